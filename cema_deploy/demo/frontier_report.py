"""The arithmetic and the report of the accuracy-uplink frontier (``cema-deploy demo --frontier``): a point per rule
and knob over seeds (mean and spread), the share a curve needs to reach an accuracy (linear interpolation), the
headline against EATA-style, the best rule over a range of shares, and ``frontier.json`` + ``frontier.png``. The
sweep that measures the points is :mod:`cema_deploy.demo.frontier`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import

#: EATA-style's natural setting, the reference of the headline.
EATA_NATURAL = 0.4
#: The rule drawn as the plot's point at 0 % uploaded (the edge alone; demo.frontier.EDGE_ALONE).
ZERO_UPLINK = "edge_stats"


@dataclass(frozen=True, kw_only=True)
class Point:
    """One rule at one knob value, over seeds."""

    knob: float
    share: float  # % of frames uploaded, mean over seeds
    share_spread: float | None
    accuracy: float  # %, mean over seeds
    spread: float | None  # standard deviation of the accuracy over seeds (points)
    seeds: int
    gap_closed: float | None = None  # share of the teacher's lead reached, mean over seeds (demo.gap)
    gap_closed_spread: float | None = None  # its standard deviation over seeds


def _sd(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1)) if len(values) > 1 else None


def point_from_runs(knob: float, runs: Sequence[tuple[float, float]]) -> Point:
    """``runs``: (accuracy %, share %) per seed."""
    acc = np.array([a for a, _ in runs], np.float64)
    share = np.array([s for _, s in runs], np.float64)
    return Point(
        knob=knob,
        share=float(share.mean()),
        share_spread=_sd(share),
        accuracy=float(acc.mean()),
        spread=_sd(acc),
        seeds=len(runs),
    )


def with_gap(point: Point, accuracies: Sequence[float], floors: Sequence[float], ceilings: Sequence[float]) -> Point:
    """``point`` with its gap closed (:func:`cema_deploy.demo.gap.gap_over_seeds`) from the per-seed accuracies,
    floors and teacher ceilings, all in seed order."""
    from cema_deploy.demo.gap import gap_over_seeds

    mean, spread = gap_over_seeds(accuracies, floors, ceilings)
    return replace(point, gap_closed=mean, gap_closed_spread=spread)


def needed_share(curve: Sequence[Point], accuracy: float) -> float | None:
    """The smallest share at which ``curve`` (sorted by share, linearly interpolated) reaches ``accuracy``; None
    when no point does."""
    pts = sorted(curve, key=lambda p: p.share)
    for i, p in enumerate(pts):
        if p.accuracy >= accuracy:
            if i == 0:
                return p.share
            q = pts[i - 1]
            if q.accuracy >= accuracy or p.accuracy == q.accuracy:
                return p.share
            return q.share + (accuracy - q.accuracy) * (p.share - q.share) / (p.accuracy - q.accuracy)
    return None


def headline(methods: dict[str, list[Point]], default: str) -> dict[str, Any]:
    """The default rule's share needed to reach EATA-style's natural-setting accuracy, as a fraction of EATA's."""
    eata = next((p for p in methods.get("eata_style", []) if math.isclose(p.knob, EATA_NATURAL)), None)
    if eata is None or default not in methods:
        return {}
    need = needed_share(methods[default], eata.accuracy)
    return {
        "default": default,
        "eata_style_share": eata.share,
        "eata_style_accuracy": eata.accuracy,
        "default_share_needed": need,
        "ratio": None if need is None else need / eata.share,
        "default_best_accuracy": max(p.accuracy for p in methods[default]),
    }


