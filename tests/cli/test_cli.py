from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from cema_deploy.cli import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("export", "inspect"):
        assert cmd in r.output


def test_export_then_inspect_json(tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(
        app, ["export", "test_resnet", "--num-classes", "10", "--img-size", "64", "--out", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    exported = json.loads(r.output)
    assert exported["parity_max_abs_diff"] <= 1e-4
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["fingerprint"] == exported["fingerprint"]
    assert info["refittable_tensors"] == 60 and info["refittable_by_layer_type"] == {"BatchNorm": 60}
    # payload = 15 BN layers x 4 tensors, float32; file adds only the header
    assert info["blob_payload_bytes"] == 4 * info["refittable_parameters"]
    assert info["blob_payload_bytes"] < info["blob_file_bytes"] < info["blob_payload_bytes"] + 16384
    assert 0 < info["blob_percent_of_model"] < 100


def test_installed_script_reports_errors_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cema_deploy", "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1
    assert "No manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        ["cema-deploy", "export", "resnet5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1 and "Did you mean: resnet50" in r.stderr and "Traceback" not in r.stderr


def test_a_command_that_raises_typer_exit_with_a_code_exits_with_it() -> None:
    # main() runs the app with standalone_mode=False, where click returns a typer.Exit's code instead of exiting.
    import subprocess
    import sys

    code = (
        "import sys, typer\nfrom cema_deploy import cli\n"
        "@cli.app.command('exit-four')\ndef _four() -> None:\n    raise typer.Exit(4)\n"
        "sys.argv = ['cema-deploy', 'exit-four']\ncli.main()\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 4
