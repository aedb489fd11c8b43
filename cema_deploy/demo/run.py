"""The demo's orchestration: data, models, export, baselines, then the cloud-backed methods over real HTTP.

Two protocols (``DemoConfig.protocol``):

* ``reset`` (the paper's: chenyaofo/CEMA's ``main.py`` builds a fresh edge model and teacher for every
  (corruption, severity) pair): per corruption the operator resets the deployment (``POST
  /v1/admin/deployments/NAME/reset`` with an admin token: fresh adaptation state, versions keep rising) and a
  fresh ``edge run`` process (fresh selector) streams that corruption, shuffled with a seeded generator.
* ``continual`` (our extension): one edge process streams the corruptions back to back (each shuffled within).

For each severity and cloud-backed method one ``cema-deploy cloud serve`` process runs on 127.0.0.1 and
torch-free ``cema-deploy edge run`` processes (they never import torch and never run a backward pass) stream the
images through ONNX Runtime, upload what their rule selects and hot-refit from the blobs. ``--sync`` makes each
edge batch wait for the blob that includes its uploads, as the paper's simulation does, so runs are
reproducible on a slow machine. Claims run over several seeds (``seeds``): each seed draws the corruptions,
shuffles the stream and seeds the selection's and the cloud's draws; the models are trained once (``train_seed``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.demo import baselines
from cema_deploy.demo.edge_only import (
    EDGE_ONLY_METHODS,
    NEEDS_BATCH_STATISTICS,
    STATS_SUFFIX,
    STREAM_ORDERS,
    ordered,
    run_edge_only,
    split_stats,
    stats_flags,
)
from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, TrainedModel, TrainSpec, load_model, resolve_models
from cema_deploy.demo.report import MethodRun, aggregate, summarize
from cema_deploy.demo.stream import (
    CORRUPTIONS,
    QUICK_CORRUPTIONS,
    LazyImages,
    Segment,
    Stream,
    corrupted_stream,
    digits_splits,
)
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.selection.rules import DEFAULT_SHARE

PROTOCOLS = ("reset", "continual")
#: W of the dynamic E_max per protocol (Eqn. 4). The paper's W counts samples of a 50,000-image corruption; a
#: reset corruption of the demo is 899 samples, so a W of 1,000 would never end: 128 (two edge batches) there,
#: 512 on the continual stream of 11,687.
WARMUP = {"reset": 128, "continual": 512}

#: Cloud-backed methods: ``edge run`` selection options of each (the share rules' share is ``DemoConfig.share``).
SELECTION_ARGS: dict[str, list[str]] = {
    "cema": ["--selection", "cema"],
    "cema_recal": ["--selection", "cema", "--recalibrate"],
    "eata_style": ["--selection", "eata"],
    "random": ["--selection", "random"],
    "entropy_top": ["--selection", "entropy-top"],
    "lead": ["--selection", "lead"],
}
#: Uploads the cloud measures its lead weights on when the demo runs the ``lead`` rule (``CemaConfig.lead_frames``;
#: the other rules run a cloud that sends none): a third of the demo's replay window of 400.
LEAD_FRAMES = 128
#: Cloud rules that ``RULE+stats`` accepts (the edge's statistics adapter on, with ``edge_stats``'s settings).
STATS_RULES = ("cema", "cema_recal", "eata_style", "random", "entropy_top")
#: The default rule of the toolkit, as the demo runs it (see README "Which selection rule").
DEFAULT_METHOD = "random"  # runtime.selection.DEFAULT_PRESET, by its demo name
#: The paper's methods: under ``--cloud-preset auto`` their cloud runs the paper's settings (the ``cema`` preset).
PAPER_METHODS = ("cema", "eata_style", "cema_recal")


def check_cloud_preset(name: str) -> None:
    """Refuse a ``demo --cloud-preset`` that is neither ``auto`` nor a :data:`~cema_deploy.cloud.config.CEMA_PRESETS`
    name."""
    from cema_deploy.cloud.config import CEMA_PRESETS

    if name not in (*CEMA_PRESETS, "auto"):
        raise CemaError(f"--cloud-preset must be one of auto, {', '.join(CEMA_PRESETS)}, got {name!r}.")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    severities: tuple[int, ...] = (3, 5)
    corruptions: tuple[str, ...] = CORRUPTIONS
    per_corruption: int | None = None  # samples per corruption (None: the whole test split)
    methods: tuple[str, ...] = ("no_adapt", "bn_adapt", "tent", "eata_style", "cema", DEFAULT_METHOD)
    protocol: str = "reset"
    seeds: int = 1  # stream seeds seed, seed + 1, ...
    seed: int = 0  # the first stream seed
    train_seed: int = 0  # seed of the split and of the models' training
    edge_batch: int = 64  # official edge batch
    cloud_batch: int = 32  # official cloud batch B
    warmup: int | None = None  # W for CEMA's dynamic E_max; None: WARMUP[protocol]
    share: float = DEFAULT_SHARE  # upload share of the share rules (random, entropy_top)
    d_margin: str = "off"  # redundancy rule in the selective methods
    # Replay buffer, scaled to the stream. The paper's 10,000 samples hold less than what one ImageNet-C
    # corruption uploads (14,434-22,002 of 50,000 per corruption in the authors' log), so replay draws from the
    # current shift; a corruption here uploads 100-700 of 899 samples, and 400 keeps that regime.
    replay_size: int = 400
    sync: bool = True
    concurrent_runs: int = 2  # cloud-backed runs at once (each a cloud and an edge process)
    stream_order: str = "shuffled"  # or "sorted": grouped by class within each corruption (demo/edge_only.py)
    edge_epochs: int | None = None  # None: the edge recipe's (models.EDGE_DEFAULT)
    teacher_epochs: int | None = None  # None: the teacher recipe's (models.TEACHER_DEFAULT)
    teacher_rows: bool = True  # the teacher_no_adapt / teacher_adapted rows and gap_closed (demo.teacher_ceiling)
    refit: str = "norms"  # what the edge export's refit carries: "norms" (paper) or "head" (export --refit head)
    # `cloud serve --cloud-preset` of every cloud-backed method: "default" (CemaConfig's), "cema" (the paper's) or
    # "auto": the paper's methods (PAPER_METHODS, with or without +stats) run the paper's settings, so their rows
    # reproduce the paper, and the toolkit's rules (random, entropy_top, lead) its defaults
    cloud_preset: str = "auto"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise CemaError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}.")
        local = (*baselines.BASELINES, *EDGE_ONLY_METHODS)
        bad_stats = [m for m in self.methods if m.endswith(STATS_SUFFIX) and split_stats(m)[0] not in STATS_RULES]
        if bad_stats:
            raise CemaError(
                f"Unknown demo methods {bad_stats}: {STATS_SUFFIX} turns on the edge's statistics under a cloud rule, "
                f"one of {', '.join(STATS_RULES)} (e.g. random{STATS_SUFFIX}); for the edge alone use edge_stats."
            )
        unknown = [m for m in self.methods if m not in local and split_stats(m)[0] not in SELECTION_ARGS]
        if unknown:
            known = [*local, *SELECTION_ARGS, *(r + STATS_SUFFIX for r in STATS_RULES)]
            raise CemaError(f"Unknown demo methods {unknown}; choose from {', '.join(known)}.")
        if self.seeds < 1:
            raise CemaError(f"--seeds must be >= 1, got {self.seeds}.")
        if self.edge_batch < 1 or self.stream_order not in STREAM_ORDERS:
            raise CemaError(
                f"--edge-batch must be >= 1 and --stream one of {', '.join(STREAM_ORDERS)}; got {self.edge_batch}, "
                f"{self.stream_order!r}."
            )
        check_cloud_preset(self.cloud_preset)

    def cloud_preset_of(self, method: str) -> str:
        """The ``cloud serve --cloud-preset`` a cloud-backed ``method`` runs with (see :attr:`cloud_preset`)."""
        if self.cloud_preset != "auto":
            return self.cloud_preset
        return "cema" if split_stats(method)[0] in PAPER_METHODS else "default"

    @property
    def skipped(self) -> dict[str, str]:
        """Methods of ``methods`` that do not run with this configuration, and why."""
        if self.edge_batch >= 2:
            return {}
        why = f"needs batch statistics; skipped at edge batch {self.edge_batch}"
        return {m: why for m in self.methods if m in NEEDS_BATCH_STATISTICS}

    @property
    def w(self) -> int:
        return self.warmup if self.warmup is not None else WARMUP[self.protocol]

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """4 corruptions x 300 samples with shorter-trained models (their own cache entries): about 2 minutes from
        an empty cache, for tests and a first look."""
        return cls(
            **{"corruptions": QUICK_CORRUPTIONS, "per_corruption": 300, "edge_epochs": 4, "teacher_epochs": 8, **kw}
        )


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cema_deploy", *args]


def _check_run(r: subprocess.CompletedProcess[str], what: str) -> None:
    if r.returncode != 0:
        raise CemaError(f"The demo's {what} failed ({r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")


class _Cloud:
    """``cema-deploy cloud serve`` on a free port of 127.0.0.1, with a device token and an admin token."""

    def __init__(
        self,
        edge_dir: Path,
        teacher: TrainedModel,
        state: Path,
        cfg: DemoConfig,
        seed: int,
        cloud_args: tuple[str, ...] = (),
    ) -> None:
        port_file = state.parent / f"{state.name}.port"
        self.log = state.parent / f"{state.name}.log"
        self.token_file, self.admin_file = state.parent / f"{state.name}.token", state.parent / f"{state.name}.admin"
        for name, path, extra in (
            ("demo-edge", self.token_file, ["--all"]),
            ("demo-admin", self.admin_file, ["--admin"]),
        ):
            r = subprocess.run(
                _cli("cloud", "token", "add", name, "--state", str(state), *extra), capture_output=True, text=True
            )
            _check_run(r, "token creation")
            path.write_text(r.stdout.strip().splitlines()[-1])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        args = [
            "cloud",
            "serve",
            "--edge",
            str(edge_dir),
            "--teacher",
            teacher.name,
            "--teacher-weights",
            str(teacher.checkpoint),
            "--state",
            str(state),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--batch-size",
            str(cfg.cloud_batch),
            "--seed",
            str(seed),
            "--replay-size",
            str(cfg.replay_size),
            "--threads",
            "1",
            "--log-level",
            "warning",
            *cloud_args,
        ]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(_cli(*args), stdout=f, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while not (port_file.exists() and port_file.read_text()):
            if self.proc.poll() is not None or time.time() - t0 > 180:
                self.stop()
                raise CemaError(f"The demo's cloud did not start; its log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{port_file.read_text()}"

    def reset(self) -> int:
        """Reset the (single) deployment as an operator would; returns its new generation."""
        from cema_deploy.runtime.link.client import AdminClient

        with AdminClient(self.url, self.admin_file.read_text().strip()) as admin:
            (model,) = admin.models()
            return admin.reset(model.name).generation

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _write_source(segments: list[Segment], path: Path) -> Path:
    """The edge's ``--source``: a .npy of the segments in memory, or a folder of links in stream order for
    images read on demand (ImageNet-C), so the edge process never holds more than a batch."""
    if not any(isinstance(s.images, LazyImages) for s in segments):
        np.save(path.with_suffix(".npy"), np.concatenate([np.asarray(s.images) for s in segments]))
        return path.with_suffix(".npy")
    path.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in segments:
        assert isinstance(s.images, LazyImages)
        for p in s.images.paths:
            (path / f"{i:09d}{p.suffix.lower()}").symlink_to(p.resolve())
            i += 1
    return path


def _edge_run(
    method: str,
    segments: list[Segment],
    edge_dir: Path,
    cloud: _Cloud,
    work: Path,
    cfg: DemoConfig,
    seed: int,
    tag: str,
) -> dict[str, Any]:
    """One ``edge run`` process over ``segments``; returns its predictions, selection flags and metrics."""
    source = _write_source(segments, work / f"stream-{tag}")
    labels = np.concatenate([s.labels for s in segments])
    np.save(work / f"labels-{tag}.npy", labels)
    args = cloud_method_args(method, cfg)
    cmd = _cli(
        "edge",
        "run",
        str(edge_dir),
        "--source",
        str(source),
        "--labels",
        str(work / f"labels-{tag}.npy"),
        "--cloud",
        cloud.url,
        "--token-file",
        str(cloud.token_file),
        *args,
        "--batch",
        str(cfg.edge_batch),
        "--warmup",
        str(cfg.w),
        "--d-margin",
        cfg.d_margin,
        "--seed",
        str(seed),
        "--predictions",
        str(work / f"pred-{tag}.npz"),
        "--json",
        str(work / f"metrics-{tag}.json"),
        "--quiet",
        "--threads",
        "1",
        "--device-id",
        f"demo-{method}",
    )
    if cfg.sync:
        cmd.append("--sync")
    r = subprocess.run(cmd, capture_output=True, text=True)
    _check_run(r, f"edge process ({method}, {tag})")
    pred = np.load(work / f"pred-{tag}.npz")
    return {"pred": pred, "labels": labels, "metrics": json.loads((work / f"metrics-{tag}.json").read_text())}


def cloud_method_args(method: str, cfg: DemoConfig) -> list[str]:
    """``edge run`` options of a cloud-backed method: its rule's selection (and share), and with ``RULE+stats`` the
    statistics adapter at ``edge_stats``'s settings (demo/edge_only.py)."""
    rule, with_stats = split_stats(method)
    args = [*SELECTION_ARGS[rule]]
    if rule in ("random", "entropy_top", "lead"):
        args += ["--upload-share", str(cfg.share)]
    return args + (stats_flags() if with_stats else [])


