"""Django admin for operators: inspect jobs and act on them through the same services as the API.

Jobs are read-only here: every state change goes through `jobs.services`, so Redis, broadcasts
and lease fencing behave exactly as for an API call.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import localize
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from jobs import scheduling
from jobs.errors import ApiError
from jobs.models import (
    ApiKey,
    EventSubscription,
    Job,
    JobDependency,
    JobStatus,
    Schedule,
    SigningSecret,
    Tenant,
)
from jobs.selectors import schedule_recent_jobs, tenant_queue_depths
from jobs.services import (
    api_key_create,
    api_key_revoke,
    job_cancel,
    job_retry,
    schedule_set_enabled,
    signing_secret_create,
    signing_secret_rotate,
    tenant_save,
)
from jobs.signing import fingerprint


class EstimatedCountPaginator(Paginator):
    """Uses PostgreSQL's row estimate instead of COUNT(*) for an unfiltered list of a big table;
    filtered lists (which the indexes serve) are counted exactly."""

    exact_below = 100_000

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and not queryset.query.where:
            connection = connections[queryset.db]
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                        [queryset.model._meta.db_table],
                    )
                    row = cursor.fetchone()
                # reltuples is -1 (never analyzed) or small for young tables: count those.
                if row is not None and row[0] >= self.exact_below:
                    return int(row[0])
        return super().count


def _when(value: datetime) -> str:
    return localize(timezone.localtime(value))


def _seconds_between(start: datetime, end: datetime) -> str:
    return f"{max(0.0, (end - start).total_seconds()):.3f} s"


def tenant_jobs_url(tenant_id: str, **filters: str) -> str:
    """The job changelist filtered to one tenant (and optionally more `list_filter` params)."""
    query = urlencode({"tenant__id__exact": tenant_id, **filters})
    return f"{reverse('admin:jobs_job_changelist')}?{query}"


def job_timeline(job: Job) -> list[tuple[str, str, str]]:
    """A job's life as far as its row tells it: (event, time, detail), oldest first.

    Only the latest attempt's start is stored; earlier attempts show in the attempt count and
    the last error.
    """
    events = [("Created", _when(job.created_at), f"type {job.type}, priority {job.priority}")]
    if job.run_at > job.created_at + timedelta(seconds=1) and job.status == JobStatus.PENDING:
        events.append(("Runnable from", _when(job.run_at), "delayed or waiting to retry"))
    if job.started_at is not None:
        detail = f"attempt {job.attempts} of {job.max_attempts}"
        if job.locked_by:
            detail += f" on worker {job.locked_by}"
        detail += f", {_seconds_between(job.created_at, job.started_at)} after creation"
        events.append(("Started", _when(job.started_at), detail))
    if job.error:
        first_line = (job.error.strip().splitlines() or [""])[0]
        # A RUNNING job's error is the previous attempt's (the current one has not ended).
        attempt = job.attempts - 1 if job.status == JobStatus.RUNNING else job.attempts
        events.append(("Last error", "", f"attempt {attempt}: {first_line[:200]}"))
    if job.finished_at is not None:
        detail = job.status
        if job.started_at is not None and job.finished_at >= job.started_at:
            detail += f" after {_seconds_between(job.started_at, job.finished_at)} running"
        events.append(("Finished", _when(job.finished_at), detail))
    events.append(("Status now", _when(job.updated_at), f"{job.status} (last update)"))
    return events


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def pretty_json(value: Any) -> SafeString | None:
    """A JSON value as indented, HTML-escaped text in a `<pre>`; None shows as empty."""
    if value is None:
        return None
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return format_html("<pre>{}</pre>", text)


# --- jobs ---------------------------------------------------------------------------------------
CHILDREN_SHOWN = 50


def _job_links(rows: list[tuple[uuid.UUID, str, str]], *, total: int) -> SafeString | str:
    """Jobs as links to their admin pages with type and status (and how many are not shown)."""
    if not rows:
        return "-"
    items = format_html_join(
        "",
        '<li><a href="{}">{}</a> {} <strong>{}</strong></li>',
        (
            (reverse("admin:jobs_job_change", args=[job_id]), job_id, job_type, status)
            for job_id, job_type, status in rows
        ),
    )
    more = format_html("<li>and {} more</li>", total - len(rows)) if total > len(rows) else ""
    return format_html('<ul class="job-links">{}{}</ul>', items, more)


JOB_FIELDSETS = (
    (None, {"fields": ("id", "tenant", "type", "status", "priority")}),
    ("Timeline", {"fields": ("timeline",)}),
    ("Attempts", {"fields": ("attempts", "max_attempts", "timeout_ms")}),
    ("Progress", {"fields": ("progress", "progress_message")}),
    ("Data", {"fields": ("payload_pretty", "result_pretty", "error_pretty")}),
    ("Workflow", {"fields": ("parents", "children", "dependencies_left")}),
    ("Times", {"fields": ("run_at", "started_at", "finished_at", "created_at", "updated_at")}),
    (
        "Worker and idempotency",
        {
            "classes": ("collapse",),
            "fields": ("locked_by", "lease_token", "lease_expires_at", "idempotency_key"),
        },
    ),
    ("Schedule", {"classes": ("collapse",), "fields": ("schedule_id", "scheduled_for")}),
)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    """Read-only job browser with bulk retry and cancel."""

    list_display = (
        "id",
        "tenant_link",
        "type",
        "status",
        "priority",
        "attempts_display",
        "progress",
        "created_at",
        "updated_at",
    )
    list_filter = ("status", "type", "tenant")
    # Only exact matches (see get_search_results): substring search on UUIDs cannot use an index.
    search_fields = ("=id", "=tenant__id")
    search_help_text = "Exact job id (UUID) or tenant id; several may be separated by spaces."
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")
    list_select_related = ("tenant",)
    # A COUNT(*) of the whole table on every page load is what makes big changelists slow.
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50
    fieldsets = JOB_FIELDSETS
    readonly_fields = tuple(f for _, options in JOB_FIELDSETS for f in options["fields"])
    actions = ("retry_selected", "cancel_selected")

    # Jobs are created through the API and changed through services only.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # Without an object this gates the changelist's actions; with one, the change form is
        # shown view-only and a POST to it is refused, so a stale form can never overwrite a row.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Job], search_term: str
    ) -> tuple[QuerySet[Job], bool]:
        terms = search_term.split()
        if not terms:
            return queryset, False
        condition = Q()
        for term in terms:
            condition |= Q(tenant_id=term)
            # A term that is not a UUID can only be a tenant id.
            with contextlib.suppress(ValueError):
                condition |= Q(id=uuid.UUID(term))
        return queryset.filter(condition), False

    @admin.display(description="tenant", ordering="tenant")
    def tenant_link(self, obj: Job) -> SafeString:
        url = reverse("admin:jobs_tenant_change", args=[quote(obj.tenant_id)])
        return format_html('<a href="{}">{}</a>', url, obj.tenant_id)

    @admin.display(description="timeline")
    def timeline(self, obj: Job) -> SafeString:
        rows = format_html_join(
            "",
            '<tr><th scope="row">{}</th><td>{}</td><td>{}</td></tr>',
            job_timeline(obj),
        )
        return format_html('<table class="job-timeline">{}</table>', rows)

    @admin.display(description="runs after (dependsOn)")
    def parents(self, obj: Job) -> SafeString | str:
        jobs = Job.objects.filter(id__in=obj.depends_on).order_by("created_at", "id")
        return _job_links(list(jobs.values_list("id", "type", "status")), total=len(jobs))

    @admin.display(description="runs before (dependents)")
    def children(self, obj: Job) -> SafeString | str:
        edges = JobDependency.objects.filter(parent=obj).order_by("child__created_at", "child_id")
        shown = list(edges.values_list("child_id", "child__type", "child__status")[:CHILDREN_SHOWN])
        total = len(shown) if len(shown) < CHILDREN_SHOWN else edges.count()
        return _job_links(shown, total=total)

    @admin.display(description="attempts")
    def attempts_display(self, obj: Job) -> str:
        return f"{obj.attempts}/{obj.max_attempts}"

    @admin.display(description="payload")
    def payload_pretty(self, obj: Job) -> SafeString | None:
        return pretty_json(obj.payload)

    @admin.display(description="result")
    def result_pretty(self, obj: Job) -> SafeString | None:
        return pretty_json(obj.result)

    @admin.display(description="error")
    def error_pretty(self, obj: Job) -> SafeString | None:
        if obj.error is None:
            return None
        return format_html("<pre>{}</pre>", obj.error)

    @admin.action(description="Retry selected jobs", permissions=["change"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        """Put FAILED and CANCELLED jobs back to PENDING (attempts reset) with `job_retry`."""
        done, skipped = self._apply(queryset, job_retry)
        self._report(request, done, skipped, "retried", "not FAILED or CANCELLED")

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        """Cancel WAITING, PENDING and RUNNING jobs with `job_cancel` (and their dependents)."""
        done, skipped = self._apply(queryset, job_cancel)
        self._report(request, done, skipped, "cancelled", "not WAITING, PENDING or RUNNING")

    @staticmethod
    def _apply(queryset: QuerySet[Job], service: Callable[..., Job]) -> tuple[int, int]:
        # One service call (and transaction) per job, so each gets its own Redis push, broadcast
        # and state check; a job in the wrong state is skipped, not an error for the whole batch.
        selected = list(queryset.order_by().values_list("id", "tenant_id"))
        tenants = Tenant.objects.in_bulk({tenant_id for _, tenant_id in selected})
        done = skipped = 0
        for job_id, tenant_id in selected:
            try:
                service(tenant=tenants[tenant_id], job_id=job_id)
            except ApiError:
                skipped += 1
            else:
                done += 1
        return done, skipped

    def _report(
        self, request: HttpRequest, done: int, skipped: int, verb: str, skip_reason: str
    ) -> None:
        text = f"{_plural(done, 'job')} {verb}"
        if skipped:
            text += f", {skipped} skipped ({skip_reason})"
        self.message_user(request, text + ".", messages.SUCCESS if done else messages.WARNING)


# --- tenants ------------------------------------------------------------------------------------
class ApiKeyInline(admin.TabularInline):
    """The tenant's API keys, read-only (keys are created and revoked from the API key admin)."""

    model = ApiKey
    fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("-created_at",)

    def has_add_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False


