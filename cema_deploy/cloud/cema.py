"""CEMA's cloud-side method in one file (arXiv 2402.17316, Sec. 3.3; official code chenyaofo/CEMA).

Per uploaded batch of B samples: (1) :func:`teacher_step`: the foundation model (teacher) takes one SGD step on
its sample-weighted entropy (Eqn. 6), only its normalization affine parameters trainable; (2)
:func:`student_step`: the edge model's replica is distilled from the teacher (Eqn. 7: weighted entropy + weighted
KL + weighted CE on the teacher's argmax) on the new batch plus ``3B`` replayed samples once the buffer holds more
than 256. Without uploads, :meth:`Cema.idle_step` distils on ``4B`` replayed samples. BatchNorm layers use test-time
batch renormalisation (the official ``tbr_bn_forward_impl``): the forward value is normalised with the running
statistics, gradients flow through the batch statistics, the running statistics move by momentum, and the first
adapted batch replaces the source statistics.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cema_deploy.cloud.config import CemaConfig
from cema_deploy.cloud.replay import MemoryReplay, ReplayBuffer
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import CloudError
from cema_deploy.export.norms import norm_kind
from cema_deploy.runtime.preprocess import normalize

_BN = nn.modules.batchnorm._BatchNorm


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy in nats: ``-sum_c p_c log p_c``."""
    logp = logits.log_softmax(dim=1)
    out: torch.Tensor = -(logp.exp() * logp).sum(dim=1)
    return out


def sample_weights(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """``1 / exp(E(x) - E_0)`` (Eqn. 6-7), detached: a weight, not a path for gradients."""
    return torch.exp(e0 - entropy(logits).detach())


def weighted_entropy(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """``mean(E(x) / exp(E(x) - E_0))``: the foundation model's loss (Eqn. 6) and the alpha term of Eqn. 7."""
    return (entropy(logits) * sample_weights(logits, e0)).mean()


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    e0: float,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
) -> torch.Tensor:
    """Eqn. 7 exactly as the official ``TTADistillationLoss``: ``alpha * weighted_entropy(student) + beta *
    mean(w * KL(teacher || student).sum(-1) * T^2) + gamma * mean(w * CE(student, argmax teacher))`` with
    ``w = 1 / exp(E(teacher) - E_0)``."""
    t = temperature
    w = sample_weights(teacher_logits, e0)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="none").sum(
        1
    ) * (t * t)
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(dim=1).detach(), reduction="none")
    return alpha * weighted_entropy(student_logits, e0) + beta * (w * kl).mean() + gamma * (w * ce).mean()


