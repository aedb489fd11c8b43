"""HTTP routes of the CEMA cloud (FastAPI); the protocol is defined in ``cema_deploy.contract.protocol``.

Only routing, authentication and limits live here; the method is in ``cema.py`` and the state in ``worker.py``.
Every refused request (4xx) changes no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from cema_deploy import __version__
from cema_deploy.cloud.worker import AdaptationService
from cema_deploy.contract import protocol
from cema_deploy.contract.samples import samples_from_bytes
from cema_deploy.exceptions import CemaError

_BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            protocol.SAMPLES_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_REPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["kind", "version"],
                    "properties": {
                        "kind": {"type": "string", "enum": ["rollback", "refused"]},
                        "version": {"type": "integer"},
                        "reason": {"type": "string"},
                    },
                }
            }
        },
    }
}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ProtocolVersionMiddleware:
    """Pure ASGI middleware: every response carries ``X-Cema-Protocol``; a request under ``/v1/models`` or
    ``/v1/admin`` that names another protocol version (or none) is refused with 400 naming both versions."""

    _header = protocol.PROTOCOL_HEADER.lower().encode()
    _value = str(protocol.PROTOCOL_VERSION).encode()

    def __init__(self, app: Any, on_refused: Any = None) -> None:
        self.app = app
        self.on_refused = on_refused

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (self._header, self._value)]}
            await send(message)

        path = scope.get("path", "")
        if path.startswith((protocol.MODELS_PATH, protocol.API_PREFIX + "/admin")):
            sent = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == self._header), None)
            try:
                protocol.check_protocol(sent, peer="the edge")
            except CemaError as exc:
                if self.on_refused is not None:
                    self.on_refused()
                response = JSONResponse({"detail": str(exc)}, status_code=400)
                await response(scope, receive, send_with_header)
                return
        await self.app(scope, receive, send_with_header)


def create_app(service: AdaptationService, *, max_upload_bytes: int = protocol.MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI application serving one edge model's adaptation ``service``."""
    app = FastAPI(
        title="cema-deploy cloud",
        version=__version__,
        description="CEMA adaptation service: edges upload selected samples and fetch refit blobs.",
    )
    app.add_middleware(ProtocolVersionMiddleware, on_refused=lambda: service.count("refused:400"))
    fp = service.manifest.fingerprint
    tokens = service.store.token_table()
    versions: dict[str, Any] = {"event": None, "loop": None}

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        service.count(f"refused:{exc.status}")
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        service.count("refused:400")
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse(
            {"detail": f"Malformed request ({where[:300]}); see /docs for the expected form."}, status_code=400
        )

    def _wake() -> None:
        old, versions["event"] = versions["event"], asyncio.Event()
        if old is not None:
            old.set()

    def on_publish(version: int) -> None:  # runs on the worker thread
        loop = versions["loop"]
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_wake)

    service.add_listener(on_publish)

    def _auth(request: Request, fingerprint: str) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _Refused(
                401,
                "Missing bearer token: send 'Authorization: Bearer <device token>' "
                "(create one with `cema-deploy cloud token add DEVICE`).",
            )
        device = service.store.device_for(token.strip(), tokens)
        if device is None:
            tokens.update(service.store.token_table())  # tokens added while serving
            device = service.store.device_for(token.strip(), tokens)
        if device is None:
            raise _Refused(401, "Unknown bearer token; ask the operator for a device token.")
        if fingerprint != fp:
            raise _Refused(404, f"No model with fingerprint {fingerprint[:24]!r} is served here (serving {fp}).")
        return device

    @app.post(
        protocol.SAMPLES_PATH,
        status_code=202,
        openapi_extra=_BINARY_BODY,
        responses={400: {}, 401: {}, 404: {}, 413: {}},
    )
    async def upload(fingerprint: str, request: Request) -> JSONResponse:
        device = _auth(request, fingerprint)
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise _Refused(400, f"Malformed Content-Length {length[:40]!r}; expected a byte count.")
        if length is not None and int(length) > max_upload_bytes:
            raise _Refused(
                413,
                f"Upload of {length} bytes exceeds the limit of {max_upload_bytes} bytes; "
                "send fewer samples per request.",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise _Refused(413, f"Upload exceeds the limit of {max_upload_bytes} bytes; send fewer samples.")
        try:
            # decoding (PNG/JPEG) runs off the event loop, so blob polls never queue behind it
            batch = await asyncio.to_thread(samples_from_bytes, bytes(body), image_hw=service.manifest.preprocess.size)
        except CemaError as exc:
            raise _Refused(400, f"Malformed sample upload: {exc}") from exc
        if batch.fingerprint != fp:
            raise _Refused(
                400, f"Upload body is bound to fingerprint {batch.fingerprint[:24]!r}, not the URL's {fp[:24]!r}."
            )
        try:
            ack = await asyncio.to_thread(service.submit, batch, device=device)
        except CemaError as exc:
            raise _Refused(400, str(exc)) from exc
        return JSONResponse(ack, status_code=202)

    @app.get(
        protocol.BLOB_PATH, responses={200: {"content": {protocol.BLOB_MEDIA_TYPE: {}}}, 204: {}, 401: {}, 404: {}}
    )
    async def blob(fingerprint: str, request: Request, after: int = 0, wait: float = 0.0) -> Response:
        _auth(request, fingerprint)
        if after < 0 or not 0 <= wait <= protocol.MAX_WAIT_S:
            raise _Refused(400, f"'after' must be >= 0 and 'wait' within [0, {protocol.MAX_WAIT_S}] seconds.")
        service.count("blob_polls")
        if versions["loop"] is None:
            versions["loop"], versions["event"] = asyncio.get_running_loop(), asyncio.Event()
        deadline = asyncio.get_running_loop().time() + wait
        while (found := service.latest(after)) is None:
            remaining = deadline - asyncio.get_running_loop().time()
            event = versions["event"]
            if remaining <= 0 or event is None or service.closing:
                return Response(status_code=204)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(remaining, 1.0))
        version, data = found
        service.count("blobs_served")
        return Response(
            content=data, media_type=protocol.BLOB_MEDIA_TYPE, headers={protocol.VERSION_HEADER: str(version)}
        )

    @app.post(
        protocol.REPORTS_PATH,
        status_code=202,
        openapi_extra=_REPORT_BODY,
        responses={400: {}, 401: {}, 404: {}, 413: {}},
    )
    async def report(fingerprint: str, request: Request) -> JSONResponse:
        device = _auth(request, fingerprint)
        body = await request.body()
        if len(body) > 64 * 1024:
            raise _Refused(413, "Report exceeds 64 KiB.")
        try:
            data = json.loads(body)
            kind, version = data["kind"], data["version"]
            if kind not in ("rollback", "refused") or not isinstance(version, int) or isinstance(version, bool):
                raise ValueError("kind must be 'rollback' or 'refused' and version an integer")
            reason = str(data.get("reason", ""))[:1000]
        except (ValueError, KeyError, TypeError) as exc:
            raise _Refused(400, f"Malformed report ({exc}); expected JSON {{kind, version, reason}}.") from exc
        await asyncio.to_thread(service.report, {"kind": kind, "version": version, "reason": reason}, device=device)
        return JSONResponse({"recorded": True}, status_code=202)

    @app.get(protocol.HEALTH_PATH)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "models": {fp: service.version},
        }

    @app.get(protocol.METRICS_PATH, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(service.metrics()), media_type=protocol.METRICS_MEDIA_TYPE)

    return app


