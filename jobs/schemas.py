"""Wire schemas of the REST API: camelCase on the wire, snake_case in Python."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from ninja import Schema
from ninja.responses import NinjaJSONEncoder
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from jobs.handlers.webhook import check_url
from jobs.models import PRIORITY_MAX, PRIORITY_MIN, TENANT_ID_PATTERN
from jobs.scheduling import CRON_MAX_LENGTH, check_cron, check_time_zone

MAX_DELAY_MS = 365 * 24 * 3600 * 1000
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_ATTEMPTS = 25

# Times a client may give: from the Unix epoch on. A time outside what Python and the database
# both hold (year 1 at +14:00 is year 0 in UTC) used to be stored, then break every read of its
# row, in the worker's batches and maintenance too.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def in_time_range(value: datetime, *, name: str, latest: datetime) -> datetime:
    """`value` in UTC if it lies between EARLIEST_TIME and `latest`; else ValueError."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{name} is out of range") from exc
    if not EARLIEST_TIME <= utc <= latest:
        raise ValueError(
            f"{name} must be between {EARLIEST_TIME.isoformat()} and {latest.isoformat()}"
        )
    return utc


TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
JobType = Annotated[str, StringConstraints(min_length=1, max_length=64)]
StatusName = Literal["WAITING", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]
DependencyRef = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class CamelSchema(Schema):
    """Base of every wire schema: camelCase aliases, snake_case attributes."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class CamelIn(BaseModel):
    """Base of request bodies: camelCase aliases like CamelSchema, as plain pydantic models.
    ninja's Schema reads its input through a Django-aware getter, made for ORM objects, and
    with `extra="forbid"` validates each item twice: that was most of the time of a batch of
    1,000 jobs. A request body is a dict; plain pydantic validates it in Rust."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class JobIn(CamelIn):
    """A job to create. Its payload is validated by the schema registered for its type."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: TenantId | None = None
    type: JobType
    payload: dict[str, Any]
    # Strict: a JSON true or "5" is not a number here.
    priority: StrictInt = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    run_at: AwareDatetime | None = None
    delay_ms: StrictInt | None = Field(None, ge=0, le=MAX_DELAY_MS)
    max_attempts: StrictInt = Field(3, ge=1, le=MAX_ATTEMPTS)
    timeout_ms: StrictInt | None = Field(None, ge=1, le=MAX_TIMEOUT_MS)
    # Job ids of the tenant (or `$<n>`, an earlier item of the same batch): the job waits
    # (WAITING) until all of them are COMPLETED (jobs/dependencies.py).
    depends_on: list[DependencyRef] = Field(default_factory=list, max_length=100)

    @field_validator("run_at")
    @classmethod
    def _run_at_in_range(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        latest = datetime.now(UTC) + timedelta(milliseconds=MAX_DELAY_MS)
        return in_time_range(value, name="runAt", latest=latest)

    @model_validator(mode="after")
    def _one_schedule(self) -> JobIn:
        if self.run_at is not None and self.delay_ms is not None:
            raise ValueError("give either runAt or delayMs, not both")
        return self


class JobBatchIn(CamelIn):
    model_config = ConfigDict(extra="forbid")

    tenant_id: TenantId | None = None
    jobs: list[JobIn] = Field(min_length=1, max_length=1000)


class JobFilter(CamelSchema):
    tenant_id: TenantId | None = None
    status: StatusName | None = None
    type: JobType | None = None
    limit: int = Field(20, ge=1, le=100)
    offset: int = Field(0, ge=0, le=10_000_000)


class JobOut(CamelSchema):
    id: UUID
    tenant_id: str
    type: str
    payload: dict[str, Any]
    status: StatusName
    priority: int
    attempts: int
    max_attempts: int
    timeout_ms: int | None
    error: str | None
    result: Any
    progress: int | None
    progress_message: str | None
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    updated_at: datetime
    cursor: str | None = Field(
        None,
        description="The position of the job's last change in the order of all changes "
        "(a string of digits; resume WebSocket or SSE updates from it).",
    )
    schedule_id: UUID | None = Field(None, description="The schedule that made the job, if any.")
    scheduled_for: datetime | None = Field(
        None, description="The due time of the schedule the job was made for."
    )
    depends_on: list[str] = Field(
        default_factory=list,
        description="The ids of the jobs this one runs after (it is WAITING until all of them "
        "are COMPLETED).",
    )


class JobCreatedOut(JobOut):
    job_id: UUID


_JOB_OUT_FIELDS = tuple(JobOut.model_fields)
_JOB_OUT_ALIASES = tuple((name, to_camel(name)) for name in _JOB_OUT_FIELDS)


def job_data(job: Any) -> dict[str, Any]:
    """A job's JobOut fields as a dict. Views return this rather than the model: ninja reads a
    model through Django's template-variable lookup for every camelCase alias it tries first,
    which costs more than the rest of a `GET /jobs/{id}`."""
    return {name: _field(job, name) for name in _JOB_OUT_FIELDS}


def _field(job: Any, name: str) -> Any:
    value = getattr(job, name)
    # The cursor is a bigint in the database and a string on the wire (JavaScript's numbers
    # lose integers past 2**53).
    return str(value) if name == "cursor" and value is not None else value


def job_json(job: Any, *, with_job_id: bool = False) -> str:
    """A job as JobOut (or JobCreatedOut) JSON, rendered directly: the same bytes ninja would
    render (tests/jobs/test_schemas.py holds them equal) for a fifth of the cost, on the API's
    hot endpoints."""
    body = {alias: _field(job, name) for name, alias in _JOB_OUT_ALIASES}
    if with_job_id:
        body["jobId"] = job.id
    return json.dumps(body, cls=NinjaJSONEncoder)


class JobListOut(CamelSchema):
    jobs: list[JobOut]
    total: int
    limit: int
    offset: int


class BatchCreatedOut(CamelSchema):
    job_ids: list[UUID]


class QueueDepthOut(CamelSchema):
    ready: int | None
    delayed: int
    running: int


class StatsOut(CamelSchema):
    tenant_id: str
    queue: QueueDepthOut
    jobs: dict[str, int]
    max_concurrency: int | None


class SigningSecretRotatedOut(CamelSchema):
    secret: str = Field(
        description="The new secret (`whsec_` + base64 of 32 bytes). Shown this once only."
    )
    created_at: datetime
    previous_expires_at: datetime | None = Field(
        description="When the last previous secret stops signing (null: there was none)."
    )


EventName = Literal[
    "job.created",
    "job.started",
    "job.completed",
    "job.failed",
    "job.cancelled",
    "job.retrying",
    "job.*",
]


class EventSubscriptionIn(CamelIn):
    """A subscription to the tenant's job events, delivered as signed POSTs to `url`."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    events: list[EventName] = Field(min_length=1, max_length=7)
    description: Annotated[str, StringConstraints(max_length=500)] = ""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_url(value)


