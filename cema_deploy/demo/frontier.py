"""The accuracy-uplink frontier: accuracy against the share of frames uploaded, one curve per selection rule, mean
and spread over seeds (``cema-deploy demo --frontier``).

Each point is one rule at one setting of its knob, run over the demo's stream under one protocol and severity, on
every seed: ``cema`` by its upload budget (the paper's rules, E_max's scale steered, E_min kept;
a budget of 1.0 is no budget: the paper's rule as it is), ``eata_style`` by E_0, ``random`` and ``entropy_top`` by
their share, ``cema_stats`` (CEMA's rule plus a uniform 5 % of statistics samples, from which alone the cloud
estimates BatchNorm statistics) by budget; ``RULE+stats`` (``random+stats``, ``cema+stats``, ``eata_style+stats``,
``entropy_top+stats``) is the rule with the edge's own statistics adapter on, at ``edge_stats``'s settings
(:data:`~cema_deploy.demo.edge_only.EDGE_STATS_SETTINGS`), by the rule's knob; ``edge_stats`` is the edge alone (no
cloud, nothing uploaded: the plot's point at 0 %). The *share* of a point is what was measured, calibration batches and
statistics samples included, not the knob. The redundancy rule (EATA Eqn. 6) is off for every rule here
(``d_margin=None``; FACTS.md: its threshold was made for 1,000 classes; on 10 classes nearly every softmax vector lies
close to the moving average); the demo runs it with ``d_margin="auto"``. ``frontier.json`` records ``d_margin``.

The runs are in-process: the edge is the real :class:`~cema_deploy.runtime.edge.EdgeRuntime` on an ONNX Runtime
session, the cloud the real local engine's deployment, joined by :class:`~cema_deploy.cloud.local_link.LocalLink`
(no HTTP, no PNG encoding), in ``--sync`` mode, so a point does not depend on timing (:func:`run_job`'s ``pace``
runs one with the edge not waiting instead: issue 22's honest timing). The demo (``cema-deploy
demo``) runs the same rules over real HTTP with separate processes.

Headline: the share of EATA-style's uploads (at its natural setting, E_0 = 0.4 ln C) that the default rule needs
to reach EATA-style's accuracy, read off the default rule's curve by linear interpolation.

This module is the sweep (the knobs, the jobs, the in-process runner, :func:`run_frontier`); the arithmetic of the
points and the report (``frontier.json``, ``frontier.png``) are :mod:`cema_deploy.demo.frontier_report`, whose names
are importable from here too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.demo.diagnosis import Diagnosis
from cema_deploy.demo.frontier_report import (
    EATA_NATURAL,
    ZERO_UPLINK,
    Point,
    best_rule,
    headline,
    needed_share,
    point_from_runs,
    with_gap,
    write_frontier,
)
from cema_deploy.exceptions import CemaError

__all__ = [
    "EATA_NATURAL",
    "EDGE_ALONE",
    "RULES",
    "STATS_RULES",
    "SWEEP",
    "Job",
    "Point",
    "best_rule",
    "check_rules",
    "headline",
    "jobs_for",
    "needed_share",
    "parse_sweep",
    "point_from_runs",
    "run_frontier",
    "run_job",
    "write_frontier",
]

#: Knob values per rule (what each point asks for; the measured share is what is plotted).
SWEEP: dict[str, tuple[float, ...]] = {
    "cema": (0.05, 0.1, 0.2, 0.4, 1.0),  # upload budget; 1.0: no budget (the paper's rule as it is)
    "eata_style": (0.1, 0.2, 0.3, 0.4, 0.6),  # E_0 / ln C (0.4: its natural setting)
    "random": (0.02, 0.05, 0.1, 0.2, 0.4, 0.8),  # share
    "entropy_top": (0.02, 0.05, 0.1, 0.2, 0.4),  # share
    "lead": (0.05, 0.1, 0.25, 0.4),  # share (the cloud sends lead weights: CemaConfig.lead_frames = LEAD_FRAMES)
    "cema_stats": (0.05, 0.1, 0.2, 0.4, 1.0),  # upload budget (1.0: none), with 5 % statistics samples
}
#: Rules that run with the edge's statistics on as ``RULE+stats`` (same knob and sweep as RULE).
STATS_RULES = ("cema", "eata_style", "random", "entropy_top")
#: The edge alone with its statistics adapter (no cloud): one point, at 0 % uploaded; its knob means nothing.
EDGE_ALONE = ZERO_UPLINK
SWEEP |= {f"{r}+stats": SWEEP[r] for r in STATS_RULES} | {EDGE_ALONE: (0.0,)}


def check_rules(rules: Sequence[str]) -> None:
    """Refuse a frontier rule that does not exist, naming the valid ones."""
    unknown = [r for r in rules if r not in SWEEP]
    if unknown:
        raise CemaError(f"Unknown frontier rules {unknown}; choose from {', '.join(SWEEP)}.")


def _stats_on(rule: str) -> bool:
    """Whether ``rule``'s edge runs its own statistics adapter."""
    from cema_deploy.demo.edge_only import split_stats

    return rule == EDGE_ALONE or split_stats(rule)[1]


