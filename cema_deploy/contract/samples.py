"""The upload wire format: a batch of selected samples from an edge, as safetensors bytes.

An edge uploads the uint8 RGB image that its preprocessing fed to the model (already resized to the
manifest's ``preprocess.size``), never float32 tensors: the cloud re-applies mean/std from the manifest and
so sees exactly the edge's input. Images travel raw (``encoding=raw``: one ``images`` tensor ``[N, H, W, 3]``)
or compressed one by one (``encoding=png`` lossless / ``jpeg`` lossy: an ``encoded`` byte tensor and an
``offsets`` tensor of N+1 int64). Metadata: format, fingerprint, edge_version, device_id, encoding, shape,
kind, generation, and for calibration batches calibration (``start`` or ``shift``).

Kinds (protocol 2):

* ``selected``: samples the edge's selection rule chose; the cloud adapts and distils on them and keeps them
  for replay.
* ``calibration``: a whole edge batch, unfiltered (the official loop sets the running statistics from the edge
  model's first forward, on the first edge batch). The cloud sets (``start``, the first after a deployment's
  start or reset) or re-initialises (``shift``, the edge detected a distribution shift) the replica's running
  statistics from it; the ``selected`` tensor (uint8 0/1 ``[N]``) marks the samples the edge's rule chose,
  which the cloud also adapts on, so none is uploaded twice.
* ``statistics``: a uniform random share of frames, for estimating running statistics without the bias of a
  selective rule (beyond the paper); never distilled on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.safetensors_io import header_from_bytes, tensors_from_bytes, tensors_to_bytes
from cema_deploy.exceptions import ContractError

SAMPLES_FORMAT = "cema-samples/2"
ENCODINGS = ("raw", "png", "jpeg")
#: Sample kinds (see the module docstring).
KIND_SELECTED, KIND_CALIBRATION, KIND_STATISTICS = "selected", "calibration", "statistics"
SAMPLE_KINDS = (KIND_SELECTED, KIND_CALIBRATION, KIND_STATISTICS)
#: Why a calibration batch was sent: the deployment's first after start/reset, or a shift the edge detected.
CALIBRATION_REASONS = ("start", "shift")
#: Most samples one upload may carry (the cloud can set a lower limit).
MAX_SAMPLES = 4096
#: Largest image side an upload may declare (uploads are at the model's input size).
MAX_IMAGE_SIDE = 4096
#: Most bytes one upload may decode to (4096 images of 224x224 RGB are 617 MB).
MAX_DECODED_BYTES = 1 << 30


class SampleFormatError(ContractError):
    """Bytes that are not a valid sample batch for the expected model."""


@dataclass(frozen=True, kw_only=True)
class SampleBatch:
    """Samples an edge selected for upload.

    Example:
        >>> b = SampleBatch(images=np.zeros((2, 8, 8, 3), np.uint8), fingerprint="ab", edge_version=0)
        >>> samples_from_bytes(samples_to_bytes(b, encoding="png")).images.shape
        (2, 8, 8, 3)
    """

    images: np.ndarray  # uint8 [N, H, W, 3]
    fingerprint: str
    edge_version: int
    device_id: str = ""
    entropy: np.ndarray | None = None  # float32 [N]: the edge's entropy of each sample (for metrics only)
    kind: str = KIND_SELECTED  # one of SAMPLE_KINDS
    generation: int = 0  # the deployment generation the edge works in (rises on every reset)
    selected: np.ndarray | None = None  # calibration only: bool [N], the samples the edge's rule chose
    calibration: str = ""  # calibration only: "start" or "shift" (CALIBRATION_REASONS)

    def __post_init__(self) -> None:
        im = self.images
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            raise SampleFormatError(f"Sample images must be uint8 [N, H, W, 3], got {im.dtype}{list(im.shape)}.")
        if self.entropy is not None and self.entropy.shape != (im.shape[0],):
            raise SampleFormatError(f"entropy must have shape [{im.shape[0]}], got {list(self.entropy.shape)}.")
        if self.kind not in SAMPLE_KINDS:
            raise SampleFormatError(f"Sample kind {self.kind!r:.40} is not one of {SAMPLE_KINDS}.")
        if self.generation < 0:
            raise SampleFormatError(f"generation must be >= 0, got {self.generation}.")
        if self.kind == KIND_CALIBRATION:
            if self.calibration not in CALIBRATION_REASONS:
                raise SampleFormatError(
                    f"A calibration batch needs calibration in {CALIBRATION_REASONS}, got {self.calibration!r:.40}."
                )
            if self.selected is None:
                object.__setattr__(self, "selected", np.zeros(im.shape[0], bool))
            sel = self.selected
            if sel is None or sel.dtype != np.bool_ or sel.shape != (im.shape[0],):
                raise SampleFormatError(f"selected must be bool [{im.shape[0]}] for a calibration batch.")
        elif self.selected is not None or self.calibration:
            raise SampleFormatError(f"selected and calibration belong to calibration batches, not {self.kind!r}.")

    @property
    def adapt_images(self) -> np.ndarray:
        """The samples the cloud adapts and distils on: all of a ``selected`` batch, the marked ones of a
        calibration batch, none of a ``statistics`` batch."""
        if self.kind == KIND_SELECTED:
            return self.images
        if self.kind == KIND_CALIBRATION and self.selected is not None:
            picked: np.ndarray = self.images[self.selected]
            return picked
        return self.images[:0]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def samples_to_bytes(batch: SampleBatch, *, encoding: str = "png", jpeg_quality: int = 90) -> bytes:
    """Serialize a batch for upload; ``png`` is lossless and typically 2-4x smaller than ``raw``."""
    if encoding not in ENCODINGS:
        raise SampleFormatError(f"Unknown sample encoding {encoding!r}; expected one of {ENCODINGS}.")
    tensors: dict[str, np.ndarray] = {}
    if encoding == "raw":
        tensors["images"] = batch.images
    else:
        image_mod = lazy_import("PIL.Image", extra="edge", purpose=f"{encoding} sample compression")
        parts: list[bytes] = []
        for img in batch.images:
            buf = io.BytesIO()
            pil = image_mod.fromarray(img)
            if encoding == "png":
                pil.save(buf, format="PNG", compress_level=1)
            else:
                pil.save(buf, format="JPEG", quality=int(jpeg_quality))
            parts.append(buf.getvalue())
        offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        tensors["encoded"] = np.frombuffer(b"".join(parts), dtype=np.uint8)
        tensors["offsets"] = offsets
    if batch.entropy is not None:
        tensors["entropy"] = batch.entropy.astype(np.float32)
    if batch.selected is not None:
        tensors["selected"] = batch.selected.astype(np.uint8)
    n, h, w, _ = batch.images.shape
    meta = {
        "format": SAMPLES_FORMAT,
        "fingerprint": batch.fingerprint,
        "edge_version": str(int(batch.edge_version)),
        "device_id": batch.device_id,
        "encoding": encoding,
        "shape": f"{n},{h},{w},3",
        "kind": batch.kind,
        "generation": str(int(batch.generation)),
    }
    if batch.kind == KIND_CALIBRATION:
        meta["calibration"] = batch.calibration
    return tensors_to_bytes(tensors, meta, error=SampleFormatError)


@dataclass(frozen=True, kw_only=True)
class UploadHeader:
    """What an upload's header declares, read without decoding or copying any image (:func:`upload_header`)."""

    count: int
    height: int
    width: int
    fingerprint: str
    kind: str
    encoding: str
    generation: int
    edge_version: int

    @property
    def decoded_bytes(self) -> int:
        """Bytes its images take once decoded (uint8 RGB)."""
        return self.count * self.height * self.width * 3