def run_cloud_method(
    method: str, stream: Stream, edge_dir: Path, teacher: TrainedModel, work: Path, cfg: DemoConfig, seed: int
) -> MethodRun:
    """One cloud-backed method on one stream under ``cfg.protocol``: one cloud process and its edge processes."""
    work.mkdir(parents=True, exist_ok=True)
    lead = ("--cloud-set", f"lead_frames={LEAD_FRAMES}") if split_stats(method)[0] == "lead" else ()
    preset = ("--cloud-preset", cfg.cloud_preset_of(method))
    cloud = _Cloud(edge_dir, teacher, work / "cloud-state", cfg, seed, cloud_args=(*preset, *lead))
    try:
        if cfg.protocol == "reset":
            parts = []
            for i, seg in enumerate(stream.segments):
                cloud.reset()
                parts.append(_edge_run(method, [seg], edge_dir, cloud, work, cfg, seed * 1000 + i, f"c{i:02d}"))
        else:
            parts = [_edge_run(method, list(stream.segments), edge_dir, cloud, work, cfg, seed, "all")]
    finally:
        cloud.stop()
    predictions = np.concatenate([p["pred"]["predictions"] for p in parts])
    uploaded = np.concatenate(
        [p["pred"]["uploaded"] if "uploaded" in p["pred"] else p["pred"]["selected"] for p in parts]
    ).astype(bool)
    metrics = [p["metrics"] for p in parts]

    def total(key: str, *path: str) -> int:
        out = 0
        for m in metrics:
            v: Any = m
            for k in (*path, key):
                v = v.get(k, 0) if isinstance(v, dict) else 0
            out += int(v)
        return out

    refused: dict[str, int] = {}
    for m in metrics:
        for k, v in m.get("refused", {}).items():
            refused[k] = refused.get(k, 0) + int(v)
    sel = {k: total(k, "selection") for k in ("seen", "selected", "unreliable", "low_info", "redundant", "not_drawn")}
    frames = {f"{k}_frames": total(k, "selection") for k in ("uploaded", "calibration", "statistics")}
    stats = [m.get("stats") or {} for m in metrics]  # the edge's own statistics adapter (RULE+stats)
    return MethodRun(
        correct=predictions == stream.labels,
        uploaded=uploaded,
        extra={
            "bytes_up": total("bytes_sent", "uplink"),
            "bytes_down": total("bytes_received"),
            "blobs_applied": total("blobs_applied"),
            "edge_fps": float(np.mean([m["fps"] for m in metrics])),
            "final_version": int(metrics[-1]["version"]),
            **sel,
            **frames,
            "rollbacks": total("rollbacks"),
            "refused": refused,
            "selection_config": metrics[0].get("selection_config", {}),
            "stats_mode": stats[0].get("mode", "off"),
            "stats_probes": int(sum(s.get("probes", 0) for s in stats)),
            "stats_local_generation": int(sum(s.get("local_generation", 0) for s in stats)),
        },
    )