class SigningSecretInline(admin.TabularInline):
    """The tenant's webhook signing secrets by fingerprint, never in clear (the action
    "Rotate signing secret" makes a new one and shows it once)."""

    model = SigningSecret
    fields = ("secret_fingerprint", "created_at", "expires_at", "live")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("-created_at", "-id")
    verbose_name = "webhook signing secret"

    def has_add_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False

    @admin.display(description="fingerprint (SHA-256)")
    def secret_fingerprint(self, obj: SigningSecret) -> str:
        return fingerprint(obj.secret)

    @admin.display(boolean=True, description="signs now")
    def live(self, obj: SigningSecret) -> bool:
        return obj.expires_at is None or obj.expires_at > timezone.now()


def _show_secret_once(request: HttpRequest, tenant_id: str, secret: str, note: str = "") -> None:
    messages.success(
        request,
        format_html(
            "New webhook signing secret for tenant {}: <code>{}</code>{} Copy it now, it will "
            "not be shown again.",
            tenant_id,
            secret,
            note,
        ),
    )


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    """Tenants with their limits, keys and signing secrets. Deactivate a tenant rather than
    delete it."""

    list_display = (
        "id",
        "name",
        "is_active",
        "max_concurrency",
        "rate_limit",
        "queue_ready",
        "queue_delayed",
        "queue_running",
        "jobs_link",
        "created_at",
    )
    list_filter = ("is_active",)
    search_fields = ("id", "name")
    ordering = ("id",)
    inlines = (ApiKeyInline, SigningSecretInline)
    actions = ("rotate_signing_secret",)

    def get_inlines(self, request: HttpRequest, obj: Tenant | None) -> Sequence[type[Any]]:
        # A tenant being added has no secret yet (saving it makes the first one).
        return self.inlines if obj is not None else (ApiKeyInline,)

    def get_readonly_fields(self, request: HttpRequest, obj: Tenant | None = None) -> Sequence[str]:
        # The id is the tenant's identity on the wire and in Redis: set once, never renamed.
        if obj is None:
            return ("created_at",)
        return ("id", "created_at", "jobs_links")

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # One Redis round trip and two grouped queries for the whole page, not per row.
        tenants = list(changelist.result_list)
        depths = tenant_queue_depths(tenant_ids=[t.id for t in tenants])
        for tenant in tenants:
            tenant.queue_depth = depths[tenant.id]
        return changelist

    @admin.display(description="ready")
    def queue_ready(self, obj: Tenant) -> str:
        depth = getattr(obj, "queue_depth", None)
        return "?" if depth is None or depth.ready is None else str(depth.ready)

    @admin.display(description="delayed")
    def queue_delayed(self, obj: Tenant) -> str:
        depth = getattr(obj, "queue_depth", None)
        return "?" if depth is None else str(depth.delayed)

    @admin.display(description="running")
    def queue_running(self, obj: Tenant) -> str:
        depth = getattr(obj, "queue_depth", None)
        return "?" if depth is None else str(depth.running)

    @admin.display(description="jobs")
    def jobs_link(self, obj: Tenant) -> SafeString:
        return format_html('<a href="{}">jobs</a>', tenant_jobs_url(obj.id))

    @admin.display(description="jobs")
    def jobs_links(self, obj: Tenant) -> SafeString:
        # Links only: counting a big tenant's jobs on every page view is not worth it.
        links = [
            ("All jobs", tenant_jobs_url(obj.id)),
            ("Failed", tenant_jobs_url(obj.id, status__exact=JobStatus.FAILED)),
            ("Running", tenant_jobs_url(obj.id, status__exact=JobStatus.RUNNING)),
            ("Live dashboard", f"{reverse('dashboard:index')}?{urlencode({'tenant': obj.id})}"),
        ]
        return format_html_join(" | ", '<a href="{}">{}</a>', ((u, t) for t, u in links))

    def save_model(self, request: HttpRequest, obj: Tenant, form: Any, change: bool) -> None:
        # The admin's add and change views run in one transaction: a new tenant is never left
        # without its first signing secret.
        tenant_save(tenant=obj)
        if not change:
            _show_secret_once(request, obj.id, signing_secret_create(tenant=obj).secret)

    @admin.action(description="Rotate webhook signing secret", permissions=["change"])
    def rotate_signing_secret(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        """A new signing secret per selected tenant with `signing_secret_rotate`, shown once;
        the previous ones keep signing for JOBS_WEBHOOK_SECRET_OVERLAP_S."""
        for tenant in queryset.order_by("id"):
            rotated = signing_secret_rotate(tenant=tenant)
            until = rotated.previous_expires_at
            note = f" (the previous one signs until {_when(until)})." if until else "."
            _show_secret_once(request, tenant.id, rotated.secret.secret, note)

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        # Deleting cascades to every job of the tenant in one statement; prune_jobs and
        # is_active are the ways to retire a tenant's data without locking the jobs table.
        return False


# --- API keys -----------------------------------------------------------------------------------
API_KEY_DETAIL_FIELDS = ("prefix", "tenant", "name", "created_at", "last_used_at", "revoked_at")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """API keys: created with `api_key_create` (the full key is shown once), revoked in bulk."""

    list_display = ("prefix", "tenant", "name", "created_at", "last_used_at", "revoked")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "tenant")
    search_fields = ("=prefix", "=tenant__id", "name")
    list_select_related = ("tenant",)
    ordering = ("-created_at",)
    actions = ("revoke_selected",)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Sequence[str]:
        if obj is None:
            return ("tenant", "name")
        return API_KEY_DETAIL_FIELDS

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Sequence[str]:
        if obj is None:
            return ()
        return tuple(f for f in API_KEY_DETAIL_FIELDS if f != "name")

    @admin.display(boolean=True, description="revoked", ordering="revoked_at")
    def revoked(self, obj: ApiKey) -> bool:
        return obj.is_revoked

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ModelForm, change: bool) -> None:
        if change:
            # Only the name is editable; saving just it keeps last_used_at and revoked_at intact.
            obj.save(update_fields=["name"])
            return
        key, raw_key = api_key_create(tenant=obj.tenant, name=obj.name)
        # The admin goes on with `obj` (log entry, redirect, message): make it the created row.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(key, field.attname))
        obj._state.adding = False
        obj._state.db = key._state.db
        messages.success(
            request,
            format_html(
                "New API key for tenant {}: <code>{}</code> Copy it now, it will not be shown "
                "again.",
                key.tenant_id,
                raw_key,
            ),
        )

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        """Revoke the selected keys with `api_key_revoke`; already revoked ones are skipped."""
        prefixes = list(queryset.filter(revoked_at__isnull=True).values_list("prefix", flat=True))
        already = queryset.count() - len(prefixes)
        for prefix in prefixes:
            api_key_revoke(prefix=prefix)
        text = f"{_plural(len(prefixes), 'key')} revoked"
        if already:
            text += f", {already} already revoked"
        self.message_user(request, text + ".", messages.SUCCESS if prefixes else messages.WARNING)