def skipped_at(edge_batch: int, rules: Sequence[str]) -> dict[str, str]:
    """Rules of ``rules`` and baselines that do not run at ``edge_batch`` frames a batch, and why: below 2 frames
    ``bn_adapt`` has no batch statistics (as the demo skips it), and a rule without the edge's statistics would
    calibrate the cloud's statistics on a single frame (its calibration batch is one edge batch); ``RULE+stats``
    and ``edge_stats`` run (the edge owns its statistics and sends no calibration batch)."""
    if edge_batch >= 2:
        return {}
    calibrates = (
        f"its cloud's statistics come from a calibration batch of one edge batch, a single frame at edge batch "
        f"{edge_batch}; skipped (RULE+stats runs: the edge owns its statistics)"
    )
    return {
        "bn_adapt": f"needs batch statistics; skipped at edge batch {edge_batch}",
        **{r: calibrates for r in rules if not _stats_on(r)},
    }


def parse_sweep(text: str) -> dict[str, tuple[float, ...]]:
    """``'random=0.05,0.2;cema=1'`` -> ``{"random": (0.05, 0.2), "cema": (1.0,)}`` (``demo --sweep``)."""
    from cema_deploy.exceptions import CemaError

    out: dict[str, tuple[float, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        rule, sep, values = part.partition("=")
        rule = rule.strip()
        if not sep or rule not in SWEEP or rule == EDGE_ALONE:
            knobbed = [r for r in SWEEP if r != EDGE_ALONE]
            raise CemaError(f"--sweep expects RULE=V1,V2;... with RULE one of {', '.join(knobbed)}; got {part!r}.")
        try:
            knobs = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError as exc:
            raise CemaError(f"--sweep: the values of {rule} must be numbers, got {values!r}.") from exc
        if not knobs or any(not 0 < k <= 1 for k in knobs):
            raise CemaError(f"--sweep: {rule} needs values in (0, 1], got {values!r}.")
        out[rule] = knobs
    return out


Runner = Callable[[str, float, str, int, int], tuple[float, float]]
"""``runner(rule, knob, protocol, severity, seed) -> (accuracy %, share %)``."""


# ---- the in-process runner ----------------------------------------------------------------------------------
#: Rules of the frontier: (selection preset, what the knob sets, cloud statistics source).
RULES: dict[str, tuple[str, str, str]] = {
    "cema": ("cema", "budget", "training"),
    "eata_style": ("eata", "e0_ratio", "training"),
    "random": ("random", "share", "training"),
    "entropy_top": ("entropy-top", "share", "training"),
    "lead": ("lead", "share", "training"),
    "cema_stats": ("cema", "budget", "samples"),
}
STATS_SHARE = 0.05  # cema_stats: uniform share of frames sent as statistics samples


@dataclass(frozen=True, kw_only=True)
class Job:
    """One frontier run: a rule at a knob value on one stream (protocol, severity, seed)."""

    rule: str
    knob: float
    protocol: str
    severity: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.protocol}/{self.severity}/{self.rule}/{self.knob:g}/{self.seed}"


def _selector_config(job: Job, warmup: int, d_margin: float | None) -> Any:
    from cema_deploy.demo.edge_only import split_stats
    from cema_deploy.runtime.selection.rules import SelectionConfig
    from cema_deploy.runtime.selection.shift import ShiftConfig

    if job.rule == EDGE_ALONE:  # no cloud: the selector only scores (nothing can go up)
        return SelectionConfig.preset("random", 10, warmup=warmup, d_margin=d_margin, seed=job.seed, share=0.1)
    preset, knob, stats = RULES[split_stats(job.rule)[0]]
    kw: dict[str, Any] = {knob: job.knob}
    if knob == "budget" and job.knob >= 1.0:
        kw["budget"] = None  # a budget of every frame: no budget, the paper's E_max as it is (Eqn. 4)
    if stats == "samples":
        kw["stats_share"] = STATS_SHARE
    shift = ShiftConfig() if job.protocol == "continual" else None  # continual: every rule recalibrates on shift
    return SelectionConfig.preset(preset, 10, warmup=warmup, d_margin=d_margin, shift=shift, seed=job.seed, **kw)


def run_job(
    job: Job,
    *,
    work: Path,
    edge_dir: Path,
    teacher: tuple[str, Path],
    stream: Any,
    replay_size: int = 400,
    edge_batch: int = 64,
    cloud_batch: int = 32,
    diagnose: bool = False,
    cloud: dict[str, Any] | None = None,
    pace: float | None = None,
    on_batch: Callable[[str, np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """One frontier point on one seed, in-process: the real EdgeRuntime (ORT) and the real local deployment,
    joined by LocalLink, in sync mode. Returns accuracy %, uploaded share % (all kinds) and counters.

    ``diagnose``: also a ``"diagnosis"`` (:mod:`cema_deploy.demo.diagnosis`: per corruption the teacher's, the
    replica's and the edge's accuracy on the uploaded frames, and a label-aware audit of every rollback verdict).
    ``cloud``: :class:`~cema_deploy.cloud.config.CemaConfig` fields set for this run (the levers; recorded).
    ``RULE+stats`` and ``edge_stats`` give each edge runtime (a fresh one per corruption under the reset protocol,
    as the demo starts a fresh ``edge run``) its own :class:`~cema_deploy.runtime.stats.adapter.StatsAdapter`;
    ``edge_stats`` runs no cloud at all. The result says ``edge_stats`` (on or not) and the adapter's counters.
    ``pace``: frames per second; the edge does not wait for the cloud (``EdgeRuntime(sync=False)``), its batches are
    fed at this rate while the cloud works concurrently in its own thread, and blobs apply when they land: extra
    cloud effort then costs delivery time (issue 22's honest timing). ``None`` (the default): ``--sync``. Recorded
    as ``"pace"``, with the rate the edge achieved (``"fps"``: lower than ``pace`` when the edge cannot keep up).
    ``on_batch(corruption, predictions, labels)``: called after every served edge batch (per-batch accuracy
    curves: ``benchmarks/batch_curve.py``)."""
    import shutil
    import time

    from cema_deploy.exceptions import CemaError

    if pace is not None and (not pace > 0 or diagnose):
        raise CemaError(
            f"run_job: pace must be > 0 frames/s and without diagnose (whose per-corruption probe waits for the "
            f"cloud), got pace={pace}, diagnose={diagnose}."
        )

    from cema_deploy.cloud.config import CemaConfig, DeploymentSpec
    from cema_deploy.cloud.deployment import Deployment
    from cema_deploy.cloud.engines.local import LocalEngine
    from cema_deploy.cloud.local_link import LocalLink
    from cema_deploy.demo.edge_only import EDGE_STATS_SETTINGS, split_stats
    from cema_deploy.demo.run import LEAD_FRAMES, WARMUP
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.selection.rules import SampleSelector
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir

    state = work / job.key.replace("/", "_")
    shutil.rmtree(state, ignore_errors=True)
    alone, with_stats = job.rule == EDGE_ALONE, _stats_on(job.rule)
    engine: Any = None
    dep: Any = None
    diag = Diagnosis() if diagnose and not alone else None
    if split_stats(job.rule)[0] == "lead":  # its cloud sends lead weights with each blob (cloud/deployment/lead.py)
        cloud = {"lead_frames": LEAD_FRAMES, **(cloud or {})}
    if not alone:
        spec = DeploymentSpec(
            name="frontier",
            edge=edge_dir,
            teacher=teacher[0],
            teacher_weights=teacher[1],
            method=CemaConfig(
                batch_size=cloud_batch,
                replay_size=replay_size,
                seed=job.seed,
                statistics=RULES[split_stats(job.rule)[0]][2],
                **(cloud or {}),
            ),
        )
        dep = Deployment.from_spec(spec, state)
        if diag is not None:
            dep.add_listener(lambda v: diag.on_publish(v, dep.job))
        engine = LocalEngine([dep])
        engine.start()
    backend = get_backend("ort-cpu", edge_dir, intra_op_threads=1)
    cfg = _selector_config(job, WARMUP[job.protocol], None)
    correct = seen = uploaded = rollbacks = calibration = 0
    stats_counts = {"probes": 0, "local_generation": 0, "resets": 0}
    fp = backend.manifest.fingerprint
    t_start = time.perf_counter()
    try:
        parts = [[s] for s in stream.segments] if job.protocol == "reset" else [list(stream.segments)]
        for i, segments in enumerate(parts):
            if job.protocol == "reset" and i > 0:
                if engine is not None:
                    engine.admin("frontier", "reset")
                # a fresh `edge run` per corruption starts from the export's parameters, not from the previous
                # corruption's last refit (which its rollback guard would otherwise judge the reset's blob against)
                backend.close()
                backend = get_backend("ort-cpu", edge_dir, intra_op_threads=1)
            adapter = None
            if with_stats:  # fresh statistics per edge runtime, as a fresh `edge run --adapt-stats` has
                adapter, why = stats_adapter_from_dir(backend, edge_dir, StatsConfig(**EDGE_STATS_SETTINGS))
                if adapter is None:
                    raise CemaError(f"{job.key}: the edge's statistics adapter stays off: {why}.")
            rt = EdgeRuntime(
                backend,
                SampleSelector(cfg),
                client=LocalLink(engine, fp, f"frontier-{job.seed}") if engine is not None else None,
                poll_wait_s=1.0,
                sync=pace is None,
                upload_batch=cloud_batch,
                selector_factory=lambda: SampleSelector(cfg),
                stats=adapter,
            )
            if diag is not None:
                rt.monitor.audit = diag.audit
            try:
                for seg in segments:
                    if diag is not None:
                        diag.begin(seg.name, rt.rollbacks, rt.ledger.snapshot().held)
                    for a in range(0, len(seg.labels), edge_batch):
                        images = np.asarray(seg.images[a : a + edge_batch])
                        if diag is not None:  # before processing: a sync run judges refits within process()
                            diag.served(_at_size(rt, images), seg.labels[a : a + edge_batch])
                        if pace is not None:  # the stream's clock: frame n arrives at n / pace seconds
                            time.sleep(max(0.0, t_start + (seen + rt.frames) / pace - time.perf_counter()))
                        step = rt.process(images)
                        if pace is None and not rt.sync(timeout=300):
                            raise RuntimeError(f"{job.key}: sync timed out")
                        correct += int((step.predictions == seg.labels[a : a + edge_batch]).sum())
                        if on_batch is not None:
                            on_batch(seg.name, np.asarray(step.predictions), seg.labels[a : a + edge_batch])
                        if diag is not None:
                            diag.batch(*_uploaded(rt, images, seg.labels[a : a + edge_batch], step))
                    if diag is not None:
                        _end_corruption(diag, dep, rt)
                m = rt.metrics()
                seen += m["frames"]
                uploaded += sum(m["uploaded"].values())
                calibration += int(m["uploaded"].get("calibration", 0))
                rollbacks += int(m["rollbacks"])
                for k in stats_counts:
                    stats_counts[k] += int(m["stats"].get(k, 0))
            finally:
                rt.close()
        wall = time.perf_counter() - t_start
    finally:
        backend.close()
        if engine is not None:
            engine.stop()
        shutil.rmtree(state, ignore_errors=True)
    return {
        "key": job.key,
        **asdict(job),
        "accuracy": 100 * correct / seen,
        "share": 100 * uploaded / seen,
        "calibration_frames": calibration,  # of the uploads, frames sent in calibration batches
        "rollbacks": rollbacks,
        "frames": seen,
        "edge_batch": edge_batch,
        "edge_stats": with_stats,
        **({f"stats_{k}": v for k, v in stats_counts.items()} if with_stats else {}),
        "pace": pace,
        "fps": seen / wall,
        "cloud": dict(cloud or {}),
        **({"diagnosis": diag.as_dict()} if diag is not None else {}),
        "cloud_seconds": dep.metrics()["step_seconds_sum"] if dep is not None else 0.0,  # adaptation jobs, gates
        **(
            {"gate": dep.gate_decisions()} if dep is not None and spec.method.gate else {}
        ),  # every cloud-side gate decision
    }


def _at_size(rt: Any, images: np.ndarray) -> np.ndarray:
    from cema_deploy.runtime.frames.preprocess import images_at_model_size

    return np.asarray(images_at_model_size(images, rt.manifest.preprocess))


def _uploaded(rt: Any, images: np.ndarray, labels: np.ndarray, step: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames at model size, labels, uploaded mask) of one edge batch: a calibration batch goes up whole."""
    frames = _at_size(rt, images)
    sel = step.selection
    up = np.ones(len(frames), bool) if step.calibration else sel.mask.copy()
    if sel.stats_mask is not None and not step.calibration:
        up |= sel.stats_mask
    return frames, np.asarray(labels), up


def _end_corruption(diag: Diagnosis, dep: Any, rt: Any) -> None:
    """The teacher's, the replica's (cloud) and the edge's predictions on the corruption's uploaded frames."""
    from cema_deploy.runtime.frames.preprocess import normalize

    frames, _ = diag.uploaded
    dep.wait_idle(300)
    if len(frames):
        teacher, replica = dep.cema.predict(frames)
        edge = np.concatenate(
            [rt.backend.infer(normalize(frames[a : a + 64], rt.manifest.preprocess)) for a in range(0, len(frames), 64)]
        )
    else:
        teacher = replica = edge = np.zeros((0, 1), np.float32)
    diag.end(
        teacher_pred=teacher.argmax(1),
        replica_pred=replica.argmax(1),
        edge_pred=edge.argmax(1),
        rollbacks=rt.rollbacks,
        held=rt.ledger.snapshot().held,
    )


_WORKER: dict[str, Any] = {}


def _init_worker(
    edge_dir: str,
    teacher: tuple[str, str],
    per_corruption: int | None,
    corruptions: tuple[str, ...],
    train_seed: int,
    work: str,
    diagnose: bool = False,
    cloud: dict[str, Any] | None = None,
    edge_batch: int = 64,
    stream_order: str = "shuffled",
) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("cema_deploy").setLevel(logging.ERROR)  # one warning per runtime x 13 corruptions: noise here
    from cema_deploy.demo.stream import digits_splits

    _WORKER.update(
        edge_dir=Path(edge_dir),
        teacher=(teacher[0], Path(teacher[1])),
        splits=digits_splits(train_seed),
        per_corruption=per_corruption,
        corruptions=corruptions,
        work=Path(work),
        streams={},
        diagnose=diagnose,
        cloud=cloud,
        edge_batch=edge_batch,
        stream_order=stream_order,
    )


def _stream(severity: int, seed: int) -> Any:
    from cema_deploy.demo.edge_only import ordered
    from cema_deploy.demo.stream import corrupted_stream

    key = (severity, seed)
    if key not in _WORKER["streams"]:
        _, _, x, y = _WORKER["splits"]
        n = _WORKER["per_corruption"]
        x, y = (x, y) if n is None else (x[:n], y[:n])
        stream = corrupted_stream(x, y, severity=severity, corruptions=_WORKER["corruptions"], seed=seed)
        _WORKER["streams"][key] = ordered(stream, _WORKER["stream_order"], seed)
    return _WORKER["streams"][key]


def _run_in_worker(job: Job) -> dict[str, Any]:
    res = run_job(
        job,
        work=_WORKER["work"],
        edge_dir=_WORKER["edge_dir"],
        teacher=_WORKER["teacher"],
        stream=_stream(job.severity, job.seed),
        diagnose=_WORKER["diagnose"],
        cloud=_WORKER["cloud"],
        edge_batch=_WORKER["edge_batch"],
    )
    return {**res, "stream": _WORKER["stream_order"]}


def jobs_for(
    rules: Sequence[str],
    protocols: Sequence[str],
    severities: Sequence[int],
    seeds: Sequence[int],
    sweep: dict[str, tuple[float, ...]] | None = None,
) -> list[Job]:
    """Every (rule, knob, protocol, severity, seed), cheapest first within a seed (low shares run fast)."""
    sweep = sweep or SWEEP
    return [
        Job(rule=r, knob=k, protocol=p, severity=s, seed=seed)
        for seed in seeds
        for p in protocols
        for s in severities
        for r in rules
        for k in sweep[r]
    ]


def run_frontier(
    out_dir: Path,
    *,
    rules: Sequence[str],
    protocols: Sequence[str],
    severities: Sequence[int],
    seeds: Sequence[int],
    default: str,
    workers: int = 2,
    per_corruption: int | None = None,
    corruptions: tuple[str, ...] | None = None,
    train_seed: int = 0,
    sweep: dict[str, tuple[float, ...]] | None = None,
    on_step: Callable[[str], None] = lambda _m: None,
    diagnose: bool = False,
    cloud: dict[str, Any] | None = None,
    refit: str = "norms",
    edge_batch: int = 64,
    stream_order: str = "shuffled",
    edge: str | None = None,
    teacher: str | None = None,
) -> list[Path]:
    """Sweep, aggregate over seeds, and write frontier.json/png. Runs are appended to ``frontier_runs.jsonl``
    as they finish, and runs already there are not repeated (a long sweep resumes where it stopped). ``sweep``
    replaces :data:`SWEEP`'s knob values for the rules it names. ``diagnose`` and ``cloud`` go to every
    :func:`run_job` and are recorded in ``frontier.json`` (runs of another setting need another ``out_dir``:
    the run log's keys do not hold them). ``refit="head"`` exports the edge model with its classifier refittable
    (``export --refit head``, beyond the paper; recorded as well).
    With ``edge_stats`` among ``rules`` the floor of every seed counts it
    (:func:`cema_deploy.demo.gap.floor_of`).

    ``edge_batch``: frames per edge batch (``demo --edge-batch``; 1 = a camera), for every edge runtime and the
    PyTorch baselines; below 2 the rules and baselines of :func:`skipped_at` do not run (recorded as ``"skipped"``,
    with their reasons). ``stream_order``: ``shuffled`` or ``sorted`` (``demo --stream``:
    :func:`cema_deploy.demo.edge_only.ordered`). Both are recorded in ``frontier.json`` and in every run's line; a
    run log of another setting is refused (use another ``out_dir``). ``edge``, ``teacher``: the demo's ``--edge``
    and ``--teacher`` (:func:`cema_deploy.demo.models.resolve_models`; None: the default models)."""
    import multiprocessing as mp

    from cema_deploy.demo.baselines import run_baseline
    from cema_deploy.demo.edge_only import EDGE_STATS_SETTINGS, STREAM_ORDERS, ordered
    from cema_deploy.demo.gap import FLOOR_ROWS, floor_of
    from cema_deploy.demo.models import load_model, resolve_models
    from cema_deploy.demo.stream import CORRUPTIONS, corrupted_stream, digits_splits
    from cema_deploy.demo.teacher_ceiling import teacher_runs
    from cema_deploy.export.to_onnx import export_timm

    check_rules(rules)
    if edge_batch < 1 or stream_order not in STREAM_ORDERS:
        raise CemaError(
            f"--edge-batch must be >= 1 and --stream one of {', '.join(STREAM_ORDERS)}; got {edge_batch}, "
            f"{stream_order!r}."
        )
    skipped = skipped_at(edge_batch, rules)
    rules = [r for r in rules if r not in skipped]
    if not rules:
        raise CemaError(
            f"No frontier rule runs at edge batch {edge_batch}: {'; '.join(f'{r}: {w}' for r, w in skipped.items())}. "
            f"Add edge_stats or a RULE+stats rule (e.g. random+stats)."
        )
    for what, why in skipped.items():
        on_step(f"frontier: {what} {why}")
    corruptions = corruptions or CORRUPTIONS
    sweep = {**SWEEP, **(sweep or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = digits_splits(train_seed)
    models = resolve_models(edge, teacher, splits, seed=train_seed)
    edge_model = load_model(models.edge.name, models.edge.checkpoint)
    teacher_model = load_model(models.teacher.name, models.teacher.checkpoint)
    edge_dir = out_dir / ("edge-model" if refit == "norms" else f"edge-model-{refit}")
    if not (edge_dir / "manifest.json").exists():
        export_timm(models.edge.name, edge_dir, model=edge_model, img_size=splits[0].shape[1], refit=refit)
    log = out_dir / "frontier_runs.jsonl"
    done = {json.loads(line)["key"]: json.loads(line) for line in log.read_text().splitlines()} if log.exists() else {}
    setting = (edge_batch, stream_order)  # lines written before these options ran at (64, "shuffled")
    other = {(r.get("edge_batch", 64), r.get("stream", "shuffled")) for r in done.values()} - {setting}
    if other:
        raise CemaError(
            f"{log} holds runs at (edge batch, stream) {sorted(other)}, this sweep is at ({edge_batch}, "
            f"{stream_order!r}): use another --out for another setting."
        )
    todo = [j for j in jobs_for(rules, protocols, severities, seeds, sweep) if j.key not in done]
    on_step(f"frontier: {len(todo)} runs to go ({len(done)} done) on {workers} worker(s)")
    ctx = mp.get_context("spawn")
    init = (
        str(edge_dir),
        (models.teacher.name, str(models.teacher.checkpoint)),
        per_corruption,
        corruptions,
        train_seed,
        str(out_dir / "work"),
        diagnose,
        cloud,
        edge_batch,
        stream_order,
    )
    with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool, open(log, "a") as f:
        for i, res in enumerate(pool.imap_unordered(_run_in_worker, todo), 1):
            done[res["key"]] = res
            f.write(json.dumps(res) + "\n")
            f.flush()
            on_step(f"frontier {i}/{len(todo)}: {res['key']} -> {res['accuracy']:.1f} % at {res['share']:.1f} %")
    panels: dict[str, dict[str, list[Point]]] = {}
    baselines_out: dict[str, dict[str, float]] = {}
    ceiling_out: dict[str, float] = {}
    floor_out: dict[str, float | None] = {}
    for p in protocols:
        for s in severities:
            name = f"{p}/{s}"
            accs: dict[str, list[float]] = {
                b: [] for b in ("no_adapt", "bn_adapt", "teacher_no_adapt", "teacher_adapted") if b not in skipped
            }
            for seed in seeds:
                x, y = splits[2], splits[3]
                if per_corruption is not None:
                    x, y = x[:per_corruption], y[:per_corruption]
                stream = corrupted_stream(x, y, severity=s, corruptions=corruptions, seed=seed)
                stream = ordered(stream, stream_order, seed)
                for b in ("no_adapt", "bn_adapt"):
                    if b not in skipped:  # no_adapt's predictions do not depend on the batch
                        batch = max(2, edge_batch)
                        accs[b].append(100 * run_baseline(b, edge_model, stream, batch=batch, protocol=p).accuracy)
                # the teacher adapts in the cloud: below an edge batch of 2 it sees the cloud's batches (as the demo)
                teacher_batch = edge_batch if edge_batch >= 2 else 32
                for b, run in teacher_runs(teacher_model, stream, protocol=p, edge_batch=teacher_batch).items():
                    accs[b].append(100 * float(run.correct.mean()))
            if EDGE_ALONE in rules:  # the edge alone counts in the floor (demo.gap), seed by seed
                accs[EDGE_ALONE] = [done[j.key]["accuracy"] for j in jobs_for([EDGE_ALONE], [p], [s], seeds, sweep)]
            has_floor = any(r in accs for r in FLOOR_ROWS)  # at edge batch 1 only with edge_stats among the rules
            floors = [floor_of({b: v[i] for b, v in accs.items()}) for i in range(len(seeds))] if has_floor else []
            ceilings = accs["teacher_adapted"]
            baselines_out[name] = {b: float(np.mean(v)) for b, v in accs.items()}
            floor_out[name] = float(np.mean(floors)) if floors else None
            ceiling_out[name] = float(np.mean(ceilings))
            panels[name] = {}
            for r in rules:
                pts = []
                for k in sweep[r]:
                    runs = [
                        (done[j.key]["accuracy"], done[j.key]["share"])
                        for j in jobs_for([r], [p], [s], seeds, sweep)
                        if math.isclose(j.knob, k)
                    ]
                    point = point_from_runs(k, runs)
                    pts.append(with_gap(point, [a for a, _ in runs], floors, ceilings) if floors else point)
                panels[name][r] = pts
    main = next(iter(panels))
    meta = {
        "seeds": list(seeds),
        "baselines": baselines_out,
        "teacher_ceiling": ceiling_out,
        "floor": floor_out,
        "best_rule": {k: best_rule(v, (10, 20, 40)) for k, v in panels.items()},
        "sweep": {r: list(sweep[r]) for r in rules},
        "stats_share": STATS_SHARE,
        # the edge's own statistics: which rules ran with them, at which adapter settings
        "edge_statistics": {"rules": [r for r in rules if _stats_on(r)], "settings": dict(EDGE_STATS_SETTINGS)},
        "d_margin": None,
        "diagnose": diagnose,
        "cloud": dict(cloud or {}),
        "refit": refit,
        "edge_batch": edge_batch,
        "stream": stream_order,
        "skipped": skipped,  # rules and baselines that did not run at this edge batch, and why
        "models": {
            "edge": models.edge.name,
            "edge_clean_accuracy": 100 * models.edge.clean_accuracy,
            "teacher": models.teacher.name,
            "teacher_clean_accuracy": 100 * models.teacher.clean_accuracy,
        },
    }
    return write_frontier(panels, default, main, out_dir, meta)
