"""The blob's optional lead weights (issue 22 item 4): signed and fingerprint-bound with the tensors, validated
against the manifest (one per class, finite, >= 0), absent without changing a byte of a blob that has none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cema_deploy.contract.blob import blob_from_bytes, blob_to_bytes, validate_blob
from cema_deploy.exceptions import BlobFormatError, BlobSchemaError, BlobValueError, SignatureError
from tests.contract.test_blob import blob, manifest

pytest.importorskip("cryptography")

LEAD = (0.25, 1.5, 1.25)  # the toy manifest has 3 classes


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from cema_deploy.contract.signing import new_key_pair

    return new_key_pair(tmp_path_factory.mktemp("keys"))


def test_lead_weights_round_trip_signed_and_validated(keys: tuple[Path, Path]) -> None:
    from cema_deploy.contract.signing import BlobVerifier, load_private_key, load_public_key, sign_blob

    signed = sign_blob(blob(lead=LEAD), load_private_key(keys[0]))
    data = blob_to_bytes(signed)
    back = BlobVerifier([load_public_key(keys[1])]).blob_from_bytes(data)
    assert back.lead == LEAD  # exactly: floats written so that they read back bit for bit
    validate_blob(back, manifest())
    # the weights are signed: other weights under the same signature are refused before anything is parsed
    forged = data.replace(b"[0.25,1.5,1.25]", b"[9.25,1.5,1.25]")
    assert forged != data and len(forged) == len(data)
    with pytest.raises(SignatureError):
        BlobVerifier([load_public_key(keys[1])])(forged)


def test_a_blob_without_lead_weights_is_what_it_was() -> None:
    data = blob_to_bytes(blob())
    assert b'"lead"' not in data and blob_from_bytes(data).lead is None
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert sorted(meta) == ["created", "epoch", "fingerprint", "format", "key_id", "producer", "signature", "version"]


@pytest.mark.parametrize(
    ("lead", "error", "match"),
    [
        ((1.0, 1.0), BlobSchemaError, "hold 2 values; the manifest's model has 3 classes"),
        ((1.0, float("nan"), 1.0), BlobValueError, "finite and >= 0; class 1 holds nan"),
        ((1.0, float("inf"), 1.0), BlobValueError, "class 1 holds inf"),
        ((1.0, 1.0, -0.5), BlobValueError, "class 2 holds -0.5"),
    ],
)
def test_a_bad_lead_vector_refuses_the_blob(lead: tuple[float, ...], error: type[Exception], match: str) -> None:
    back = blob_from_bytes(blob_to_bytes(blob(lead=lead)))  # parsed: the parser does not know the class count
    with pytest.raises(error, match=match):
        validate_blob(back, manifest())


@pytest.mark.parametrize("text", ['{"a": 1}', "[1, true, 2]", '["1", 2, 3]', "[1, 2"])
def test_malformed_lead_metadata_is_a_format_error(text: str) -> None:
    from cema_deploy.contract.safetensors_io import tensors_to_bytes

    b = blob()
    data = tensors_to_bytes(b.tensors, {**b.metadata(), "lead": text}, error=BlobFormatError)
    with pytest.raises(BlobFormatError, match="'lead'"):
        blob_from_bytes(data)
