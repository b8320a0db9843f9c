"""Tenants, their API keys and webhook signing secrets, and their jobs. PostgreSQL is the source
of truth."""

from __future__ import annotations

import uuid

from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
PRIORITY_MIN = -10
PRIORITY_MAX = 10


class CursorField(models.BigIntegerField):
    """A job's cursor: the database gives every change one, from one sequence, in the statement
    that makes the change (jobs/cursors.py). Returned by INSERTs where the database can."""

    db_returning = True


class Tenant(models.Model):
    """A customer. Its `id` is the stable slug used on the wire (`tenantId`) and in Redis keys."""

    id = models.CharField(
        primary_key=True,
        max_length=64,
        validators=[RegexValidator(TENANT_ID_PATTERN, "letters, digits, '-' and '_' (max 64)")],
    )
    name = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    max_concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="Jobs of this tenant running at once; empty is unlimited."
    )
    rate_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Job creations per second; empty uses JOBS_TENANT_RATE_LIMIT, 0 is unlimited.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id


class ApiKey(models.Model):
    """An API key of a tenant. Only a SHA-256 hash and a short lookup prefix are stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant_id})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class SigningSecret(models.Model):
    """A tenant's webhook signing secret in the Standard Webhooks format (`whsec_` + base64 of
    32 random bytes). Stored as given: signing needs the secret itself, so unlike an API key it
    cannot be hashed. It is shown once (at creation or rotation) and never rendered again: not
    by `__str__`, the admin or the API. Live while `expires_at` is empty or in the future."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="signing_secrets")
    secret = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "expires_at"], name="signing_secret_tenant_exp")]

    def __str__(self) -> str:
        return f"signing secret {self.pk} ({self.tenant_id})"


