"""The Prometheus text writer both /metrics share (cema_deploy/_prometheus.py): value and label formatting, line
order. The edge's and the cloud's full outputs are pinned by tests/runtime/test_metrics_http.py and tests/cloud."""

from __future__ import annotations

import math

from cema_deploy._prometheus import Exposition, number


def test_numbers_follow_the_text_format() -> None:
    assert [number(v) for v in (True, False, 3, 0.5, 1.0, math.inf, -math.inf)] == [
        "1",
        "0",
        "3",
        "0.5",
        "1.0",
        "+Inf",
        "-Inf",
    ]
    assert number(math.nan) == "nan"


def test_an_exposition_writes_help_type_then_samples_with_escaped_labels() -> None:
    out = Exposition()
    out.metric("cema_x_total", "counter", "Things.", [({"name": 'a"b\\c\nd'}, 2), ({}, 1)])
    out.sample("cema_y_bucket", 'deployment="cams",le="+Inf"', 4)
    assert out.text() == (
        "# HELP cema_x_total Things.\n"
        "# TYPE cema_x_total counter\n"
        'cema_x_total{name="a\\"b\\\\c\\nd"} 2\n'
        "cema_x_total 1\n"
        'cema_y_bucket{deployment="cams",le="+Inf"} 4\n'
    )
