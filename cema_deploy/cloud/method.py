"""CEMA's cloud-side method (arXiv 2402.17316, Sec. 3.3; official code chenyaofo/CEMA ``codebase/core/tta/cema.py``).

Named functions in the manner of Tent plus one small class; no I/O, no threads, no config files. Per cloud batch of
B uploaded samples: :func:`teacher_step` (the foundation model takes one SGD step on its sample-weighted entropy,
Eqn. 6, only its normalization affine parameters trainable), then :func:`student_step` (the edge replica is
distilled from the teacher, Eqn. 7, on the batch plus replayed samples). BatchNorm runs test-time batch
renormalisation (the official ``tbr_bn_forward_impl``): the forward value is normalised with the running
statistics, gradients flow through the batch statistics, the running statistics move by momentum 0.1.

Running statistics start from the first forward, as in the official code (there they are ``None`` until then):
:func:`calibrate` is that first forward, on a calibration batch; a model that trains before any calibration takes
its statistics from its first training forward. Beyond the paper (each switchable, see ``CemaConfig``):
merging several calibration batches by sample count, recalibration on a shift, statistics from statistics
samples (:func:`update_statistics`) with training forwards that never move them (``statistics = "samples"``),
an autocast teacher, and a separate input normalisation for the teacher (:class:`TeacherInput`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cema_deploy.cloud.config import CemaConfig
from cema_deploy.cloud.head import group_lr, head_parameters, head_state, restore_head, student_param_groups
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import CloudError
from cema_deploy.export.norms import norm_kind

_BN = nn.modules.batchnorm._BatchNorm


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy in nats: ``-sum_c p_c log p_c``."""
    logp = logits.float().log_softmax(dim=1)
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
    t, s, te = temperature, student_logits.float(), teacher_logits.float()
    w = sample_weights(te, e0)
    kl = F.kl_div(F.log_softmax(s / t, dim=1), F.softmax(te / t, dim=1), reduction="none").sum(1) * (t * t)
    ce = F.cross_entropy(s, te.argmax(dim=1).detach(), reduction="none")
    return alpha * weighted_entropy(s, e0) + beta * (w * kl).mean() + gamma * (w * ce).mean()


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) per channel in float32, unbiased as the official ``torch.var_mean``."""
    correction = 1 if x.numel() > x.shape[1] else 0
    var, mu = torch.var_mean(x.float(), dim=[0, *range(2, x.ndim)], correction=correction)
    return var, mu


def _tbr_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """One BatchNorm (plus timm's BatchNormAct drop/act) under TBR in train mode; eval mode as usual, except in a
    calibration pass, where the running statistics first become this input's batch statistics."""
    if self.running_mean is None or self.running_var is None:
        raise CloudError(f"{type(self).__name__} tracks no running statistics; CEMA's TBR needs them.")
    if not self.training:
        if getattr(self, "_cema_calibrate", False):  # official first forward: statistics := batch statistics
            var, mu = _batch_stats(x)
            self.running_mean.copy_(mu)
            self.running_var.copy_(var)
            self._cema_seen = True  # type: ignore[assignment]
        y: torch.Tensor = self._cema_eval_forward(x)  # type: ignore[operator]
        return y
    var, mu = _batch_stats(x)
    with torch.no_grad():
        if not getattr(self, "_cema_seen", False):  # uncalibrated: the first training forward sets them (official)
            self.running_mean.copy_(mu)
            self.running_var.copy_(var)
            self._cema_seen = True  # type: ignore[assignment]
    shape = [1, -1] + [1] * (x.ndim - 2)
    sigma = torch.sqrt(var + self.eps)
    sigma_run = torch.sqrt(self.running_var + self.eps)
    # y = ((x - mu) / sigma * r + d) * weight + bias with r = sigma / sigma_run, d = (mu - mean_run) / sigma_run
    # (r, d detached), folded into one per-channel scale and shift: the full-size tensor is touched once.
    scale = (sigma.detach() / sigma_run) / sigma
    shift = (mu.detach() - self.running_mean) / sigma_run - mu * scale
    if self.affine:
        scale, shift = scale * self.weight, shift * self.weight + self.bias
    y = torch.addcmul(shift.view(shape), x, scale.view(shape))
    if getattr(self, "_cema_track", True):  # statistics = "samples": training forwards never move them
        with torch.no_grad():
            m = 0.1 if self.momentum is None else self.momentum
            self.running_mean.lerp_(mu.detach(), m)
            self.running_var.lerp_(var.detach(), m)
    for tail in ("drop", "act"):  # timm BatchNormAct2d applies dropout and activation after the norm
        mod = getattr(self, tail, None)
        if isinstance(mod, nn.Module):
            y = mod(y)
    return y


def configure_model(model: nn.Module, *, bn_momentum: float = 0.1, track_stats: bool = True) -> nn.Module:
    """Eval mode, only normalization affine parameters trainable (BatchNorm, GroupNorm, LayerNorm and timm's
    subclasses); BatchNorm runs TBR while in train mode (:func:`set_bn_training`), moving its running statistics
    only when ``track_stats``."""
    model.eval()
    model.requires_grad_(False)
    for mod in model.modules():
        if norm_kind(mod) is not None:
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
        if isinstance(mod, _BN):
            mod.momentum = bn_momentum
            mod._cema_track = track_stats  # type: ignore[assignment]
            if not hasattr(mod, "_cema_eval_forward"):
                mod._cema_eval_forward = mod.forward  # type: ignore[assignment]
                mod.forward = types.MethodType(_tbr_forward, mod)  # type: ignore[method-assign]
    return model


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN)]


