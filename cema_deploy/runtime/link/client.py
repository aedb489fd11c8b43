"""The edge's view of a cloud (:class:`CloudLink`) and its HTTP implementation (:class:`CloudClient`, protocol 2).

:class:`CloudLink` is what the uplink and the runtime call; :class:`CloudClient` speaks it over HTTP with the
routes, headers and JSON bodies of :mod:`cema_deploy.contract.protocol` and :mod:`cema_deploy.contract.messages`,
and maps every failure to :class:`~cema_deploy.exceptions.UplinkError` at this one boundary (httpx's errors never
leave this module). ``cema_deploy.cloud.local_link`` implements the same protocol in-process, without HTTP.

Every request carries ``X-Cema-Protocol``; every response's is checked, so an edge and a cloud of different
protocol versions fail with a message naming both (:class:`~cema_deploy.exceptions.ProtocolMismatchError`).
:class:`AdminClient` calls the operator routes (reset, freeze, unfreeze) with an admin token.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
from typing import Any, Protocol
from urllib.parse import urlsplit

from cema_deploy._lazy import lazy_import
from cema_deploy.contract import protocol
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import ENCODINGS, SampleBatch, samples_to_bytes
from cema_deploy.exceptions import CemaError, ProtocolError, ProtocolMismatchError, StaleGenerationError, UplinkError
from cema_deploy.runtime.link.connectivity import Connectivity

__all__ = ["AdminClient", "CloudClient", "CloudLink", "EdgeConfigError", "StaleGenerationError", "is_loopback_url"]

log = logging.getLogger("cema_deploy.edge")

#: Statuses worth retrying besides 5xx: request timeout and rate limiting.
RETRYABLE_4XX = (408, 429)
#: Longest Retry-After honoured, seconds (a cloud asking for more is capped: the edge keeps trying).
MAX_RETRY_AFTER_S = 300.0


class EdgeConfigError(CemaError, ValueError):
    """An edge runtime, uplink or client option out of range."""


class CloudLink(Protocol):
    """One deployment (one fingerprint) of a cloud, as an edge uses it. Implementations are thread-safe."""

    fingerprint: str

    def status(self) -> DeploymentStatus: ...

    def upload(self, batch: SampleBatch, *, idempotency_key: str) -> UploadAck: ...

    def batch_report(self, report: BatchReport, *, idempotency_key: str) -> BatchAck: ...

    def fetch_blob(self, after: int, wait: float = 0.0) -> tuple[int, bytes] | None: ...

    def report(self, report: EdgeReport) -> None: ...

    def close(self) -> None: ...


def is_loopback_url(url: str | None) -> bool:
    """True for a cloud on this machine (``localhost``, 127.0.0.0/8, ``::1``) and for an in-process link (``url``
    None, or not an ``http(s)://`` URL, e.g. ``local:{deployment}``): traffic that never crosses a network."""
    if url is None:
        return True
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    """Verify the cloud's certificate against ``ca_file`` (PEM) only, with host name checking."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise EdgeConfigError(f"Cannot use {ca_file!r} as the CA bundle for the cloud's certificate: {exc}.") from exc


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(0.0, float(value)), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:  # an HTTP date: not sent by our cloud; fall back to the uplink's own back-off
        return None


class _Http:
    """One ``httpx.Client`` with the protocol header, and the error mapping every request goes through."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        timeout_s: float,
        connect_timeout_s: float,
        ca_file: str | None,
    ) -> None:
        httpx = lazy_import("httpx", extra="edge", purpose="talking to the CEMA cloud")
        if not base_url.startswith(("http://", "https://")):
            raise UplinkError(f"Cloud URL {base_url!r} must start with http:// or https://.", retryable=False)
        self.base_url = base_url.rstrip("/")
        if self.base_url.startswith("http://") and not is_loopback_url(self.base_url):
            log.warning("the cloud at %s is reached over plain http:// on an address that is not a loopback one: the "
                        "token and every uploaded frame cross the network unencrypted and readable; use https:// "
                        "(--ca-file for a private CA) or a tunnel to a loopback address", self.base_url)  # fmt: skip
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.httpx = httpx
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            headers={**headers, protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)},
            verify=_ssl_context(ca_file) if ca_file is not None else True,
        )
        #: Whether the cloud answers (one log line per change; ``cema_edge_cloud_up``).
        self.connectivity = Connectivity(self.base_url)

    def request(self, method: str, url: str, *, ok: tuple[int, ...], **kw: Any) -> Any:
        try:
            r = self.client.request(method, url, **kw)
        except self.httpx.HTTPError as exc:
            if not self.client.is_closed:
                self.connectivity.unreachable(f"{type(exc).__name__}: {exc}")
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise UplinkError(
                    f"The TLS certificate of the cloud at {self.base_url} did not verify ({exc}); pass --ca-file "
                    "with the CA that signed it (or fix the certificate). Will retry.",
                    retryable=True,
                ) from exc
            raise UplinkError(
                f"Cannot reach the cloud at {self.base_url} ({type(exc).__name__}: {exc}); will retry.", retryable=True
            ) from exc
        self.connectivity.answered()
        try:
            protocol.check_protocol(r.headers.get(protocol.PROTOCOL_HEADER), peer=f"the cloud at {self.base_url}")
        except ProtocolMismatchError as exc:
            raise UplinkError(str(exc), retryable=False, status=r.status_code) from exc
        if r.status_code in ok:
            return r
        retryable = r.status_code >= 500 or r.status_code in RETRYABLE_4XX
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code == 409 and isinstance(body, dict):  # an upload for an older generation: body = status
            try:
                current = DeploymentStatus.from_json(body)
            except ProtocolError:
                pass
            else:
                raise StaleGenerationError(
                    f"The cloud at {self.base_url} was reset (generation {current.generation}); this upload "
                    "belonged to an older generation and was dropped. The edge starts the new generation.",
                    current=current,
                )
        detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
        what = "failed" if retryable else "refused"
        raise UplinkError(
            f"The cloud {what} {method} {url} ({r.status_code}): {str(detail)[:500]}",
            retryable=retryable,
            status=r.status_code,
            retry_after=_retry_after(r.headers.get(protocol.RETRY_AFTER_HEADER)) if r.status_code == 429 else None,
        )

    def json_of(self, r: Any, what: str) -> Any:
        try:
            return r.json()
        except ValueError as exc:
            raise UplinkError(
                f"The cloud's answer to {what} is not JSON ({r.text[:100]!r}).", retryable=False, status=r.status_code
            ) from exc

    def close(self) -> None:
        self.client.close()


