"""The HTTP API fuzzed from its own OpenAPI spec (schemathesis): never a 5xx, never a changed state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]
schemathesis = pytest.importorskip("schemathesis")

FUZZ: dict[str, Any] = {}


@schemathesis.serializer("application/vnd.cema.samples+safetensors")
def _samples_body(ctx: Any, value: Any) -> bytes:
    """The spec declares the upload as binary: send whatever bytes hypothesis generated (or their repr)."""
    return value if isinstance(value, bytes) else repr(value).encode()


@pytest.fixture(scope="module")
def api(tmp_path_factory, exported, teacher_ckpt):  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.engines.local import LocalEngine
    from cema_deploy.cloud.service.api import create_app
    from cema_deploy.cloud.store.state import StateStore, TokenTable
    from tests.cloud.conftest import make_deployment

    edge, _ = exported("bn")
    state = tmp_path_factory.mktemp("fuzz-state")
    service = make_deployment(edge, teacher_ckpt, state, batch_size=8)
    token = StateStore(state).add_token("fuzzer")
    admin = StateStore(state).add_token("ops", admin=True)
    app = create_app(LocalEngine([service]), TokenTable(StateStore(state)), max_upload_bytes=1 << 20)
    FUZZ.update(service=service, token=token, admin=admin, fp=service.fingerprint, state=Path(state))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=25, deadline=None)
def test_no_5xx_and_no_state_change(case: Any) -> None:
    service = FUZZ["service"]
    if "fingerprint" in (case.path_parameters or {}) and hash(str(case.body)) % 2 == 0:
        case.path_parameters["fingerprint"] = FUZZ["fp"]  # half the cases reach the body parsers
    headers = {"Authorization": f"Bearer {FUZZ['token']}"} if hash(repr(case.query)) % 3 else {}
    if hash(repr(case.query)) % 5:
        headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
    if case.path.endswith("/blob"):
        case.query = {**(case.query or {}), "wait": 0}  # no long polls in a fuzz run
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    # random bytes are never accepted as samples, and no admin action ran without an admin token
    assert service.version == 0 and service.samples.adapt_total == 0 and service.generation == 1
