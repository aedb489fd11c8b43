"""The edge's statistics report (protocol 3): float16 on the wire, checked against the manifest on the cloud."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.contract.edge_statistics import (
    statistics_from_text,
    statistics_names,
    statistics_to_bytes,
    statistics_to_text,
)
from cema_deploy.contract.messages import BatchReport
from cema_deploy.exceptions import ProtocolError
from tests.contract.test_blob import manifest


def _stats() -> dict[str, np.ndarray]:
    return {"bn.running_mean": np.array([0.1, -2.0, 3.5, 0.0], np.float32),
            "bn.running_var": np.array([1.0, 0.25, 7.0, 1e6], np.float32)}  # fmt: skip


def test_round_trip_in_float16_with_variances_clipped_to_its_range() -> None:
    m = manifest()
    assert statistics_names(m) == ("bn.running_mean", "bn.running_var")
    got, generation = statistics_from_text(statistics_to_text(_stats(), local_generation=7), m)
    assert generation == 7 and got["bn.running_mean"].dtype == np.float32
    np.testing.assert_allclose(got["bn.running_mean"], _stats()["bn.running_mean"], rtol=1e-3)
    np.testing.assert_allclose(got["bn.running_var"][:3], _stats()["bn.running_var"][:3], rtol=1e-3)
    assert got["bn.running_var"][3] == np.finfo(np.float16).max  # clipped, never infinite
    assert len(statistics_to_bytes(_stats())) < 256  # 16 bytes of values plus the header


def test_a_batch_report_carries_them_and_older_reports_still_parse() -> None:
    r = BatchReport(seen=0, selected=0, uploaded=0, generation=1, statistics=statistics_to_text(_stats()),
                    stats_generation=3)  # fmt: skip
    assert BatchReport.from_json(r.to_json()) == r
    plain = BatchReport.from_json({"seen": 4, "selected": 1, "uploaded": 1, "generation": 1})
    assert plain.statistics == "" and plain.stats_generation == 0
    with pytest.raises(ProtocolError, match="stats_generation must be >= 0"):
        BatchReport.from_json({**plain.to_json(), "stats_generation": -1})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bn.running_mean": np.full(4, np.nan, np.float16)}, "NaN or Inf"),
        ({"bn.running_var": np.array([1, -1, 1, 1], np.float16)}, "negative variance"),
        ({"bn.running_var": np.ones(5, np.float16)}, "shape"),
        ({"bn.weight": np.ones(4, np.float16)}, r"unexpected \['bn.weight'\]"),
        ({"bn.running_mean": np.ones(4, np.int32)}, "dtype int32"),
    ],
)
def test_a_report_that_does_not_fit_the_manifest_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    import base64

    from cema_deploy.contract.safetensors_io import tensors_to_bytes

    tensors = {k: np.clip(v, 0, 10).astype(np.float16) for k, v in _stats().items()} | change
    with pytest.raises(ProtocolError, match=message):
        statistics_from_text(base64.b64encode(tensors_to_bytes(tensors, {})).decode(), manifest())
    missing = base64.b64encode(tensors_to_bytes({"bn.running_mean": tensors["bn.running_mean"]}, {})).decode()
    with pytest.raises(ProtocolError, match=r"missing \['bn.running_var'\]"):
        statistics_from_text(missing, manifest())
    for junk in ("%%%", "", "AAAA"):
        with pytest.raises(ProtocolError):
            statistics_from_text(junk, manifest())