class CloudClient:
    """Blocking HTTP calls to one cloud for one deployment (one exported fingerprint): a :class:`CloudLink`.

    Transport errors, 5xx, 408 and 429 raise :class:`UplinkError` with ``retryable=True`` (a 429 carries
    ``retry_after``); every other non-2xx answer raises it with the server's message, ``retryable=False`` and
    ``status`` set; a 409 on an upload raises :class:`StaleGenerationError`. Thread-safe (one ``httpx.Client``),
    so the uploader and the blob poller share one client. ``ca_file`` verifies an ``https://`` cloud against
    that CA bundle (default: the system's).

    Example:
        >>> client = CloudClient("http://127.0.0.1:8750", token, manifest.fingerprint)  # doctest: +SKIP
        >>> client.status().calibrated; client.fetch_blob(after=0, wait=10.0)  # doctest: +SKIP
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        fingerprint: str,
        *,
        device_id: str = "",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        encoding: str = "png",
        ca_file: str | None = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise EdgeConfigError(f"Upload encoding {encoding!r} is not one of {ENCODINGS}.")
        self._http = _Http(
            base_url,
            {"Authorization": f"Bearer {token}", protocol.DEVICE_HEADER: device_id},
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            ca_file=ca_file,
        )
        self.base_url, self.fingerprint, self.device_id, self.encoding = (
            self._http.base_url,
            fingerprint,
            device_id,
            encoding,
        )
        self._encoded: tuple[str, bytes] | None = None  # (idempotency key, body): retries are not re-encoded
        self._lock = threading.Lock()
        #: Bytes of the upload bodies the cloud acknowledged.
        self.bytes_sent = 0
        #: Whether the cloud answers (see :mod:`~cema_deploy.runtime.link.connectivity`).
        self.connectivity = self._http.connectivity

    @property
    def timeout_s(self) -> float:
        return self._http.timeout_s

    def status(self) -> DeploymentStatus:
        """The deployment as the cloud sees it (generation, calibrated, newest version)."""
        r = self._http.request("GET", protocol.model_url(self.base_url, self.fingerprint), ok=(200,))
        status: DeploymentStatus = self._parse(DeploymentStatus, r, "GET status")
        return status

    def upload(self, batch: SampleBatch, *, idempotency_key: str) -> UploadAck:
        """Encode ``batch`` (the client's ``encoding``) and upload it; a retry with the same key is sent the same
        bytes and stored once by the cloud."""
        with self._lock:
            cached = self._encoded
        if cached is not None and cached[0] == idempotency_key:
            body = cached[1]
        else:
            body = samples_to_bytes(batch, encoding=self.encoding)
            with self._lock:
                self._encoded = (idempotency_key, body)
        return self.upload_bytes(body, idempotency_key=idempotency_key)

    def upload_bytes(self, body: bytes, *, idempotency_key: str) -> UploadAck:
        """POST an already-encoded sample batch; returns the cloud's acknowledgement."""
        r = self._http.request(
            "POST",
            protocol.samples_url(self.base_url, self.fingerprint),
            ok=(200, 201, 202),
            content=body,
            headers={"Content-Type": protocol.SAMPLES_MEDIA_TYPE, protocol.IDEMPOTENCY_HEADER: idempotency_key},
        )
        with self._lock:
            self.bytes_sent += len(body)
        ack: UploadAck = self._parse(UploadAck, r, "an upload")
        return ack

    def batch_report(self, report: BatchReport, *, idempotency_key: str) -> BatchAck:
        """Tell the cloud one edge batch ended (after its uploads)."""
        r = self._http.request(
            "POST",
            protocol.batches_url(self.base_url, self.fingerprint),
            ok=(200, 202),
            content=json.dumps(report.to_json()),
            headers={"Content-Type": "application/json", protocol.IDEMPOTENCY_HEADER: idempotency_key},
        )
        ack: BatchAck = self._parse(BatchAck, r, "a batch report")
        return ack

    def fetch_blob(self, after: int, wait: float = 0.0) -> tuple[int, bytes] | None:
        """Long-poll for the newest blob with a version above ``after``, waiting up to ``wait`` seconds (capped at
        :data:`~cema_deploy.contract.protocol.MAX_WAIT_S`).

        Returns ``(version announced in the X-Cema-Version header, raw body bytes)`` or ``None`` (204). The bytes
        are not parsed here: the caller verifies a signature first and takes the version from the parsed blob.
        The header is unauthenticated: it names the answer in logs and reports, and moves nothing the edge
        remembers (see :mod:`cema_deploy.runtime.updates.ledger`).
        """
        wait = min(max(0.0, float(wait)), protocol.MAX_WAIT_S)
        httpx = self._http.httpx
        r = self._http.request(
            "GET",
            protocol.blob_url(self.base_url, self.fingerprint),
            ok=(200, 204),
            params={"after": int(after), "wait": wait},
            timeout=httpx.Timeout(wait + self._http.timeout_s, connect=self._http.connect_timeout_s),
        )
        if r.status_code == 204:
            return None
        header = r.headers.get(protocol.VERSION_HEADER)
        try:
            version = int(header)
        except (TypeError, ValueError) as exc:
            raise UplinkError(
                f"The cloud sent a blob without a valid {protocol.VERSION_HEADER} header (got {header!r:.40}).",
                retryable=False,
                status=r.status_code,
            ) from exc
        return version, bytes(r.content)

    def report(self, report: EdgeReport) -> None:
        """Tell the cloud this edge refused or rolled back ``report.version``."""
        self._http.request(
            "POST",
            protocol.reports_url(self.base_url, self.fingerprint),
            ok=(200, 202, 204),
            content=json.dumps(report.to_json()),
            headers={"Content-Type": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _parse(self, cls: Any, r: Any, what: str) -> Any:
        try:
            return cls.from_json(self._http.json_of(r, what))
        except ProtocolError as exc:
            raise UplinkError(
                f"The cloud's answer to {what} does not follow the protocol: {exc}",
                retryable=False,
                status=r.status_code,
            ) from exc


class AdminClient:
    """The operator routes of a cloud (reset, freeze, unfreeze a deployment by name), with an admin token.

    Example:
        >>> AdminClient("http://127.0.0.1:8750", admin_token).reset("cams").generation  # doctest: +SKIP
    """

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 120.0, ca_file: str | None = None) -> None:
        self._http = _Http(
            base_url,
            {"Authorization": f"Bearer {token}"},
            timeout_s=timeout_s,
            connect_timeout_s=5.0,
            ca_file=ca_file,
        )

    def reset(self, name: str) -> DeploymentStatus:
        return self._action(name, "reset")

    def freeze(self, name: str) -> DeploymentStatus:
        return self._action(name, "freeze")

    def unfreeze(self, name: str) -> DeploymentStatus:
        return self._action(name, "unfreeze")

    def publish(self, name: str, version: int) -> DeploymentStatus:
        """Publish the state behind kept ``version`` anew as a new, higher version."""
        return self._action(name, "publish", version)

    def pin(self, name: str, version: int) -> DeploymentStatus:
        """Serve ``version``'s state (as a new version) and publish nothing newer until :meth:`unpin`."""
        return self._action(name, "pin", version)

    def unpin(self, name: str) -> DeploymentStatus:
        return self._action(name, "unpin")

    def fleet(self) -> list[dict[str, Any]]:
        """The operator's status of every deployment (``GET /v1/admin/deployments``): plain JSON objects."""
        r = self._http.request("GET", self._http.base_url + protocol.ADMIN_STATUS_PATH, ok=(200,))
        body = self._http.json_of(r, "GET /v1/admin/deployments")
        rows = body.get("deployments") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not all(isinstance(x, dict) for x in rows):
            raise UplinkError("The cloud's operator status does not follow the protocol.", retryable=False)
        return rows

    def models(self) -> list[DeploymentStatus]:
        r = self._http.request("GET", self._http.base_url + protocol.MODELS_PATH, ok=(200,))
        body = self._http.json_of(r, "GET /v1/models")
        try:
            return [DeploymentStatus.from_json(m) for m in body["models"]]
        except (KeyError, TypeError, ProtocolError) as exc:
            raise UplinkError(f"The cloud's model list does not follow the protocol: {exc}", retryable=False) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _action(self, name: str, action: str, version: int | None = None) -> DeploymentStatus:
        params = {"version": version} if version is not None else None
        r = self._http.request("POST", protocol.admin_url(self._http.base_url, name, action), ok=(200,), params=params)
        try:
            return DeploymentStatus.from_json(self._http.json_of(r, f"{action} {name}"))
        except ProtocolError as exc:
            raise UplinkError(
                f"The cloud's answer to {action} does not follow the protocol: {exc}", retryable=False
            ) from exc
