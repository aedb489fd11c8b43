"""The one exception tree of cema-deploy.

Every error the toolkit raises on purpose is a :class:`CemaError`; errors of ONNX Runtime, TensorRT,
safetensors, torch or httpx are re-raised as one of these with ``raise ... from exc``. The CLI prints a
``CemaError`` as one message without a traceback and exits with status 1.

::

    CemaError
    ├── MissingExtraError          an optional dependency (extra) is not installed
    ├── ContractError              the manifest / refit-blob contract between edge and cloud
    │   ├── ManifestError          manifest.json missing, unreadable or inconsistent
    │   │   └── ExportIntegrityError   the export's files disagree with its manifest or fingerprint
    │   ├── ProtocolError          an edge-cloud message (JSON body, header) that does not follow the protocol
    │   │   └── ProtocolMismatchError  the other side speaks another protocol version
    │   └── BlobError              a refit blob that must not be applied
    │       ├── BlobFormatError        not a readable safetensors refit blob (truncated, bad header, ...)
    │       ├── FingerprintMismatchError  made for another model or another export
    │       ├── BlobSchemaError        names, shapes or dtypes differ from the manifest
    │       ├── BlobValueError         NaN/Inf, negative variance
    │       ├── StaleBlobError         version not newer than the one serving (replay)
    │       │   └── StaleEpochError        made by an older cloud state (epoch) than the one serving
    │       └── SignatureError         unsigned, wrongly signed or altered blob
    ├── ModelError                 unknown model name, unreadable checkpoint
    ├── ExportError                the ONNX export failed
    │   └── VerificationError      the exported model failed a check (checker, ORT, parity, names)
    ├── BackendError               an inference backend failed
    │   ├── BackendUnavailableError   the backend's package or device is missing
    │   └── RefitError             new parameters could not be built; the old ones keep serving
    ├── UplinkError                talking to the cloud failed
    │   └── StaleGenerationError   an upload for an older generation (409): the deployment was reset
    └── CloudError                 the adaptation service refused or failed a request
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cema_deploy.contract.messages import DeploymentStatus


class CemaError(Exception):
    """Root of every error cema-deploy raises on purpose."""


class MissingExtraError(CemaError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class ContractError(CemaError):
    """The manifest / refit-blob contract between the edge and the cloud was broken."""


class ManifestError(ContractError):
    """A manifest is missing, unreadable or inconsistent with its model."""


class ExportIntegrityError(ManifestError):
    """An export folder's files disagree with its manifest: ``model.onnx`` does not hash to the recorded
    fingerprint (truncated, replaced, or ``manifest.json`` hand-edited), or a file's size or hash differs."""


class ProtocolError(ContractError):
    """An edge-cloud message (JSON body or header) that does not follow ``contract.protocol``."""


class ProtocolMismatchError(ProtocolError):
    """The other side speaks another protocol version; the message names both."""


class BlobError(ContractError):
    """A refit blob that must not be applied. Nothing was changed."""


class BlobFormatError(BlobError):
    """The bytes are not a readable refit blob (truncated, bad header, wrong format version)."""


class FingerprintMismatchError(BlobError):
    """The blob was made for another model or another export of it."""


class BlobSchemaError(BlobError):
    """The blob's tensor names, shapes or dtypes differ from the manifest's refittable parameters."""


class BlobValueError(BlobError):
    """The blob holds values that must not reach an engine (NaN, Inf, negative variance)."""


class StaleBlobError(BlobError):
    """The blob's version is not newer than the version already serving (a replay)."""


class StaleEpochError(StaleBlobError):
    """The blob's epoch (the cloud state that minted it) is older than the epoch this edge follows."""


class SignatureError(BlobError):
    """The blob is unsigned, signed by another key, or altered after signing."""


class ModelError(CemaError):
    """A model name, checkpoint or model directory could not be used."""


class ExportError(CemaError):
    """Exporting a model to ONNX failed."""


class VerificationError(ExportError):
    """An exported model failed a check (ONNX checker, ORT session, parity, refittable names)."""


class BackendError(CemaError):
    """An inference backend failed."""


class BackendUnavailableError(BackendError):
    """The requested backend's package or device is not available here."""


class RefitError(BackendError):
    """New parameters could not be built into the engine; the previous parameters keep serving."""


class UplinkError(CemaError):
    """Talking to the cloud service failed. ``retryable`` is False when the cloud refused the request (4xx).
    ``retry_after`` is the cloud's ``Retry-After`` (seconds) of a 429, when it sent one."""

    def __init__(
        self, message: str, *, retryable: bool = True, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class StaleGenerationError(UplinkError):
    """The cloud refused an upload made for an older generation (409): the deployment was reset. ``current``
    is the deployment as the cloud sees it now; start its generation (fresh selector, calibrate if needed).
    Raised by both links of the edge (HTTP and in-process), so it lives here, with the tree."""

    def __init__(self, message: str, *, current: DeploymentStatus) -> None:
        super().__init__(message, retryable=False, status=409)
        self.current = current


class CloudError(CemaError):
    """The adaptation service refused or failed a request."""
