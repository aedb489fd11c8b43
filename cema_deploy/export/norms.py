"""Find the normalization layers of a PyTorch model and their refittable tensors (Tent's ``collect_params``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cema_deploy.contract.names import norm_stat_suffixes


@dataclass(frozen=True, kw_only=True)
class NormParam:
    """One refittable tensor of a normalization layer, named as in the model's state dict."""

    name: str
    layer_type: str  # "BatchNorm" | "LayerNorm" | "GroupNorm"
    module_name: str
    attr: str  # weight | bias | running_mean | running_var


def norm_kind(module: Any) -> str | None:
    """'BatchNorm', 'LayerNorm', 'GroupNorm' or None. timm subclasses (BatchNormAct2d, LayerNorm2d,
    GroupNormAct) count as their base class."""
    import torch.nn as nn

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm"
    if isinstance(module, nn.LayerNorm):
        return "LayerNorm"
    if isinstance(module, nn.GroupNorm):
        return "GroupNorm"
    return None


def collect_norm_params(model: Any) -> list[NormParam]:
    """Every refittable tensor of ``model``: BN gamma/beta/mean/var, LN and GN gamma/beta, in module order.

    Example:
        >>> import timm
        >>> params = collect_norm_params(timm.create_model("test_resnet"))
        >>> params[0].name
        'conv1.1.weight'
    """
    out: list[NormParam] = []
    for module_name, module in model.named_modules():
        kind = norm_kind(module)
        if kind is None:
            continue
        affine = bool(getattr(module, "affine", getattr(module, "elementwise_affine", False)))
        if kind == "LayerNorm" and module.weight is None:
            affine = False
        track = (
            bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None
        )
        for attr in norm_stat_suffixes(kind, affine=affine, track_running_stats=track):
            if getattr(module, attr, None) is None:  # e.g. LayerNorm(bias=False)
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            out.append(NormParam(name=name, layer_type=kind, module_name=module_name, attr=attr))
    return out


def count_norm_layers(model: Any) -> dict[str, int]:
    """How many BatchNorm / LayerNorm / GroupNorm modules ``model`` has."""
    counts = {"BatchNorm": 0, "LayerNorm": 0, "GroupNorm": 0}
    for module in model.modules():
        kind = norm_kind(module)
        if kind is not None:
            counts[kind] += 1
    return counts