def _epochs(spec: TrainSpec, epochs: int | None) -> TrainSpec:
    return spec if epochs is None else dataclasses.replace(spec, epochs=epochs)


def _run_cloud_methods(
    methods: list[str],
    stream: Stream,
    edge_dir: Path,
    teacher: TrainedModel,
    out_dir: Path,
    tag: str,
    cfg: DemoConfig,
    seed: int,
) -> dict[str, MethodRun]:
    """The cloud-backed runs of one stream, ``cfg.concurrent_runs`` at a time. Each has its own cloud and edge
    processes, and ``--sync`` makes every edge batch wait for the blob of its own uploads, so the results do not
    depend on timing."""

    def one(method: str) -> MethodRun:
        t0 = time.perf_counter()
        run = run_cloud_method(method, stream, edge_dir, teacher, out_dir / f"{tag}-{method}", cfg, seed)
        run.extra["seconds"] = round(time.perf_counter() - t0, 1)
        return run

    if cfg.concurrent_runs <= 1 or len(methods) == 1:
        return {m: one(m) for m in methods}
    with ThreadPoolExecutor(max_workers=cfg.concurrent_runs) as pool:  # threads only wait on subprocesses
        futures = {m: pool.submit(one, m) for m in methods}
        return {m: f.result() for m, f in futures.items()}


