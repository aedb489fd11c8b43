"""The replica trained under the statistics each edge serves (issue 21, composition with the edge's adapter).

When an edge's statistics adapter is on, the edge owns its BatchNorm running statistics and the cloud owns the
affine parameters. The edge reports its statistics with its batch reports (protocol 3,
:mod:`cema_deploy.contract.edge_statistics`); the deployment keeps each device's latest
(:mod:`cema_deploy.cloud.store.edge_stats`). In a student step (Eqn. 7), the samples uploaded by device ``d``
are normalised by every BatchNorm layer with ``d``'s statistics, held fixed (the step never moves them), with
the gradients of the TBR forward in :mod:`cema_deploy.cloud.method`: the forward value is
``(x - mean_d) / sqrt(var_d + eps) * weight + bias`` (what the edge computes), the gradient flows through the
batch statistics of ``d``'s samples in the step, as TBR's does through those of the whole batch. Samples of
devices that report no statistics keep the replica's own running statistics (the paper's TBR, moving them as
configured). The teacher is not touched.

Beyond the paper: CEMA's edge serves the replica's statistics (the official code, chenyaofo/CEMA, sends gamma,
beta, mean and variance every step); here each device serves its own and the replica learns affine parameters
that suit each device's statistics, so one deployment can serve cameras whose scenes differ.

Blobs are unchanged: a blob carries the affine parameters *and* the replica's running statistics, as the contract
has every refittable tensor (an edge with its adapter off, or without a statistics probe, needs them); an edge
whose adapter is on substitutes its own statistics before the blob reaches its engine
(:class:`~cema_deploy.runtime.edge.EdgeRuntime`), so no batch is served, and no blob judged, with the cloud's.
"""

from __future__ import annotations

import collections
import contextlib
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cema_deploy.cloud.method import _batch_stats, bn_layers
from cema_deploy.cloud.store.edge_stats import EdgeStatsBook

__all__ = ["StudentGroups", "groups_for", "normalised_by_device"]


@dataclass
class StudentGroups:
    """Which statistics normalise each sample of a student step's input (the new samples, then the replayed).

    ``index[i]``: the group of sample ``i``, ``-1`` for the replica's own running statistics; ``devices[g]`` and
    ``stats[g]`` (running mean/var by refittable name) for group ``g``; ``generations[g]`` the device's local
    statistics generation. ``used`` counts, per device, the samples a student step normalised with its statistics.
    """

    index: np.ndarray
    devices: list[str]
    stats: list[Mapping[str, np.ndarray]]
    generations: list[int]
    used: collections.Counter[str] = field(default_factory=collections.Counter)


def groups_for(devices: Sequence[str], book: EdgeStatsBook) -> StudentGroups | None:
    """The groups of samples uploaded by ``devices`` (one name per sample) under ``book``'s latest statistics;
    None when no sample comes from a device that reported statistics (the step then runs as the paper's)."""
    latest = book.snapshot()
    names = sorted({d for d in devices if d in latest})
    if not names:
        return None
    where = {d: g for g, d in enumerate(names)}
    index = np.array([where.get(d, -1) for d in devices], np.int64)
    return StudentGroups(
        index=index,
        devices=names,
        stats=[latest[d].tensors for d in names],
        generations=[latest[d].local_generation for d in names],
    )


def _fixed_stats_forward(mod: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """TBR (method.py ``_tbr_forward``) with ``mean``/``var`` in place of the running statistics, which are not
    moved: value ``(x - mean) / sqrt(var + eps)`` (affine after), gradients through ``x``'s batch statistics."""
    b_var, mu = _batch_stats(x)
    shape = [1, -1] + [1] * (x.ndim - 2)
    sigma = torch.sqrt(b_var + mod.eps)
    sigma_run = torch.sqrt(var + mod.eps)
    scale = (sigma.detach() / sigma_run) / sigma
    shift = (mu.detach() - mean) / sigma_run - mu * scale
    if mod.affine:
        scale, shift = scale * mod.weight, shift * mod.weight + mod.bias
    y = torch.addcmul(shift.view(shape), x, scale.view(shape))
    for tail in ("drop", "act"):  # timm BatchNormAct2d applies dropout and activation after the norm
        tail_mod = getattr(mod, tail, None)
        if isinstance(tail_mod, nn.Module):
            y = tail_mod(y)
    return y


@contextlib.contextmanager
def normalised_by_device(model: nn.Module, groups: StudentGroups, device: torch.device) -> Iterator[None]:
    """Within the block, every BatchNorm of ``model`` in train mode (a student step) normalises each group of
    samples with its device's statistics (see the module docstring); eval-mode forwards are unchanged."""
    index = torch.as_tensor(groups.index, device=device)
    parts = [(g, torch.nonzero(index == g).flatten()) for g in range(-1, len(groups.devices))]
    parts = [(g, idx) for g, idx in parts if idx.numel()]
    inverse = torch.argsort(torch.cat([idx for _, idx in parts]))
    layers = bn_layers(model)
    saved = []
    for name, mod in layers:
        stats = [
            (
                torch.as_tensor(s[f"{name}.running_mean"], dtype=torch.float32, device=device),
                torch.as_tensor(s[f"{name}.running_var"], dtype=torch.float32, device=device),
            )
            for s in groups.stats
        ]
        saved.append((mod, mod.forward))
        mod.forward = types.MethodType(_grouped(mod.forward, parts, inverse, stats), mod)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for mod, forward in saved:
            mod.forward = forward  # type: ignore[method-assign]
    for g, idx in parts:
        if g >= 0:
            groups.used[groups.devices[g]] += int(idx.numel())


def _grouped(
    prev: Callable[[torch.Tensor], torch.Tensor],
    parts: list[tuple[int, torch.Tensor]],
    inverse: torch.Tensor,
    stats: list[tuple[torch.Tensor, torch.Tensor]],
) -> Callable[[nn.modules.batchnorm._BatchNorm, torch.Tensor], torch.Tensor]:
    """A BatchNorm forward over groups of samples: group ``-1`` by ``prev`` (TBR with the replica's own running
    statistics), group ``g`` by :func:`_fixed_stats_forward` with ``stats[g]``; the output in the input's order."""

    def forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return prev(x)
        ys = [
            prev(x.index_select(0, idx)) if g < 0 else _fixed_stats_forward(self, x.index_select(0, idx), *stats[g])
            for g, idx in parts
        ]
        return torch.cat(ys).index_select(0, inverse)

    return forward