# --- event subscriptions ------------------------------------------------------------------------
DELIVERIES_SHOWN = 50


@admin.register(EventSubscription)
class EventSubscriptionAdmin(admin.ModelAdmin):
    """Tenants' event subscriptions and their latest delivery attempts, read-only (tenants make
    and delete them through the API)."""

    list_display = ("id", "tenant", "url", "events_list", "description", "created_at", "cursor")
    list_filter = ("tenant",)
    search_fields = ("=id", "=tenant__id", "url")
    list_select_related = ("tenant",)
    ordering = ("-created_at", "-id")
    fields = (
        "id",
        "tenant",
        "url",
        "events",
        "description",
        "created_at",
        "cursor",
        "recent_deliveries",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: EventSubscription | None = None
    ) -> bool:
        return False

    @admin.display(description="events")
    def events_list(self, obj: EventSubscription) -> str:
        return ", ".join(obj.events)

    @admin.display(description=f"latest {DELIVERIES_SHOWN} delivery attempts")
    def recent_deliveries(self, obj: EventSubscription) -> SafeString:
        rows = obj.deliveries.order_by("-created_at", "-id")[:DELIVERIES_SHOWN]
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "</tr>",
            (
                (
                    _when(row.created_at),
                    row.event_type,
                    row.event_id,
                    row.attempt,
                    "" if row.status_code is None else row.status_code,
                    "" if row.duration_ms is None else f"{row.duration_ms} ms",
                    row.error or "",
                )
                for row in rows
            ),
        )
        if not body:
            return format_html("<p>{}</p>", "No delivery yet.")
        return format_html(
            "<table><thead><tr><th>time</th><th>event</th><th>event id</th><th>attempt</th>"
            "<th>status</th><th>duration</th><th>error</th></tr></thead><tbody>{}</tbody>"
            "</table>",
            body,
        )


