"""Signed refit blobs: Ed25519 keys, signing on the cloud, verification of raw bytes on the edge.

The cloud signs :func:`~cema_deploy.contract.blob.blob_digest` (the canonical header without the signature
fields, then the raw data bytes) and stores the signature and the signer's ``key_id`` in the blob's metadata.
The edge verifies the *raw bytes* it received before anything else: :class:`BlobVerifier` reads only the
bounded JSON header, checks that it is byte for byte the canonical header a signer writes, and hashes the data
region as it lies in the input; no array is built before the signature has verified. Any refusal is a
:class:`~cema_deploy.exceptions.SignatureError` that says why (unsigned, unknown key, altered). Fingerprint,
version, names, shapes and values are then checked by :func:`~cema_deploy.contract.blob.validate_blob`.

Keys are PEM files: the private key PKCS#8 (file mode 0600), the public key SubjectPublicKeyInfo. A key is named
by its ``key_id``, the first 16 hex digits of the SHA-256 of the raw 32-byte public key.

Example:
    >>> priv_path, pub_path = new_key_pair("keys")  # doctest: +SKIP
    >>> signed = sign_blob(blob, load_private_key(priv_path))  # doctest: +SKIP
    >>> verify = BlobVerifier([load_public_key(pub_path)])  # doctest: +SKIP
    >>> blob = verify.blob_from_bytes(blob_to_bytes(signed))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from cema_deploy._atomic import write_atomic
from cema_deploy._lazy import lazy_import
from cema_deploy.contract.blob import RefitBlob, blob_digest, blob_from_bytes, blob_to_bytes, digest_from_header
from cema_deploy.contract.safetensors_io import header_from_bytes, header_json
from cema_deploy.exceptions import BlobFormatError, ContractError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: File names ``cema-deploy keys new`` writes.
PRIVATE_KEY_FILE = "cema-signing.key"
PUBLIC_KEY_FILE = "cema-signing.pub"
#: Hex digits of the public key's SHA-256 that name a key.
KEY_ID_HEX = 16
_SIGNATURE_BYTES = 64


class SigningKeyError(ContractError):
    """A signing key file is missing, unreadable, of the wrong kind, or readable by other users."""


def _ed25519() -> ModuleType:
    return lazy_import("cryptography.hazmat.primitives.asymmetric.ed25519", extra="edge", purpose="signed refit blobs")


def _serialization() -> ModuleType:
    return lazy_import("cryptography.hazmat.primitives.serialization", extra="edge", purpose="signed refit blobs")


def key_id(public_key: Ed25519PublicKey) -> str:
    """The short name of a public key: first 16 hex digits of SHA-256 over its raw 32 bytes."""
    ser = _serialization()
    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def new_key_pair(directory: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create an Ed25519 key pair in ``directory``: ``cema-signing.key`` (mode 0600) and ``cema-signing.pub``.

    Refuses to replace existing files unless ``overwrite``. Returns (private key path, public key path).

    Example:
        >>> priv, pub = new_key_pair("keys")  # doctest: +SKIP
        >>> key_id(load_public_key(pub))  # doctest: +SKIP
        '3f9a0c1d2e4b5a69'
    """
    ser = _serialization()
    directory = Path(directory)
    priv_path, pub_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    existing = [str(p) for p in (priv_path, pub_path) if p.exists()]
    if existing and not overwrite:
        raise SigningKeyError(
            f"{', '.join(existing)} already exist; refusing to replace a signing key (edges trust its public "
            "key). Choose another directory, or pass --force / overwrite=True to replace it."
        )
    private_key = _ed25519().Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    public_pem = private_key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(priv_path, private_pem, mode=0o600)
        write_atomic(pub_path, public_pem, mode=0o644)
    except OSError as exc:
        raise SigningKeyError(f"Cannot write the key pair to {directory}: {exc}.") from exc
    return priv_path, pub_path


def load_private_key(
    path: str | os.PathLike[str], *, password: bytes | None = None, check_mode: bool = True
) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key. With ``check_mode`` (default) a file that group or others may read
    is refused, as ssh does."""
    path = Path(path)
    data = _read_key_file(path, "private")
    if check_mode and os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SigningKeyError(
                f"Private key {path} has mode {mode:04o}; other users can read it. Run `chmod 600 {path}`."
            )
    try:
        key = _serialization().load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not a readable PEM private key ({exc}).") from exc
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}; expected an Ed25519 private key.")
    private_key: Ed25519PrivateKey = key
    return private_key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key (as written by :func:`new_key_pair`)."""
    path = Path(path)
    data = _read_key_file(path, "public")
    try:
        key = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not a readable PEM public key ({exc}).") from exc
    if not isinstance(key, _ed25519().Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}; expected an Ed25519 public key.")
    public_key: Ed25519PublicKey = key
    return public_key


