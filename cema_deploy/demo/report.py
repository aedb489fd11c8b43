"""The demo's results: a table per corruption and overall (JSON, Markdown, rich) and PNG plots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.exceptions import CemaError

METHODS = {
    "no_adapt": "no adaptation",
    "bn_adapt": "BN statistics adaptation",
    "tent": "Tent (backprop at the edge)",
    "eata_style": "EATA-style selection + cloud",
    "cema": "CEMA",
    "cema_recal": "CEMA + recalibration on shift",
    "random": "random uploads + cloud",
    "entropy_top": "highest entropy first + cloud",
    "lead": "where the teacher disagrees (cloud's lead weights) + cloud",
    "edge_stats": "edge statistics (no cloud)",
    "edge_stats_ema": "edge statistics, ema (no cloud)",
    "edge_stats_alpha": "edge statistics, alpha (no cloud)",
    "teacher_no_adapt": "teacher, no adaptation",
    "teacher_adapted": "teacher, own adaptation (ceiling)",
}


@dataclass
class MethodRun:
    """Per-sample outcome of one method on one stream."""

    correct: np.ndarray  # bool [N]
    uploaded: np.ndarray  # bool [N]
    extra: dict[str, Any] = field(default_factory=dict)  # bytes up/down, blobs applied, fps, ...


#: Methods that run in-process at the edge (no cloud, no uploads); every other method is cloud-backed.
LOCAL_METHODS = (
    "no_adapt",
    "bn_adapt",
    "tent",
    "edge_stats",
    "edge_stats_ema",
    "edge_stats_alpha",
    "teacher_no_adapt",
    "teacher_adapted",
)


def is_cloud(method: str) -> bool:
    """Whether ``method``'s edge uploads samples to the cloud (its rows show uploaded shares and traffic)."""
    return method not in LOCAL_METHODS


def _pct(mask: np.ndarray) -> float:
    return 100 * float(mask.mean()) if len(mask) else float("nan")


