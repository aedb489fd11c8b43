"""The edge's side of the lead weights (issue 22 item 4): the ``lead`` rule draws with the weights of the blob that
serves (a rollback brings back the previous blob's), and a blob with a bad vector is refused whole."""

from __future__ import annotations

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.runtime.selection.rules import SelectionConfig
from tests.conftest import needs_torch
from tests.runtime.test_edge import _diverse, _perturbed, _runtime

pytestmark = needs_torch
LEAD_RULE = SelectionConfig.preset("lead", 10, share=0.25, seed=0)


def _onehot(c: int) -> tuple[float, ...]:
    return tuple(10.0 if i == c else 0.0 for i in range(10))


def _blob(tensors, fp: str, version: int, lead: tuple[float, ...] | None) -> bytes:  # type: ignore[no-untyped-def]
    return blob_to_bytes(RefitBlob(tensors=tensors, fingerprint=fp, version=version, lead=lead))


def _kept_classes(rt, x: np.ndarray, batches: int = 6) -> set[int]:  # type: ignore[no-untyped-def]
    kept: set[int] = set()
    for _ in range(batches):
        step = rt.process(x)
        kept |= set(step.predictions[step.selection.mask].tolist())
    return kept


def test_the_rule_uses_the_weights_of_the_serving_blob_and_not_of_a_rolled_back_one(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    x = _diverse(64, seed=0)
    with _runtime(out, LEAD_RULE, window=4096) as rt:  # a window no run here fills: the guard never judges
        pred = rt.process(x).predictions
        a, b = np.bincount(pred, minlength=10).argsort()[::-1][:2]  # the two classes predicted most on x
        assert rt.lead_weights is None and rt.selector.counters.lead_weighted == 0  # before weights: uniform
        # the same tensors under new versions: predictions stay, only the weights change
        assert rt.apply_blob_bytes(_blob(v0.tensors, v0.fingerprint, 1, _onehot(a)))
        assert rt.lead_weights == _onehot(a) and _kept_classes(rt, x) == {a}
        assert rt.apply_blob_bytes(_blob(v0.tensors, v0.fingerprint, 2, _onehot(b)))
        assert rt.lead_weights == _onehot(b) and _kept_classes(rt, x) == {b}
        assert rt.backend.rollback(only_if_serving=2) == 1  # what the guard does to a blob judged bad
        assert rt.lead_weights == _onehot(a) and _kept_classes(rt, x) == {a}
        assert rt.apply_blob_bytes(_blob(v0.tensors, v0.fingerprint, 3, None))  # a blob without weights
        assert rt.lead_weights is None and len(_kept_classes(rt, x, batches=12)) > 1  # uniform again
        assert rt.selector.counters.lead_weighted == 3 * 6 * 64


def test_a_blob_with_a_bad_lead_vector_is_refused_and_nothing_is_applied(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    fp, x = v0.fingerprint, _diverse(16, seed=1)
    with _runtime(out, LEAD_RULE, window=4096) as rt:
        assert rt.apply_blob_bytes(_blob(v0.tensors, fp, 1, _onehot(2)))
        before = rt.process(x).logits
        changed = _perturbed(v0.tensors, 3)  # valid tensors that would change every output
        for version, lead, reason in (
            (2, (1.0,) * 9, "schema"),
            (3, (1.0,) * 9 + (float("nan"),), "value"),
            (4, (1.0,) * 9 + (-1.0,), "value"),
        ):
            assert not rt.apply_blob_bytes(_blob(changed, fp, version, lead))
            assert rt.refused[reason] >= 1
        assert rt.version == 1 and rt.lead_weights == _onehot(2)
        assert np.array_equal(rt.process(x).logits, before)


def test_edge_run_takes_the_lead_rule_with_a_share(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, _ = exported("bn")
    np.save(tmp_path / "s.npy", _diverse(64, seed=2))
    args = ["edge", "run", str(out), "--source", str(tmp_path / "s.npy"), "--batch", "16", "--quiet"]
    r = CliRunner().invoke(
        app, [*args, "--selection", "lead", "--upload-share", "0.25", "--json", str(tmp_path / "m.json")]
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "m.json").read_text())["selection"]
    assert s["seen"] == 64 and s["selected"] == 16 and s["lead_weighted"] == 0  # no cloud, no weights: random at 25 %
    r = CliRunner().invoke(app, [*args, "--selection", "cema", "--upload-share", "0.25"])
    assert r.exit_code != 0 and "applies to --selection random, entropy-top or lead" in str(r.exception)
