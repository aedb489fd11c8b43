"""The HTTP protocol between edges and the cloud: version, paths, headers, media types and limits, defined once.

Every route is under ``/v1``. Requests that touch a model carry ``Authorization: Bearer <device token>`` and
``X-Cema-Protocol: 3`` (:data:`PROTOCOL_VERSION`); the cloud answers every response with the same header and
refuses a request that names another protocol version (or none) with 400 and a message naming both versions
(:func:`check_protocol`). JSON bodies are the dataclasses of :mod:`cema_deploy.contract.messages`.

A *deployment* is one edge model (one fingerprint) in one domain, shared by its devices; its *generation* rises
by one on every operator reset, its blob *version* rises on every publish and never repeats, across resets too.

=====================================================  =============================================================
``GET /v1/models``                                     200 JSON ``{"models": [DeploymentStatus, ...]}``: the
                                                       deployments this token may use.
``GET /v1/models/{fingerprint}``                       200 :class:`~.messages.DeploymentStatus` (is it calibrated
                                                       in this generation? frozen? newest version?).
``POST /v1/models/{fingerprint}/samples``              body: a sample batch (:mod:`cema_deploy.contract.samples`,
                                                       :data:`SAMPLES_MEDIA_TYPE`), kind ``selected``,
                                                       ``calibration`` or ``statistics``; header
                                                       :data:`IDEMPOTENCY_HEADER` (a retry with the same key gets
                                                       the same answer and is stored once). 202
                                                       :class:`~.messages.UploadAck` once the samples are durable.
                                                       400 malformed, 401 token, 404 fingerprint not served to this
                                                       token, 409 the batch names an older generation (body: the
                                                       DeploymentStatus; the edge starts the new generation), 413
                                                       too large, 429 pending cap reached (header
                                                       :data:`RETRY_AFTER_HEADER`, seconds).
``POST /v1/models/{fingerprint}/batches``              JSON :class:`~.messages.BatchReport`: one per edge batch,
                                                       also when it selected nothing, sent after that batch's
                                                       uploads (the edge's queue keeps the order). The cloud runs
                                                       the official loop's replay-only step for a report interval
                                                       in which no cloud step ran. Protocol 3: carries the edge's
                                                       own BatchNorm statistics when they changed (``statistics``;
                                                       400 when they do not fit the manifest, nothing changed).
                                                       202 :class:`~.messages.BatchAck`. Takes
                                                       :data:`IDEMPOTENCY_HEADER` too.
``GET /v1/models/{fingerprint}/blob?after=N&wait=S``   200 with the newest refit blob whose version > N (header
                                                       :data:`VERSION_HEADER`, :data:`BLOB_MEDIA_TYPE`); 204 when
                                                       none is newer after waiting up to S seconds (S <=
                                                       :data:`MAX_WAIT_S`).
``POST /v1/models/{fingerprint}/reports``              JSON :class:`~.messages.EdgeReport` (``rollback`` or
                                                       ``refused``, version, reason). 202.
``POST /v1/admin/deployments/{name}/reset``            admin token only: fresh adaptation state, generation + 1,
                                                       a blob of the reset state published at once (version + 1).
                                                       200 DeploymentStatus.
``POST /v1/admin/deployments/{name}/freeze``           admin token only: stop publishing (edges keep their
``POST /v1/admin/deployments/{name}/unfreeze``         version); unfreeze resumes. 200 DeploymentStatus.
``POST /v1/admin/deployments/{name}/publish``          admin token only, ``?version=N``: the state behind kept
                                                       version N published anew as a new, higher version. ``pin``:
``POST /v1/admin/deployments/{name}/pin``              the same, then nothing newer until ``unpin`` (which
``POST /v1/admin/deployments/{name}/unpin``            publishes what was learnt meanwhile). 200 DeploymentStatus;
                                                       404 version not kept; 409 refused while pinned.
``GET /v1/admin/deployments``                          admin token only: 200 JSON ``{"deployments": [...]}``, per
                                                       deployment its status, pin, held uploads, kept versions and
                                                       per device the version served, last seen, uploads,
                                                       refusals and rollbacks (``cloud status``).
``GET /v1/health``                                     200 JSON ``{"status": "ok", "protocol": 3, "models": {fp:
                                                       version}}``; no token, no protocol header needed.
``GET /metrics``                                       Prometheus text format 0.0.4; no token.
=====================================================  =============================================================
"""

from __future__ import annotations

from cema_deploy.exceptions import ProtocolMismatchError