def _tbr_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Test-time batch renormalisation of one BatchNorm (plus timm's BatchNormAct drop/act when present)."""
    if not self.training:
        y: torch.Tensor = self._cema_eval_forward(x)  # type: ignore[operator]
        return y
    if self.running_mean is None or self.running_var is None:
        raise CloudError(f"{type(self).__name__} tracks no running statistics; CEMA's TBR needs them.")
    dims = [0, *range(2, x.ndim)]
    correction = 1 if x.numel() > x.shape[1] else 0  # official torch.var_mean: unbiased
    var, mu = torch.var_mean(x, dim=dims, correction=correction)
    with torch.no_grad():
        if not getattr(self, "_cema_seen", False):  # the first adapted batch replaces the source statistics
            self.running_mean.copy_(mu)
            self.running_var.copy_(var)
            self._cema_seen = True  # type: ignore[assignment]
    shape = [1, -1] + [1] * (x.ndim - 2)
    sigma = torch.sqrt(var + self.eps)
    sigma_run = torch.sqrt(self.running_var + self.eps)
    r = sigma.detach() / sigma_run
    d = (mu.detach() - self.running_mean) / sigma_run
    # y = ((x - mu) / sigma * r + d) * weight + bias, folded into one per-channel scale and shift so that the
    # full-size tensor is touched once (same value, same gradients; 2-3x faster on CPU).
    scale = r / sigma
    shift = d - mu * scale
    if self.affine:
        scale, shift = scale * self.weight, shift * self.weight + self.bias
    y = torch.addcmul(shift.view(shape), x, scale.view(shape))
    with torch.no_grad():
        m = 0.1 if self.momentum is None else self.momentum
        self.running_mean.lerp_(mu.detach(), m)
        self.running_var.lerp_(var.detach(), m)
    for tail in ("drop", "act"):  # timm BatchNormAct2d applies dropout and activation after the norm
        mod = getattr(self, tail, None)
        if isinstance(mod, nn.Module):
            y = mod(y)
    return y


def configure_model(model: nn.Module, *, bn_momentum: float = 0.1) -> nn.Module:
    """Eval mode, only normalization affine parameters trainable (BatchNorm, GroupNorm, LayerNorm and timm's
    subclasses); BatchNorm runs test-time batch renormalisation while in train mode (:func:`set_bn_training`)."""
    model.eval()
    model.requires_grad_(False)
    for mod in model.modules():
        if norm_kind(mod) is not None:
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
        if isinstance(mod, _BN):
            mod.momentum = bn_momentum
            if not hasattr(mod, "_cema_eval_forward"):
                mod._cema_eval_forward = mod.forward  # type: ignore[assignment]
                mod.forward = types.MethodType(_tbr_forward, mod)  # type: ignore[method-assign]
    return model


def set_bn_training(model: nn.Module, mode: bool) -> None:
    """TBR (``True``) or running-statistics eval (``False``) for every BatchNorm; other layers stay in eval."""
    for mod in model.modules():
        if isinstance(mod, _BN):
            mod.train(mode)


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The normalization affine parameters, with their state-dict names (= the refittable initializer names)."""
    params, names = [], []
    for mod_name, mod in model.named_modules():
        if norm_kind(mod) is not None:
            for p_name, p in mod.named_parameters(recurse=False):
                params.append(p)
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return params, names


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries of every normalization layer (affine parameters and running statistics)."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if norm_kind(mod) is not None:
            for k, v in mod.state_dict().items():
                out[f"{mod_name}.{k}" if mod_name else k] = v.detach().clone()
    return out


def teacher_step(teacher: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, *, e0: float) -> float:
    """One SGD step of the foundation model on its weighted entropy (Eqn. 6), BatchNorm in TBR mode."""
    set_bn_training(teacher, True)
    try:
        loss = weighted_entropy(teacher(x), e0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    finally:
        set_bn_training(teacher, False)
    return float(loss.detach())


def student_step(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    e0: float,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
) -> float:
    """One SGD step of the edge replica (BatchNorm in TBR mode) distilled from the eval-mode teacher (Eqn. 7)."""
    with torch.no_grad():
        teacher_logits = teacher(x)
    set_bn_training(student, True)
    try:
        loss = distill_loss(
            student(x), teacher_logits, e0=e0, alpha=alpha, beta=beta, gamma=gamma, temperature=temperature
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    finally:
        set_bn_training(student, False)
    return float(loss.detach())


@dataclass(frozen=True, kw_only=True)
class StepReport:
    """What one cloud step did (``teacher_loss`` is NaN for an idle replay step)."""

    step: int
    new_samples: int
    replayed: int
    teacher_loss: float
    student_loss: float
    seconds: float


class Cema:
    """The teacher, the edge replica, their optimizers, the replay buffer and the step counter.

    ``replay`` is the buffer the official code calls ``history_buffer``: uploads join it when they arrive, so the
    owner of an external buffer adds a batch before :meth:`adapt` runs on it; without one, :meth:`adapt` adds it.

    Example:
        >>> cema = Cema(teacher, replica, manifest=manifest, config=CemaConfig())  # doctest: +SKIP
        >>> cema.adapt(uint8_images).student_loss; blob = cema.blob_tensors()  # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        manifest: Manifest,
        config: CemaConfig,
        replay: ReplayBuffer | None = None,
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.e0 = config.e0(manifest.num_classes)
        if config.channels_last:  # 4-D weights become NHWC; norm parameters (1-D) and their names are unchanged
            teacher = teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            student = student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.teacher = configure_model(teacher, bn_momentum=config.bn_momentum)
        self.student = configure_model(student, bn_momentum=config.bn_momentum)
        self.opt_teacher = torch.optim.SGD(collect_params(teacher)[0], lr=config.teacher_lr, momentum=config.momentum)
        self.opt_student = torch.optim.SGD(collect_params(student)[0], lr=config.student_lr, momentum=config.momentum)
        self._memory: MemoryReplay | None = None
        if replay is None:
            replay = self._memory = MemoryReplay(capacity=config.replay_size)
        self.replay = replay
        self.steps = 0
        state = self.student.state_dict()
        missing = [p.name for p in manifest.refittable if p.name not in state]
        if missing:
            raise CloudError(
                f"The replica of {manifest.model_name} lacks refittable tensors {missing[:3]}; "
                "load the replica from the same export as the manifest."
            )

    def adapt(self, images: np.ndarray) -> StepReport:
        """One cloud step on a batch of uploaded uint8 ``[N, H, W, 3]`` images at model size."""
        t0 = time.perf_counter()
        c = self.config
        if self._memory is not None:
            self._memory.add(images)
        x = self._tensor(images)
        t_loss = teacher_step(self.teacher, self.opt_teacher, x, e0=self.e0)
        replayed = self._draw(c.replay_factor * c.batch_size) if len(self.replay) > c.replay_min else None
        if replayed is not None and len(replayed):
            x = torch.cat([x, self._tensor(replayed)])
        s_loss = self._distill(x)
        return StepReport(
            step=self.steps,
            new_samples=len(images),
            replayed=0 if replayed is None else len(replayed),
            teacher_loss=t_loss,
            student_loss=s_loss,
            seconds=time.perf_counter() - t0,
        )

    def idle_step(self) -> StepReport | None:
        """Distil on ``idle_factor * B`` replayed samples; ``None`` while the buffer holds ``replay_min`` or fewer."""
        c = self.config
        if len(self.replay) <= c.replay_min:
            return None
        t0 = time.perf_counter()
        replayed = self._draw(c.idle_factor * c.batch_size)
        s_loss = self._distill(self._tensor(replayed))
        return StepReport(
            step=self.steps,
            new_samples=0,
            replayed=len(replayed),
            teacher_loss=float("nan"),
            student_loss=s_loss,
            seconds=time.perf_counter() - t0,
        )

    def blob_tensors(self) -> dict[str, np.ndarray]:
        """The replica's tensors named in the manifest (affine parameters and running statistics), float32:
        everything the edge graph needs to reproduce the replica's eval-mode output."""
        state = self.student.state_dict()
        return {p.name: state[p.name].detach().to(torch.float32).cpu().numpy().copy() for p in self.manifest.refittable}

    def state_dict(self) -> dict[str, Any]:
        """What adaptation changed: normalization tensors of both models, optimizer states, TBR flags, steps."""
        seen = {n: bool(getattr(m, "_cema_seen", False)) for n, m in self._bns()}
        return {
            "teacher": norm_state(self.teacher),
            "student": norm_state(self.student),
            "steps": self.steps,
            "opt_teacher": self.opt_teacher.state_dict(),
            "opt_student": self.opt_student.state_dict(),
            "seen": seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for side, model in (("teacher", self.teacher), ("student", self.student)):
            missing = set(norm_state(model)) - set(state[side])
            if missing:
                raise CloudError(
                    f"The saved adaptation state lacks {len(missing)} {side} tensors, e.g. "
                    f"{sorted(missing)[:3]}; it belongs to other models. Use a new --state directory."
                )
            model.load_state_dict(state[side], strict=False)
        self.opt_teacher.load_state_dict(state["opt_teacher"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.steps = int(state.get("steps", 0))
        for name, mod in self._bns():
            mod._cema_seen = bool(state["seen"].get(name, False))  # type: ignore[assignment]

    def _distill(self, x: torch.Tensor) -> float:
        c = self.config
        loss = student_step(
            self.student,
            self.teacher,
            self.opt_student,
            x,
            e0=self.e0,
            alpha=c.alpha,
            beta=c.beta,
            gamma=c.gamma,
            temperature=c.temperature,
        )
        self.steps += 1
        return loss

    def _draw(self, k: int) -> np.ndarray:
        # Seeded per step, so a restarted service draws what an uninterrupted one would have drawn.
        return self.replay.sample(k, np.random.default_rng([self.config.seed, self.steps]))

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(normalize(images, self.manifest.preprocess))
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _bns(self) -> list[tuple[str, nn.Module]]:
        return [
            (f"{side}.{n}", m)
            for side, model in (("teacher", self.teacher), ("student", self.student))
            for n, m in model.named_modules()
            if isinstance(m, _BN)
        ]
