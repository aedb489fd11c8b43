"""The printed form of a bench report (``cema-deploy bench`` and ``benchmarks/bench_backends.py``): the
throughput/latency table, the same-run ratios, and one line per refit measurement."""

from __future__ import annotations

from typing import Any

from rich.console import Console


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print a :func:`~cema_deploy.bench.table.run_bench` report: the throughput/latency table, the ratios, the
    refit lines (on ``console``, by default a plain one on stdout)."""
    from rich.table import Table

    console = console if console is not None else Console(highlight=False)

    t = Table(title=f"{report['model']} — throughput (img/s) and latency (ms)")
    for col in ("backend", "engine", "batch", "img/s", "p50", "p90", "p99"):
        t.add_column(col, justify="right" if col not in ("backend", "engine") else "left")
    for r in report["rows"]:
        t.add_row(
            r["backend"],
            r["engine"],
            str(r["batch"]),
            f"{r['throughput']:.1f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
        )
    console.print(t)
    rt = Table(title="Ratios, same run: mean throughput (median-latency throughput)")
    for col in ("backend", "batch", "refittable / folded", "edge step / bare", "torch eager / refittable"):
        rt.add_column(col, justify="right" if col != "backend" else "left")

    def cell(r: dict[str, Any], key: str) -> str:
        mean, p50 = r.get(key), r.get(key + "_p50")
        return "n/a" if mean is None else f"{mean:.3f} ({p50:.3f})" if p50 is not None else f"{mean:.3f}"

    for r in report["ratios"]:
        rt.add_row(
            r["backend"],
            str(r["batch"]),
            *(cell(r, k) for k in ("refittable_vs_folded", "edge_step_vs_bare", "torch_eager_vs_refittable")),
        )
    console.print(rt)
    for r in report["refit"]:
        tg = r["targets"]
        console.print(
            f"[bold]refit[/] {r['backend']} ({r['refit_path']}, median of {r['repeats']}): blob {r['blob_bytes']:,} B, "
            f"version {r['version'][0]} -> {r['version'][1]}, received->serving {r['received_to_serving_ms']:.0f} ms "
            f"(parse {r['parse_ms']:.1f}, validate {r['validate_ms']:.1f}, build {r['build_ms']:.0f}, warm-up "
            f"{r['warmup_ms']:.0f}) vs idle plain build {r['idle_build_ms']:.0f} ms "
            f"(x{tg['serving_vs_idle_build']:.2f}); "
            f"first response with the new version {r['received_to_first_new_response_ms']:.0f} ms "
            f"(x{tg['first_new_vs_build_plus_p99']:.2f} of build + warm-up + steady p99; it took "
            f"{r['first_new_response_latency_ms']:.0f} ms); {r['requests_during_refit']:.0f} requests during it, "
            f"{r['failed_requests']} failed; throughput {r['throughput_during_refit']} vs steady "
            f"{r['steady_throughput']} img/s; max latency {r['max_latency_during_refit_ms']:.1f} ms vs steady p99 "
            f"{r['steady_p99_ms']:.1f} ms (x{tg['max_latency_vs_steady_p99']:.2f})"
        )
    s = report.get("sustained_refit")
    if s:
        console.print(
            f"[bold]sustained refits[/] {s['backend']} ({s['refit_path']}): {s['seconds']:.0f} s, a blob every "
            f"{s['refit_every_s']:g} s: {s['refits']} applied, {s['refits_coalesced']} coalesced, "
            f"{s['refits_failed']} failed; {s['failed_requests']} of {s['requests']} requests failed; throughput "
            f"{s['throughput']} vs steady {s['steady_throughput']} img/s (x{s['throughput_ratio']}); p99 "
            f"{s['p99_ms']:.1f} vs steady {s['steady_p99_ms']:.1f} ms; RSS {s['rss_after_10s_mb']:.0f} MB after "
            f"10 s, {s['rss_mb']:.0f} MB at the end ({s['rss_growth_pct']:+.1f} %)"
        )
        iv = s.get("interleaved") or {}
        console.print(
            f"[bold]sustained refits[/] applied {s['refits_applied_per_s']}/s of {s['refits_offered_per_s']}/s "
            f"offered; throughput by CPU time x{s['throughput_ratio_cpu']}; interleaved windows with/without "
            f"refits ({iv.get('pairs')} pairs): x{iv.get('throughput_ratio_wall')} wall, "
            f"x{iv.get('throughput_ratio_cpu')} CPU"
        )