def prometheus_text(m: dict[str, Any]) -> str:
    """The service's metrics in Prometheus text exposition format 0.0.4."""
    fp = m["fingerprint"][:16]
    c = m["counters"]
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {value}" for labels, value in samples)

    base = f'model="{fp}"'
    metric("cema_blob_version", "gauge", "Newest published refit blob version.", [(base, m["version"])])
    metric("cema_steps_total", "counter", "Adaptation steps run.", [(base, m["steps"])])
    metric("cema_pending_samples", "gauge", "Uploaded samples not yet adapted on.", [(base, m["pending"])])
    metric("cema_replay_samples", "gauge", "Samples held in the replay buffer.", [(base, m["buffered"])])
    metric("cema_uploads_total", "counter", "Accepted uploads.", [(base, c.get("uploads", 0))])
    metric("cema_samples_total", "counter", "Accepted samples.", [(base, c.get("samples", 0))])
    metric("cema_blob_polls_total", "counter", "Blob queries.", [(base, c.get("blob_polls", 0))])
    metric("cema_step_errors_total", "counter", "Failed adaptation steps.", [(base, c.get("step_errors", 0))])
    refused = [(f'{base},status="{k.split(":")[1]}"', v) for k, v in sorted(c.items()) if k.startswith("refused:")]
    metric("cema_requests_refused_total", "counter", "Requests answered with 4xx.", refused or [(base, 0)])
    reports = [(f'{base},kind="{k.split(":")[1]}"', v) for k, v in sorted(c.items()) if k.startswith("report:")]
    metric("cema_edge_reports_total", "counter", "Rollback/refusal reports from edges.", reports or [(base, 0)])
    metric("cema_step_seconds", "summary", "Time per adaptation step.", [])
    lines.append(f"cema_step_seconds_sum{{{base}}} {m['step_seconds_sum']}")
    lines.append(f"cema_step_seconds_count{{{base}}} {m['step_seconds_count']}")
    return "\n".join(lines) + "\n"
