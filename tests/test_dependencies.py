"""The edge side never imports torch; heavy dependencies are lazy (Polygraphy's test_dependencies idea)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import cema_deploy.contract
import cema_deploy.runtime

EDGE_PACKAGES = ("cema_deploy.contract", "cema_deploy.runtime")
FORBIDDEN = (
    "torch", "timm", "torchvision", "onnx", "onnxscript", "fastapi", "ray", "cema_deploy.export", "cema_deploy.cloud"
)  # fmt: skip


def _edge_modules() -> list[str]:
    mods = []
    for pkg in (cema_deploy.contract, cema_deploy.runtime):
        mods.append(pkg.__name__)
        mods += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return mods


def _imports_in_subprocess(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('@@MODULES@@'); print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return set(out.split("@@MODULES@@")[1].split())


def test_edge_modules_import_without_torch():
    mods = _edge_modules()
    assert "cema_deploy.runtime.backends.onnxrt" in mods and "cema_deploy.contract.blob" in mods
    assert {"cema_deploy.runtime.link.uplink", "cema_deploy.runtime.edge", "cema_deploy.runtime.frames.sources"} <= set(
        mods
    )
    loaded = _imports_in_subprocess("\n".join(f"import {m}" for m in mods))
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN[-2:]))
    assert not bad, f"edge modules imported {bad[:5]}"


def test_cli_help_imports_no_heavy_package():
    loaded = _imports_in_subprocess(
        "import sys\nsys.argv=['cema-deploy','--help']\nfrom cema_deploy.cli import app\n"
        "try:\n    app(standalone_mode=False)\nexcept SystemExit:\n    pass"
    )
    assert not any(m.split(".")[0] in ("torch", "timm", "onnx", "onnxruntime", "fastapi", "ray") for m in loaded)


def test_the_engine_registry_imports_ray_only_when_chosen():
    loaded = _imports_in_subprocess(
        "from cema_deploy.cloud.engines import get_engine, list_engines\n"
        "assert list_engines() == ['local', 'ray']\nget_engine('local')"
    )
    assert "cema_deploy.cloud.engines.local" in loaded
    assert not any(m.split(".")[0] == "ray" or m.endswith("ray_engine") for m in loaded)


def test_import_linter_contracts_hold():
    result = subprocess.run(["lint-imports"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