def sign_blob(blob: RefitBlob, private_key: Ed25519PrivateKey) -> RefitBlob:
    """Return ``blob`` with ``signature`` (hex Ed25519 signature of :func:`blob_digest`) and ``key_id`` set.

    Example:
        >>> signed = sign_blob(blob, load_private_key("keys/cema-signing.key"))  # doctest: +SKIP
        >>> save_blob(signed, "blob-v7.safetensors")  # doctest: +SKIP
    """
    signature = private_key.sign(blob_digest(blob))
    return blob.with_signature(signature.hex(), key_id(private_key.public_key()))


class BlobVerifier:
    """Checks that raw blob bytes were signed by one of the trusted public keys, before they are parsed.

    Calling it on bytes returns the signer's key id or raises :class:`SignatureError`. Only the JSON header
    (bounded by ``MAX_HEADER_BYTES``) is parsed; the data region is hashed as it lies in ``data``.

    Example:
        >>> verify = BlobVerifier([load_public_key("keys/cema-signing.pub")])  # doctest: +SKIP
        >>> verify(data)  # doctest: +SKIP
        '3f9a0c1d2e4b5a69'
        >>> blob = verify.blob_from_bytes(data)  # verified, then parsed  # doctest: +SKIP
    """

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in public_keys}
        if not self._keys:
            raise SigningKeyError("A BlobVerifier needs at least one trusted public key.")

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> BlobVerifier:
        """A verifier trusting the PEM public keys in ``paths``."""
        return cls(load_public_key(p) for p in paths)

    @property
    def key_ids(self) -> list[str]:
        """The ids of the trusted keys, sorted."""
        return sorted(self._keys)

    def __call__(self, data: bytes, *, source: str = "blob") -> str:
        """Verify raw blob bytes; returns the signer's key id. Raises :class:`SignatureError` with the reason."""
        try:
            header, body_start = header_from_bytes(data, source=source, error=BlobFormatError)
        except BlobFormatError as exc:
            raise SignatureError(f"Cannot verify {source}: {exc} Refusing it.") from exc
        meta = header["__metadata__"]
        signature_hex: str = meta.get("signature", "")
        signer: str = meta.get("key_id", "")
        if not signature_hex or not signer:
            raise SignatureError(
                f"{source} is unsigned, and this edge only applies blobs signed by {self._describe()}. "
                "Sign it on the cloud (cema_deploy.contract.signing.sign_blob) or configure the edge without keys."
            )
        public_key = self._keys.get(signer)
        if public_key is None:
            raise SignatureError(
                f"{source} is signed by key {signer[:32]!r}, which is not trusted here ({self._describe()}). "
                "Add its public key to the edge (cema-deploy keys show PUBFILE prints its id) or sign with a "
                "trusted key."
            )
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            signature = b""
        if len(signature) != _SIGNATURE_BYTES or signature.hex() != signature_hex:  # one spelling only
            raise SignatureError(
                f"{source}: the signature field is not a lowercase hex Ed25519 signature (altered?); refusing it."
            )
        head_len = body_start - 8
        canonical = header_json(header)
        canonical += b" " * (-len(canonical) % 8)
        if head_len != len(canonical) or bytes(memoryview(data)[8:body_start]) != canonical:
            raise SignatureError(
                f"{source}: the header is not in the canonical form a signer writes (altered after signing?); "
                "refusing it."
            )
        digest = digest_from_header(header, [memoryview(data)[body_start:]])
        invalid = lazy_import("cryptography.exceptions", extra="edge", purpose="signed refit blobs").InvalidSignature
        try:
            public_key.verify(signature, digest)
        except invalid as exc:
            raise SignatureError(
                f"{source}: the signature does not verify with key {signer}: the blob was altered after signing "
                "or signed by another key. Refusing it; the serving parameters are unchanged."
            ) from exc
        return signer

    def verify_blob(self, blob: RefitBlob) -> str:
        """Verify an in-memory blob (e.g. on the cloud before sending); returns the signer's key id."""
        return self(blob_to_bytes(blob))

    def blob_from_bytes(self, data: bytes, *, source: str = "blob") -> RefitBlob:
        """Verify ``data``, then parse it with :func:`~cema_deploy.contract.blob.blob_from_bytes`."""
        self(data, source=source)
        return blob_from_bytes(data, source=source)

    def _describe(self) -> str:
        return f"{len(self._keys)} trusted key(s): {', '.join(self.key_ids)}"


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        if path.stat().st_size > 64 * 1024:
            raise SigningKeyError(f"{path} is too large to be a PEM {kind} key.")
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"Cannot read the {kind} key {path}: {exc}. Create a key pair with `cema-deploy keys new --out DIR`."
        ) from exc


__all__ = [
    "KEY_ID_HEX",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "BlobVerifier",
    "SigningKeyError",
    "key_id",
    "load_private_key",
    "load_public_key",
    "new_key_pair",
    "sign_blob",
]