#: Version of this protocol. Both sides send it in :data:`PROTOCOL_HEADER` and refuse any other.
#: 1: the first release (no header). 2: calibration and statistics samples, batch reports, generations, admin
#: routes, idempotent uploads. 3: batch reports carry the edge's own statistics (an edge with ``--adapt-stats``
#: owns its running statistics, sends no calibration batches, and applies cloud blobs with its statistics).
#: The blob's optional lead weights (``contract/lead.py``, issue 22 item 4) did not change it: they ride in the blob's
#: signed metadata, which every reader takes by name, so an edge that does not know them ignores them.
PROTOCOL_VERSION = 3

API_PREFIX = "/v1"
MODELS_PATH = API_PREFIX + "/models"
MODEL_PATH = API_PREFIX + "/models/{fingerprint}"
SAMPLES_PATH = API_PREFIX + "/models/{fingerprint}/samples"
BATCHES_PATH = API_PREFIX + "/models/{fingerprint}/batches"
BLOB_PATH = API_PREFIX + "/models/{fingerprint}/blob"
REPORTS_PATH = API_PREFIX + "/models/{fingerprint}/reports"
ADMIN_PATH = API_PREFIX + "/admin/deployments/{name}/{action}"
ADMIN_ACTIONS = ("reset", "freeze", "unfreeze", "publish", "pin", "unpin")
#: Admin actions that take ``?version=N`` (and the others take none).
VERSIONED_ADMIN_ACTIONS = ("publish", "pin")
ADMIN_STATUS_PATH = API_PREFIX + "/admin/deployments"
HEALTH_PATH = API_PREFIX + "/health"
METRICS_PATH = "/metrics"

SAMPLES_MEDIA_TYPE = "application/vnd.cema.samples+safetensors"
BLOB_MEDIA_TYPE = "application/vnd.cema.blob+safetensors"
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Request and response header carrying :data:`PROTOCOL_VERSION`.
PROTOCOL_HEADER = "X-Cema-Protocol"
#: Response header carrying the version of the blob in the body.
VERSION_HEADER = "X-Cema-Version"
#: Request header naming the device (informational; the token identifies it).
DEVICE_HEADER = "X-Cema-Device"
#: Request header of uploads and batch reports: the same key on a retry means "the same request".
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Longest idempotency key accepted (a UUID is 36 characters).
MAX_IDEMPOTENCY_KEY = 128
#: Response header of a 429: seconds to wait before trying again.
RETRY_AFTER_HEADER = "Retry-After"

#: Longest long-poll the cloud honours, seconds.
MAX_WAIT_S = 30.0
#: Default limit on one upload's body, bytes (the service can lower or raise it).
MAX_UPLOAD_BYTES = 16 * 1024 * 1024
#: Largest JSON body (batch reports, edge reports) the cloud reads: a batch report with a ResNet-50's statistics
#: (protocol 3) is ~160 KB of base64; 1 MiB leaves room for models with ~6x as many BatchNorm channels.
MAX_JSON_BYTES = 1024 * 1024


def check_protocol(value: str | None, *, peer: str) -> None:
    """Refuse a message whose :data:`PROTOCOL_HEADER` is not :data:`PROTOCOL_VERSION`.

    ``peer`` names the other side for the message, e.g. ``"the cloud at http://host:8750"`` or ``"the edge"``.

    Example:
        >>> check_protocol("3", peer="the edge")
        >>> check_protocol(None, peer="the edge")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cema_deploy.exceptions.ProtocolMismatchError: The edge speaks cema protocol 1 (it sent no ...
    """
    if value is not None and value.strip() == str(PROTOCOL_VERSION):
        return
    said = "1 (it sent no X-Cema-Protocol header)" if value is None else repr(value.strip()[:20])
    raise ProtocolMismatchError(
        f"{peer[:1].upper()}{peer[1:]} speaks cema protocol {said}; this side speaks protocol {PROTOCOL_VERSION}. "
        "Upgrade cema-deploy on the older side so both speak the same version."
    )


def model_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + MODEL_PATH.format(fingerprint=fingerprint)


def samples_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + SAMPLES_PATH.format(fingerprint=fingerprint)


def batches_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + BATCHES_PATH.format(fingerprint=fingerprint)


def blob_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + BLOB_PATH.format(fingerprint=fingerprint)


def reports_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + REPORTS_PATH.format(fingerprint=fingerprint)


def admin_url(base_url: str, name: str, action: str) -> str:
    if action not in ADMIN_ACTIONS:
        raise ValueError(f"admin action {action!r} is not one of {ADMIN_ACTIONS}")
    return base_url.rstrip("/") + ADMIN_PATH.format(name=name, action=action)
