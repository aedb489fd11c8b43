"""``/openapi.json`` lists the ``X-Cema-Protocol`` header the middleware requires (issue 19 item 9: it did not)."""

from __future__ import annotations

from pathlib import Path

from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import make_deployment
from tests.conftest import needs_torch

pytestmark = needs_torch


def test_the_protocol_header_is_in_the_openapi_document(exported, teacher_ckpt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from cema_deploy.cloud.engines.local import LocalEngine
    from cema_deploy.cloud.service.api import create_app
    from cema_deploy.cloud.store.state import StateStore, TokenTable

    edge, _ = exported("bn")
    service = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    app = create_app(LocalEngine([service]), TokenTable(StateStore(tmp_path / "s")))
    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
        for path, operations in doc["paths"].items():
            for method, op in operations.items():
                declared = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "header"}
                if path.startswith(("/v1/models", "/v1/admin")):
                    assert declared[PROTOCOL_HEADER]["required"], (method, path)
                    assert declared[PROTOCOL_HEADER]["schema"]["enum"] == [str(PROTOCOL_VERSION)]
                else:
                    assert PROTOCOL_HEADER not in declared, (method, path)
                assert all(PROTOCOL_HEADER in r["headers"] for r in op["responses"].values()), (method, path)
        # behaviour unchanged: the middleware still refuses a request without it, with 400
        r = client.get(f"/v1/models/{service.fingerprint}")
        assert r.status_code == 400 and PROTOCOL_HEADER in r.json()["detail"]
