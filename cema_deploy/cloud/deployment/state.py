"""What one deployment holds: its models and stores, the book of pointers saved with the adaptation state, the
restart from disk, and the read-only views (status, info, metrics) the rooms of the loop share."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cema_deploy.cloud.config import DeploymentSpec
from cema_deploy.cloud.deployment.metrics import Timings
from cema_deploy.cloud.store.edge_stats import EdgeStatsBook
from cema_deploy.cloud.store.replay import SampleStore, keys_journal_lines
from cema_deploy.cloud.store.state import DeploymentStore
from cema_deploy.contract.blob import RefitBlob
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.messages import BatchAck, DeploymentStatus
from cema_deploy.exceptions import CloudError, ProtocolError

log = logging.getLogger("cema_deploy.cloud")

Signer = Callable[[RefitBlob], RefitBlob]
#: Monotonic pointers of the loop, persisted with the adaptation state (the larger copy wins on restart).
_POINTERS = ("cursor", "stats_cursor", "calib_done", "full_steps")
#: The journal of batch-report idempotency keys and the acks sent (in the deployment's state directory).
REPORT_KEYS = "report_keys.jsonl"
#: Versions remembered as bad (rolled back), at most.
_MAX_BAD = 1024


class DeploymentState:
    """The fields of one deployment and what reads them; the mixins of :mod:`cema_deploy.cloud.deployment` (intake,
    calibration, publishing, admin) act on them and :class:`~cema_deploy.cloud.deployment.loop.Deployment` joins
    them with the worker. Fields that change are guarded by ``_cond``."""

    #: The version the operator pinned (None: not pinned) and the republish job due; kept by ``operator.py``.
    pinned: int | None = None
    _republish: tuple[int, threading.Event, list[str]] | None = None

    def __init__(
        self,
        spec: DeploymentSpec,
        state_dir: str | Path,
        manifest: Manifest,
        teacher: Any,
        student: Any,
        *,
        signer: Signer | None = None,
        device: Any = "cpu",
        teacher_input: Any = None,
    ) -> None:
        from cema_deploy.cloud.method import Cema

        self.spec, self.config, self.manifest = spec, spec.method, manifest
        self.name, self.fingerprint = spec.name, manifest.fingerprint
        self.signer = signer
        self.store = DeploymentStore(state_dir, keep_blobs=spec.keep_blobs)
        self.epoch = self.store.epoch  # carried by every blob this state publishes
        self.samples = SampleStore(self.store.directory / "uploads", capacity=self.config.replay_size)
        self.edge_stats = EdgeStatsBook(self.store.directory / "edge-stats")  # each device's own (protocol 3)
        self.edge_stats_used: collections.Counter[str] = collections.Counter()  # samples a student step normalised
        self.last_student_groups: Any = None  # with each device's statistics; the groups of the last such step
        self.cema = Cema(
            teacher,
            student,
            manifest=manifest,
            config=self.config,
            device=device,
            teacher_input=teacher_input,
            teacher_dtype=spec.teacher_dtype,
        )
        self._cond = threading.Condition()
        self._decode = threading.Condition()  # guards _decoding: bytes of uploads being decoded and stored
        self._decoding = 0
        self._write_lock = threading.Lock()  # appends and resets, in order
        self.counters: collections.Counter[str] = collections.Counter()
        self._keys: collections.OrderedDict[str, str] = collections.OrderedDict()  # upload key -> UploadAck JSON
        self._inflight_keys: dict[str, threading.Event] = {}
        self._report_keys: collections.OrderedDict[str, BatchAck] = collections.OrderedDict()
        self._journal_lines = 0
        self._report_lines = 0  # lines in the report-keys journal
        self._load()
        self._latest: tuple[int, bytes] | None = None
        if self.version > 0 and self.store.blob_path(self.version).exists():
            self._latest = (self.version, self.store.blob_bytes(self.version))
        self._reset_waiters: list[threading.Event] = []
        self._restore: tuple[int, int] | None = None  # (bad version, good version to return to)
        self._rollbacks: dict[int, set[str]] = {}  # version -> devices that rolled it back
        self._publish_req = False
        self._replay_due: int | None = None  # the replay window's end for the due replay-only step
        self.episode_start = 0  # adapt index where the current episode began (its last setting calibration); not
        # saved: after a restart replay keeps to the episode from the next such calibration on
        self._attributed = self.full_steps + (self.samples.adapt_total - self.cursor) // self.config.batch_size
        self._inflight: tuple[str, int] = ("", 0)  # (job, publishes it will make)
        self._inflight_seq = -1  # the calibration in flight
        self._job_steps = 0  # the method's step counter when the job in flight started
        self._awaiting: collections.deque[tuple[int, float]] = collections.deque()  # (adapt end, ack time)
        self._awaiting_cal: collections.deque[tuple[int, float]] = collections.deque()  # (seq, ack time)
        self._timings = Timings()
        self._listeners: list[Callable[[int], None]] = []
        self._stop = False
        #: Set (without a lock: safe from a signal handler) when the server shuts down; long polls then end.
        self.closing = False
        self._thread: threading.Thread | None = None
        self._last_upload = time.monotonic()
        self._idle_steps = 0
        self._next_sweep = time.monotonic()

    # ---- restart ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        st = self.store.load_state()
        adapt = self.store.load_adapt()
        book: dict[str, Any] = {
            "generation": 1,
            "calibrated": False,
            "episode_n": 0,
            "shift_step": -1,
            "bad": [],
            "floor": -1,  # -1: a state saved before floors existed (set below)
            "floor_pending": False,
            "promised": 0,
            **{k: 0 for k in _POINTERS},
        }
        book.update({k: st[k] for k in book if k in st})
        if adapt is not None:
            try:
                self.cema.load_state_dict(adapt["cema"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CloudError(
                    f"{self.store.directory / 'adapt_state.pt'} does not fit these models ({exc!s:.200}); "
                    "serve them from a new state directory."
                ) from exc
            saved = adapt["book"]
            for k, v in saved.items():  # adapt_state.pt is written before state.json: it is the newer ...
                book[k] = max(book.get(k, 0), v) if k in _POINTERS else v  # ... but pointers only rise
            st["version"] = max(int(st["version"]), int(saved.get("version", 0)))
        self.version: int = int(st["version"])
        self.frozen: bool = bool(st.get("frozen", False))
        self.generation: int = int(book["generation"])
        self.calibrated: bool = bool(book["calibrated"])
        self.episode_n: int = int(book["episode_n"])
        self.shift_step: int = int(book["shift_step"])
        self.bad: list[int] = [int(v) for v in book["bad"]]
        #: The version that published the generation's newest calibration or reset: no restore goes below it
        #: (``floor_pending``: one was applied while frozen and is not published yet, so no restore at all).
        floor = int(book["floor"])
        self.floor: int = floor if floor >= 0 else (self.version if self.calibrated else 0)
        self._floor_pending: bool = bool(book["floor_pending"])
        #: device -> the version its newest upload said it serves (``edge_version``); bounds its rollback reports.
        self._device_versions: collections.OrderedDict[str, int] = collections.OrderedDict(
            (str(k), int(v)) for k, v in dict(st.get("device_versions", {})).items()
        )
        self.cursor, self.stats_cursor = int(book["cursor"]), int(book["stats_cursor"])
        self.calib_done, self.full_steps = int(book["calib_done"]), int(book["full_steps"])
        self._dirty = bool(st.get("dirty", False))
        self.counters.update({k: int(v) for k, v in st.get("counters", {}).items()})
        s = self.samples
        s.resume(
            adapt_total=int(st.get("adapt_total", 0)),
            stats_total=int(st.get("stats_total", 0)),
            next_seq=int(st.get("next_seq", 1)),
        )
        stale = [u for u in s.uploads.values() if u.generation != self.generation]  # a reset was interrupted
        s._remove(stale)
        s.delete_files(stale)
        for u in list(s.uploads.values()):
            # applied before a crash, not yet rewritten
            if u.calibration and u.seq <= self.calib_done and s.applied(u) is not None:
                s.write(u)
        # Samples deleted by the retention while the saved cursors lagged cannot be adapted on any more.
        self.cursor = max(self.cursor, min(s.first_adapt, s.adapt_total))
        firsts = [u.stats_start for u in s.uploads.values() if u.n_stats]
        self.stats_cursor = max(self.stats_cursor, min(firsts) if firsts else s.stats_total)
        if not self.cursor <= s.adapt_total:
            raise CloudError(
                f"The state in {self.store.directory} consumed {self.cursor} samples but its uploads end at "
                f"{s.adapt_total}; it was altered. Use a new state directory."
            )
        limit = self.spec.idempotency_keys
        journal = keys_journal_lines(self.store.directory / "keys.jsonl", limit)
        if journal:
            self.store.compact_keys(journal)
        self._journal_lines = len(journal)
        live = [(u.key, u.ack) for u in sorted(s.uploads.values(), key=lambda u: u.seq) if u.key]
        for key, ack in [*journal, *live][-limit:] if limit else []:
            self._keys[key] = ack
        reports = keys_journal_lines(self.store.directory / REPORT_KEYS, limit)
        if reports:
            self.store.compact_keys(reports, name=REPORT_KEYS)
        self._report_lines = len(reports)
        for key, text in reports:
            with contextlib.suppress(ValueError, TypeError, ProtocolError):
                self._report_keys[key] = BatchAck.from_json(json.loads(text))
        #: The highest target version an ack named: the worker publishes at least this (a catch-up publish when
        #: the jobs an ack counted on did not publish, e.g. after a reset, a retention sweep or a divergence).
        acks = [a.target_version for a in self._report_keys.values()]
        for u in s.uploads.values():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                acks.append(int(json.loads(u.ack).get("target_version", 0)))
        self._promised: int = max([int(book["promised"]), *acks])

    # ---- requests -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Static facts an ingress needs: name, fingerprint, model, the uploads' image size."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "model": self.manifest.model_name,
            "image_hw": tuple(self.manifest.preprocess.size),
        }

    def status(self) -> DeploymentStatus:
        with self._cond:
            return self._status()

    def _status(self) -> DeploymentStatus:
        return DeploymentStatus(
            name=self.name,
            fingerprint=self.fingerprint,
            model=self.manifest.model_name,
            version=self.version,
            generation=self.generation,
            calibrated=self.calibrated,
            frozen=self.frozen,
            epoch=self.epoch,
        )

    def _pending_samples(self) -> int:
        s = self.samples
        cal = sum(u.count - u.n_adapt for u in s.uploads.values() if u.calibration)
        return (s.adapt_total - self.cursor) + (s.stats_total - self.stats_cursor) + cal

    def _remember(self, table: collections.OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        while len(table) > self.spec.idempotency_keys:
            table.popitem(last=False)

    def _book(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "calibrated": self.calibrated,
            "episode_n": self.episode_n,
            "shift_step": self.shift_step,
            "bad": list(self.bad),
            "floor": self.floor,
            "floor_pending": self._floor_pending,
            "promised": self._promised,
            "version": self.version,
            **{k: getattr(self, k) for k in _POINTERS},
        }

    def _state_json(self) -> dict[str, Any]:
        s = self.samples
        return {
            **self._book(),
            "frozen": self.frozen,
            "dirty": self._dirty,
            "adapt_total": s.adapt_total,
            "stats_total": s.stats_total,
            "next_seq": s.next_seq,
            "counters": dict(self.counters),
            "device_versions": dict(self._device_versions),
        }

    # ---- metrics ------------------------------------------------------------------------------------------
    @property
    def replay_start(self) -> int:
        """The lowest adapt index replay may draw: the episode's start under ``replay_scope = "episode"``, else 0."""
        return self.episode_start if self.config.replay_scope == "episode" else 0

    def count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self.counters[key] += n

    def metrics(self) -> dict[str, Any]:
        with self._cond:
            s = self.samples
            return {
                "name": self.name,
                "fingerprint": self.fingerprint,
                "version": self.version,
                "epoch": self.epoch,
                "generation": self.generation,
                "calibrated": self.calibrated,
                "frozen": self.frozen,
                "steps": self.cema.steps,
                "pending": self._pending_samples(),
                "pending_cap": self.spec.pending_cap,
                "replay_window": s.window_len(s.adapt_total, self.replay_start),
                "held": s.held(),
                "counters": dict(self.counters),
                **self._timings.figures(),
                "bad_versions": len(self.bad),
            }
