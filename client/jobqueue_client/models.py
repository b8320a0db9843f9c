"""Typed results: a job as the REST API returns it, and an update as the WebSocket pushes it."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

# Every status a job can have, in the order of its life: WAITING (dependencies unfinished),
# PENDING, RUNNING, then one of the terminal ones.
STATUSES = ("WAITING", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})

_TIME = re.compile(r"^(?P<base>[^.]+?)(?:\.(?P<fraction>\d+))?(?P<zone>Z|[+-]\d\d:?\d\d)?$")


def parse_time(value: str | None) -> datetime | None:
    """An ISO 8601 time of the API (`2026-11-28T01:36:51.910Z`) as an aware datetime (UTC if it
    names no zone), also on Python 3.9, whose `fromisoformat` takes no `Z` and only 3 or 6
    fraction digits."""
    if value is None:
        return None
    match = _TIME.match(value)
    if match is None:
        raise ValueError(f"not an ISO 8601 time: {value!r}")
    fraction = f".{match['fraction'][:6].ljust(6, '0')}" if match["fraction"] else ""
    zone = match["zone"] or "+00:00"
    if zone == "Z":
        zone = "+00:00"
    elif ":" not in zone:
        zone = f"{zone[:3]}:{zone[3:]}"
    return datetime.fromisoformat(f"{match['base']}{fraction}{zone}")


def format_time(value: datetime | None) -> str | None:
    """The API's spelling of a time: UTC with a `Z`, in milliseconds (as REST answers) unless
    it has microseconds (as frames carry)."""
    if value is None:
        return None
    utc = value.astimezone(timezone.utc)
    micro = utc.microsecond
    fraction = f"{micro // 1000:03d}" if micro % 1000 == 0 else f"{micro:06d}"
    return f"{utc.strftime('%Y-%m-%dT%H:%M:%S')}.{fraction}Z"


def cursor_value(cursor: str | None) -> int | None:
    """A cursor as a number to compare (larger is later), or None if absent or not a number."""
    if cursor is None:
        return None
    try:
        return int(cursor)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Job:
    """A job as `GET /jobs/{id}` returns it, with snake_case names and parsed times."""

    id: str
    tenant_id: str
    type: str
    status: str
    payload: Any = None
    priority: int = 0
    attempts: int = 0
    max_attempts: int | None = None
    timeout_ms: int | None = None
    error: str | None = None
    result: Any = None
    progress: int | None = None
    progress_message: str | None = None
    run_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    cursor: str | None = None
    # Set on jobs a schedule made: the schedule's id and the due time the job was made for.
    schedule_id: str | None = None
    scheduled_for: datetime | None = None
    # The ids of the jobs this one runs after (it is WAITING until all are COMPLETED).
    depends_on: tuple[str, ...] = ()

    @property
    def is_terminal(self) -> bool:
        """Whether the job reached COMPLETED, FAILED or CANCELLED."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Job:
        """Build from the API's job JSON; fields this version does not know are ignored."""
        return cls(**_from_wire(cls, data))

    def to_api(self) -> dict[str, Any]:
        """The job in the API's own JSON shape (camelCase, ISO times)."""
        return _to_wire(self)


@dataclass(frozen=True)
class JobUpdate:
    """A `JOB_UPDATE` frame: one state change of a job, pushed over the WebSocket."""

    tenant_id: str
    job_id: str
    status: str
    job_type: str | None = None
    attempts: int = 0
    error: str | None = None
    result: Any = None
    progress: int | None = None
    progress_message: str | None = None
    updated_at: datetime | None = None
    cursor: str | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether this update is the job's COMPLETED, FAILED or CANCELLED."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> JobUpdate:
        """Build from a `JOB_UPDATE` frame; fields this version does not know are ignored."""
        return cls(**_from_wire(cls, frame))

    def to_api(self) -> dict[str, Any]:
        """The update in the frame's own JSON shape, `type` included."""
        return {"type": "JOB_UPDATE", **_to_wire(self)}


_TIME_FIELDS = frozenset(
    {"run_at", "started_at", "finished_at", "created_at", "updated_at", "scheduled_for"}
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _from_wire(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in fields(cls):
        wire = _camel(field.name)
        if wire not in data:
            continue
        value = data[wire]
        if field.name in _TIME_FIELDS:
            value = parse_time(value)
        elif field.name == "cursor" and value is not None:
            value = str(value)
        elif field.name == "depends_on":
            value = tuple(value or ())
        values[field.name] = value
    return values


def _to_wire(obj: Job | JobUpdate) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in fields(obj):
        value = getattr(obj, field.name)
        if field.name in _TIME_FIELDS:
            value = format_time(value)
        elif field.name == "depends_on":
            value = list(value)
        out[_camel(field.name)] = value
    return out
