from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from cema_deploy.contract import (
    InputSpec,
    Manifest,
    Preprocess,
    RefitBlob,
    RefittableParam,
    blob_digest,
    blob_from_bytes,
    blob_from_path,
    blob_to_bytes,
    save_blob,
    validate_blob,
)
from cema_deploy.exceptions import (
    BlobError,
    BlobFormatError,
    BlobSchemaError,
    BlobValueError,
    FingerprintMismatchError,
    ManifestError,
    StaleBlobError,
)

FP = "ab" * 32


def manifest() -> Manifest:
    return Manifest(
        model_name="toy",
        fingerprint=FP,
        input=InputSpec(name="input", shape=(-1, 3, 8, 8)),
        output_name="logits",
        num_classes=3,
        preprocess=Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, size=(8, 8)),
        refittable=(
            RefittableParam(name="bn.weight", shape=(4,), dtype="float32", layer_type="BatchNorm"),
            RefittableParam(name="bn.bias", shape=(4,), dtype="float32", layer_type="BatchNorm"),
            RefittableParam(name="bn.running_mean", shape=(4,), dtype="float32", layer_type="BatchNorm"),
            RefittableParam(name="bn.running_var", shape=(4,), dtype="float32", layer_type="BatchNorm"),
        ),
        opset=17,
    )


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {p.name: rng.random(4, dtype=np.float32) + 0.1 for p in manifest().refittable}


def blob(**kw: object) -> RefitBlob:
    args: dict[str, object] = {"tensors": tensors(), "fingerprint": FP, "version": 3, "producer": "test"}
    args.update(kw)
    return RefitBlob(**args)  # type: ignore[arg-type]


def test_round_trip_keeps_values_and_metadata(tmp_path):
    b = blob()
    back = blob_from_path(save_blob(b, tmp_path / "b.safetensors"))
    assert back.version == 3 and back.fingerprint == FP and back.producer == "test"
    assert back.created == pytest.approx(b.created)
    for k, v in b.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)
    assert blob_digest(back) == blob_digest(b)
    validate_blob(back, manifest())


def test_readable_by_the_safetensors_package():
    data = blob_to_bytes(blob())
    loaded = safetensors.numpy.load(data)
    np.testing.assert_array_equal(loaded["bn.weight"], tensors()["bn.weight"])


def test_digest_changes_with_any_byte_of_payload_or_header():
    b = blob()
    t = dict(b.tensors)
    t["bn.bias"] = t["bn.bias"].copy()
    t["bn.bias"][0] = np.nextafter(t["bn.bias"][0], np.float32(2))
    assert blob_digest(RefitBlob(tensors=t, fingerprint=FP, version=3, created=b.created)) != blob_digest(b)
    assert blob_digest(blob(version=4, created=b.created)) != blob_digest(blob(version=3, created=b.created))
    # the signature fields are not part of what is signed
    assert blob_digest(b.with_signature("sig", "key")) == blob_digest(b)


def test_epoch_round_trips_is_signed_metadata_and_orders_before_the_version():
    b = blob(epoch=1_764_000_000_000, version=1)
    data = blob_to_bytes(b)
    meta = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    assert meta["epoch"] == "1764000000000"  # decimal text, as the wire contract says
    back = blob_from_bytes(data)
    assert back.epoch == 1_764_000_000_000 and back.stamp == (1_764_000_000_000, 1)
    assert blob_digest(back) == blob_digest(b)
    assert blob_digest(blob(epoch=2, created=b.created)) != blob_digest(blob(epoch=1, created=b.created))
    assert blob(epoch=2, version=1).stamp > blob(epoch=1, version=9).stamp  # a newer cloud state wins
    assert blob().epoch == 0


