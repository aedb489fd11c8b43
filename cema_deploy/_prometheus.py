"""The Prometheus text exposition format (0.0.4) that both ``/metrics`` speak: the edge's (``edge run
--metrics-port``, :mod:`cema_deploy.runtime.metrics`) and the cloud's (:mod:`cema_deploy.cloud.service.api`).

Standard library only, so the torch-free edge and the cloud share it. Each side keeps its own metric names; this
module only writes them: ``# HELP`` and ``# TYPE`` lines, then one sample a line, ``name{label="value",...} number``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: A sample's labels: name -> value (escaped here), or a label string already written.
Labels = Mapping[str, str] | str


def number(v: float) -> str:
    """A sample value: booleans as 1/0, infinities as +Inf/-Inf, floats as ``repr``, integers as digits."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def label_value(v: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(labels: Labels) -> str:
    """``name="value",...`` (empty for no labels)."""
    if isinstance(labels, str):
        return labels
    return ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())


class Exposition:
    """The lines of one exposition, in the order written.

    Example:
        >>> out = Exposition()
        >>> out.metric("cema_up", "gauge", "1 while serving.", [({"side": "edge"}, 1)])
        >>> print(out.text(), end="")
        # HELP cema_up 1 while serving.
        # TYPE cema_up gauge
        cema_up{side="edge"} 1
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def header(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Labels, value: float) -> None:
        lab = label_text(labels)
        self.lines.append(f"{name}{{{lab}}} {number(value)}" if lab else f"{name} {number(value)}")

    def metric(self, name: str, kind: str, help_: str, samples: Iterable[tuple[Labels, float]] = ()) -> None:
        """``# HELP``, ``# TYPE``, then one line per (labels, value)."""
        self.header(name, kind, help_)
        for labels, value in samples:
            self.sample(name, labels, value)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
