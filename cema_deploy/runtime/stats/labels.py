"""How concentrated the served predictions are: the label-correlated stream guard of the statistics adapter.

A camera that watches one class for a while (a label-correlated stream) gives batch statistics that describe that
class, not the domain; folding them into the served statistics can make the model worse than no adaptation. The
served predictions tell the two apart for free (the engine computes them anyway): :class:`LabelWindow` keeps the
predicted labels of the last ``frames`` served frames and measures their *effective number of classes*
``exp(H(histogram))`` (1 when every frame got the same label, ``K`` when ``K`` labels are equally frequent).
:meth:`LabelWindow.concentration` compares it with the number of classes; :meth:`LabelWindow.run_concentration`
measures instead how often a label repeats from one frame to the next (``balance_measure="runs"``). The adapter
multiplies its source prior by the chosen one (runtime/stats/adapter.py). Beyond the papers: RoTTA (Yuan et al.
2023) balances a memory bank of frames by predicted class for the same reason; this keeps no frames, only labels,
and costs no probe. Never imports torch.
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["LabelWindow"]


class LabelWindow:
    """The last ``frames`` predicted labels of ``num_classes`` classes.

    Example:
        >>> w = LabelWindow(frames=64, num_classes=10)
        >>> w.add(np.zeros(40, np.int64))
        >>> round(w.concentration(), 1)  # 10 classes possible, 1 shown
        10.0
    """

    def __init__(self, *, frames: int, num_classes: int) -> None:
        self.frames, self.num_classes = frames, num_classes
        self._labels: deque[int] = deque(maxlen=frames)

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, labels: np.ndarray) -> None:
        """Append the predicted labels of one served batch (oldest ones drop out)."""
        self._labels.extend(int(v) for v in np.asarray(labels).reshape(-1))

    def clear(self) -> None:
        self._labels.clear()

    def effective_classes(self) -> float:
        """``exp`` of the entropy of the label histogram (1.0 for an empty window)."""
        if not self._labels:
            return 1.0
        counts = np.bincount(np.fromiter(self._labels, np.int64), minlength=1).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(np.exp(-(p * np.log(p)).sum()))

    def concentration(self) -> float:
        """``num_classes / effective_classes``, at least 1: 1 for labels spread evenly over every class,
        ``num_classes`` for a window of one label; 1 for an empty window (nothing known). A short window counts as
        concentrated (a few frames cannot show many classes): measured better than excusing it on the
        label-sorted stream at batch 1, where the first frames of a class run otherwise weigh the most."""
        if not self._labels:
            return 1.0
        return max(1.0, self.num_classes / self.effective_classes())

    def run_concentration(self) -> float:
        """``num_classes`` times the share of consecutive frames in the window that got the same label, clipped to
        [1, ``num_classes``]: ``num_classes`` for one unbroken run, about 1 for labels that change as often as
        evenly spread independent ones would; 1 below two frames (no pair yet). A run of one class (a label-correlated
        stream) repeats its label from frame to frame; a model that a corruption collapses onto a few classes repeats
        a label only as often as chance does, and a short window of changing labels does not read as concentrated
        (:meth:`concentration` counts it so). Beyond the papers; chosen on the quick demo's seed 0 (README,
        "The edge's own statistics")."""
        if len(self._labels) < 2:
            return 1.0
        a = np.fromiter(self._labels, np.int64)
        return float(np.clip(self.num_classes * np.mean(a[1:] == a[:-1]), 1.0, self.num_classes))