def upload_header(
    data: bytes, *, image_hw: tuple[int, int] | None = None, max_samples: int = MAX_SAMPLES
) -> UploadHeader:
    """Parse and check an upload's header only (format, shape, size limits, ``image_hw``), so a receiver can
    refuse it, or reserve the memory it will decode to, before decoding anything."""
    header, _ = header_from_bytes(data, source="sample upload", error=SampleFormatError)
    return _header_from_meta(header["__metadata__"], image_hw=image_hw, max_samples=max_samples)


def _header_from_meta(meta: dict[str, str], *, image_hw: tuple[int, int] | None, max_samples: int) -> UploadHeader:
    if meta.get("format") != SAMPLES_FORMAT:
        raise SampleFormatError(f"Upload format {meta.get('format')!r} is not {SAMPLES_FORMAT!r}.")
    try:
        n, h, w, c = (int(v) for v in meta["shape"].split(","))
        edge_version = int(meta.get("edge_version", "0"))
        encoding = meta["encoding"]
        fingerprint = meta["fingerprint"]
        kind = meta["kind"]
        generation = int(meta["generation"])
    except (KeyError, ValueError) as exc:
        raise SampleFormatError(f"Upload metadata missing or malformed ({exc!r}).") from exc
    if not 1 <= n <= max_samples or c != 3 or not 1 <= h <= MAX_IMAGE_SIDE or not 1 <= w <= MAX_IMAGE_SIDE:
        raise SampleFormatError(
            f"Upload shape {[n, h, w, c]!s:.200} is not 1..{max_samples} RGB images of at most "
            f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels."
        )
    if n * h * w * 3 > MAX_DECODED_BYTES:
        raise SampleFormatError(
            f"Upload of {n} images of {h}x{w} would decode to {n * h * w * 3} bytes, more than the "
            f"{MAX_DECODED_BYTES} one upload may have; send smaller batches."
        )
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise SampleFormatError(f"Upload images are {h}x{w}, the model expects {image_hw[0]}x{image_hw[1]}.")
    return UploadHeader(
        count=n,
        height=h,
        width=w,
        fingerprint=fingerprint,
        kind=kind,
        encoding=encoding,
        generation=generation,
        edge_version=edge_version,
    )