def run_stream(
    stream: Stream,
    edge_model: Any,
    edge_dir: Path,
    teacher: TrainedModel,
    out_dir: Path,
    tag: str,
    cfg: DemoConfig,
    seed: int,
    on_step: Callable[[str], None],
) -> dict[str, MethodRun]:
    """Every method of ``cfg`` on one (already shuffled) stream."""
    none = np.zeros(len(stream), bool)
    runs: dict[str, MethodRun] = {}
    for method in [m for m in cfg.methods if m in baselines.BASELINES and m not in cfg.skipped]:
        on_step(f"{tag}: {method}")
        t0 = time.perf_counter()
        batch = max(2, cfg.edge_batch)  # only no_adapt runs below 2 (skipped), and its predictions ignore the batch
        res = baselines.run_baseline(method, edge_model, stream, batch=batch, protocol=cfg.protocol)
        runs[method] = MethodRun(
            res.correct,
            none,
            {"edge_fps": round(res.frames_per_second, 1), "seconds": round(time.perf_counter() - t0, 1)},
        )
    for method in [m for m in cfg.methods if m in EDGE_ONLY_METHODS]:
        on_step(f"{tag}: {method} (torch-free edge process alone, no cloud)")
        t0 = time.perf_counter()
        work = out_dir / f"{tag}-{method}"
        runs[method] = run_edge_only(method, stream, edge_dir, work, batch=cfg.edge_batch, protocol=cfg.protocol)
        runs[method].extra["seconds"] = round(time.perf_counter() - t0, 1)
    cloud = [m for m in cfg.methods if m not in baselines.BASELINES and m not in EDGE_ONLY_METHODS]
    if cloud:
        on_step(f"{tag}: {' and '.join(cloud)} (cloud + torch-free edge processes)")
        runs.update(_run_cloud_methods(cloud, stream, edge_dir, teacher, out_dir, tag, cfg, seed))
    out = {m: runs[m] for m in cfg.methods if m in runs}
    if cfg.teacher_rows:
        from cema_deploy.demo.teacher_ceiling import teacher_runs

        on_step(f"{tag}: the teacher's rows (no adaptation, own adaptation)")
        out.update(
            teacher_runs(
                load_model(teacher.name, teacher.checkpoint),
                stream,
                protocol=cfg.protocol,
                # the teacher adapts in the cloud: below an edge batch of 2 (no batch statistics) it sees the
                # cloud's batches instead
                edge_batch=cfg.edge_batch if cfg.edge_batch >= 2 else cfg.cloud_batch,
                cloud_batch=cfg.cloud_batch,
            )
        )
    return out


