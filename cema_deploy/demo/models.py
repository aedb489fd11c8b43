"""The demo's models, trained once on the clean digits and cached: a small BatchNorm ResNet for the edge and a
larger teacher trained with generic augmentation. Deterministic from a seed; CPU only (2 threads); no download.

Both models are plain ``timm.create_model(name, num_classes=10)`` so that the cloud (``cloud serve --teacher NAME
--teacher-weights CKPT``) and the export (``export_timm(name, model=...)``) rebuild exactly what was trained.
Inputs are normalised with timm's data config for the model (:func:`mean_std`), the very function
``export_timm`` uses to write the manifest's ``preprocess``, so the edge's ``preprocess.normalize`` feeds what
training used. Both defaults use ImageNet's mean/std; :func:`resolve_models` refuses an edge/teacher pair whose
normalisations differ, because the cloud feeds the teacher with the edge manifest's preprocessing.

Example:
    >>> from cema_deploy.demo.stream import digits_splits
    >>> models = resolve_models(None, None, digits_splits(0))  # doctest: +SKIP
    >>> models.edge.name, round(models.edge.clean_accuracy, 3)  # doctest: +SKIP
    ('resnet10t', 0.986)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.demo.stream import cache_dir
from cema_deploy.exceptions import ModelError

NUM_CLASSES = 10
TRAIN_THREADS = 2
TRAIN_VERSION = "3"  # bump when training changes, so caches are rebuilt

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """How one demo model is trained from scratch (AdamW + one-cycle schedule, cross-entropy)."""

    name: str  # timm model name, built with num_classes only
    epochs: int
    augment: bool  # generic augmentation (:func:`augment`), never the test corruptions
    lr: float = 2e-3
    batch: int = 64


#: The edge: a small BatchNorm ResNet (4.9 M parameters), no augmentation, so corruptions hurt it.
EDGE_DEFAULT = TrainSpec(name="resnet10t", epochs=12, augment=False)
#: The teacher: ResNet-18 (11 M parameters) trained longer with augmentation.
TEACHER_DEFAULT = TrainSpec(name="resnet18", epochs=30, augment=True)


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint the demo can export (edge) or serve (teacher)."""

    name: str  # timm name
    checkpoint: Path  # state-dict .safetensors
    clean_accuracy: float  # on the clean test split, 0..1
    train_seconds: float  # 0.0 for a checkpoint given by the user
    cached: bool = False  # loaded from the cache rather than trained now


@dataclass(frozen=True)
class DemoModels:
    """The edge and the teacher, plus the input normalisation both were trained with."""

    edge: TrainedModel
    teacher: TrainedModel
    mean: tuple[float, ...]
    std: tuple[float, ...]


@contextmanager
def torch_threads(n: int = TRAIN_THREADS) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (at most the CPU count) for the block, then restored."""
    torch = lazy_import("torch", extra="export")
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mean_std(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalization timm's data config gives ``model``: the one ``export_timm`` writes to the manifest."""
    timm_data = lazy_import("timm.data", extra="export", purpose="the demo's models")
    cfg = timm_data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def to_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """uint8 [N, H, W, 3] -> normalised float32 [N, 3, H, W], as ``runtime.preprocess.normalize`` does."""
    torch = lazy_import("torch", extra="export", purpose="the demo's models")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return _normalize(x, mean, std)