def samples_from_bytes(
    data: bytes, *, image_hw: tuple[int, int] | None = None, max_samples: int = MAX_SAMPLES
) -> SampleBatch:
    """Parse and check an upload; ``image_hw`` is the manifest's input size, when known."""
    tensors, meta = tensors_from_bytes(data, source="sample upload", error=SampleFormatError)
    head = _header_from_meta(meta, image_hw=image_hw, max_samples=max_samples)
    n, h, w = head.count, head.height, head.width
    encoding, fingerprint, kind = head.encoding, head.fingerprint, head.kind
    generation, edge_version = head.generation, head.edge_version
    if encoding == "raw":
        images = tensors.get("images")
        if images is None or images.dtype != np.uint8 or images.shape != (n, h, w, 3):
            raise SampleFormatError(f"Raw upload must carry uint8 images of shape {[n, h, w, 3]}.")
    elif encoding in ("png", "jpeg"):
        images = _decode_images(tensors, n, h, w)
    else:
        raise SampleFormatError(f"Unknown sample encoding {encoding!r}; expected one of {ENCODINGS}.")
    entropy = tensors.get("entropy")
    if entropy is not None and (entropy.shape != (n,) or entropy.dtype != np.float32):
        raise SampleFormatError(f"Upload entropy must be float32 [{n}].")
    selected = tensors.get("selected")
    if selected is not None:
        if selected.shape != (n,) or selected.dtype != np.uint8 or (selected > 1).any():
            raise SampleFormatError(f"Upload 'selected' must be uint8 0/1 [{n}].")
        selected = selected.astype(bool)
    return SampleBatch(
        images=images,
        fingerprint=fingerprint,
        edge_version=edge_version,
        device_id=meta.get("device_id", ""),
        entropy=entropy,
        kind=kind,
        generation=generation,
        selected=selected,
        calibration=meta.get("calibration", ""),
    )


def _decode_images(tensors: dict[str, np.ndarray], n: int, h: int, w: int) -> np.ndarray:
    image_mod = lazy_import("PIL.Image", extra="cloud", purpose="decoding compressed samples")
    encoded, offsets = tensors.get("encoded"), tensors.get("offsets")
    if encoded is None or offsets is None or encoded.dtype != np.uint8 or offsets.shape != (n + 1,):
        raise SampleFormatError("Compressed upload must carry 'encoded' (uint8) and 'offsets' (N+1 int64).")
    if offsets[0] != 0 or offsets[-1] != encoded.size or (np.diff(offsets) <= 0).any():
        raise SampleFormatError("Compressed upload offsets are not increasing from 0 to the payload size.")
    # Decode one by one into one array of the declared size, allocated once the first image really decoded at
    # that size (a header's claim alone allocates nothing), so the peak is the images once, never a list of them
    # plus their stacked copy (a receiver reserves that much from the header first: see upload_header).
    out: np.ndarray | None = None
    raw = encoded.data
    for i in range(n):
        try:
            with image_mod.open(io.BytesIO(raw[offsets[i] : offsets[i + 1]])) as im:
                if im.size != (w, h):
                    raise SampleFormatError(f"Sample {i} decodes to {im.size[1]}x{im.size[0]}, expected {h}x{w}.")
                frame = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if out is None:
                out = np.empty((n, h, w, 3), np.uint8)
            out[i] = frame
        except SampleFormatError:
            raise
        except Exception as exc:  # PIL raises many types on hostile bytes
            raise SampleFormatError(f"Sample {i} is not a decodable image ({exc}).") from exc
    assert out is not None  # n >= 1
    return out
