"""Hostile input for every parser of the contract: each case parses to a valid object or raises a CemaError.

Never another exception type, never a hang (hypothesis deadline), never a large allocation (tracemalloc peak).
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cema_deploy.contract import Manifest, RefitBlob, blob_from_bytes, blob_to_bytes, manifest_from_dir, validate_blob
from cema_deploy.contract.safetensors_io import MAX_HEADER_BYTES, ST_DTYPES
from cema_deploy.contract.samples import SampleBatch, samples_from_bytes, samples_to_bytes
from cema_deploy.exceptions import CemaError, ManifestError
from tests.contract.test_blob import FP, blob, manifest

FUZZ = settings(
    max_examples=settings.default.max_examples * 2,  # 200 under the default "ci" profile (tests/conftest.py)
    deadline=timedelta(seconds=2),  # generous: the machine is shared; a hang still fails
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: Largest Python-heap peak one parse of a small input may reach.
ALLOC_LIMIT = 32 * 1024 * 1024
HOSTILE_NAMES = ["../x", "/etc/passwd", "..\\..\\boot.ini", "", "__metadata__", "a\x00b", "\ud800", "é" * 300]


# ---- helpers -------------------------------------------------------------------------------------------------
@contextmanager
def bounded_memory(limit: int = ALLOC_LIMIT) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"parsing allocated {peak} bytes"


def outcome(parse: Callable[[], Any]) -> Any:
    """Run ``parse``; a CemaError is a clean refusal (returns None), any other exception fails the test."""
    try:
        return parse()
    except CemaError:
        return None


def raw(header: dict[str, Any] | bytes, body: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def parse_all(data: bytes, verifier: Any) -> None:
    """Every byte-level parser of the contract, each must refuse cleanly or succeed."""
    parsed = outcome(lambda: blob_from_bytes(data))
    if parsed is not None:
        check_blob(parsed, len(data))
        outcome(lambda: validate_blob(parsed, manifest(), newer_than=0))
    outcome(lambda: samples_from_bytes(data))
    outcome(lambda: samples_from_bytes(data, image_hw=(8, 8), max_samples=4))
    if verifier is not None:
        outcome(lambda: verifier(data))


def check_blob(b: RefitBlob, size: int) -> None:
    assert b.version >= 0 and math.isfinite(b.created)
    assert b.nbytes <= size
    for t in b.tensors.values():
        assert t.dtype.newbyteorder("<") in ST_DTYPES.values()


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("cryptography")
    from cema_deploy.contract.signing import BlobVerifier, load_public_key, new_key_pair

    _, pub = new_key_pair(tmp_path_factory.mktemp("fuzz-keys"))
    return BlobVerifier([load_public_key(pub)])


@pytest.fixture(scope="module")
def signed_bytes(verifier: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from cema_deploy.contract.signing import load_private_key, new_key_pair, sign_blob

    priv, pub = new_key_pair(tmp_path_factory.mktemp("fuzz-signer"))
    from cema_deploy.contract.signing import BlobVerifier, load_public_key

    data = blob_to_bytes(sign_blob(blob(), load_private_key(priv)))
    assert BlobVerifier([load_public_key(pub)])(data)
    return data


def sample_bytes(encoding: str) -> bytes:
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    return samples_to_bytes(
        SampleBatch(images=images, fingerprint=FP, edge_version=1, entropy=np.ones(2, np.float32)), encoding=encoding
    )


VALID = {
    "blob": lambda: blob_to_bytes(blob()),
    "samples-raw": lambda: sample_bytes("raw"),
    "samples-png": lambda: sample_bytes("png"),
}


# ---- arbitrary and mutated bytes ---------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes, verifier: Any) -> None:
    with bounded_memory():
        parse_all(data, verifier)


@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_behind_a_plausible_header_length(data: bytes, verifier: Any) -> None:
    with bounded_memory():
        parse_all(struct.pack("<Q", len(data)) + data, verifier)


@FUZZ
@given(which=st.sampled_from(sorted(VALID)), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255))))
def test_valid_files_with_random_byte_edits(which: str, edits: list[tuple[int, int]], verifier: Any) -> None:
    data = bytearray(VALID[which]())
    for pos, value in edits:
        data[pos % len(data)] = value
    with bounded_memory():
        parse_all(bytes(data), verifier)


@pytest.mark.parametrize("which", sorted(VALID))
def test_truncated_valid_files_at_every_length(which: str, verifier: Any) -> None:
    data = VALID[which]()
    for n in range(len(data)):
        parse_all(data[:n], verifier)
        if which == "blob":
            with pytest.raises(CemaError):
                blob_from_bytes(data[:n])
        else:
            with pytest.raises(CemaError):
                samples_from_bytes(data[:n])


def test_truncated_signed_blob_at_every_length(signed_bytes: bytes, verifier: Any) -> None:
    from cema_deploy.exceptions import SignatureError

    for n in range(len(signed_bytes)):
        with pytest.raises(SignatureError):
            verifier(signed_bytes[:n])


@pytest.mark.parametrize(
    "hlen", [MAX_HEADER_BYTES + 1, 2**31, 2**32 + 2, 2**63, 2**64 - 1, 10**18, 100, 9], ids=lambda v: f"{v:#x}"
)
def test_huge_or_wrong_header_length_prefixes(hlen: int, verifier: Any) -> None:
    body = json.dumps({"__metadata__": {"format": "cema-refit-blob/1"}}).encode()
    with bounded_memory():
        parse_all(struct.pack("<Q", hlen) + body, verifier)
    with pytest.raises(CemaError):
        blob_from_bytes(struct.pack("<Q", hlen) + body)


# ---- structured headers ------------------------------------------------------------------------------------
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(min_value=0, max_value=8),
    st.sampled_from([-1, 2**31, 2**62, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    json_value,
)
entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from([*ST_DTYPES, "BF16", "F8_E4M3", "BOOL", "f32", ""]), json_value),
        "shape": st.one_of(st.lists(dims, max_size=20), json_value),
        "data_offsets": st.one_of(st.lists(dims, min_size=2, max_size=2), st.lists(dims, max_size=3), json_value),
    }
)
names = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=12))
metadata = st.one_of(
    st.fixed_dictionaries(
        {
            "format": st.sampled_from(["cema-refit-blob/1", "cema-samples/1", "x"]),
            "fingerprint": st.just(FP) | st.text(max_size=4),
            "version": st.sampled_from(["1", "0", "-1", "nan", "9" * 5000, "1e3", " 2 ", "٣"]),
            "created": st.sampled_from(["0", "nan", "inf", "-inf", "1e400", "x"]),
            "shape": st.sampled_from(["2,8,8,3", "1,100000,100000,3", "4097,8,8,3", "0,8,8,3", "a,b"]),
            "encoding": st.sampled_from(["raw", "png", "jpeg", "gif"]),
        }
    ),
    json_value,
)


@FUZZ
@given(
    meta=metadata,
    tensors=st.dictionaries(names, st.one_of(entry, json_value), max_size=6),
    body=st.binary(max_size=256),
)
def test_structured_hostile_headers(meta: Any, tensors: dict[str, Any], body: bytes, verifier: Any) -> None:
    with bounded_memory():
        parse_all(raw({"__metadata__": meta, **tensors}, body), verifier)


@FUZZ
@given(
    dtype=st.sampled_from(sorted(ST_DTYPES)),
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4),
)
def test_wrong_dtypes_and_non_finite_values_are_refused_by_validate(dtype: str, values: list[float]) -> None:
    """The format parser takes any supported dtype and any value; validate_blob refuses what an engine must not
    get (wrong dtype, NaN/Inf, negative variance), always as a BlobError."""
    from cema_deploy.exceptions import BlobError

    arr = np.asarray(values, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflows to inf: also refused below
        cast = arr.astype(ST_DTYPES[dtype]) if dtype[0] == "F" else np.arange(4).astype(ST_DTYPES[dtype])
    for name in ("bn.weight", "bn.running_var"):
        tensors = {**blob().tensors, name: cast}
        parsed = blob_from_bytes(blob_to_bytes(blob(tensors=tensors)))
        np.testing.assert_array_equal(parsed.tensors[name], cast)
        fine = dtype == "F32" and bool(np.isfinite(arr).all()) and (name != "bn.running_var" or (arr >= 0).all())
        if fine:
            validate_blob(parsed, manifest())
        else:
            with pytest.raises(BlobError):
                validate_blob(parsed, manifest())


def test_duplicate_and_path_like_names() -> None:
    head = (
        b'{"__metadata__":{"format":"cema-refit-blob/1","fingerprint":"ab","version":"1"},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    with pytest.raises(CemaError, match="duplicate"):
        blob_from_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    # names are dictionary keys, never paths: they parse, and validate_blob refuses them as unexpected
    meta = {"format": "cema-refit-blob/1", "fingerprint": FP, "version": "9"}
    for name in HOSTILE_NAMES[:-2]:
        if name == "__metadata__":
            continue
        parsed = blob_from_bytes(
            raw({"__metadata__": meta, name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
        )
        assert list(parsed.tensors) == [name]
        with pytest.raises(CemaError, match="unexpected"):
            validate_blob(parsed, manifest())


def test_non_utf8_and_deeply_nested_headers(verifier: Any) -> None:
    for head in (b"\xff\xfe{}", b'{"a":"\xc3\x28"}', b"[" * 100_000, b'{"a":' * 50_000, b'{"a":' + b"9" * 5000 + b"}"):
        with pytest.raises(CemaError):
            blob_from_bytes(raw(head))
        parse_all(raw(head), verifier)


def test_many_entries_sharing_the_same_bytes_do_not_multiply_memory() -> None:
    """10,000 tensors that all point at one 64 KiB span: refused for overlapping before any is copied."""
    meta = {"format": "cema-refit-blob/1", "fingerprint": FP, "version": "1"}
    entries = {f"t{i}": {"dtype": "U8", "shape": [65536], "data_offsets": [0, 65536]} for i in range(10_000)}
    data = raw({"__metadata__": meta, **entries}, b"\0" * 65536)
    with bounded_memory(64 * 1024 * 1024), pytest.raises(CemaError, match="overlap"):
        blob_from_bytes(data)


def test_huge_declared_sample_images_are_refused_before_allocating() -> None:
    data = sample_bytes("png")
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    for shape in ("2,100000,100000,3", "2,4096,4096,3", "4096,4096,4096,3"):
        header["__metadata__"]["shape"] = shape
        with bounded_memory(), pytest.raises(CemaError):
            samples_from_bytes(raw(header, data[8 + hlen :]))


# ---- manifests ----------------------------------------------------------------------------------------------
def manifest_dict() -> dict[str, Any]:
    return json.loads(manifest().to_json())  # type: ignore[no-any-return]


def manifest_outcome(data: Any) -> None:
    m = outcome(lambda: Manifest.from_dict(data))
    if m is not None:
        assert Manifest.from_dict(json.loads(m.to_json())) == m  # a parsed manifest round-trips


@FUZZ
@given(data=json_value)
def test_manifest_from_arbitrary_json(data: Any) -> None:
    manifest_outcome(data)


@FUZZ
@given(
    path=st.lists(
        st.sampled_from(["input", "preprocess", "refittable", 0, "shape", "mean", "std", "size"]), max_size=3
    ),
    key=st.sampled_from(
        [
            "format",
            "model_name",
            "fingerprint",
            "num_classes",
            "opset",
            "extra",
            "shape",
            "dtype",
            "name",
            "mean",
            "std",
            "size",
            "crop_pct",
            "layer_type",
            "refittable",
            "input",
            "preprocess",
            "model_bytes",
        ]
    ),
    value=json_value,
    delete=st.booleans(),
)
def test_manifest_with_one_field_replaced(path: list[Any], key: str, value: Any, delete: bool) -> None:
    data = manifest_dict()
    node: Any = data
    for step in path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            break
    if isinstance(node, dict):
        if delete:
            node.pop(key, None)
        else:
            node[key] = value
    manifest_outcome(data)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300, -1, 0, True, "7", [], {}, None, 2**80])
@pytest.mark.parametrize("field", ["num_classes", "opset", "model_bytes"])
def test_manifest_numbers(field: str, value: Any) -> None:
    manifest_outcome({**manifest_dict(), field: value})


@pytest.mark.parametrize(
    "pre",
    [
        {"mean": [math.nan] * 3, "std": [0.5] * 3},
        {"mean": [0.5] * 3, "std": [math.inf] * 3},
        {"crop_pct": math.nan},
        {"size": [0, 8]},
        {"size": [math.inf, 8]},
        {"size": [8, 8, 8]},
    ],
)
def test_manifest_with_non_finite_or_empty_preprocess_is_refused(pre: dict[str, Any]) -> None:
    data = manifest_dict()
    data["preprocess"].update(pre)
    with pytest.raises(ManifestError):
        Manifest.from_dict(data)


@FUZZ
@given(content=st.binary(max_size=2048) | json_value.map(lambda v: json.dumps(v).encode()))
def test_manifest_from_dir_with_arbitrary_file(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    d = tmp_path_factory.mktemp("fuzz-manifest", numbered=True)
    (d / "manifest.json").write_bytes(content)
    outcome(lambda: manifest_from_dir(d))


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000, b'{"a":' + b"9" * 5000 + b"}", b'{"format":"cema-manifest/1","num_classes":1e999}', b"\xff"],
    ids=["deep", "digits", "inf", "not-utf8"],
)
def test_manifest_from_dir_hostile_files(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError):
        manifest_from_dir(tmp_path)
