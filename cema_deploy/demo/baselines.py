"""The alternatives CEMA is compared with, run in-process in PyTorch over the same stream, batches in stream order,
under either protocol (:func:`run_baseline`: ``reset`` per corruption as the paper's tables, or ``continual``):

- ``no_adapt``: the source model as is (BatchNorm with its training statistics).
- ``bn_adapt``: BatchNorm normalises with each test batch's own statistics, no gradient (Schneider et al.,
  NeurIPS 2020; Nado et al., 2020).
- ``tent``: batch statistics plus one entropy-minimisation step per batch on the BatchNorm affine parameters
  (Wang et al., ICLR 2021): backpropagation on the device itself, the thing CEMA moves to the cloud. The
  prediction for a batch is the output of the forward pass that computes the loss, as Tent's
  ``forward_and_adapt`` returns it.

Each function returns the arg-max predictions in stream order; :func:`run_baseline` runs one over a
:class:`~cema_deploy.demo.stream.Stream` and reports per-sample correctness and per-corruption accuracy.

Example:
    >>> from cema_deploy.demo.stream import corrupted_stream, digits_splits
    >>> x_tr, y_tr, x_te, y_te = digits_splits(0)  # doctest: +SKIP
    >>> result = run_baseline("bn_adapt", model, corrupted_stream(x_te, y_te, severity=5))  # doctest: +SKIP
    >>> result.per_segment["contrast"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.demo.models import mean_std, to_tensor, torch_threads
from cema_deploy.demo.stream import DataError, Stream

#: The official CEMA edge batch size.
EDGE_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class TentConfig:
    """Tent's optimiser. The default is Tent's ImageNet-C setting (SGD, momentum 0.9, lr 0.00025 at batch 64),
    with the learning rate scaled linearly with the batch size as EATA's code does; the digits edge model is
    small and 10-class, so ``lr`` is exposed to try larger values."""

    optimizer: str = "sgd"  # "sgd" or "adam" (Tent's CIFAR-10-C setting: Adam, lr 1e-3, batch 200)
    lr: float | None = None  # None: 0.00025 * batch / 64 for SGD, 1e-3 for Adam
    momentum: float = 0.9  # SGD only

    def lr_for(self, batch: int) -> float:
        if self.lr is not None:
            return self.lr
        return 0.00025 * batch / 64 if self.optimizer == "sgd" else 1e-3


@dataclass(frozen=True)
class BaselineResult:
    """One baseline over one stream."""

    method: str
    predictions: np.ndarray  # int64 [N], stream order
    correct: np.ndarray  # bool [N]
    per_segment: dict[str, float]  # corruption -> accuracy 0..1
    accuracy: float  # 0..1 over the whole stream
    seconds: float
    frames_per_second: float


def _batches(n: int, batch: int) -> list[slice]:
    """Consecutive slices of ``batch``; a last slice of one sample joins the previous one (BatchNorm with batch
    statistics needs at least two values per channel)."""
    if batch < 2:
        raise DataError(f"The edge batch size must be at least 2 for batch statistics, got {batch}.")
    starts = list(range(0, n, batch))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, [*starts[1:], n], strict=True)]


def _is_bn(module: Any) -> bool:
    torch = lazy_import("torch", extra="export")
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def _with_batch_stats(model: Any) -> Any:
    """A copy of ``model`` whose BatchNorm layers normalise with the current batch's statistics."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if _is_bn(m):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def _predict_all(model: Any, images: np.ndarray, batch: int) -> np.ndarray:
    torch = lazy_import("torch", extra="export", purpose="the demo's baselines")
    mean, std = mean_std(model)
    with torch.no_grad():
        out = [model(to_tensor(images[s], mean, std)).argmax(1).numpy() for s in _batches(len(images), batch)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def no_adapt(model: Any, images: np.ndarray, batch: int = EDGE_BATCH) -> np.ndarray:
    """Predictions of the source model as is (``model`` is not modified)."""
    return _predict_all(copy.deepcopy(model).eval(), images, batch)


def bn_adapt(model: Any, images: np.ndarray, batch: int = EDGE_BATCH) -> np.ndarray:
    """BatchNorm normalises with each test batch's statistics; no gradients (``model`` is not modified)."""
    return _predict_all(_with_batch_stats(model), images, batch)


def tent(model: Any, images: np.ndarray, batch: int = EDGE_BATCH, config: TentConfig | None = None) -> np.ndarray:
    """Tent: batch statistics plus one entropy-minimisation step per batch on the BatchNorm affine parameters,
    continual over the whole stream (``model`` is not modified; a copy adapts)."""
    torch = lazy_import("torch", extra="export", purpose="the demo's baselines")
    cfg = config or TentConfig()
    mean, std = mean_std(model)
    model = _with_batch_stats(model)
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if _is_bn(m) and m.affine:
            m.requires_grad_(True)
            params += [m.weight, m.bias]
    lr = cfg.lr_for(batch)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    else:
        raise DataError(f"Unknown Tent optimizer {cfg.optimizer!r}; use 'sgd' or 'adam'.")
    preds = []
    for s in _batches(len(images), batch):
        logits = model(to_tensor(images[s], mean, std))
        logp = logits.log_softmax(1)
        loss = -(logp.exp() * logp).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        preds.append(logits.argmax(1).detach().numpy())
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)


#: Baselines by their results key.
BASELINES: dict[str, Callable[..., np.ndarray]] = {"no_adapt": no_adapt, "bn_adapt": bn_adapt, "tent": tent}


def run_baseline(
    method: str,
    model: Any,
    stream: Stream,
    *,
    batch: int = EDGE_BATCH,
    tent_config: TentConfig | None = None,
    threads: int = 2,
    protocol: str = "continual",
) -> BaselineResult:
    """Run baseline ``method`` over ``stream`` with ``threads`` torch threads.

    ``protocol="reset"`` (the paper's): each corruption starts from the source model (matters for Tent, whose
    parameters adapt; BN statistics adaptation and no adaptation are per batch anyway) and no batch straddles two
    corruptions. ``"continual"``: one pass over the whole stream.
    """
    if method not in BASELINES:
        raise DataError(f"Unknown baseline {method!r}; choose from {sorted(BASELINES)}.")
    if protocol not in ("reset", "continual"):
        raise DataError(f"protocol must be 'reset' or 'continual', got {protocol!r}.")
    kwargs: dict[str, Any] = {"config": tent_config} if method == "tent" else {}
    labels, segment_of = stream.labels, stream.segment_of
    with torch_threads(threads):
        t0 = time.perf_counter()
        if protocol == "reset":
            parts = [BASELINES[method](model, seg.images, batch, **kwargs) for seg in stream.segments]
            pred = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        else:
            pred = BASELINES[method](model, stream.chained, batch, **kwargs)
        seconds = time.perf_counter() - t0
    correct = pred == labels
    per = {
        seg.name: float(correct[segment_of == i].mean()) if len(seg.labels) else float("nan")
        for i, seg in enumerate(stream.segments)
    }
    return BaselineResult(
        method,
        pred,
        correct,
        per,
        float(correct.mean()) if len(correct) else float("nan"),
        seconds,
        len(labels) / seconds if seconds > 0 else float("inf"),
    )
