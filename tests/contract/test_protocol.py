"""Protocol 2: the version check, the JSON messages both sides exchange, and the sample kinds on the wire."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.contract import protocol
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import (
    KIND_CALIBRATION,
    KIND_SELECTED,
    KIND_STATISTICS,
    SampleBatch,
    SampleFormatError,
    samples_from_bytes,
    samples_to_bytes,
)
from cema_deploy.exceptions import ProtocolError, ProtocolMismatchError


def test_same_version_passes_and_others_are_refused_naming_both() -> None:
    protocol.check_protocol(str(protocol.PROTOCOL_VERSION), peer="the edge")
    protocol.check_protocol(f" {protocol.PROTOCOL_VERSION} ", peer="the edge")
    with pytest.raises(ProtocolMismatchError, match=r"The cloud at http://x speaks cema protocol '4'.*protocol 3"):
        protocol.check_protocol("4", peer="the cloud at http://x")
    with pytest.raises(ProtocolMismatchError, match=r"The edge speaks cema protocol '2'; this side speaks protocol 3"):
        protocol.check_protocol("2", peer="the edge")
    with pytest.raises(ProtocolMismatchError, match=r"protocol 1 \(it sent no X-Cema-Protocol header\)"):
        protocol.check_protocol(None, peer="the edge")


MESSAGES = [
    DeploymentStatus(
        name="cams", fingerprint="ab" * 32, model="resnet50", version=7, generation=2, calibrated=True, frozen=False
    ),
    UploadAck(
        accepted=3, pending=5, buffered=40, version=7, target_version=8, generation=2, calibrated=False, duplicate=True
    ),
    BatchReport(seen=64, selected=11, uploaded=14, generation=2),
    BatchAck(version=7, target_version=9, generation=2, calibrated=True, replay_step=True),
    EdgeReport(kind="rollback", version=7, reason="score fell"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip_and_refuse_wrong_types(msg) -> None:  # type: ignore[no-untyped-def]
    cls = type(msg)
    assert cls.from_json(msg.to_json()) == msg
    assert cls.from_json({**msg.to_json(), "unknown_field": 1}) == msg  # newer peers may add fields
    first = next(iter(msg.to_json()))
    with pytest.raises(ProtocolError, match=rf"lacks the field '{first}'"):
        cls.from_json({k: v for k, v in msg.to_json().items() if k != first})
    for key, value in msg.to_json().items():
        wrong = "7" if not isinstance(value, str) else 7
        with pytest.raises(ProtocolError, match=rf"{cls.__name__}\.{key} must be"):
            cls.from_json({**msg.to_json(), key: wrong})
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        cls.from_json([msg.to_json()])


def test_counts_are_non_negative_and_booleans_are_not_integers() -> None:
    with pytest.raises(ProtocolError, match=r"BatchReport\.seen must be >= 0, got -1"):
        BatchReport.from_json({"seen": -1, "selected": 0, "uploaded": 0, "generation": 0})
    with pytest.raises(ProtocolError, match=r"BatchReport\.seen must be an integer"):
        BatchReport.from_json({"seen": True, "selected": 0, "uploaded": 0, "generation": 0})
    with pytest.raises(ProtocolError, match="kind must be one of"):
        EdgeReport.from_json({"kind": "other", "version": 1})
    assert len(EdgeReport(kind="refused", version=1, reason="x" * 5000).reason) == 1000


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_sample_kinds_travel_with_generation_and_the_selected_mask(encoding: str) -> None:
    sel = np.array([True, False, True, False])
    cal = SampleBatch(
        images=_images(4),
        fingerprint="fp",
        edge_version=3,
        kind=KIND_CALIBRATION,
        generation=5,
        selected=sel,
        calibration="shift",
    )
    back = samples_from_bytes(samples_to_bytes(cal, encoding=encoding))
    assert (back.kind, back.generation, back.calibration) == (KIND_CALIBRATION, 5, "shift")
    assert back.selected is not None and back.selected.tolist() == sel.tolist()
    np.testing.assert_array_equal(back.adapt_images, cal.images[sel])
    stats = samples_from_bytes(
        samples_to_bytes(
            SampleBatch(images=_images(2), fingerprint="fp", edge_version=0, kind=KIND_STATISTICS), encoding=encoding
        )
    )
    assert stats.kind == KIND_STATISTICS and stats.selected is None and len(stats.adapt_images) == 0
    plain = samples_from_bytes(samples_to_bytes(SampleBatch(images=_images(2), fingerprint="fp", edge_version=0)))
    assert plain.kind == KIND_SELECTED and plain.generation == 0 and len(plain.adapt_images) == 2


def test_inconsistent_sample_kinds_are_refused() -> None:
    with pytest.raises(SampleFormatError, match="not one of"):
        SampleBatch(images=_images(2), fingerprint="fp", edge_version=0, kind="other")
    with pytest.raises(SampleFormatError, match="needs calibration in"):
        SampleBatch(images=_images(2), fingerprint="fp", edge_version=0, kind=KIND_CALIBRATION)
    with pytest.raises(SampleFormatError, match="selected must be bool"):
        SampleBatch(
            images=_images(2),
            fingerprint="fp",
            edge_version=0,
            kind=KIND_CALIBRATION,
            calibration="start",
            selected=np.ones(3, bool),
        )
    with pytest.raises(SampleFormatError, match="belong to calibration batches"):
        SampleBatch(images=_images(2), fingerprint="fp", edge_version=0, selected=np.ones(2, bool))
    no_mask = SampleBatch(
        images=_images(2), fingerprint="fp", edge_version=0, kind=KIND_CALIBRATION, calibration="start"
    )
    assert no_mask.selected is not None and not no_mask.selected.any()  # a calibration batch adapts on nothing


def test_protocol_1_uploads_are_refused_by_format() -> None:
    from cema_deploy.contract.safetensors_io import tensors_to_bytes

    old = tensors_to_bytes(
        {"images": _images(1)}, {"format": "cema-samples/1", "fingerprint": "fp", "encoding": "raw", "shape": "1,8,8,3"}
    )
    with pytest.raises(SampleFormatError, match="is not 'cema-samples/2'"):
        samples_from_bytes(old)
