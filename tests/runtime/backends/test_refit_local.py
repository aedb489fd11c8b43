"""``Backend.refit_local`` on a build-per-refit backend (ONNX Runtime, ``plain`` path): a local statistics refit keeps
the cloud's epoch and version, and never undoes a rollback that lands while it builds."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob
from cema_deploy.exceptions import RefitError
from cema_deploy.runtime.backends.registry import get_backend
from tests.conftest import needs_torch

pytestmark = needs_torch


def _stats(tensors: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {k: v * np.float32(factor) for k, v in tensors.items() if k.endswith(("running_mean", "running_var"))}


def test_a_local_refit_keeps_the_cloud_epoch_and_version(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    with get_backend("ort-cpu", Path(out), refit_path="plain") as be:
        export = dict(be.tensors)
        be.refit(RefitBlob(tensors=export, fingerprint=be.manifest.fingerprint, version=4, epoch=3))
        be.refit_local(_stats(export, 1.5))
        assert be.stamp == (3, 4)  # was (0, 4): a blob of an older epoch would then have passed as newer


def test_a_rollback_during_a_local_refit_is_not_undone(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    with get_backend("ort-cpu", Path(out), refit_path="plain") as be:
        export = dict(be.tensors)
        be.refit(RefitBlob(tensors={k: v * np.float32(1.1) for k, v in export.items()},
                           fingerprint=be.manifest.fingerprint, version=1))  # fmt: skip
        building, release = threading.Event(), threading.Event()
        build = be._build

        def slow_build(tensors: Any) -> Any:
            building.set()
            assert release.wait(30)
            return build(tensors)

        be._build = slow_build  # type: ignore[method-assign]
        errors: list[BaseException] = []

        def local() -> None:
            try:
                be.refit_local(_stats(export, 1.5))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=local)
        t.start()
        assert building.wait(30)
        assert be.rollback() == 0
        release.set()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], RefitError)
        with pytest.raises(RefitError, match="Nothing to roll back"):
            be.rollback()
        assert be.version == 0
        for k, v in be.tensors.items():
            np.testing.assert_array_equal(v, export[k])  # the rolled-back parameters serve, not v1 + statistics