class EventSubscriptionOut(CamelSchema):
    id: UUID
    url: str
    events: list[str]
    description: str
    created_at: datetime


class EventSubscriptionListOut(CamelSchema):
    subscriptions: list[EventSubscriptionOut]


class EventDeliveryOut(CamelSchema):
    event: str = Field(description="The event type, e.g. `job.completed`.")
    event_id: str = Field(description="The event's id, its requests' `webhook-id`.")
    job_id: UUID
    attempt: int
    status_code: int | None = Field(description="The HTTP status answered (null: no answer).")
    duration_ms: int | None
    error: str | None
    created_at: datetime


class EventDeliveryListOut(CamelSchema):
    deliveries: list[EventDeliveryOut]


MAX_EVERY_S = 366 * 24 * 3600
# No control characters (PostgreSQL stores no NUL in text; the others only hide in lists).
ScheduleName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
CronExpression = Annotated[str, StringConstraints(min_length=1, max_length=CRON_MAX_LENGTH)]
TimeZoneName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Overlap = Literal["allow", "skip"]


def _checked_cron(value: str | None) -> str | None:
    return None if value is None else check_cron(value.strip())


def _checked_time_zone(value: str | None) -> str | None:
    if value is not None:
        check_time_zone(value)
    return value


class ScheduleJobIn(CamelIn):
    """The job a schedule creates, validated as `POST /jobs` validates a job."""

    model_config = ConfigDict(extra="forbid")

    type: JobType
    payload: dict[str, Any]
    priority: StrictInt = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    max_attempts: StrictInt = Field(3, ge=1, le=MAX_ATTEMPTS)


class ScheduleIn(CamelIn):
    """A schedule to create: `cron` (5 fields, in `timezone`) or `every` seconds, not both."""

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName
    cron: CronExpression | None = None
    every: StrictInt | None = Field(None, ge=1, le=MAX_EVERY_S, description="seconds")
    timezone: TimeZoneName = "UTC"
    job: ScheduleJobIn
    enabled: StrictBool = True
    overlap: Overlap = "allow"

    _cron = field_validator("cron")(_checked_cron)
    _time_zone = field_validator("timezone")(_checked_time_zone)


class SchedulePatch(CamelIn):
    """Changes to a schedule; fields left out keep their value. Switching between `cron` and
    `every` sets the other to null in the same request."""

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName | None = None
    cron: CronExpression | None = None
    every: StrictInt | None = Field(None, ge=1, le=MAX_EVERY_S, description="seconds")
    timezone: TimeZoneName | None = None
    job: ScheduleJobIn | None = None
    enabled: StrictBool | None = None
    overlap: Overlap | None = None

    _cron = field_validator("cron")(_checked_cron)
    _time_zone = field_validator("timezone")(_checked_time_zone)


class ScheduleJobOut(CamelSchema):
    type: str
    payload: dict[str, Any]
    priority: int
    max_attempts: int


class ScheduleOut(CamelSchema):
    id: UUID
    tenant_id: str
    name: str
    cron: str | None
    every: int | None
    timezone: str
    job: ScheduleJobOut
    enabled: bool
    overlap: str
    next_run_at: datetime | None = Field(description="The next due time (null while disabled).")
    last_run_at: datetime | None = Field(description="The due time of the last job it made.")
    created_at: datetime
    updated_at: datetime


class ScheduleListOut(CamelSchema):
    schedules: list[ScheduleOut]


class HealthOut(CamelSchema):
    status: str
    timestamp: datetime


class ReadyOut(CamelSchema):
    status: str
    checks: dict[str, str]


class ErrorOut(Schema):
    error: str
    details: Any = None
