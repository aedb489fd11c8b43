from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cema_deploy.contract import RefitBlob, blob_digest, blob_from_bytes, blob_to_bytes, validate_blob
from cema_deploy.contract.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    BlobVerifier,
    SigningKeyError,
    key_id,
    load_private_key,
    load_public_key,
    new_key_pair,
    sign_blob,
)
from cema_deploy.exceptions import BlobError, SignatureError, StaleBlobError
from tests.contract.test_blob import FP, blob, manifest

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return new_key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return new_key_pair(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="module")
def verifier(keys: tuple[Path, Path]) -> BlobVerifier:
    return BlobVerifier([load_public_key(keys[1])])


def small_blob() -> RefitBlob:
    """A blob small enough to flip every byte of: two tensors of 2 floats."""
    return RefitBlob(
        tensors={"a.weight": np.array([1.0, 2.0], np.float32), "a.bias": np.array([3.0, 4.0], np.float32)},
        fingerprint=FP,
        version=5,
        created=1.0,
        producer="test",
    )


def test_round_trip(keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    signed = sign_blob(blob(), load_private_key(keys[0]))
    assert signed.key_id == key_id(load_public_key(keys[1])) and len(signed.key_id) == 16
    assert len(bytes.fromhex(signed.signature)) == 64
    assert blob_digest(signed) == blob_digest(blob(created=signed.created))  # the signature is not signed
    data = blob_to_bytes(signed)
    assert verifier(data) == signed.key_id
    back = verifier.blob_from_bytes(data)
    assert back.signature == signed.signature and back.key_id == signed.key_id
    validate_blob(back, manifest(), newer_than=2)  # fingerprint/version are left to validate_blob
    with pytest.raises(StaleBlobError):
        validate_blob(back, manifest(), newer_than=3)
    assert verifier.verify_blob(back) == signed.key_id


def test_verifier_accepts_any_trusted_key(keys: tuple[Path, Path], other_keys: tuple[Path, Path]) -> None:
    both = BlobVerifier.from_files([keys[1], other_keys[1]])
    assert len(both.key_ids) == 2
    for priv, _ in (keys, other_keys):
        signed = sign_blob(blob(), load_private_key(priv))
        assert both(blob_to_bytes(signed)) == signed.key_id


def test_unsigned_blob_is_refused(verifier: BlobVerifier) -> None:
    with pytest.raises(SignatureError, match="unsigned"):
        verifier(blob_to_bytes(blob()))


def test_blob_signed_by_an_untrusted_key_is_refused(other_keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    signed = sign_blob(blob(), load_private_key(other_keys[0]))
    with pytest.raises(SignatureError, match="not trusted here"):
        verifier(blob_to_bytes(signed))


def test_key_id_of_a_trusted_key_with_another_keys_signature_is_refused(
    keys: tuple[Path, Path], other_keys: tuple[Path, Path], verifier: BlobVerifier
) -> None:
    forged = sign_blob(blob(), load_private_key(other_keys[0]))
    forged = forged.with_signature(forged.signature, key_id(load_public_key(keys[1])))
    with pytest.raises(SignatureError, match="does not verify"):
        verifier(blob_to_bytes(forged))


def test_changed_content_under_a_valid_signature_is_refused(keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    signed = sign_blob(blob(), load_private_key(keys[0]))
    tensors = dict(signed.tensors)
    tensors["bn.bias"] = tensors["bn.bias"] + np.float32(1)
    for changed in (
        RefitBlob(**{**signed.__dict__, "tensors": tensors}),
        RefitBlob(**{**signed.__dict__, "version": signed.version + 1}),
        RefitBlob(**{**signed.__dict__, "fingerprint": "cd" * 32}),
        RefitBlob(**{**signed.__dict__, "producer": "someone else"}),
    ):
        with pytest.raises(SignatureError, match="does not verify"):
            verifier(blob_to_bytes(changed))


def test_every_single_byte_flip_is_refused(keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    data = blob_to_bytes(sign_blob(small_blob(), load_private_key(keys[0])))
    assert verifier(data)
    assert len(data) < 1024
    for pos in range(len(data)):
        for bit in (0x01, 0x20, 0x80):
            flipped = bytearray(data)
            flipped[pos] ^= bit
            with pytest.raises(SignatureError):
                verifier(bytes(flipped))


def test_truncation_and_appended_bytes_are_refused(keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    data = blob_to_bytes(sign_blob(small_blob(), load_private_key(keys[0])))
    for n in range(len(data)):
        with pytest.raises(SignatureError):
            verifier(data[:n])
    with pytest.raises(SignatureError):
        verifier(data + b"\0")


def test_non_canonical_header_with_the_same_meaning_is_refused(keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    data = blob_to_bytes(sign_blob(small_blob(), load_private_key(keys[0])))
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    head = json.dumps(header, indent=1).encode()  # same JSON value, other spelling
    head += b" " * (-len(head) % 8)
    with pytest.raises(SignatureError, match="canonical"):
        verifier(struct.pack("<Q", len(head)) + head + data[8 + hlen :])


def test_signature_is_checked_before_any_tensor_is_parsed(keys: tuple[Path, Path], verifier: BlobVerifier) -> None:
    """A header that would fail the tensor parser (offsets past the data) but carries a wrong signature is a
    SignatureError: the verifier never got as far as building tensors."""
    signed = sign_blob(small_blob(), load_private_key(keys[0]))
    header = {
        "__metadata__": signed.metadata(),
        "a.weight": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    garbage = struct.pack("<Q", len(head)) + head + b"\xff" * 16
    with pytest.raises(BlobError, match="out of range"):
        blob_from_bytes(garbage)  # what the parser alone would say
    with pytest.raises(SignatureError, match="does not verify"):
        verifier(garbage)


def test_keys_files_and_modes(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert priv.name == PRIVATE_KEY_FILE and pub.name == PUBLIC_KEY_FILE
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to replace"):
        new_key_pair(priv.parent)
    loose = tmp_path / "loose.key"
    loose.write_bytes(priv.read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_private_key(loose)
    assert load_private_key(loose, check_mode=False)
    with pytest.raises(SigningKeyError, match="not a readable PEM public key"):
        load_public_key(priv)
    with pytest.raises(SigningKeyError, match="Cannot read the public key"):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(SigningKeyError, match="at least one"):
        BlobVerifier([])


def test_overwrite_makes_a_new_key(tmp_path: Path) -> None:
    _, pub = new_key_pair(tmp_path)
    first = key_id(load_public_key(pub))
    _, pub = new_key_pair(tmp_path, overwrite=True)
    assert key_id(load_public_key(pub)) != first


def test_keys_cli(tmp_path: Path) -> None:
    from cema_deploy.cli import app

    runner = CliRunner()
    out = tmp_path / "k"
    r = runner.invoke(app, ["keys", "new", "--out", str(out)])
    assert r.exit_code == 0, r.output
    kid = key_id(load_public_key(out / PUBLIC_KEY_FILE))
    assert kid in r.output
    assert stat.S_IMODE((out / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    r = runner.invoke(app, ["keys", "new", "--out", str(out)])
    assert r.exit_code == 1 and isinstance(r.exception, SigningKeyError)
    assert "--force" in str(r.exception)
    r = runner.invoke(app, ["keys", "new", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    new_kid = key_id(load_public_key(out / PUBLIC_KEY_FILE))
    assert new_kid != kid
    r = runner.invoke(app, ["keys", "show", str(out / PUBLIC_KEY_FILE)])
    assert r.exit_code == 0 and new_kid in r.output and "Ed25519" in r.output
    r = runner.invoke(app, ["keys", "show", str(out / PRIVATE_KEY_FILE)])
    assert r.exit_code == 1 and isinstance(r.exception, SigningKeyError)