class JobStatus(models.TextChoices):
    WAITING = "WAITING"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class Job(models.Model):
    """One unit of work of one tenant, with its whole lifecycle and the worker's bookkeeping."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="jobs")
    type = models.CharField(max_length=64)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING)
    priority = models.SmallIntegerField(
        default=0, validators=[MinValueValidator(PRIORITY_MIN), MaxValueValidator(PRIORITY_MAX)]
    )
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=3)
    timeout_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    # What the handler last reported during the current attempt (0-100 and a short note).
    progress = models.PositiveSmallIntegerField(null=True, blank=True)
    progress_message = models.CharField(max_length=200, null=True, blank=True)
    run_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_hash = models.CharField(max_length=64, null=True, blank=True)
    # Worker bookkeeping: who holds the job, the fencing token of its claim, and the lease expiry.
    locked_by = models.CharField(max_length=200, null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Set by the database on every change a subscriber sees (jobs/cursors.py); never by Python.
    cursor = CursorField(null=True, blank=True, editable=False)
    # The schedule that made the job and the due time it fired for (jobs/scheduling.py); a plain
    # column, not a foreign key, so deleting a schedule leaves its jobs as they are.
    schedule_id = models.UUIDField(null=True, blank=True)
    scheduled_for = models.DateTimeField(null=True, blank=True)
    # Workflows (jobs/dependencies.py): the ids of the jobs this one waits for, as on the wire;
    # how many of them are not finished yet (a WAITING job is released at 0); and whether jobs
    # wait for this one (its end must settle them: release or cancel).
    depends_on = models.JSONField(default=list, blank=True)
    dependencies_left = models.PositiveIntegerField(default=0)
    dependents_waiting = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["tenant", "-created_at", "-id"], name="job_tenant_newest"),
            models.Index(
                fields=["tenant", "status", "-created_at", "-id"], name="job_tenant_status_newest"
            ),
            models.Index(fields=["status", "run_at"], name="job_status_run_at"),
            models.Index(fields=["status", "lease_expires_at"], name="job_status_lease"),
            models.Index(fields=["tenant", "updated_at"], name="job_tenant_updated"),
            models.Index(fields=["status", "finished_at"], name="job_status_finished"),
            models.Index(fields=["tenant", "cursor"], name="job_tenant_cursor"),
            # Finished jobs whose dependents are not settled yet (a crash after the final
            # write): the sweep reads this small index, never the waiting jobs.
            models.Index(
                fields=["status"],
                condition=Q(dependents_waiting=True),
                name="job_dependents_waiting",
            ),
        ]
        # On PostgreSQL jobs_job is partitioned by created_at (migration 0010) and these two
        # are not indexes of it: the side tables jobs_jobkey and jobs_jobscheduledue, written
        # by triggers, hold the same keys unique and raise the same IntegrityError.
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="job_unique_idempotency_key",
            ),
            # One job per schedule and due time: the claim that makes a due time fire once.
            models.UniqueConstraint(
                fields=["schedule_id", "scheduled_for"],
                condition=Q(schedule_id__isnull=False),
                name="job_unique_schedule_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id} ({self.status})"


class JobDependency(models.Model):
    """An edge of a workflow: `child` runs after `parent` completes. `open` while the child's
    count of unfinished dependencies (`Job.dependencies_left`) still includes this parent:
    closed when the parent's end is settled, or from the start when the parent had already
    ended at the child's creation. Read by parent (release) and by child (the admin)."""

    # Plain columns in the database (no foreign key constraint): on PostgreSQL jobs_job is
    # partitioned and its id alone is no unique key. Deletes through Django still cascade.
    parent = models.ForeignKey(
        Job,
        on_delete=models.CASCADE,
        related_name="dependent_edges",
        db_index=False,
        db_constraint=False,
    )
    child = models.ForeignKey(
        Job, on_delete=models.CASCADE, related_name="dependency_edges", db_constraint=False
    )
    open = models.BooleanField(default=True)

    class Meta:
        constraints = [
            # Also the index by parent that a release reads.
            models.UniqueConstraint(fields=["parent", "child"], name="job_dependency_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.child_id} after {self.parent_id}"


class EventSubscription(models.Model):
    """A tenant's order to be told of its jobs' changes: the service POSTs each matching change
    to `url` as an `event_delivery` job (jobs/events_dispatch.py). `cursor` is how far the
    dispatcher has read the tenant's changes (jobs/cursors.py); it starts at the watermark of
    the subscription's creation, so only later changes are sent."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="event_subscriptions")
    url = models.CharField(max_length=2048)
    events = models.JSONField(default=list)
    description = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField()
    cursor = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="event_sub_tenant_created")]

    def __str__(self) -> str:
        return f"event subscription {self.id} ({self.tenant_id})"


class JobChange(models.Model):
    """One change of a job of a tenant that has event subscriptions, as the job stood right
    after it: written by a trigger in the statement that made the change (migration 0007), read
    in cursor order by the event dispatcher (jobs/events_dispatch.py), deleted once every
    subscription of the tenant has read past it. The dispatcher reads each change, not only the
    latest state of a job, so every matching change becomes an event."""

    cursor = models.BigIntegerField(primary_key=True)
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, db_constraint=False, related_name="+"
    )
    job_id = models.UUIDField()
    # The job's row as JSON (column names as keys): `job_from_snapshot` makes it a Job again.
    snapshot = models.JSONField()

    class Meta:
        ordering = ["cursor"]
        indexes = [models.Index(fields=["tenant", "cursor"], name="job_change_tenant_cursor")]

    def __str__(self) -> str:
        return f"change {self.cursor} of job {self.job_id}"


class EventDelivery(models.Model):
    """One attempt to deliver one event to a subscription's URL: the delivery log (the newest
    `events_dispatch.LOG_KEEP` per subscription are kept)."""

    subscription = models.ForeignKey(
        EventSubscription, on_delete=models.CASCADE, related_name="deliveries"
    )
    job_id = models.UUIDField()
    event_type = models.CharField(max_length=32)
    event_id = models.CharField(max_length=100)
    attempt = models.PositiveIntegerField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(null=True, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "event deliveries"
        indexes = [
            models.Index(
                fields=["subscription", "-created_at", "-id"], name="event_delivery_sub_newest"
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id} attempt {self.attempt}"


class ScheduleOverlap(models.TextChoices):
    ALLOW = "allow"
    SKIP = "skip"


class Schedule(models.Model):
    """A tenant's periodic job: a 5-field `cron` expression in `timezone`, or `every` N seconds
    (one of the two). The workers fire it (jobs/scheduling.py): each due time once, as a job
    carrying `schedule_id` and `scheduled_for`. `job` is the job to create, as validated at
    save time: `{type, payload, priority, maxAttempts}`. `next_run_at` is empty while disabled."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=200)
    cron = models.CharField(max_length=100, null=True, blank=True)
    every = models.PositiveIntegerField(null=True, blank=True, help_text="seconds")
    timezone = models.CharField(max_length=64, default="UTC")
    job = models.JSONField()
    enabled = models.BooleanField(default=True)
    overlap = models.CharField(
        max_length=8, choices=ScheduleOverlap.choices, default=ScheduleOverlap.ALLOW
    )
    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    # The newest job the schedule made: `overlap: skip` waits for it to finish.
    last_job_id = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["tenant_id", "name"]
        indexes = [
            # The workers' once-a-second check: `enabled AND next_run_at <= now()`.
            models.Index(fields=["next_run_at"], condition=Q(enabled=True), name="schedule_due"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="schedule_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.tenant_id})"
