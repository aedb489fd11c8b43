"""HTTP routes of the CEMA cloud (FastAPI) over one or many deployments; the protocol is defined in
``cema_deploy.contract.protocol``.

Only routing, authentication, decoding and limits live here; the routes talk to an
:class:`~cema_deploy.cloud.engines.base.Engine` and never know which one runs. Every refused request (4xx)
changes no state. Bearer tokens come from the service's ``tokens.json`` (re-read when it changes): a device
token may use the deployments it was granted; an admin token (``cema-deploy cloud token add NAME --admin``) may
list every deployment and call the operator routes (reset, freeze, unfreeze), and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from cema_deploy import __version__
from cema_deploy._prometheus import Exposition, Labels, number
from cema_deploy.cloud.engines.base import DeploymentInfo, Engine
from cema_deploy.cloud.errors import Refused
from cema_deploy.cloud.service.openapi import declare_protocol_header
from cema_deploy.cloud.store.state import Grant, TokenTable
from cema_deploy.contract import protocol
from cema_deploy.contract.messages import BatchReport, EdgeReport
from cema_deploy.exceptions import CemaError, ProtocolError


def _quietly(fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Call a bookkeeping ``fn`` that must never fail a request (the operator's per-device records)."""
    with contextlib.suppress(CemaError):
        fn(*args, **kwargs)


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {protocol.SAMPLES_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}
_REPORT_BODY = _json_body(
    {
        "type": "object",
        "required": ["kind", "version"],
        "properties": {
            "kind": {"type": "string", "enum": ["rollback", "refused"]},
            "version": {"type": "integer"},
            "reason": {"type": "string"},
        },
    }
)
_BATCH_BODY = _json_body(
    {
        "type": "object",
        "required": ["seen", "selected", "uploaded", "generation"],
        "properties": {k: {"type": "integer"} for k in ("seen", "selected", "uploaded", "generation")},
    }
)
_KEY_HEADER = [
    {"name": protocol.IDEMPOTENCY_HEADER, "in": "header", "required": False, "schema": {"type": "string"}},
]


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


