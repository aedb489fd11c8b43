"""Per-frame outputs of an edge run, streamed to a file as frames are served (``edge run --predictions``).

Nothing per frame stays in memory: ``.csv`` gets one line per frame as it is served; ``.npy`` and ``.npz`` append
each array's bytes to a hidden part file beside the target and are assembled into the target on :meth:`close`
(read back from disk in chunks, then renamed into place), so a run of any length holds only the current batch.
A run that is killed (SIGKILL) leaves the part files and no target; a run that stops on SIGINT/SIGTERM or at the
end of its source closes the writer and writes every frame it served. Never imports torch.

Example:
    >>> with PredictionWriter(Path("preds.csv")) as out:  # doctest: +SKIP
    ...     out.write(pred, entropy, selected, version, uploaded)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np

from cema_deploy.exceptions import CemaError

__all__ = ["PREDICTION_SUFFIXES", "PredictionWriter"]

PREDICTION_SUFFIXES = (".csv", ".npy", ".npz")
#: The arrays of a ``.npz`` (and the first, alone, of a ``.npy``), with their dtypes.
_FIELDS = (
    ("predictions", np.int64),
    ("entropy", np.float32),
    ("selected", np.bool_),
    ("version", np.int64),
    ("uploaded", np.bool_),
)


class PredictionWriter:
    """Write the per-frame arrays of an edge run to ``path`` (``.csv``, ``.npy`` classes only, ``.npz`` all)."""

    def __init__(self, path: Path) -> None:
        if path.suffix not in PREDICTION_SUFFIXES:
            raise CemaError(f"--predictions must end in {', '.join(PREDICTION_SUFFIXES)}, got {path.name!r}.")
        self.path, self.frames = path, 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".csv":
                self._csv: IO[str] | None = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
                self._csv.write("index,prediction,entropy,selected,version\n")
                self._parts: dict[str, IO[bytes]] = {}
            else:
                self._csv = None
                names = [_FIELDS[0][0]] if path.suffix == ".npy" else [name for name, _ in _FIELDS]
                self._parts = {name: open(self._part(name), "wb") for name in names}  # noqa: SIM115
        except OSError as exc:
            raise CemaError(f"Cannot write predictions to {path}: {exc}.") from exc
        self._closed = False

    def _part(self, name: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{name}.part")

    def write(
        self, pred: np.ndarray, entropy: np.ndarray, selected: np.ndarray, version: int, uploaded: np.ndarray
    ) -> None:
        """Append one served batch (``version``: the parameters that produced it)."""
        n = len(pred)
        if self._csv is not None:
            self._csv.writelines(
                f"{self.frames + i},{int(a)},{float(b):.6f},{int(c)},{version}\n"
                for i, (a, b, c) in enumerate(zip(pred, entropy, selected, strict=True))
            )
        else:
            arrays = dict(zip((name for name, _ in _FIELDS), (pred, entropy, selected, np.full(n, version), uploaded),
                              strict=True))  # fmt: skip
            dtypes = dict(_FIELDS)
            for name, f in self._parts.items():
                f.write(np.ascontiguousarray(arrays[name], dtype=dtypes[name]).tobytes())
        self.frames += n

    def close(self) -> None:
        """Finish the file: every frame written so far is in ``path`` (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._csv is not None:
                self._csv.close()
                return
            for f in self._parts.values():
                f.close()
            arrays = {name: _read_part(self._part(name), dtype) for name, dtype in _FIELDS if name in self._parts}
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "wb") as f:
                if self.path.suffix == ".npy":
                    np.save(f, arrays["predictions"])
                else:
                    np.savez(f, **arrays)  # type: ignore[arg-type]  # chunked from the memory maps
            os.replace(tmp, self.path)
            for name in self._parts:
                self._part(name).unlink(missing_ok=True)
        except OSError as exc:
            raise CemaError(f"Cannot write predictions to {self.path}: {exc}.") from exc

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_part(path: Path, dtype: type) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")
