"""One deployment's adaptation loop: acknowledged uploads -> CEMA steps -> versioned, checked refit blobs.

A *deployment* is one edge model (one fingerprint) in one domain, shared by all its devices. It accepts uploads
durably (:meth:`Deployment.upload`: 202 only once the samples are on disk), runs the official loop on one worker
thread (adaptation is serialised per fingerprint) and publishes refit blobs that polls read from memory, so a poll
never waits on training. Every public method takes and returns plain picklable data (sample batches, the messages
of :mod:`cema_deploy.contract.messages`, bytes, dicts), so an engine may host the deployment in another process.

The official loop (chenyaofo/CEMA ``CEMA.infer``) mapped onto a service (PROTOCOL2):

* while B (32) samples are pending: a teacher step on those B (Eqn. 6), then a distillation step on them plus 3B
  replayed samples once the replay window holds >= 256 (the window ends at the end of the upload holding the
  batch's last sample: the official history holds the whole edge batch);
* a batch report after an edge batch in which no cloud step ran (``ran = 0``) sets ``replay_due`` when the window
  holds > 256: one replay-only step on 4B samples (a flag, never a queue; full batches run first);
* calibration batches set (first of a generation), merge (further ``start`` batches) or re-initialise (``shift``)
  the running statistics and publish at once; statistics samples move them (beyond the paper).

Beyond the paper, for a service: a pending cap (429 + Retry-After), idempotent uploads and reports, no
non-finite state ever published (the last good state is restored), blob retention, rollback reports that mark a
version bad and return to the state behind the last good one (bounded for a fleet: see ``admin``), acks whose
target versions the worker always publishes (``loop``), an epoch per state carried by every blob (``state``),
frames on disk and decoding within a byte budget (``intake``), operator reset / freeze, frame retention.

The loop is one class, :class:`Deployment` (``loop``: lifecycle and the step scheduler), joined from one mixin per
job over the fields of ``state``: ``intake`` (uploads, idempotency, the pending cap, the version an ack promises),
``calibration`` (calibration and statistics jobs), ``publishing`` (commit, polls, retention), ``admin`` (reset,
freeze, rollback reports); ``metrics`` holds its timing figures.
"""

from cema_deploy.cloud.deployment.loop import Deployment
from cema_deploy.cloud.deployment.metrics import LATENCY_BUCKETS

__all__ = ["LATENCY_BUCKETS", "Deployment"]
