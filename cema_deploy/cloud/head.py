"""The replica's classifier, trained when the export marks it refittable (``export --refit head``; beyond the paper).

CEMA's replica learns its normalization affine parameters only (Sec. 3.3). An export made with ``--refit head``
lists the classifier's bias (and, for heads of <= 100 classes, its weight) among the refittable tensors; the cloud
then trains those too, in their own SGD parameter group with :attr:`CemaConfig.head_learning_rate`, keeps them
in its saved state, and :meth:`Cema.blob_tensors` carries them (it copies every refittable tensor by name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cema_deploy.cloud.config import CemaConfig
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import CloudError

#: The ``name`` of the replica optimizer's parameter group that holds the head (kept through a state save).
HEAD_GROUP = "head"


def head_parameters(model: nn.Module, manifest: Manifest) -> list[nn.Parameter]:
    """The parameters of ``model`` that the manifest marks as refittable classifier tensors, made trainable."""
    params = dict(model.named_parameters())
    names = [p.name for p in manifest.head_refittable]
    missing = [n for n in names if n not in params]
    if missing:
        raise CloudError(
            f"The replica of {manifest.model_name} has no parameters {missing[:3]} that the manifest marks as its "
            "refittable head; load the replica from the same export as the manifest."
        )
    for n in names:
        params[n].requires_grad_(True)
    return [params[n] for n in names]


def student_param_groups(norms: list[nn.Parameter], head: list[nn.Parameter], config: CemaConfig) -> list[Any]:
    """The replica optimizer's parameter groups: the normalization affine parameters at ``student_lr``, then the
    head (if any) at ``head_learning_rate``."""
    groups: list[dict[str, Any]] = [{"params": norms, "lr": config.student_lr}]
    if head:
        groups.append({"params": head, "lr": config.head_learning_rate, "name": HEAD_GROUP})
    return groups


def group_lr(group: dict[str, Any], config: CemaConfig) -> float:
    """The configured lr of one replica parameter group (a restored state keeps the config's, not its own)."""
    return config.head_learning_rate if group.get("name") == HEAD_GROUP else config.student_lr


def head_state(model: nn.Module, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Copies of the refittable classifier tensors of ``model`` (empty for a norms-only export)."""
    state = model.state_dict()
    return {p.name: state[p.name].detach().clone() for p in manifest.head_refittable}


@torch.no_grad()
def restore_head(model: nn.Module, manifest: Manifest, saved: dict[str, torch.Tensor], optimizer: Any) -> None:
    """``head_scope = "episode"``: the head's tensors back to ``saved`` (the replica's state at construction: the
    export's head) and their SGD momentum dropped, so a new episode does not inherit what earlier ones taught it."""
    params = dict(model.named_parameters())
    for p in manifest.head_refittable:
        params[p.name].copy_(saved[p.name])
        optimizer.state.pop(params[p.name], None)