def summarize(runs: dict[str, MethodRun], segment_of: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy and uploaded share per corruption and overall for every method (percentages)."""
    out: dict[str, Any] = {}
    for method, r in runs.items():
        if r.correct.shape != segment_of.shape or r.uploaded.shape != segment_of.shape:
            raise CemaError(
                f"{method}: {r.correct.shape[0]} correctness and {r.uploaded.shape[0]} upload flags for "
                f"a stream of {segment_of.shape[0]} samples; every method must cover the whole stream."
            )
        per = {
            n: {"accuracy": _pct(r.correct[segment_of == i]), "uploaded": _pct(r.uploaded[segment_of == i])}
            for i, n in enumerate(names)
        }
        out[method] = {
            "per_corruption": per,
            "accuracy": _pct(r.correct),
            "uploaded": _pct(r.uploaded),
            "uploaded_samples": int(r.uploaded.sum()),
            "samples": len(r.correct),
            **r.extra,
        }
    return out


def _mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def aggregate(per_seed: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per method: ``accuracy`` and ``uploaded`` as means over seeds with their spread (standard deviation over
    seeds; None with one seed), ``rollbacks`` summed, per-corruption means, and every seed's own summary."""
    out: dict[str, Any] = {}
    for method in per_seed[0]:
        runs = [s[method] for s in per_seed]
        acc, acc_sd = _mean_spread([r["accuracy"] for r in runs])
        up, up_sd = _mean_spread([r["uploaded"] for r in runs])
        names = list(runs[0]["per_corruption"])
        out[method] = {
            "accuracy": acc,
            "accuracy_spread": acc_sd,
            "uploaded": up,
            "uploaded_spread": up_sd,
            "rollbacks": int(sum(int(r.get("rollbacks", 0)) for r in runs)),
            "per_corruption": {
                n: {k: float(np.mean([r["per_corruption"][n][k] for r in runs])) for k in ("accuracy", "uploaded")}
                for n in names
            },
            "per_seed": [{"seed": seed, **r} for seed, r in zip(seeds, runs, strict=True)],
        }
    return out


def _cell(value: float, spread: float | None) -> str:
    return f"{value:.1f}" if spread is None else f"{value:.1f} ± {spread:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """One table per severity: rows = corruptions + overall, columns = methods (accuracy % / uploaded %)."""
    lines = []
    models = results.get("models", {})
    if models:
        lines.append("| model | timm name | clean accuracy % |\n|---|---|---:|")
        lines += [f"| {role} | {m['name']} | {m['clean_accuracy']:.1f} |" for role, m in models.items()]
        lines.append("")
    for sev, res in results["severities"].items():
        methods = list(res["methods"])
        names = list(next(iter(res["methods"].values()))["per_corruption"])
        lines.append(f"### Severity {sev}\n")
        lines.append("| corruption | " + " | ".join(METHODS.get(m, m) for m in methods) + " |")
        lines.append("|---|" + "---:|" * len(methods))
        for n in [*names, "overall"]:
            cells = []
            for m in methods:
                r = res["methods"][m]
                c = r if n == "overall" else r["per_corruption"][n]
                acc = _cell(c["accuracy"], c.get("accuracy_spread") if n == "overall" else None)
                up = _cell(c["uploaded"], c.get("uploaded_spread") if n == "overall" else None)
                cells.append(acc + (f" / {up}% up" if is_cloud(m) else ""))
            lines.append(f"| {'**overall**' if n == 'overall' else n} | " + " | ".join(cells) + " |")
        lines.append("")
        cloud = [m for m in methods if is_cloud(m)]
        if cloud:
            lines.append(
                "| method (first seed) | uploaded | MB up | MB down | blobs applied | rollbacks | edge frames/s |"
            )
            lines.append("|---|---:|---:|---:|---:|---:|---:|")
            for m in cloud:
                r = res["methods"][m]
                r0 = r["per_seed"][0] if "per_seed" in r else r
                lines.append(
                    f"| {METHODS.get(m, m)} | {r0['uploaded_samples']} of {r0['samples']} ({r0['uploaded']:.1f} %) | "
                    f"{r0.get('bytes_up', 0) / 1e6:.2f} | {r0.get('bytes_down', 0) / 1e6:.2f} | "
                    f"{r0.get('blobs_applied', 0)} | {r0.get('rollbacks', 0)} | {r0.get('edge_fps', 0):.0f} |"
                )
            lines.append("")
    for m, why in (results.get("skipped") or {}).items():
        lines.append(f"{METHODS.get(m, m)}: {why}.")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf floats as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_outputs(
    results: dict[str, Any],
    runs: dict[int, dict[str, MethodRun]],
    out_dir: Path,
    boundaries: dict[int, list[tuple[int, str]]] | None = None,
) -> list[Path]:
    """results.json, results.md, and per severity accuracy-over-stream and cumulative-uploads PNGs (of the first
    seed), with the corruption boundaries marked and named when ``boundaries`` gives them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    (out_dir / "results.md").write_text(markdown(results))
    paths = [out_dir / "results.json", out_dir / "results.md"]
    matplotlib = lazy_import("matplotlib", extra="demo", purpose="the demo's plots")
    matplotlib.use("Agg")
    plt = lazy_import("matplotlib.pyplot", extra="demo")
    for sev, method_runs in runs.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for m, r in method_runs.items():
            w = max(1, min(500, len(r.correct) // 20))
            ma = np.convolve(r.correct.astype(float), np.ones(w) / w, mode="valid") * 100
            ax1.plot(np.arange(len(ma)) + w, ma, label=METHODS.get(m, m))
            ax2.plot(np.cumsum(r.uploaded), label=METHODS.get(m, m))
        ax1.set(
            title=f"accuracy over the stream (moving average), severity {sev}",
            xlabel="samples seen",
            ylabel="accuracy %",
        )
        ax2.set(title=f"cumulative uploads, severity {sev}", xlabel="samples seen", ylabel="samples uploaded")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            for pos, name in (boundaries or {}).get(sev, []):
                ax.axvline(pos, color="grey", lw=0.6, ls=":")
                if ax is ax1:
                    ax.text(
                        pos,
                        1.0,
                        " " + name.replace("_", " "),
                        transform=ax.get_xaxis_transform(),
                        rotation=90,
                        va="top",
                        ha="left",
                        fontsize=6,
                        color="dimgrey",
                    )
        fig.tight_layout()
        path = out_dir / f"stream_severity{sev}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for sev, res in results["severities"].items():
        methods = list(res["methods"])
        t = Table(title=f"severity {sev}: accuracy % (uploaded %)")
        t.add_column("corruption")
        for m in methods:
            t.add_column(METHODS.get(m, m), justify="right")
        names = list(next(iter(res["methods"].values()))["per_corruption"])
        for n in [*names, "overall"]:
            row = []
            for m in methods:
                r = res["methods"][m]
                c = r if n == "overall" else r["per_corruption"][n]
                spread = c.get("accuracy_spread") if n == "overall" else None
                row.append(_cell(c["accuracy"], spread) + (f" ({c['uploaded']:.0f}%)" if is_cloud(m) else ""))
            t.add_row("[b]overall[/]" if n == "overall" else n, *row)
        console.print(t)
    for m, why in (results.get("skipped") or {}).items():
        console.print(f"{METHODS.get(m, m)}: {why}.")