def test_a_blob_without_an_epoch_is_epoch_zero():
    legacy = _raw(
        {"__metadata__": META, "bn.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
    )
    assert blob_from_bytes(legacy).epoch == 0  # written by a cloud without epochs


@pytest.mark.parametrize("text", ["-1", "+5", " 5", "1_000", "1e3", "", "x", "12345678901234567890", "\u0665"])
def test_a_malformed_epoch_is_refused_with_a_clear_error(text):
    with pytest.raises(BlobFormatError, match="'epoch'"):
        blob_from_bytes(_raw({"__metadata__": {**META, "epoch": text}}))


@pytest.mark.parametrize("epoch", [-1, 1.5, "3", True, 10**19])
def test_a_blob_is_built_only_with_a_non_negative_integer_epoch(epoch):
    with pytest.raises(BlobFormatError, match="epoch must be an integer"):
        blob(epoch=epoch)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda b: blob(fingerprint="cd" * 32), FingerprintMismatchError, "does not match model fingerprint"),
        (lambda b: blob(version=2), StaleBlobError, "not newer"),
        (lambda b: blob(tensors={k: v for k, v in tensors().items() if k != "bn.bias"}), BlobSchemaError, "1 missing"),
        (lambda b: blob(tensors={**tensors(), "fc.weight": np.ones(2, np.float32)}), BlobSchemaError, "1 unexpected"),
        (
            lambda b: blob(tensors={**tensors(), "bn.bias": np.ones(5, np.float32)}),
            BlobSchemaError,
            r"expected float32\[4\]",
        ),
        (lambda b: blob(tensors={**tensors(), "bn.bias": np.ones(4, np.float64)}), BlobSchemaError, "float64"),
        (
            lambda b: blob(tensors={**tensors(), "bn.bias": np.array([1, np.nan, 0, 0], np.float32)}),
            BlobValueError,
            "NaN",
        ),
        (
            lambda b: blob(tensors={**tensors(), "bn.weight": np.array([1, np.inf, 0, 0], np.float32)}),
            BlobValueError,
            "Inf",
        ),
        (
            lambda b: blob(tensors={**tensors(), "bn.running_var": -np.ones(4, np.float32)}),
            BlobValueError,
            "negative variance",
        ),
    ],
)
def test_validate_rejects(mutate, error, match):
    with pytest.raises(error, match=match):
        validate_blob(mutate(None), manifest(), newer_than=2)


def test_validate_accepts_newer():
    validate_blob(blob(version=3), manifest(), newer_than=2)


def _raw(header: dict[str, object], body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


META = {"format": "cema-refit-blob/1", "fingerprint": FP, "version": "1"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"\x01" * 7, "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
        (_raw({"__metadata__": {"format": "other"}}), "not 'cema-refit-blob/1'"),
        (_raw({"__metadata__": {**META, "version": "x"}}), "malformed"),
        (_raw({"__metadata__": {**META, "version": "-1"}}), "out of range"),
        (
            _raw({"__metadata__": META, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "out of range",
        ),
        (
            _raw({"__metadata__": META, "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16),
            "expected 12",
        ),
        (
            _raw({"__metadata__": META, "a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
            "unsupported",
        ),
        (
            _raw(
                {
                    "__metadata__": META,
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                },
                b"\0" * 24,
            ),
            "overlap",
        ),
    ],
)
def test_parser_rejects_hostile_bytes(data, match):
    with pytest.raises(BlobFormatError, match=match):
        blob_from_bytes(data)


def test_parser_rejects_duplicate_names():
    head = (
        b'{"__metadata__":{"format":"cema-refit-blob/1","fingerprint":"ab","version":"1"},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    )
    with pytest.raises(BlobFormatError, match="duplicate key"):
        blob_from_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 4)


def test_truncated_blob_is_refused_at_every_length():
    data = blob_to_bytes(blob())
    for n in range(0, len(data), max(1, len(data) // 40)):
        with pytest.raises(BlobError):
            validate_blob(blob_from_bytes(data[:n]), manifest())


def test_manifest_round_trip_and_errors(tmp_path):
    m = manifest()
    m.save(tmp_path)
    from cema_deploy.contract import manifest_from_dir

    assert manifest_from_dir(tmp_path) == m
    with pytest.raises(ManifestError, match=r"No manifest\.json"):
        manifest_from_dir(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text('{"format": "cema-manifest/0"}')
    with pytest.raises(ManifestError, match="not supported"):
        manifest_from_dir(tmp_path)
    with pytest.raises(ManifestError, match="appears twice"):
        Manifest(**{**m.__dict__, "refittable": m.refittable + m.refittable[:1]})


@pytest.mark.parametrize("extra", [{"x": float("nan")}, {"x": [float("inf")]}, {None: 1}, {"x": (1, 2)}, {"x": b"1"}])
def test_manifest_extra_must_be_plain_json(extra):
    # Found by the parser fuzzing: NaN/Infinity or non-string keys in `extra` made a manifest that did not
    # survive its own JSON round trip (NaN != NaN; {None: 1} came back as {"null": 1}).
    with pytest.raises(ManifestError, match="extra is not a JSON object"):
        Manifest(**{**manifest().__dict__, "extra": extra})


def test_manifest_file_with_nan_token_is_refused(tmp_path):
    m = manifest()
    m.save(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text().replace('"num_classes": 3', '"num_classes": 3, "crop": NaN'))
    from cema_deploy.contract import manifest_from_dir

    with pytest.raises(ManifestError, match="NaN is not standard JSON"):
        manifest_from_dir(tmp_path)