def set_bn_training(model: nn.Module, mode: bool) -> None:
    """TBR (``True``) or running-statistics eval (``False``) for every BatchNorm; other layers stay in eval."""
    for _, mod in bn_layers(model):
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


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, *, keep: float = 0.0) -> None:
    """The official first forward on ``x``: no gradients, every BatchNorm's running statistics become the batch
    statistics of its input, so later layers see earlier ones normalised with the new statistics. ``keep`` in
    [0, 1) merges instead of replacing (beyond the paper): each statistic becomes ``keep * old + (1 - keep) *
    new``; with ``keep = n_old / (n_old + n_new)`` that is the sample-count-weighted mean of two calibrations."""
    layers = bn_layers(model)
    old = [(m.running_mean.clone(), m.running_var.clone()) for _, m in layers]  # type: ignore[union-attr]
    set_bn_training(model, False)
    for _, m in layers:
        m._cema_calibrate = True  # type: ignore[assignment]
    try:
        model(x)
    finally:
        for _, m in layers:
            m._cema_calibrate = False  # type: ignore[assignment]
    if keep > 0:
        for (_, m), (mean, var) in zip(layers, old, strict=True):
            m.running_mean.lerp_(mean, keep)  # type: ignore[union-attr]
            m.running_var.lerp_(var, keep)  # type: ignore[union-attr]


@torch.no_grad()
def update_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """Beyond the paper: one no-grad TBR forward that moves each BatchNorm's running statistics by its momentum
    toward ``x``'s batch statistics (statistics samples), also where training forwards do not move them."""
    layers = bn_layers(model)
    tracking = [getattr(m, "_cema_track", True) for _, m in layers]
    set_bn_training(model, True)
    for _, m in layers:
        m._cema_track = True  # type: ignore[assignment]
    try:
        model(x)
    finally:
        set_bn_training(model, False)
        for (_, m), t in zip(layers, tracking, strict=True):
            m._cema_track = t  # type: ignore[assignment]


