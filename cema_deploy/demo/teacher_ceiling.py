"""The teacher's own rows in the demo and the frontier (issue 22): how good the cloud's model is on the same
stream and protocol as the edge, the lead the cloud should carry to the edge.

- ``teacher_no_adapt``: the teacher as is (BatchNorm with its training statistics).
- ``teacher_adapted``: the teacher with test-time adaptation of its own, the higher (over the whole stream) of

  * ``bn_adapt``: test-batch BatchNorm (each edge batch's own statistics, no gradient), and
  * ``entropy_step``: the cloud's teacher step as :class:`~cema_deploy.cloud.method.Cema` runs it, on every
    frame: the official first forward calibrates the running statistics at the start of the stream (and of each
    corruption under the reset protocol), as the cloud calibrates its teacher on a shift calibration (on a start
    calibration the cloud keeps the teacher's training statistics: this row starts every corruption calibrated),
    then per cloud batch of B frames one SGD step on the sample-weighted entropy (Eqn. 6; lr ``teacher_lr``,
    momentum 0.9, E_0 = 0.4 ln C: :class:`~cema_deploy.cloud.config.CemaConfig` defaults) with test-time batch
    renormalisation (running statistics move by momentum 0.1); a frame's prediction is the output of the forward
    that computes its loss.

  Which one won is recorded (``adapted_by``) with both accuracies. This is the ``teacher_ceiling`` of
  :mod:`cema_deploy.demo.gap`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.demo import baselines
from cema_deploy.demo.models import NUM_CLASSES, mean_std, to_tensor, torch_threads
from cema_deploy.demo.report import MethodRun
from cema_deploy.demo.stream import Stream

#: The rows this module adds, in results order.
TEACHER_ROWS = ("teacher_no_adapt", "teacher_adapted")


def entropy_step(model: Any, images: Any, batch: int = 32, *, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Predictions of the teacher adapting as the cloud adapts it (see the module doc), on a copy of ``model``."""
    torch = lazy_import("torch", extra="export", purpose="the teacher's rows")
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import calibrate, configure_model, set_bn_training, weighted_entropy

    cfg = CemaConfig()
    mean, std = mean_std(model)
    model = configure_model(copy.deepcopy(model), bn_momentum=cfg.bn_momentum)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.teacher_lr, momentum=cfg.momentum)
    e0 = cfg.e0_ratio * math.log(num_classes)
    preds = []
    for i, s in enumerate(baselines._batches(len(images), batch)):
        x = to_tensor(images[s], mean, std)
        if i == 0:
            calibrate(model, x)  # the official first forward
        set_bn_training(model, True)
        try:
            logits = model(x)
            loss = weighted_entropy(logits, e0)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        finally:
            set_bn_training(model, False)
        preds.append(logits.argmax(1).detach().numpy())
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)


def _entropy_over(teacher: Any, stream: Stream, protocol: str, batch: int) -> np.ndarray:
    if protocol == "reset":
        parts = [entropy_step(teacher, seg.images, batch) for seg in stream.segments]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return entropy_step(teacher, stream.chained, batch)


def teacher_runs(
    teacher: Any, stream: Stream, *, protocol: str, edge_batch: int = 64, cloud_batch: int = 32, threads: int = 2
) -> dict[str, MethodRun]:
    """``teacher_no_adapt`` and ``teacher_adapted`` over ``stream`` (``teacher``: the torch model, unmodified)."""
    none = np.zeros(len(stream), bool)
    plain = baselines.run_baseline("no_adapt", teacher, stream, batch=edge_batch, protocol=protocol, threads=threads)
    bn = baselines.run_baseline("bn_adapt", teacher, stream, batch=edge_batch, protocol=protocol, threads=threads)
    t1 = time.perf_counter()
    with torch_threads(threads):
        ent = _entropy_over(teacher, stream, protocol, cloud_batch) == stream.labels
    t2 = time.perf_counter()
    ent_acc = 100 * float(ent.mean()) if len(ent) else float("nan")
    bn_acc = 100 * bn.accuracy
    adapted_by, correct = ("entropy_step", ent) if ent_acc > bn_acc else ("bn_adapt", bn.correct)
    return {
        "teacher_no_adapt": MethodRun(plain.correct, none, {"seconds": round(plain.seconds, 1)}),
        "teacher_adapted": MethodRun(
            correct,
            none,
            {
                "adapted_by": adapted_by,
                "bn_adapt_accuracy": bn_acc,
                "entropy_step_accuracy": ent_acc,
                "seconds": round(bn.seconds + t2 - t1, 1),
            },
        ),
    }
