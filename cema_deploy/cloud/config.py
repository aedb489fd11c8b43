"""Hyperparameters of the CEMA cloud, each defined once, named as in the paper (arXiv 2402.17316) and its
official code's ImageNet-C configuration."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class CemaConfig:
    """The cloud's adaptation settings. Class-count dependent values are derived in :meth:`e0`.

    Example:
        >>> round(CemaConfig().e0(1000), 3)
        2.763
    """

    batch_size: int = 32  # B, uploaded samples per cloud step (official cloud batch 32)
    teacher_lr: float = 2.5e-4  # SGD lr of the foundation model's entropy step (Eqn. 6)
    student_lr: float = 2.5e-3  # SGD lr of the edge replica's distillation step (Eqn. 7)
    momentum: float = 0.9  # SGD momentum of both optimizers
    alpha: float = 3.0  # weight of the replica's weighted entropy term (Eqn. 7)
    beta: float = 3.0  # weight of the weighted KL(teacher || replica) term (Eqn. 7)
    gamma: float = 1.0  # weight of the weighted CE(replica, teacher argmax) term (Eqn. 7)
    temperature: float = 1.0  # T of the distillation softmax (Eqn. 7)
    e0_ratio: float = 0.4  # E_0 = 0.4 ln C, the sample-weight reference 1/exp(E - E_0) (Eqn. 3, 6)
    replay_size: int = 10_000  # samples kept in the replay buffer (Sec. 3.3)
    replay_min: int = 256  # replay starts once more than this many samples are stored
    replay_factor: int = 3  # each step distils on B new + replay_factor*B replayed samples
    idle_factor: int = 4  # an idle step replays idle_factor*B samples
    idle_after_s: float = 0.0  # seconds without uploads before an idle replay step; 0 = no idle replay
    idle_max_steps: int = 8  # idle replay steps between two uploads, at most
    publish_every: int = 1  # K: publish a blob after every K steps (official K = 1)
    bn_momentum: float = 0.1  # running-statistics momentum of test-time batch renormalisation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.publish_every < 1 or self.replay_size < 0:
            raise ValueError("batch_size and publish_every must be >= 1 and replay_size >= 0")

    def e0(self, num_classes: int) -> float:
        """E_0 for ``num_classes`` classes."""
        return self.e0_ratio * math.log(num_classes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
