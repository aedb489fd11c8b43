"""The contract between edge and cloud: the model manifest and the refit blob (numpy + safetensors only)."""

from cema_deploy.contract.blob import (
    BLOB_FORMAT,
    RefitBlob,
    blob_digest,
    blob_from_bytes,
    blob_from_path,
    blob_to_bytes,
    save_blob,
    validate_blob,
)
from cema_deploy.contract.manifest import (
    MANIFEST_FORMAT,
    InputSpec,
    Manifest,
    Preprocess,
    RefittableParam,
    manifest_from_dir,
)
from cema_deploy.contract.names import NORM_KINDS, norm_stat_suffixes

__all__ = [
    "BLOB_FORMAT",
    "MANIFEST_FORMAT",
    "NORM_KINDS",
    "InputSpec",
    "Manifest",
    "Preprocess",
    "RefitBlob",
    "RefittableParam",
    "blob_digest",
    "blob_from_bytes",
    "blob_from_path",
    "blob_to_bytes",
    "manifest_from_dir",
    "norm_stat_suffixes",
    "save_blob",
    "validate_blob",
]
