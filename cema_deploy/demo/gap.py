"""How much of the teacher's lead reaches the edge (issue 22's definitions, used by the demo and the frontier):

- ``teacher_ceiling``: the teacher with test-time adaptation of its own, on the same stream and protocol: the
  higher of its cloud-side entropy step and test-batch BatchNorm (the ``teacher_adapted`` row,
  :mod:`cema_deploy.demo.teacher_ceiling`).
- ``floor``: the best the edge reaches with no cloud, in the same run and seed: the higher of ``bn_adapt``
  (PyTorch test-batch BN) and ``edge_stats`` (the edge's own statistics adapter) where the run has it.
- ``gap_closed`` = (rule's accuracy - floor) / (teacher_ceiling - floor), per seed, then mean and spread over
  seeds. 0: the cloud added nothing over the edge alone; 1: the edge reached the adapted teacher. Where the
  ceiling is not above the floor there is no lead to carry and the ratio is undefined: :func:`gap_closed`
  returns None (never a division by zero, never an infinity), and such seeds are left out of the mean.

Example:
    >>> gap_closed(70.0, floor=60.0, ceiling=80.0)
    0.5
    >>> gap_closed(70.0, floor=60.0, ceiling=60.0) is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cema_deploy.exceptions import CemaError

#: Rows whose best is the floor (edge alone, no cloud); ``edge_stats`` counts where present.
FLOOR_ROWS = ("bn_adapt", "edge_stats")
#: The row that is the ceiling.
CEILING_ROW = "teacher_adapted"


def floor_of(rows: Mapping[str, float]) -> float:
    """The higher of ``bn_adapt`` and ``edge_stats`` among ``rows`` (accuracy by row name) that has them."""
    got = [float(rows[r]) for r in FLOOR_ROWS if r in rows and rows[r] is not None]
    if not got:
        raise CemaError(
            f"The floor needs a bn_adapt or edge_stats accuracy in the same run; got rows {sorted(rows)}. "
            "Run the demo or the frontier with bn_adapt among its baselines."
        )
    return max(got)


def gap_closed(accuracy: float, *, floor: float, ceiling: float) -> float | None:
    """(accuracy - floor) / (ceiling - floor); None when ``ceiling <= floor`` (the teacher has no lead to carry).
    Negative when the rule is below the edge alone, above 1 when it beats the adapted teacher."""
    if not ceiling > floor:
        return None
    return (accuracy - floor) / (ceiling - floor)


def gap_over_seeds(
    accuracies: Sequence[float], floors: Sequence[float], ceilings: Sequence[float]
) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds of the per-seed gap closed (seeds where it is undefined are
    left out); (None, None) when no seed defines it, spread None with one defined seed."""
    if not len(accuracies) == len(floors) == len(ceilings):
        raise CemaError(
            f"gap_closed needs one floor and one ceiling per seed: {len(accuracies)} accuracies, "
            f"{len(floors)} floors, {len(ceilings)} ceilings."
        )
    gaps = [gap_closed(a, floor=f, ceiling=c) for a, f, c in zip(accuracies, floors, ceilings, strict=True)]
    vals = np.array([g for g in gaps if g is not None], np.float64)
    if not len(vals):
        return None, None
    return float(vals.mean()), (float(vals.std(ddof=1)) if len(vals) > 1 else None)


def results_gap(per_seed: Sequence[Mapping[str, Mapping[str, object]]]) -> dict[str, object]:
    """For the demo's ``results.json`` (one severity): the per-seed ``floor`` and ``teacher_ceiling`` and, per
    method, ``gap_closed`` with its spread. ``per_seed``: :func:`~cema_deploy.demo.report.summarize`'s dict per
    seed. Empty when the run has no teacher row or no floor row."""
    if not per_seed or CEILING_ROW not in per_seed[0] or not any(r in per_seed[0] for r in FLOOR_ROWS):
        return {}

    def acc(seed: Mapping[str, Mapping[str, object]], row: str) -> float:
        return float(seed[row]["accuracy"])  # type: ignore[arg-type]

    floors = [floor_of({r: acc(s, r) for r in FLOOR_ROWS if r in s}) for s in per_seed]
    ceilings = [acc(s, CEILING_ROW) for s in per_seed]
    methods = {}
    for m in per_seed[0]:
        mean, spread = gap_over_seeds([acc(s, m) for s in per_seed], floors, ceilings)
        methods[m] = {"gap_closed": mean, "gap_closed_spread": spread}
    return {"floor": floors, "teacher_ceiling": ceilings, "methods": methods}