def _gap(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"gap_closed": ...}`` for a severity's results (demo.gap), or nothing without the rows it needs."""
    from cema_deploy.demo.gap import results_gap

    got = results_gap(per_seed)
    return {"gap_closed": got} if got else {}


def run_demo(
    out_dir: Path,
    cfg: DemoConfig,
    *,
    edge: str | None = None,
    teacher: str | None = None,
    on_step: Callable[[str], None] = lambda _m: None,
) -> tuple[dict[str, Any], dict[int, dict[str, MethodRun]], dict[int, list[tuple[int, str]]]]:
    """The whole comparison; returns the results dict, the first seed's per-sample runs and the corruption
    boundaries per severity (for plots)."""
    import torch

    from cema_deploy.export.to_onnx import export_timm

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    on_step("digits: train/test split, 32x32 RGB")
    splits = digits_splits(cfg.train_seed)
    on_step("edge and teacher models (trained once, cached)")
    models = resolve_models(
        edge,
        teacher,
        splits,
        seed=cfg.train_seed,
        edge_spec=_epochs(EDGE_DEFAULT, cfg.edge_epochs),
        teacher_spec=_epochs(TEACHER_DEFAULT, cfg.teacher_epochs),
    )
    edge_tm, teacher_tm = models.edge, models.teacher
    edge_model = load_model(edge_tm.name, edge_tm.checkpoint)
    on_step(f"export {edge_tm.name} to a refittable ONNX model")
    edge_dir = out_dir / "edge-model"
    export_timm(edge_tm.name, edge_dir, model=edge_model, img_size=splits[0].shape[1], force=True, refit=cfg.refit)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    results: dict[str, Any] = {
        "protocol": cfg.protocol,
        "seeds": seeds,
        "config": {**dataclasses.asdict(cfg), "warmup": cfg.w},
        "models": {
            role: {
                "name": tm.name,
                "clean_accuracy": 100 * tm.clean_accuracy,
                "train_seconds": round(tm.train_seconds, 1),
                "cached": tm.cached,
                "checkpoint": str(tm.checkpoint),
                "train_seed": cfg.train_seed,
            }
            for role, tm in (("edge", edge_tm), ("teacher", teacher_tm))
        },
        "severities": {},
        "skipped": cfg.skipped,
    }
    first_runs: dict[int, dict[str, MethodRun]] = {}
    boundaries: dict[int, list[tuple[int, str]]] = {}
    for sev in cfg.severities:
        per_seed = []
        for seed in seeds:
            tag = f"s{sev}-seed{seed}"
            on_step(
                f"severity {sev}, seed {seed}: corrupt and shuffle the test stream ({len(cfg.corruptions)} corruptions)"
            )
            x_te, y_te = splits[2], splits[3]
            if cfg.per_corruption is not None:
                x_te, y_te = x_te[: cfg.per_corruption], y_te[: cfg.per_corruption]
            stream = corrupted_stream(x_te, y_te, severity=sev, corruptions=cfg.corruptions, seed=seed)
            stream = ordered(stream, cfg.stream_order, seed)
            runs = run_stream(stream, edge_model, edge_dir, teacher_tm, out_dir, tag, cfg, seed, on_step)
            per_seed.append(summarize(runs, stream.segment_of, [s.name for s in stream.segments]))
            if seed == seeds[0]:
                first_runs[sev], boundaries[sev] = runs, stream.boundaries
        results["severities"][str(sev)] = {"methods": aggregate(per_seed, seeds), **_gap(per_seed)}
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    return results, first_runs, boundaries
