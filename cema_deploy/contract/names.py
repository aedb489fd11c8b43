"""Rules for refittable parameter names.

Refittable tensors are named exactly as in the PyTorch ``state_dict`` of the exported model
(``layer1.0.bn1.weight``, ``layer1.0.bn1.running_var``), so the ONNX initializer, the manifest entry, the
cloud replica's parameter and the refit-blob tensor all share one name.
"""

from __future__ import annotations

#: Normalization layer kinds whose parameters are refittable.
NORM_KINDS: tuple[str, ...] = ("BatchNorm", "LayerNorm", "GroupNorm")
#: The layer kind of the classifier's tensors when an export makes the head refittable (``--refit head``, beyond
#: the paper, which refits the normalization layers only).
HEAD_KIND = "Classifier"
#: Every layer kind a manifest may name for a refittable tensor.
REFIT_KINDS: tuple[str, ...] = (*NORM_KINDS, HEAD_KIND)

_AFFINE = ("weight", "bias")
_BN_STATS = ("running_mean", "running_var")


def norm_stat_suffixes(kind: str, *, affine: bool, track_running_stats: bool) -> tuple[str, ...]:
    """The state-dict suffixes that are refittable for a normalization layer of ``kind``.

    BatchNorm carries gamma, beta and the running statistics (the official CEMA code sends the edge its BN
    statistics as well as the affine parameters); LayerNorm and GroupNorm only their affine parameters.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown normalization kind {kind!r}; expected one of {NORM_KINDS}")
    suffixes: tuple[str, ...] = _AFFINE if affine else ()
    if kind == "BatchNorm" and track_running_stats:
        suffixes += _BN_STATS
    return suffixes


def is_variance_name(name: str) -> bool:
    """True for BatchNorm running-variance tensors, which must never be negative."""
    return name.endswith(".running_var")
