"""CEMA's cloud-side method in one file (arXiv 2402.17316, Sec. 3.3; official code chenyaofo/CEMA).

Per uploaded batch: (1) the foundation model (teacher) takes one SGD step on its sample-weighted entropy
(Eqn. 6), only its normalization affine parameters trainable; (2) the edge model's replica is distilled from the
teacher (Eqn. 7: weighted entropy + weighted KL + weighted CE on the teacher's argmax), on the new batch plus
replayed samples. BatchNorm layers use test-time batch renormalisation (the official ``tbr_bn_forward_impl``):
the forward value is normalised with the running statistics, gradients flow through the batch statistics, and
the running statistics move by momentum; the first adapted batch replaces the source statistics.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cema_deploy.cloud.config import CemaConfig

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy, natural log: ``-sum p log p``."""
    logp = logits.log_softmax(dim=1)
    out: torch.Tensor = -(logp.exp() * logp).sum(dim=1)
    return out


def sample_weights(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """``1 / exp(E(x) - E_0)`` (Eqn. 6), detached: a weight, not a path for gradients."""
    return torch.exp(-(entropy(logits).detach() - e0))


def weighted_entropy(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """``mean(E(x) / exp(E(x) - E_0))``, the foundation model's loss (Eqn. 6)."""
    return (entropy(logits) * sample_weights(logits, e0)).mean()


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, e0: float, alpha: float, beta: float, gamma: float, t: float
) -> torch.Tensor:
    """Eqn. 7 as the official ``TTADistillationLoss``: ``alpha * weighted entropy(student) + beta * mean(w *
    KL(teacher || student) * T^2) + gamma * mean(w * CE(student, argmax teacher))`` with ``w = 1/exp(E_teacher -
    E_0)``."""
    w = sample_weights(teacher, e0)
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="none").sum(1) * t * t
    ce = F.cross_entropy(student, teacher.argmax(dim=1), reduction="none")
    return alpha * weighted_entropy(student, e0) + beta * (w * kl).mean() + gamma * (w * ce).mean()


def _tbr_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Test-time batch renormalisation of one BatchNorm (plus timm's BatchNormAct drop/act when present)."""
    if not self.training:
        y = self._cema_eval_forward(x)  # type: ignore[operator]
        return y  # type: ignore[no-any-return]
    assert self.running_mean is not None and self.running_var is not None  # configure_model guarantees them
    dims = [0, *range(2, x.ndim)]
    mu = x.mean(dims)
    var = x.var(dims, unbiased=False)
    with torch.no_grad():
        if not getattr(self, "_cema_seen", False):  # the first adapted batch replaces the source statistics
            self.running_mean.copy_(mu)
            self.running_var.copy_(var)
            self._cema_seen = True  # type: ignore[assignment]
    shape = [1, -1] + [1] * (x.ndim - 2)
    sigma = torch.sqrt(var + self.eps)
    sigma_run = torch.sqrt(self.running_var + self.eps)
    r = (sigma / sigma_run).detach()
    d = ((mu - self.running_mean) / sigma_run).detach()
    y = ((x - mu.view(shape)) / sigma.view(shape)) * r.view(shape) + d.view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    with torch.no_grad():
        m = self.momentum if self.momentum is not None else 0.1
        n = x.numel() / x.shape[1]
        self.running_mean.mul_(1 - m).add_(mu.detach(), alpha=m)
        self.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)
    for tail in ("drop", "act"):  # timm BatchNormAct2d applies dropout and activation after the norm
        mod = getattr(self, tail, None)
        if isinstance(mod, nn.Module):
            out: torch.Tensor = mod(y)
            y = out
    return y


def configure_model(model: nn.Module, *, bn_momentum: float = 0.1) -> nn.Module:
    """Eval mode everywhere, only normalization affine parameters trainable, BatchNorm with TBR in train mode."""
    model.eval()
    model.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, _NORMS):
            mod.requires_grad_(True)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = bn_momentum
            if not hasattr(mod, "_cema_eval_forward"):
                mod._cema_eval_forward = mod.forward  # type: ignore[assignment]
                mod.forward = types.MethodType(_tbr_forward, mod)  # type: ignore[method-assign]
    return model