def best_rule(methods: dict[str, list[Point]], shares: Sequence[float], slack: float = 1.25) -> str | None:
    """The rule with the highest mean interpolated accuracy over ``shares`` (the tuning criterion), among the
    rules whose measured curve spans them (lowest point at most ``slack`` x the lowest share, highest point at
    least the highest share): a curve is never extrapolated, so a rule measured at one setting competes only
    where it was measured. None when no curve spans ``shares``."""

    def spans(curve: list[Point]) -> bool:
        got = [p.share for p in curve]
        return bool(got) and min(got) <= slack * min(shares) and max(got) >= max(shares)

    def acc_at(curve: list[Point], share: float) -> float:
        pts = sorted(curve, key=lambda p: p.share)
        return float(np.interp(share, [p.share for p in pts], [p.accuracy for p in pts]))

    scores = {m: float(np.mean([acc_at(c, s) for s in shares])) for m, c in methods.items() if spans(c)}
    return max(scores, key=lambda m: scores[m]) if scores else None


def write_frontier(
    panels: dict[str, dict[str, list[Point]]], default: str, main: str, out_dir: Path, meta: dict[str, Any]
) -> list[Path]:
    """``frontier.json`` (``{"default", "methods" (the main panel), "panels", "headline", ...}``, and from ``meta``
    ``"teacher_ceiling"`` and ``"floor"`` keyed by panel, means over seeds) and ``frontier.png`` (one subplot per
    panel, mean accuracy against mean share, error bars = spread, the ceiling and the floor as horizontal lines)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    as_json = {k: {m: [asdict(p) for p in pts] for m, pts in v.items()} for k, v in panels.items()}
    doc = {
        "default": default,
        "main_panel": main,
        "methods": as_json[main],
        "panels": as_json,
        "headline": {k: headline(v, default) for k, v in panels.items()},
        **meta,
    }
    path = out_dir / "frontier.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False))
    fig = frontier_figure(panels, default, meta)
    png = out_dir / "frontier.png"
    fig.savefig(png, dpi=110)
    lazy_import("matplotlib.pyplot", extra="demo").close(fig)
    return [path, png]


def frontier_figure(panels: dict[str, dict[str, list[Point]]], default: str, meta: dict[str, Any]) -> Any:
    """The frontier plot (a matplotlib figure, one subplot per panel): mean accuracy against mean share, error bars
    = spread, the baselines, the ceiling and the floor as horizontal lines. The share axis is logarithmic above 1 %
    and linear below (``symlog``), so that it starts at 0 %: the edge alone (``edge_stats``, nothing uploaded) is a
    point at x = 0, where every curve of a rule with the edge's statistics starts from."""
    matplotlib = lazy_import("matplotlib", extra="demo", purpose="the frontier plot")
    matplotlib.use("Agg")
    plt = lazy_import("matplotlib.pyplot", extra="demo")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, methods) in zip(axes[0], panels.items(), strict=True):
        for m, pts in methods.items():
            pts = sorted(pts, key=lambda p: p.share)
            ax.errorbar(
                [p.share for p in pts],
                [p.accuracy for p in pts],
                yerr=[p.spread or 0 for p in pts],
                marker="*" if m == ZERO_UPLINK else "o",
                ms=9 if m == ZERO_UPLINK else 3,
                capsize=2,
                lw=2.2 if m == default else 1.2,
                label=m + (" (default)" if m == default else "") + (" (no uplink)" if m == ZERO_UPLINK else ""),
            )
        for ref, style in (("no_adapt", ":"), ("bn_adapt", "--")):
            if ref in meta.get("baselines", {}).get(name, {}):
                ax.axhline(meta["baselines"][name][ref], color="grey", ls=style, lw=0.8, label=ref)
        for ref, color in (("teacher_ceiling", "black"), ("floor", "tab:brown")):
            if meta.get(ref, {}).get(name) is not None:
                ax.axhline(meta[ref][name], color=color, ls="-.", lw=1.0, label=ref)
        ax.set_xscale("symlog", linthresh=1.0)  # linear on [0, 1] %: 0 % uploaded is on the axis
        ax.set_xlim(left=0)
        ax.set(title=name, xlabel="frames uploaded %", ylabel="accuracy %")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
