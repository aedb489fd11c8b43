"""The JSON bodies of the edge-cloud protocol (:mod:`cema_deploy.contract.protocol`), defined once for both sides.

Each message is a frozen dataclass with :meth:`to_json` (a plain dict) and a strict ``from_json`` that raises
:class:`~cema_deploy.exceptions.ProtocolError` naming the field, the value seen and the type expected. Unknown
keys are ignored (a newer peer may add fields within one protocol version); missing or mistyped ones are not.

Example:
    >>> ack = BatchAck(version=3, target_version=4, generation=1, calibrated=True, replay_step=True)
    >>> BatchAck.from_json(ack.to_json()) == ack
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from cema_deploy.contract.protocol import PROTOCOL_VERSION
from cema_deploy.exceptions import ProtocolError

_M = TypeVar("_M", bound="_Message")

#: Kinds of :class:`EdgeReport`.
REPORT_KINDS = ("rollback", "refused")


class _Message:
    """``to_json``/``from_json`` for the dataclasses below; ``_nonneg`` names int fields that must be >= 0."""

    _nonneg: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_json(cls: type[_M], obj: Any) -> _M:
        name = cls.__name__
        if not isinstance(obj, dict):
            raise ProtocolError(f"{name} must be a JSON object, got {type(obj).__name__}.")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in obj:
                if f.default is not dataclasses.MISSING:
                    continue
                raise ProtocolError(f"{name} lacks the field {f.name!r}; expected {_type_name(f.type)}.")
            values[f.name] = _check(name, f.name, obj[f.name], f.type, f.name in cls._nonneg)
        return cls(**values)


def _type_name(t: Any) -> str:
    return {"int": "an integer", "bool": "true or false", "str": "a string"}.get(str(t), str(t))


def _check(msg: str, field: str, value: Any, t: Any, nonneg: bool) -> Any:
    t = str(t)
    ok = (
        (t == "int" and isinstance(value, int) and not isinstance(value, bool))
        or (t == "bool" and isinstance(value, bool))
        or (t == "str" and isinstance(value, str))
    )
    if not ok:
        raise ProtocolError(f"{msg}.{field} must be {_type_name(t)}, got {value!r:.60}.")
    if nonneg and value < 0:
        raise ProtocolError(f"{msg}.{field} must be >= 0, got {value}.")
    return value


@dataclass(frozen=True, kw_only=True)
class DeploymentStatus(_Message):
    """One deployment as the cloud sees it (``GET /v1/models/{fp}``, the body of a 409 and of admin answers).

    ``calibrated`` is False until a calibration batch of the current ``generation`` was applied: an edge that
    reads False sends its next edge batch unfiltered as calibration (the official loop's first forward).
    """

    _nonneg = ("version", "generation", "protocol", "epoch")

    name: str
    fingerprint: str
    model: str
    version: int  # newest published blob version (0: none yet)
    generation: int  # rises by one on every reset
    calibrated: bool
    frozen: bool  # publishing stopped by the operator
    protocol: int = PROTOCOL_VERSION
    epoch: int = 0  # the cloud state's epoch, carried by its blobs (0: a cloud without epochs)


@dataclass(frozen=True, kw_only=True)
class UploadAck(_Message):
    """The 202 answer to an upload. ``target_version`` is the blob version whose cloud step includes these
    samples (for a calibration batch: the blob of the calibrated statistics); an edge that waits for it to serve
    has adapted on them. ``duplicate`` is True when this was a retry of an upload already stored."""

    _nonneg = ("accepted", "pending", "buffered", "version", "target_version", "generation")

    accepted: int
    pending: int  # acknowledged samples not yet adapted on
    buffered: int  # samples held (replay window and pending)
    version: int
    target_version: int
    generation: int = 0
    calibrated: bool = True
    duplicate: bool = False


@dataclass(frozen=True, kw_only=True)
class BatchReport(_Message):
    """What an edge did with one edge batch (sent after that batch's uploads, also when it selected nothing).

    ``seen``: frames run; ``selected``: of them uploaded for adaptation (selected, or the selected part of a
    calibration batch); ``uploaded``: all frames uploaded for this batch (selected, calibration and statistics
    samples), which the cloud may count against the deployment's uplink; ``generation``: the generation the
    edge worked in. Protocol 3: ``statistics``, the edge's own BatchNorm statistics (base64 float16 safetensors,
    :mod:`cema_deploy.contract.edge_statistics`; "" otherwise) and ``stats_generation``, the edge's local
    statistics generation (informational). An edge whose adapter is on sends them, when they changed, in a
    *statistics report*: ``seen = 0``, queued ahead of the batch's uploads; it ends no batch (no replay-only step).
    Its other batch reports carry ``stats_generation`` > 0; one with 0 tells the cloud that this edge serves the
    blob's statistics (its adapter is off) and the cloud forgets the statistics it reported.
    """

    _nonneg = ("seen", "selected", "uploaded", "generation", "stats_generation")

    seen: int
    selected: int
    uploaded: int
    generation: int
    statistics: str = ""
    stats_generation: int = 0


@dataclass(frozen=True, kw_only=True)
class BatchAck(_Message):
    """The answer to a :class:`BatchReport`: ``target_version`` includes every step this report caused (cloud
    steps on the pending samples and, when ``replay_step``, the replay-only step of this interval)."""

    _nonneg = ("version", "target_version", "generation")

    version: int
    target_version: int
    generation: int
    calibrated: bool
    replay_step: bool


@dataclass(frozen=True, kw_only=True)
class EdgeReport(_Message):
    """An edge refused or rolled back ``version``; ``reason`` says why (free text, at most 1,000 characters)."""

    _nonneg = ("version",)

    kind: str
    version: int
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in REPORT_KINDS:
            raise ProtocolError(f"EdgeReport.kind must be one of {REPORT_KINDS}, got {self.kind!r:.40}.")
        if len(self.reason) > 1000:
            object.__setattr__(self, "reason", self.reason[:1000])


ReportKind = Literal["rollback", "refused"]
