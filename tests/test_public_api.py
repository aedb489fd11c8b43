"""The public surface of each subpackage is explicit, sorted, and importable (httpx's test_exported_members)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "cema_deploy.contract": [
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
    ],
    "cema_deploy.runtime": ["Backend", "EngineState", "RefitReport", "get_backend", "list_backends"],
    "cema_deploy.export": ["ExportResult", "create_timm_model", "export_timm", "load_weights"],
    "cema_deploy.cloud.deployment": ["LATENCY_BUCKETS", "Deployment"],
    "cema_deploy.bench": [
        "available_backends",
        "measure_refit",
        "measure_sustained_refit",
        "print_report",
        "run_bench",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_pinned_sorted_and_importable(module: str) -> None:
    if module in ("cema_deploy.export", "cema_deploy.cloud.deployment"):
        pytest.importorskip("torch")
    mod = importlib.import_module(module)
    assert mod.__all__ == PUBLIC[module]
    # ruff RUF022 (isort-style): CONSTANTS, then Classes, then functions, each alphabetical
    assert list(mod.__all__) == sorted(mod.__all__, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_version_is_the_only_thing_at_the_top() -> None:
    import types

    import cema_deploy

    public = [n for n, v in vars(cema_deploy).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)]
    assert public == []
    assert cema_deploy.__version__