def set_bn_training(model: nn.Module, mode: bool) -> None:
    """TBR (``True``) or running-statistics eval (``False``) for every BatchNorm; other layers stay in eval."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train(mode)


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The normalization affine parameters, with their state-dict names (= the refittable initializer names)."""
    params, names = [], []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NORMS):
            for p_name, p in mod.named_parameters(recurse=False):
                params.append(p)
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return params, names


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries of every normalization layer (affine parameters and running statistics)."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NORMS):
            for k, v in mod.state_dict().items():
                out[f"{mod_name}.{k}" if mod_name else k] = v.detach().clone()
    return out


@dataclass(frozen=True)
class StepReport:
    """What one cloud step did."""

    new_samples: int
    replayed: int
    teacher_loss: float
    student_loss: float
    seconds: float


class Cema:
    """The teacher, the edge replica and their optimizers. ``adapt`` runs one step on a normalised batch."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, num_classes: int, config: CemaConfig) -> None:
        self.config = config
        self.e0 = config.e0(num_classes)
        self.teacher = configure_model(teacher, bn_momentum=config.bn_momentum)
        self.student = configure_model(student, bn_momentum=config.bn_momentum)
        self.opt_teacher = torch.optim.SGD(collect_params(teacher)[0], lr=config.teacher_lr, momentum=config.momentum)
        self.opt_student = torch.optim.SGD(collect_params(student)[0], lr=config.student_lr, momentum=config.momentum)

    def adapt(self, new: torch.Tensor, replay: torch.Tensor | None = None) -> StepReport:
        """Teacher step on ``new`` (Eqn. 6), then replica distillation on ``new`` + ``replay`` (Eqn. 7)."""
        import time

        t0 = time.perf_counter()
        set_bn_training(self.teacher, True)
        t_loss = weighted_entropy(self.teacher(new), self.e0)
        self.opt_teacher.zero_grad(set_to_none=True)
        t_loss.backward()  # type: ignore[no-untyped-call]
        self.opt_teacher.step()
        set_bn_training(self.teacher, False)
        batch = new if replay is None or len(replay) == 0 else torch.cat([new, replay])
        s_loss = self.distill(batch)
        return StepReport(len(new), 0 if replay is None else len(replay), float(t_loss.detach()), s_loss,
                          time.perf_counter() - t0)

    def distill(self, batch: torch.Tensor) -> float:
        """One replica step on ``batch`` against the (eval-mode) teacher; also the idle replay step."""
        with torch.no_grad():
            teacher_logits = self.teacher(batch)
        set_bn_training(self.student, True)
        c = self.config
        loss = distill_loss(self.student(batch), teacher_logits, e0=self.e0, alpha=c.alpha, beta=c.beta,
                            gamma=c.gamma, t=c.temperature)
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt_student.step()
        set_bn_training(self.student, False)
        return float(loss.detach())

    def blob_tensors(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The replica's tensors named in the manifest (affine params and running statistics), float32."""
        state = self.student.state_dict()
        return {n: state[n].detach().to(torch.float32).cpu().numpy().copy() for n in names}

    def state_dict(self) -> dict[str, Any]:
        """What adaptation changed: normalization tensors of both models, optimizer states, TBR flags."""
        seen = {n: bool(getattr(m, "_cema_seen", False)) for n, m in self._bns()}
        return {
            "teacher": norm_state(self.teacher), "student": norm_state(self.student),
            "opt_teacher": self.opt_teacher.state_dict(), "opt_student": self.opt_student.state_dict(), "seen": seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for model, part in ((self.teacher, state["teacher"]), (self.student, state["student"])):
            missing = set(norm_state(model)) - set(part)
            if missing:
                raise KeyError(f"adaptation state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
            model.load_state_dict(part, strict=False)
        self.opt_teacher.load_state_dict(state["opt_teacher"])
        self.opt_student.load_state_dict(state["opt_student"])
        for name, mod in self._bns():
            mod._cema_seen = state["seen"].get(name, False)

    def _bns(self) -> list[tuple[str, nn.Module]]:
        return [(f"{side}.{n}", m) for side, model in (("teacher", self.teacher), ("student", self.student))
                for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