def _normalize(x: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    torch = lazy_import("torch", extra="export")
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment(x: Any, gen: Any) -> Any:
    """Generic augmentation of [0, 1] images [N, 3, H, W], each applied to a random half of the samples: a random
    affine warp (shift up to 10 %, scale 0.85-1.15, rotation up to 12 degrees), a contrast/level jitter (blend
    towards a random grey), Gaussian noise (sigma <= 0.12), a 3x3 box blur and a random erased square. These are
    the usual training augmentations, deliberately not ImageNet-C's corruption functions."""
    torch = lazy_import("torch", extra="export")
    f = torch.nn.functional
    n = x.shape[0]

    def pick() -> Any:
        return (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()

    def u(lo: float, hi: float) -> Any:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle, scale = u(-0.21, 0.21), u(0.85, 1.15)
    tx, ty = u(-0.2, 0.2), u(-0.2, 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = f.affine_grid(theta, list(x.shape), align_corners=False)
    m = pick()
    x = m * f.grid_sample(x, grid, padding_mode="border", align_corners=False) + (1 - m) * x
    level, grey = u(0.0, 0.7).view(n, 1, 1, 1), u(0.0, 1.0).view(n, 1, 1, 1)
    m = pick()
    x = m * (x * (1 - level) + grey * level) + (1 - m) * x
    m = pick()
    x = m * f.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) + (1 - m) * x
    x = x + pick() * torch.randn(x.shape, generator=gen) * u(0.0, 0.12).view(n, 1, 1, 1)
    h, w = x.shape[2], x.shape[3]
    side = h // 4
    cy, cx = torch.randint(0, h - side, (n,), generator=gen), torch.randint(0, w - side, (n,), generator=gen)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = (
        (
            (rows >= cy.view(n, 1, 1))
            & (rows < (cy + side).view(n, 1, 1))
            & (cols >= cx.view(n, 1, 1))
            & (cols < (cx + side).view(n, 1, 1))
        )
        .unsqueeze(1)
        .float()
    )
    x = x * (1 - pick() * box)
    return x.clamp(0.0, 1.0)


def train(spec: TrainSpec, images: np.ndarray, labels: np.ndarray, *, seed: int) -> Any:
    """Train ``spec.name`` from scratch on uint8 images with 2 CPU threads; returns the model in eval mode.
    The same seed gives bit-identical weights."""
    torch = lazy_import("torch", extra="export", purpose="training the demo's models")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # same seed, same thread count -> bit-identical weights
    try:
        with torch_threads(TRAIN_THREADS):
            return _train(torch, spec, images, labels, seed=seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(torch: Any, spec: TrainSpec, images: np.ndarray, labels: np.ndarray, *, seed: int) -> Any:
    from cema_deploy.export.to_onnx import create_timm_model

    torch.manual_seed(seed)
    model = create_timm_model(spec.name, num_classes=NUM_CLASSES)
    mean, std = mean_std(model)
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    y_all = torch.from_numpy(labels.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    steps = spec.epochs * ((len(y_all) + spec.batch - 1) // spec.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(spec.epochs):
        perm = torch.randperm(len(y_all), generator=gen)
        for i in range(0, len(perm), spec.batch):
            idx = perm[i : i + spec.batch]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            x = augment(x_all[idx], gen) if spec.augment else x_all[idx]
            loss = torch.nn.functional.cross_entropy(model(_normalize(x, mean, std)), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def predict(model: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Arg-max predictions of ``model`` (eval mode, running statistics) on uint8 images."""
    torch = lazy_import("torch", extra="export")
    mean, std = mean_std(model)
    model.eval()
    with torch.no_grad():
        out = [
            model(to_tensor(images[i : i + batch], mean, std)).argmax(1).numpy() for i in range(0, len(images), batch)
        ]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (0..1) of ``model`` in eval mode."""
    return float((predict(model, images) == labels).mean())


def train_model(
    spec: TrainSpec, splits: Splits, *, seed: int = 0, role: str = "model", cache: bool = True
) -> TrainedModel:
    """Train one model on the training split (or load it from the cache, keyed by the spec, the seed and the
    training data) and measure its clean test accuracy; the checkpoint is a state-dict ``.safetensors``."""
    from safetensors.torch import save_file

    x_tr, y_tr, x_te, y_te = splits
    key = hashlib.sha256(
        json.dumps([TRAIN_VERSION, asdict(spec), seed, list(x_tr.shape)]).encode() + x_tr.tobytes() + y_tr.tobytes()
    ).hexdigest()[:16]
    ckpt = cache_dir() / "models" / f"{role}-{spec.name}-{key}.safetensors"
    meta = ckpt.with_suffix(".json")
    if cache and ckpt.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return TrainedModel(spec.name, ckpt, info["clean_accuracy"], info["train_seconds"], cached=True)
    t0 = time.perf_counter()
    model = train(spec, x_tr, y_tr, seed=seed)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, x_te, y_te)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(ckpt)
    meta.write_text(
        json.dumps(
            {"name": spec.name, "clean_accuracy": acc, "train_seconds": seconds, "spec": asdict(spec), "seed": seed}
        )
    )
    return TrainedModel(spec.name, ckpt, acc, seconds)


def load_model(name: str, checkpoint: Path, num_classes: int = NUM_CLASSES) -> Any:
    """``timm.create_model(name, num_classes=...)`` with the checkpoint loaded strictly, in eval mode."""
    from cema_deploy.export.to_onnx import create_timm_model

    return create_timm_model(name, weights=checkpoint, num_classes=num_classes)


def resolve_models(
    edge: str | None,
    teacher: str | None,
    splits: Splits,
    *,
    seed: int = 0,
    edge_spec: TrainSpec = EDGE_DEFAULT,
    teacher_spec: TrainSpec = TEACHER_DEFAULT,
) -> DemoModels:
    """The demo's ``--edge``/``--teacher`` arguments to checkpoints. Each argument is ``None`` (train the default
    spec, cached), a timm name (train it with the default spec's recipe), ``NAME=CHECKPOINT`` or the path of a
    ``.safetensors`` checkpoint this module wrote (its ``.json`` sidecar names the model). The clean accuracy
    of a given checkpoint is measured on the clean test split."""
    e = _resolve(edge, edge_spec, splits, seed=seed, role="edge")
    t = _resolve(teacher, teacher_spec, splits, seed=seed, role="teacher")
    e_norm = mean_std(load_model(e.name, e.checkpoint))
    t_norm = mean_std(load_model(t.name, t.checkpoint))
    if e_norm != t_norm:
        raise ModelError(
            f"The edge {e.name} normalises with mean/std {e_norm} but the teacher {t.name} with {t_norm}; the cloud "
            "feeds the teacher with the edge manifest's preprocessing, so pick models with the same timm data config."
        )
    return DemoModels(edge=e, teacher=t, mean=e_norm[0], std=e_norm[1])


def _resolve(arg: str | None, default: TrainSpec, splits: Splits, *, seed: int, role: str) -> TrainedModel:
    if arg is None:
        return train_model(default, splits, seed=seed, role=role)
    if "=" in arg:
        name, given = arg.split("=", 1)
        return _given(name, Path(given), splits)
    path = Path(arg)
    if path.suffix == ".safetensors" or path.exists():
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ModelError(
                f"--{role} {arg}: no {sidecar.name} next to the checkpoint names its timm model; "
                f"pass NAME={arg} instead (e.g. resnet18={arg})."
            )
        return _given(str(json.loads(sidecar.read_text())["name"]), path, splits)
    return train_model(TrainSpec(**{**asdict(default), "name": arg}), splits, seed=seed, role=role)


def _given(name: str, path: Path, splits: Splits) -> TrainedModel:
    model = load_model(name, path)
    return TrainedModel(name, path, accuracy(model, splits[2], splits[3]), 0.0)