# --- schedules ----------------------------------------------------------------------------------
SCHEDULE_JOBS_SHOWN = 20


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    """Tenants' schedules with their next run: enabled or disabled and run at once from here,
    through the same services as the API; the rest is the tenants' to change."""

    list_display = (
        "name",
        "tenant",
        "timing",
        "timezone",
        "enabled",
        "overlap",
        "next_run_at",
        "last_run_at",
    )
    list_filter = ("enabled", "overlap", "tenant")
    search_fields = ("=id", "=tenant__id", "name")
    list_select_related = ("tenant",)
    ordering = ("next_run_at", "tenant_id", "name")
    actions = ("enable_selected", "disable_selected", "run_now")
    fields = (
        "id",
        "tenant",
        "name",
        "cron",
        "every",
        "timezone",
        "job_pretty",
        "enabled",
        "overlap",
        "next_run_at",
        "last_run_at",
        "created_at",
        "updated_at",
        "recent_jobs",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Schedule | None = None) -> bool:
        # Without an object this gates the changelist's actions; the form stays read-only.
        return obj is None and super().has_change_permission(request)

    @admin.display(description="when")
    def timing(self, obj: Schedule) -> str:
        return obj.cron if obj.cron is not None else f"every {obj.every} s"

    @admin.display(description="job")
    def job_pretty(self, obj: Schedule) -> SafeString | None:
        return pretty_json(obj.job)

    @admin.display(description=f"latest {SCHEDULE_JOBS_SHOWN} jobs")
    def recent_jobs(self, obj: Schedule) -> SafeString:
        rows = schedule_recent_jobs(schedule=obj, limit=SCHEDULE_JOBS_SHOWN)
        body = format_html_join(
            "",
            '<tr><td>{}</td><td><a href="{}">{}</a></td><td>{}</td><td>{}</td></tr>',
            (
                (
                    _when(job.scheduled_for) if job.scheduled_for else "",
                    reverse("admin:jobs_job_change", args=[quote(job.pk)]),
                    job.id,
                    job.status,
                    job.attempts,
                )
                for job in rows
            ),
        )
        if not body:
            return format_html("<p>{}</p>", "No job yet.")
        return format_html(
            "<table><thead><tr><th>due</th><th>job</th><th>status</th><th>attempts</th></tr>"
            "</thead><tbody>{}</tbody></table>",
            body,
        )

    @admin.action(description="Enable selected schedules", permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        """Enable the selected schedules; each plans its next run from now."""
        self._set_enabled(request, queryset, enabled=True)

    @admin.action(description="Disable selected schedules", permissions=["change"])
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._set_enabled(request, queryset, enabled=False)

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[Schedule], *, enabled: bool
    ) -> None:
        changed = 0
        for schedule in queryset.select_related("tenant").filter(enabled=not enabled):
            schedule_set_enabled(schedule=schedule, enabled=enabled)
            changed += 1
        word = "enabled" if enabled else "disabled"
        self.message_user(request, f"{_plural(changed, 'schedule')} {word}.", messages.SUCCESS)

    @admin.action(description="Run selected schedules now", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        """Create each selected schedule's job at once, marked with the schedule; the next
        runs stay as planned."""
        done, failed = 0, []
        for schedule in queryset:
            try:
                scheduling.run_now(schedule=schedule)
                done += 1
            except (ApiError, ValueError, KeyError) as exc:
                failed.append(f"{schedule.name}: {exc}")
        self.message_user(request, f"{_plural(done, 'job')} created.", messages.SUCCESS)
        if failed:
            self.message_user(request, "Not run: " + "; ".join(failed), messages.ERROR)