def teacher_step(
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    e0: float,
    autocast: Any = None,
    scaler: Any = None,
) -> float:
    """One SGD step of the foundation model on its weighted entropy (Eqn. 6), BatchNorm in TBR mode. ``autocast``
    is a context manager for the forward (beyond the paper), ``scaler`` a GradScaler for float16."""
    set_bn_training(teacher, True)
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            loss = weighted_entropy(teacher(x), e0)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
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
    x_teacher: torch.Tensor,
    *,
    e0: float,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
    autocast: Any = None,
) -> float:
    """One SGD step of the edge replica (BatchNorm in TBR mode) distilled from the eval-mode teacher (Eqn. 7);
    ``x_teacher`` is the same images as ``x``, prepared as the teacher expects."""
    with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
        teacher_logits = teacher(x_teacher).float()
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
class TeacherInput:
    """How the teacher's input is made from an uploaded uint8 image (beyond the official code, which feeds both
    models one tensor): resized to ``size`` when it differs, then ``(x / 255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]
    interpolation: str = "bilinear"
    source: str = ""  # where these came from, for messages


@dataclass(frozen=True, kw_only=True)
class StepReport:
    """What one cloud step did (``teacher_loss`` is NaN for a replay-only step)."""

    step: int
    new_samples: int
    replayed: int
    teacher_loss: float
    student_loss: float
    seconds: float


def _has_group_norm(*models: nn.Module) -> bool:
    return any(isinstance(m, nn.GroupNorm) for model in models for m in model.modules())


class Cema:
    """The teacher, the edge replica and their optimizers on one ``device``; the caller picks what to replay.

    Example:
        >>> cema = Cema(teacher, replica, manifest=manifest, config=CemaConfig())  # doctest: +SKIP
        >>> cema.adapt(uint8_images, replayed).student_loss; blob = cema.blob_tensors()  # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        manifest: Manifest,
        config: CemaConfig,
        device: str | torch.device = "cpu",
        teacher_input: TeacherInput | None = None,
        teacher_dtype: str = "float32",
    ) -> None:
        self.config, self.manifest, self.device = config, manifest, torch.device(device)
        self.e0 = config.e0(manifest.num_classes)
        pre = manifest.preprocess
        self.teacher_input = teacher_input or TeacherInput(mean=pre.mean, std=pre.std, size=tuple(pre.size))  # type: ignore[arg-type]
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format
        if fmt is torch.channels_last and self.device.type == "cpu" and _has_group_norm(teacher, student):
            # torch 2.13's CPU GroupNorm backward in channels_last crashed the process (SIGSEGV) on a GroupNorm
            # export; the plain layout gives the same values. Reproduced by tests/cloud (GroupNorm deployment).
            fmt = torch.contiguous_format
        track = config.statistics == "training"
        teacher = teacher.to(self.device, memory_format=fmt)  # type: ignore[call-overload]
        student = student.to(self.device, memory_format=fmt)  # type: ignore[call-overload]
        self.teacher = configure_model(teacher, bn_momentum=config.bn_momentum)
        self.student = configure_model(student, bn_momentum=config.bn_momentum)
        for model in (self.teacher, self.student):
            for _, m in bn_layers(model):
                m._cema_track = track  # type: ignore[assignment]
        self._autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(teacher_dtype)
        self._scaler = torch.amp.GradScaler(self.device.type) if self._autocast_dtype == torch.float16 else None
        self._fmt = fmt
        self.steps = 0
        self.distill_steps = 0  # SGD steps of the replica (student_steps per cloud step; not saved) ...
        self.distilled_samples = 0  # ... and the samples they distilled on, new and replayed (the effort, measured)
        missing = [p.name for p in manifest.refittable if p.name not in self.student.state_dict()]
        if missing:
            raise CloudError(
                f"The replica of {manifest.model_name} lacks refittable tensors {missing[:3]}; "
                "load the replica from the same export as the manifest."
            )
        self._head = head_parameters(self.student, manifest)  # beyond the paper: `export --refit head`
        self._new_optimizers()
        self._initial = self.state_dict()

    # ---- steps ----------------------------------------------------------------------------------------------
    def adapt(self, images: np.ndarray, replayed: np.ndarray | None = None, *, groups: Any = None) -> StepReport:
        """One cloud step: the teacher on B uploaded uint8 ``[N, H, W, 3]`` images (Eqn. 6), then the replica
        distilled on them plus ``replayed`` (Eqn. 7; official: 3B from the replay window once it holds >= 256).
        ``groups``: a :class:`~cema_deploy.cloud.edge_statistics.StudentGroups` over ``images`` then ``replayed``
        (beyond the paper: each device's samples normalised with the statistics that device serves).
        With ``student_steps = k`` (beyond the paper) the replica takes k SGD steps, each on the new images plus
        its own k-th share of ``replayed`` (the caller draws k times the replay of one step)."""
        t0 = time.perf_counter()
        x, xt = self._inputs(images)
        t_loss = teacher_step(self.teacher, self.opt_teacher, xt, e0=self.e0, autocast=self._ac(), scaler=self._scaler)
        n_rep = 0 if replayed is None else len(replayed)
        k, b = self.config.student_steps, len(images)
        bounds = np.cumsum([0] + [n_rep // k + (i < n_rep % k) for i in range(k)])  # np.array_split's shares
        for lo, hi in itertools.pairwise(bounds):
            sx, sxt = x, xt
            if hi > lo:
                rx, rxt = self._inputs(replayed[lo:hi])  # type: ignore[index]
                sx, sxt = torch.cat([x, rx]), torch.cat([xt, rxt])
            rows = np.r_[0:b, b + lo : b + hi]  # this step's samples in ``groups`` (new, then its replay share)
            with self._edge_norm(groups, rows):
                s_loss = self._distill(sx, sxt, count=False)
        self.steps += 1
        return StepReport(
            step=self.steps,
            new_samples=len(images),
            replayed=n_rep,
            teacher_loss=t_loss,
            student_loss=s_loss,
            seconds=time.perf_counter() - t0,
        )

    def replay_step(self, replayed: np.ndarray, *, groups: Any = None) -> StepReport:
        """The official replay-only step: the replica distilled on replayed samples (4B), no teacher step. With
        ``replay_moves_stats = False`` (beyond the paper) no running statistics move during it. ``groups``: as in
        :meth:`adapt`."""
        t0 = time.perf_counter()
        frozen = [] if self.config.replay_moves_stats else [m for _, m in self._bns()]
        tracking = [getattr(m, "_cema_track", True) for m in frozen]
        for m in frozen:
            m._cema_track = False  # type: ignore[assignment]
        try:
            with self._edge_norm(groups):
                s_loss = self._distill(*self._inputs(replayed))
        finally:
            for m, t in zip(frozen, tracking, strict=True):
                m._cema_track = t  # type: ignore[assignment]
        return StepReport(
            step=self.steps,
            new_samples=0,
            replayed=len(replayed),
            teacher_loss=float("nan"),
            student_loss=s_loss,
            seconds=time.perf_counter() - t0,
        )

    def calibrate(self, images: np.ndarray, *, student: bool = True, teacher: bool = False, keep: float = 0.0) -> None:
        """:func:`calibrate` the replica and/or the teacher on a calibration batch."""
        x, xt = self._inputs(images)
        if student and keep == 0 and self.config.head_scope == "episode":  # beyond the paper (cloud/head.py)
            restore_head(self.student, self.manifest, self._initial["student"], self.opt_student)
        if student:
            calibrate(self.student, x, keep=keep)
        if teacher:
            calibrate(self.teacher, xt, keep=keep)

    def update_statistics(self, images: np.ndarray) -> None:
        """:func:`update_statistics` of both models on a batch of statistics samples."""
        x, xt = self._inputs(images)
        update_statistics(self.student, x)
        update_statistics(self.teacher, xt)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits of the teacher and of the replica on uint8 ``images``, both normalising with their running
        statistics (what distillation targets and what a blob carries); no state changes. For diagnosis."""
        set_bn_training(self.teacher, False)
        set_bn_training(self.student, False)
        x, xt = self._inputs(images)
        return self.teacher(xt).float().cpu().numpy(), self.student(x).float().cpu().numpy()

    @torch.no_grad()
    def predict_replica(self, images: np.ndarray) -> np.ndarray:
        """The replica's logits alone (:meth:`predict` without the teacher): the gate's second candidate."""
        set_bn_training(self.student, False)
        return self.student(self._inputs(images)[0]).float().cpu().numpy()  # type: ignore[no-any-return]

    # ---- state ----------------------------------------------------------------------------------------------
    def blob_tensors(self) -> dict[str, np.ndarray]:
        """The replica's tensors named in the manifest (affine parameters and running statistics), float32 on the
        host: everything the edge graph needs to reproduce the replica's eval-mode output."""
        state = self.student.state_dict()
        return {
            p.name: state[p.name].detach().to("cpu", torch.float32).numpy().copy() for p in self.manifest.refittable
        }

    @torch.no_grad()
    def load_replica(self, tensors: dict[str, np.ndarray], *, clear_momentum: bool = False) -> None:
        """Put :meth:`blob_tensors` (e.g. the last published ones) into the replica; ``clear_momentum`` also drops
        its optimizer's momentum, which would push it back the way it came (the cloud-side gate's refusal)."""
        state = self.student.state_dict()
        for name, value in tensors.items():
            state[name].copy_(torch.from_numpy(np.asarray(value)))
        if clear_momentum:
            self.opt_student.state.clear()

    def problem(self) -> str | None:
        """Why this state must not be published (a non-finite tensor or a negative variance in either model), or
        ``None``. Checked after every step: a diverged step is never published."""
        for side, model in (("teacher", self.teacher), ("replica", self.student)):
            tensors = {**norm_state(model), **(head_state(model, self.manifest) if model is self.student else {})}
            for name, v in tensors.items():
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    return f"the {side}'s {name} holds NaN or Inf"
                if name.endswith("running_var") and bool((v < 0).any()):
                    return f"the {side}'s {name} holds a negative variance"
        return None

    def state_dict(self) -> dict[str, Any]:
        """What adaptation changed, on the host: normalization tensors of both models, optimizer states, TBR
        flags, the step counter."""
        seen = {n: bool(getattr(m, "_cema_seen", False)) for n, m in self._bns()}
        out: dict[str, Any] = _to_cpu(
            {
                "teacher": norm_state(self.teacher),
                "student": {**norm_state(self.student), **head_state(self.student, self.manifest)},
                "steps": self.steps,
                "opt_teacher": self.opt_teacher.state_dict(),
                "opt_student": self.opt_student.state_dict(),
                "seen": seen,
            }
        )
        return out

    def load_state_dict(self, state: dict[str, Any], *, steps: bool = True) -> None:
        """Restore :meth:`state_dict` (onto this device); learning rates stay the config's."""
        for side, model in (("teacher", self.teacher), ("student", self.student)):
            missing = set(norm_state(model)) - set(state[side])
            if side == "student":
                missing |= set(head_state(model, self.manifest)) - set(state[side])
            if missing:
                raise CloudError(
                    f"The saved adaptation state lacks {len(missing)} {side} tensors, e.g. "
                    f"{sorted(missing)[:3]}; it belongs to other models. Use a new --state directory."
                )
            model.load_state_dict(state[side], strict=False)
        self.opt_teacher.load_state_dict(state["opt_teacher"])  # moves the momentum buffers onto the device
        self.opt_student.load_state_dict(state["opt_student"])
        for group in self.opt_teacher.param_groups:
            group["lr"] = self.config.teacher_lr
        for group in self.opt_student.param_groups:
            group["lr"] = group_lr(group, self.config)
        if steps:
            self.steps = int(state.get("steps", 0))
        for name, mod in self._bns():
            mod._cema_seen = bool(state["seen"].get(name, False))  # type: ignore[assignment]

    def reset(self) -> None:
        """Both models back to their state at construction, optimizer states cleared, step counter 0."""
        self._new_optimizers()
        self.load_state_dict(self._initial)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _new_optimizers(self) -> None:
        c = self.config
        self.opt_teacher = torch.optim.SGD(collect_params(self.teacher)[0], lr=c.teacher_lr, momentum=c.momentum)
        groups = student_param_groups(collect_params(self.student)[0], self._head, c)
        self.opt_student = torch.optim.SGD(groups, lr=c.student_lr, momentum=c.momentum)

    def _edge_norm(self, groups: Any, rows: np.ndarray | None = None) -> Any:
        """Beyond the paper: within the block, the replica normalises each device's samples with the statistics
        that device serves (cloud/edge_statistics.py); no-op without ``groups``. ``rows``: the samples of
        ``groups`` this forward sees (one student step of several), all of them when None."""
        if groups is None:
            return contextlib.nullcontext()
        from cema_deploy.cloud.edge_statistics import normalised_by_device

        if rows is not None:
            groups = dataclasses.replace(groups, index=groups.index[rows])  # the same devices, stats and counter
        return normalised_by_device(self.student, groups, self.device)

    def _distill(self, x: torch.Tensor, xt: torch.Tensor, *, count: bool = True) -> float:
        """One distillation step; ``count``: it is the whole cloud step (a multi-step :meth:`adapt` counts once)."""
        c = self.config
        loss = student_step(
            self.student,
            self.teacher,
            self.opt_student,
            x,
            xt,
            e0=self.e0,
            alpha=c.alpha,
            beta=c.beta,
            gamma=c.gamma,
            temperature=c.temperature,
            autocast=self._ac(),
        )
        self.distill_steps += 1
        self.distilled_samples += len(x)
        self.steps += int(count)
        return loss

    def _ac(self) -> Any:
        if self._autocast_dtype is None:
            return None
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _inputs(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[N, H, W, 3]`` -> (the replica's input as the edge made it, the teacher's input), on the
        device: the uint8 batch is moved once, scaled there."""
        u = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(self.device, non_blocking=True)
        x = u.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        pre, ti = self.manifest.preprocess, self.teacher_input
        xs = _normalise(x, pre.mean, pre.std)
        xt = x
        if tuple(ti.size) != tuple(x.shape[2:]):
            down = ti.size[0] < x.shape[2] or ti.size[1] < x.shape[3]
            mode = ti.interpolation if ti.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            xt = F.interpolate(x, size=tuple(ti.size), mode=mode, antialias=down and mode != "nearest")
        xt = _normalise(xt, ti.mean, ti.std)
        return xs.contiguous(memory_format=self._fmt), xt.contiguous(memory_format=self._fmt)

    def _bns(self) -> Iterator[tuple[str, nn.Module]]:
        for side, model in (("teacher", self.teacher), ("student", self.student)):
            for n, m in bn_layers(model):
                yield f"{side}.{n}", m


def _normalise(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
