"""The demo's models, trained once on the clean digits and cached: a small BatchNorm ResNet for the edge and a
larger teacher trained with augmentation. Deterministic from a seed; CPU only; no download."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.demo.stream import cache_dir

#: (timm name, constructor kwargs, epochs, augment)
EDGE_DEFAULT = ("resnet10t", {"num_classes": 10}, 12, False)
TEACHER_DEFAULT = ("resnet18", {"num_classes": 10}, 20, True)
TRAIN_VERSION = "2"  # bump when training changes, so caches are rebuilt


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint the demo can export (edge) or serve (teacher)."""

    name: str
    checkpoint: Path
    clean_accuracy: float
    train_seconds: float


def mean_std(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalization timm's data config gives ``model``: the one ``cema-deploy export`` writes to the manifest."""
    timm_data = lazy_import("timm.data", extra="export", purpose="the demo's models")
    cfg = timm_data.resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def to_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    torch = lazy_import("torch", extra="export", purpose="the demo's models")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _augment(x: Any, gen: Any) -> Any:
    """Light, generic augmentation (shifts, noise, blur, contrast), deliberately not the test corruptions."""
    torch = lazy_import("torch", extra="export")
    n = x.shape[0]
    pad = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="replicate")
    dx, dy = torch.randint(0, 7, (2,), generator=gen).tolist()
    x = pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    x = (x - x.mean((1, 2, 3), keepdim=True)) * contrast + x.mean((1, 2, 3), keepdim=True)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x + torch.randn(x.shape, generator=gen) * 0.3 * torch.rand(n, 1, 1, 1, generator=gen)


def train(name: str, kwargs: dict[str, Any], images: np.ndarray, labels: np.ndarray, *, epochs: int, augment: bool,
          seed: int, batch: int = 64, lr: float = 2e-3) -> Any:
    """Train timm ``name`` from scratch on uint8 images; returns the model in eval mode."""
    torch = lazy_import("torch", extra="export", purpose="training the demo's models")
    timm = lazy_import("timm", extra="export", purpose="training the demo's models")
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    mean, std = mean_std(model)
    x_all, y_all = to_tensor(images, mean, std), torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y_all) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_all), generator=gen)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            x = _augment(x_all[idx], gen) if augment else x_all[idx]
            loss = torch.nn.functional.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    torch = lazy_import("torch", extra="export")
    mean, std = mean_std(model)
    with torch.no_grad():
        pred = torch.cat([model(to_tensor(images[i : i + 256], mean, std)).argmax(1)
                          for i in range(0, len(images), 256)])
    return float((pred.numpy() == labels).mean())


def trained(spec: tuple[str, dict[str, Any], int, bool], splits: tuple[np.ndarray, ...], *, seed: int,
            role: str) -> TrainedModel:
    """Train (or load from the cache) one model; the checkpoint is a state-dict ``.safetensors``."""
    from safetensors.torch import load_file, save_file

    timm = lazy_import("timm", extra="export")
    name, kwargs, epochs, augment = spec
    x_tr, y_tr, x_te, y_te = splits
    key = hashlib.sha256(json.dumps([TRAIN_VERSION, name, kwargs, epochs, augment, seed]).encode()
                         + x_tr.tobytes()).hexdigest()[:16]
    ckpt = cache_dir() / "models" / f"{role}-{name}-{key}.safetensors"
    meta = ckpt.with_suffix(".json")
    if ckpt.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return TrainedModel(name, ckpt, info["clean_accuracy"], info["train_seconds"])
    t0 = time.perf_counter()
    model = train(name, kwargs, x_tr, y_tr, epochs=epochs, augment=augment, seed=seed)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, x_te, y_te)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    meta.write_text(json.dumps({"clean_accuracy": acc, "train_seconds": seconds, "name": name}))
    # reload check: what is cached is what was trained
    fresh = timm.create_model(name, **kwargs)
    fresh.load_state_dict(load_file(str(ckpt)))
    return TrainedModel(name, ckpt, acc, seconds)


def load_model(name: str, checkpoint: Path, num_classes: int = 10) -> Any:
    from safetensors.torch import load_file

    timm = lazy_import("timm", extra="export")
    model = timm.create_model(name, num_classes=num_classes)
    model.load_state_dict(load_file(str(checkpoint)))
    return model.eval()
