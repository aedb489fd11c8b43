"""The classifier tensors an export makes refittable with ``--refit head`` (beyond the paper).

CEMA (Chen et al., ICLR 2024) refits the normalization layers only. ``--refit head`` adds the classifier: its bias
always, and its weight matrix too for small heads (at most :data:`HEAD_WEIGHT_MAX_CLASSES` classes), so the cloud
can carry a class-prior or decision-boundary correction that the norms cannot express. A 1,000-class head stays
bias only: ResNet-50's 2048 x 1000 weight would add 8 MB to every blob (~8 % of the model), while its bias adds
4 KB (the blob stays well under 0.5 % of the model). A low-rank update of a large head is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cema_deploy.contract.names import HEAD_KIND
from cema_deploy.exceptions import ExportError

#: What ``export --refit`` accepts: ``norms`` (the paper's: normalization layers only) or ``head`` (plus the
#: classifier, beyond the paper).
REFIT_SCOPES = ("norms", "head")
#: Largest class count whose classifier weight matrix is made refittable; above it, the bias only.
HEAD_WEIGHT_MAX_CLASSES = 100


@dataclass(frozen=True, kw_only=True)
class HeadParam:
    """One refittable classifier tensor, named as in the model's state dict."""

    name: str
    layer_type: str = HEAD_KIND
    module_name: str
    attr: str  # weight | bias


def classifier_module(model: Any) -> tuple[str, Any]:
    """(state-dict prefix, module) of ``model``'s final classifier: timm's ``get_classifier()``, an ``nn.Linear``."""
    import torch.nn as nn

    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        kind = "no get_classifier()" if head is None else type(head).__name__
        raise ExportError(
            f"--refit head needs a model whose classifier is one nn.Linear (timm's get_classifier()); "
            f"{type(model).__name__} has {kind}. Export with --refit norms."
        )
    for name, module in model.named_modules():
        if module is head:
            return name, head
    raise ExportError(f"The classifier of {type(model).__name__} is not a submodule of it; export with --refit norms.")


def collect_head_params(model: Any) -> list[HeadParam]:
    """The classifier's refittable tensors: its bias, and its weight when it has <= 100 output classes.

    Example:
        >>> import timm
        >>> [p.name for p in collect_head_params(timm.create_model("test_resnet", num_classes=10))]
        ['fc.weight', 'fc.bias']
    """
    module_name, head = classifier_module(model)
    if head.bias is None:
        raise ExportError(
            f"The classifier {module_name!r} has no bias; --refit head refits at least the bias. "
            "Export with --refit norms."
        )
    attrs = ("weight", "bias") if head.out_features <= HEAD_WEIGHT_MAX_CLASSES else ("bias",)
    return [HeadParam(name=f"{module_name}.{a}", module_name=module_name, attr=a) for a in attrs]


def check_refit_scope(refit: str) -> None:
    if refit not in REFIT_SCOPES:
        raise ExportError(f"--refit {refit!r} is not one of {list(REFIT_SCOPES)}; use norms (the paper's) or head.")
