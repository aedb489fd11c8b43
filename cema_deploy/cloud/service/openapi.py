"""The OpenAPI document names the protocol header: ``X-Cema-Protocol`` is checked by
:class:`~cema_deploy.cloud.service.api.ProtocolVersionMiddleware`, outside FastAPI's routing, so FastAPI cannot see it;
this declares it on every operation the middleware guards (requests) and answers (responses). Behaviour is the
middleware's, unchanged."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cema_deploy.contract import protocol

#: Paths whose requests must carry the header (the middleware's prefixes).
GUARDED_PREFIXES = (protocol.MODELS_PATH, protocol.API_PREFIX + "/admin")


def declare_protocol_header(app: FastAPI) -> None:
    """Make ``app.openapi()`` list ``X-Cema-Protocol``: a required request header on the guarded paths, and a
    response header of every operation."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            value = str(protocol.PROTOCOL_VERSION)
            request_header = {
                "name": protocol.PROTOCOL_HEADER,
                "in": "header",
                "required": True,
                "schema": {"type": "string", "enum": [value]},
                "description": f"The edge-cloud protocol version; must be {value} (any other, or none: 400).",
            }
            response_header = {
                "description": "The protocol version this cloud speaks.",
                "schema": {"type": "string", "enum": [value]},
            }
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    if path.startswith(GUARDED_PREFIXES):
                        params = operation.setdefault("parameters", [])
                        if all(p.get("name") != protocol.PROTOCOL_HEADER for p in params):
                            params.append(request_header)
                    for response in operation.get("responses", {}).values():
                        response.setdefault("headers", {})[protocol.PROTOCOL_HEADER] = response_header
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
