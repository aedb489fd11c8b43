"""Hyperparameters of the CEMA cloud, each defined once, named as in the paper (arXiv 2402.17316) and tagged with
its equation or the official code's default (chenyaofo/CEMA ``conf/cema.conf``, ``codebase/core/tta/cema.py``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cema_deploy.exceptions import CloudError


@dataclass(frozen=True, kw_only=True)
class CemaConfig:
    """The cloud's adaptation settings. Values that depend on the class count are derived in :meth:`e0`.

    Example:
        >>> round(CemaConfig().e0(1000), 3)
        2.763
    """

    batch_size: int = 32  # B: uploaded samples per cloud step (official cloud batch size 32)
    teacher_lr: float = 2.5e-4  # SGD lr of the foundation model's weighted-entropy step (Eqn. 6; t_tta_lr)
    student_lr: float = 2.5e-3  # SGD lr of the edge replica's distillation step (Eqn. 7; s_tta_lr)
    momentum: float = 0.9  # SGD momentum of both optimizers (official optim.SGD(momentum=0.9))
    alpha: float = 3.0  # alpha: weight of the replica's weighted entropy term (Eqn. 7)
    beta: float = 3.0  # beta: weight of the weighted KL(teacher || replica) term (Eqn. 7)
    gamma: float = 1.0  # gamma: weight of the weighted CE(replica, argmax teacher) term (Eqn. 7)
    temperature: float = 1.0  # T: distillation softmax temperature, KL scaled by T^2 (Eqn. 7)
    e0_ratio: float = 0.4  # E_0 = e0_ratio * ln C in the sample weight 1/exp(E(x) - E_0) (Eqn. 6-7; E_max)
    replay_size: int = 10_000  # replay buffer: the last 10,000 uploaded samples (Sec. 3.3; replay_buffer_size)
    replay_min: int = 256  # replay starts once more than this many samples are stored (official 256)
    replay_factor: int = 3  # each step distils on B new + replay_factor * B replayed samples (official 3B)
    idle_factor: int = 4  # an idle step distils on idle_factor * B replayed samples (official 4B)
    idle_after_s: float = 0.0  # seconds without uploads before an idle replay step; 0 disables idle replay
    idle_max_steps: int = 8  # idle replay steps between two uploads, at most (bounds CPU use when nothing comes)
    publish_every: int = 1  # K: publish the replica's parameters after every K steps (official K = 1)
    bn_momentum: float = 0.1  # momentum of the running statistics under test-time batch renormalisation (TBR)
    channels_last: bool = True  # NHWC memory layout for both models: same values, conv ~30 % faster on CPU
    # (measured: resnet18 teacher + resnet10t replica at 32x32, B = 32 + 3B replayed, 0.39 -> 0.27 s per step)
    seed: int = 0  # seeds replay sampling (per step, so a restart draws what an uninterrupted run would)

    def __post_init__(self) -> None:
        problems = [
            f"{name} = {getattr(self, name)} must be >= {low}"
            for name, low in (
                ("batch_size", 1),
                ("publish_every", 1),
                ("replay_size", 0),
                ("replay_min", 0),
                ("replay_factor", 0),
                ("idle_factor", 1),
                ("idle_max_steps", 0),
                ("idle_after_s", 0),
            )
            if getattr(self, name) < low
        ]
        problems += [
            f"{name} = {getattr(self, name)} must be positive"
            for name in ("teacher_lr", "student_lr", "temperature")
            if not getattr(self, name) > 0
        ]
        if not 0 < self.bn_momentum <= 1:
            problems.append(f"bn_momentum = {self.bn_momentum} must be in (0, 1]")
        if problems:
            raise CloudError("Invalid CEMA settings: " + "; ".join(problems) + ".")

    def e0(self, num_classes: int) -> float:
        """E_0 = ``e0_ratio * ln(num_classes)`` (Eqn. 6-7)."""
        return self.e0_ratio * math.log(num_classes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
