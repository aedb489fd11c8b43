"""The HTTP protocol between edges and the cloud: paths, headers, media types and limits, defined once.

Every route is under ``/v1``; requests that touch a model carry ``Authorization: Bearer <device token>``.

=========================================================  =========================================================
``POST /v1/models/{fingerprint}/samples``                  body: a sample batch (:mod:`cema_deploy.contract.samples`,
                                                           media type :data:`SAMPLES_MEDIA_TYPE`). 202 once the
                                                           samples are durable in the replay buffer, JSON
                                                           :class:`UploadAck`-shaped. 400 malformed, 401 token,
                                                           404 unknown fingerprint, 413 too large.
``GET /v1/models/{fingerprint}/blob?after=N&wait=S``        200 with the newest refit blob whose version > N
                                                           (header :data:`VERSION_HEADER`, media type
                                                           :data:`BLOB_MEDIA_TYPE`); 204 when none is newer after
                                                           waiting up to S seconds (long poll, S <= MAX_WAIT_S).
``POST /v1/models/{fingerprint}/reports``                  JSON ``{"kind": "rollback", "version": V, "reason": ...}``
                                                           from an edge that refused or rolled back a version. 202.
``GET /v1/health``                                         200 JSON ``{"status": "ok", "models": {fp: version}}``.
``GET /metrics``                                           Prometheus text format 0.0.4.
=========================================================  =========================================================
"""

from __future__ import annotations

API_PREFIX = "/v1"
SAMPLES_PATH = API_PREFIX + "/models/{fingerprint}/samples"
BLOB_PATH = API_PREFIX + "/models/{fingerprint}/blob"
REPORTS_PATH = API_PREFIX + "/models/{fingerprint}/reports"
HEALTH_PATH = API_PREFIX + "/health"
METRICS_PATH = "/metrics"

SAMPLES_MEDIA_TYPE = "application/vnd.cema.samples+safetensors"
BLOB_MEDIA_TYPE = "application/vnd.cema.blob+safetensors"
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Response header carrying the version of the blob in the body.
VERSION_HEADER = "X-Cema-Version"
#: Request header naming the device (informational; the token identifies it).
DEVICE_HEADER = "X-Cema-Device"

#: Longest long-poll the cloud honours, seconds.
MAX_WAIT_S = 30.0
#: Default limit on one upload's body, bytes (the service can lower or raise it).
MAX_UPLOAD_BYTES = 16 * 1024 * 1024


def samples_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + SAMPLES_PATH.format(fingerprint=fingerprint)


def blob_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + BLOB_PATH.format(fingerprint=fingerprint)


def reports_url(base_url: str, fingerprint: str) -> str:
    return base_url.rstrip("/") + REPORTS_PATH.format(fingerprint=fingerprint)