def create_app(engine: Engine, tokens: TokenTable, *, max_upload_bytes: int = protocol.MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI application serving the deployments of ``engine`` to the holders of ``tokens``."""
    app = FastAPI(
        title="cema-deploy cloud",
        version=__version__,
        description="CEMA adaptation service: edges upload samples and fetch refit blobs, per deployment.",
    )
    refused: collections.Counter[str] = collections.Counter()  # requests refused before reaching a deployment
    polls: collections.Counter[tuple[str, str]] = collections.Counter()  # (fingerprint, what): counted here
    app.add_middleware(ProtocolVersionMiddleware, on_refused=lambda: refused.update(["400"]))
    infos: dict[str, DeploymentInfo] = {d.fingerprint: d for d in engine.deployments()}
    app.state.engine, app.state.refused = engine, refused

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        refused[str(exc.status)] += 1
        headers = {protocol.RETRY_AFTER_HEADER: str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(exc.body or {"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        refused["400"] += 1
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse(
            {"detail": f"Malformed request ({where[:300]}); see /docs for the expected form."}, status_code=400
        )

    def _grant(request: Request, fingerprint: str | None = None) -> Grant:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refused(
                "Missing bearer token: send 'Authorization: Bearer <device token>' "
                "(create one with `cema-deploy cloud token add DEVICE --deployment NAME`).",
                401,
            )
        grant = tokens.lookup(token.strip())
        if grant is None:
            raise Refused("Unknown or revoked bearer token; ask the operator for a device token.", 401)
        if grant.expired():
            if fingerprint in infos:  # counted for the operator against the device (cloud status)
                _quietly(engine.seen, fingerprint, grant.device, refused=True)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(grant.expires or 0))
            raise Refused(
                f"The bearer token of {grant.device!r} expired at {when}; ask the operator for a new one "
                f"(`cema-deploy cloud token add {grant.device} --rotate ...`).",
                401,
            )
        return grant

    def _auth(request: Request, fingerprint: str, *, read: bool = False) -> tuple[Grant, DeploymentInfo]:
        grant = _grant(request, fingerprint)
        info = infos.get(fingerprint)
        if info is None or not (grant.allows(info.name) or (read and grant.admin)):
            if info is not None and not grant.admin:
                _quietly(engine.seen, fingerprint, grant.device, refused=True)
            raise Refused(f"No deployment with fingerprint {fingerprint[:24]!r} is served to this token.", 404)
        return grant, info

    def _key(request: Request) -> str:
        key = request.headers.get(protocol.IDEMPOTENCY_HEADER, "")
        if len(key) > protocol.MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
            raise Refused(
                f"{protocol.IDEMPOTENCY_HEADER} must be at most {protocol.MAX_IDEMPOTENCY_KEY} printable ASCII "
                "characters (a UUID).",
                400,
            )
        return key

    async def _json(request: Request, what: str) -> Any:
        body = await _read_limited(request, protocol.MAX_JSON_BYTES, what.capitalize(), "send a smaller one")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise Refused(f"Malformed {what} ({exc}); expected a JSON object.", 400) from exc

    @app.get(protocol.MODELS_PATH, responses={401: {}})
    async def models(request: Request) -> JSONResponse:
        grant = _grant(request)
        allowed = [i.fingerprint for i in infos.values() if grant.admin or grant.allows(i.name)]
        statuses = await asyncio.to_thread(lambda: [engine.status(fp).to_json() for fp in allowed])
        return JSONResponse({"models": statuses})

    @app.get(protocol.MODEL_PATH, responses={401: {}, 404: {}})
    async def model(fingerprint: str, request: Request) -> JSONResponse:
        _auth(request, fingerprint, read=True)
        status = await asyncio.to_thread(engine.status, fingerprint)  # a cluster engine's status is a remote call
        return JSONResponse(status.to_json())

    @app.post(
        protocol.SAMPLES_PATH,
        status_code=202,
        openapi_extra={**_BINARY_BODY, "parameters": _KEY_HEADER},
        responses={400: {}, 401: {}, 404: {}, 409: {}, 413: {}, 429: {}},
    )
    async def upload(fingerprint: str, request: Request) -> JSONResponse:
        grant, _ = _auth(request, fingerprint)
        key = _key(request)
        body = await _read_limited(request, max_upload_bytes, "Upload", "send fewer samples per request")
        # The deployment checks the header (pending cap, size) before decoding, and decodes (PNG/JPEG) within its
        # byte budget, off the event loop, so blob polls never queue behind it.
        ack = await asyncio.to_thread(engine.upload, fingerprint, body, device=grant.device, idempotency_key=key)
        return JSONResponse(ack.to_json(), status_code=202)

    @app.post(
        protocol.BATCHES_PATH,
        status_code=202,
        openapi_extra={**_BATCH_BODY, "parameters": _KEY_HEADER},
        responses={400: {}, 401: {}, 404: {}, 413: {}},
    )
    async def batches(fingerprint: str, request: Request) -> JSONResponse:
        grant, _ = _auth(request, fingerprint)
        key = _key(request)
        try:
            report = BatchReport.from_json(await _json(request, "batch report"))
        except ProtocolError as exc:
            raise Refused(f"Malformed batch report: {exc}", 400) from exc
        ack = await asyncio.to_thread(
            engine.batch_report, fingerprint, report, device=grant.device, idempotency_key=key
        )
        return JSONResponse(ack.to_json(), status_code=202)

    @app.get(
        protocol.BLOB_PATH, responses={200: {"content": {protocol.BLOB_MEDIA_TYPE: {}}}, 204: {}, 401: {}, 404: {}}
    )
    async def blob(fingerprint: str, request: Request, after: int = 0, wait: float = 0.0) -> Response:
        grant, _ = _auth(request, fingerprint)
        if after < 0 or not 0 <= wait <= protocol.MAX_WAIT_S or math.isnan(wait):
            raise Refused(f"'after' must be >= 0 and 'wait' within [0, {protocol.MAX_WAIT_S}] seconds.", 400)
        polls[fingerprint, "blob_polls"] += 1
        _quietly(engine.seen, fingerprint, grant.device, version=after)  # an edge polls after the one it serves
        found = engine.latest(fingerprint, after)
        if found is None and wait > 0 and not engine.closing:
            await engine.wait_version(fingerprint, after, wait)
            found = engine.latest(fingerprint, after)
        if found is None:
            return Response(status_code=204)
        version, data = found
        polls[fingerprint, "blobs_served"] += 1
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
        grant, _ = _auth(request, fingerprint)
        try:
            edge_report = EdgeReport.from_json(await _json(request, "report"))
        except ProtocolError as exc:
            raise Refused(f"Malformed report ({exc}); expected JSON {{kind, version, reason}}.", 400) from exc
        outcome = await asyncio.to_thread(engine.edge_report, fingerprint, edge_report, device=grant.device)
        return JSONResponse({"recorded": True, "outcome": outcome}, status_code=202)

    def _admin_grant(request: Request, what: str) -> Grant:
        grant = _grant(request)
        if not grant.admin:
            raise Refused(
                f"{what} needs an admin token (`cema-deploy cloud token add NAME --admin`); "
                f"{grant.device!r} holds a device token.",
                403,
            )
        return grant

    @app.post(protocol.ADMIN_PATH, responses={400: {}, 401: {}, 403: {}, 404: {}, 409: {}})
    async def admin(name: str, action: str, request: Request, version: int | None = None) -> JSONResponse:
        _admin_grant(request, action)
        if action not in protocol.ADMIN_ACTIONS:
            raise Refused(f"Unknown admin action {action!r}; expected one of {protocol.ADMIN_ACTIONS}.", 404)
        if (version is not None) != (action in protocol.VERSIONED_ADMIN_ACTIONS):
            raise Refused(
                f"{action} takes ?version=N" if version is None else f"{action} takes no version (got {version}).",
                400,
            )
        status = await asyncio.to_thread(engine.admin, name, action, version)
        return JSONResponse(status.to_json())

    @app.get(protocol.ADMIN_STATUS_PATH, responses={401: {}, 403: {}})
    async def admin_status(request: Request) -> JSONResponse:
        _admin_grant(request, "The operator's status")
        rows = await asyncio.to_thread(lambda: [engine.operator_status(fp) for fp in infos])
        return JSONResponse({"deployments": rows})

    @app.get(protocol.HEALTH_PATH)
    async def health(request: Request) -> dict[str, Any]:
        """Liveness for anyone; the served fingerprints and versions only for a valid token (those it may use)."""
        answer: dict[str, Any] = {"status": "ok", "version": __version__, "protocol": protocol.PROTOCOL_VERSION}
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        grant = tokens.lookup(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if grant is not None:
            rows = await asyncio.to_thread(engine.metrics)
            names = {i.fingerprint: i.name for i in infos.values()}
            answer["models"] = {
                m["fingerprint"]: m["version"]
                for m in rows
                if grant.admin or grant.allows(names.get(m["fingerprint"], ""))
            }
        return answer

    @app.get(protocol.METRICS_PATH, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        rows = await asyncio.to_thread(engine.metrics)
        for m in rows:
            for what in ("blob_polls", "blobs_served"):
                m["counters"][what] = polls[m["fingerprint"], what]
        return PlainTextResponse(prometheus_text(rows, dict(refused)), media_type=protocol.METRICS_MEDIA_TYPE)

    declare_protocol_header(app)  # the middleware's header, listed in /openapi.json
    return app


async def _read_limited(request: Request, limit: int, what: str, fix: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (by its Content-Length, or while
    it streams in): a body is never read whole before its size is checked."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise Refused(f"Malformed Content-Length {length[:40]!r}; expected a byte count.", 400)
    if length is not None and int(length) > limit:
        raise Refused(f"{what} of {length} bytes exceeds the limit of {limit} bytes; {fix}.", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(f"{what} exceeds the limit of {limit} bytes; {fix}.", 413)
    return bytes(body)


def prometheus_text(rows: list[dict[str, Any]], refused: dict[str, int] | None = None) -> str:
    """Deployment metrics (one label set per deployment) in Prometheus text exposition format 0.0.4."""
    out = Exposition()
    metric = out.metric

    def per(key: Any) -> list[tuple[dict[str, str], float]]:
        return [({"deployment": m["name"], "model": m["fingerprint"][:16]}, key(m)) for m in rows]

    def counter(name: str) -> Any:
        return lambda m: m["counters"].get(name, 0)

    metric("cema_blob_version", "gauge", "Newest published refit blob version.", per(lambda m: m["version"]))
    metric("cema_generation", "gauge", "Deployment generation (rises on every reset).", per(lambda m: m["generation"]))
    metric("cema_frozen", "gauge", "1 while publishing is frozen by the operator.", per(lambda m: int(m["frozen"])))
    metric("cema_steps_total", "counter", "Distillation steps of the method.", per(lambda m: m["steps"]))
    for name, key, help_ in (
        ("cema_cloud_steps_total", "steps", "Cloud steps on B uploaded samples (teacher + replica)."),
        ("cema_replay_steps_total", "replay_steps", "Replay-only steps (official, per report interval)."),
        ("cema_idle_steps_total", "idle_steps", "Time-based idle replay steps."),
        ("cema_calibrations_total", "calibrations", "Calibration batches applied."),
        ("cema_statistics_updates_total", "statistics_updates", "Running-statistics updates from statistics samples."),
        ("cema_diverged_steps_total", "diverged", "Steps whose result was non-finite: not published, restored."),
        ("cema_restores_total", "restores", "Returns to the state behind the last good version (rollbacks)."),
        ("cema_resets_total", "resets", "Operator resets."),
        ("cema_uploads_total", "uploads", "Accepted uploads."),
        ("cema_samples_total", "samples", "Accepted samples."),
        ("cema_duplicate_uploads_total", "duplicates", "Uploads answered from their idempotency key."),
        ("cema_expired_samples_total", "expired_samples", "Samples deleted by the retention."),
        ("cema_blob_polls_total", "blob_polls", "Blob queries."),
        ("cema_step_errors_total", "step_errors", "Failed adaptation jobs."),
        ("cema_edge_statistics_reports_total", "edge_stats_reports", "Edges' own statistics received (protocol 3)."),
        ("cema_gate_passed_total", "gate_passed", "Candidates the cloud-side gate published (CemaConfig.gate)."),
        ("cema_gate_refused_total", "gate_refused", "Candidates the gate refused: agreed less with the teacher."),
    ):
        metric(name, "counter", help_, per(counter(key)))
    metric("cema_pending_samples", "gauge", "Acknowledged samples not yet used.", per(lambda m: m["pending"]))
    metric("cema_pending_cap", "gauge", "Pending samples allowed before 429.", per(lambda m: m["pending_cap"]))
    metric("cema_replay_samples", "gauge", "Samples in the replay window.", per(lambda m: m["replay_window"]))
    metric("cema_held_samples", "gauge", "Uploaded samples held on disk (frames).", per(lambda m: m["held"]))
    statuses: list[tuple[Labels, float]] = []
    for m in rows:
        for k, v in sorted(m["counters"].items()):
            if k.startswith("refused:"):
                statuses.append(({"deployment": m["name"], "status": k.split(":")[1]}, v))
    statuses += [({"deployment": "", "status": k}, v) for k, v in sorted((refused or {}).items())]
    metric("cema_requests_refused_total", "counter", "Requests answered with 4xx.", statuses or [({"status": ""}, 0)])
    reports: list[tuple[Labels, float]] = [
        ({"deployment": m["name"], "kind": k.split(":")[1]}, v)
        for m in rows
        for k, v in sorted(m["counters"].items())
        if k.startswith("report:")
    ]
    metric("cema_edge_reports_total", "counter", "Rollback/refusal reports from edges.", reports or [({"kind": ""}, 0)])
    metric("cema_step_seconds", "summary", "Time per adaptation job.", [])
    for labels, m in zip([x[0] for x in per(lambda m: 0)], rows, strict=True):
        out.sample("cema_step_seconds_sum", labels, m["step_seconds_sum"])
        out.sample("cema_step_seconds_count", labels, m["step_seconds_count"])
    metric(
        "cema_upload_to_blob_p50_seconds", "gauge", "Upload to blob, median of the newest 10,000.",
        per(lambda m: m["upload_to_blob_p50_s"]),
    )  # fmt: skip
    metric(
        "cema_upload_to_blob_p99_seconds", "gauge", "Upload to blob, p99 of the newest 10,000.",
        per(lambda m: m["upload_to_blob_p99_s"]),
    )  # fmt: skip
    metric(
        "cema_publish_delay_p99_seconds", "gauge", "From a blob's creation to polls seeing it (fsynced).",
        per(lambda m: m["publish_delay_p99_s"]),
    )  # fmt: skip
    metric("cema_upload_to_blob_seconds", "histogram", "From an upload's acknowledgement to the blob with it.", [])
    for labels, m in zip([x[0] for x in per(lambda m: 0)], rows, strict=True):
        for le, count in m["upload_to_blob_buckets"]:
            out.sample("cema_upload_to_blob_seconds_bucket", {**labels, "le": number(float(le))}, count)
        out.sample("cema_upload_to_blob_seconds_sum", labels, m["upload_to_blob_sum_s"])
        out.sample("cema_upload_to_blob_seconds_count", labels, m["upload_to_blob_count"])
    return out.text()
