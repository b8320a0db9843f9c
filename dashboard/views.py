"""The staff dashboard: one HTML page and the JSON stats it polls. Both need a staff session;
the live feed comes from the WebSocket `/ws`, which admits the same session."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from dashboard.selectors import (
    MAX_TENANTS,
    THROUGHPUT_BUCKET_S,
    DashboardStats,
    dashboard_stats,
)
from jobs.models import JobStatus, Tenant
from realtime.auth import WATCH_PERMISSION, can_watch_jobs
from realtime.broadcast import iso

FEED_LIMIT = 200
POLL_MS = 3000
# A job's admin URL with this id replaced by the real one (UUIDs need no admin quoting).
JOB_ID_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


class UnknownTenant(Exception):
    """`?tenant=` names no tenant."""


def _selected_tenant(request: HttpRequest) -> Tenant | None:
    tenant_id = request.GET.get("tenant", "").strip()
    if not tenant_id:
        return None
    tenant = Tenant.objects.filter(id=tenant_id).first()
    if tenant is None:
        raise UnknownTenant(tenant_id)
    return tenant


def tenant_links(tenant_id: str) -> dict[str, str]:
    """Where a tenant leads: its admin page, its jobs in the admin, the dashboard filtered."""
    return {
        "adminUrl": reverse("admin:jobs_tenant_change", args=[quote(tenant_id)]),
        "jobsUrl": f"{reverse('admin:jobs_job_changelist')}?"
        + urlencode({"tenant__id__exact": tenant_id}),
        "dashboardUrl": f"{reverse('dashboard:index')}?" + urlencode({"tenant": tenant_id}),
    }


def stats_payload(stats: DashboardStats) -> dict[str, Any]:
    """The stats as the page's JavaScript reads them (camelCase, like the API)."""
    return {
        "serverTime": iso(stats.server_time),
        "cursor": None if stats.cursor is None else str(stats.cursor),
        "tenant": stats.tenant_id,
        "statuses": list(JobStatus.values),
        "totals": stats.totals,
        "tenants": [
            {
                "id": row.tenant.id,
                "name": row.tenant.name,
                "isActive": row.tenant.is_active,
                "counts": row.counts,
                "total": sum(row.counts.values()),
                "queue": {
                    "ready": row.queue.ready,
                    "delayed": row.queue.delayed,
                    "running": row.queue.running,
                },
                **tenant_links(row.tenant.id),
            }
            for row in stats.tenants
        ],
        "tenantsTotal": stats.tenants_total,
        "throughput": {
            "bucketSeconds": THROUGHPUT_BUCKET_S,
            "buckets": [
                {"start": iso(b.start), "completed": b.completed, "failed": b.failed}
                for b in stats.throughput
            ],
        },
        "workers": [
            {
                "name": w.name,
                "heartbeatAgeS": None if w.heartbeat_age_s is None else round(w.heartbeat_age_s, 1),
                "alive": w.alive,
                "running": w.running,
            }
            for w in stats.workers
        ],
        "redisOk": stats.redis_ok,
        "openCircuits": [
            {
                "host": c.host,
                "state": c.state,
                "until": iso(c.until),
                "failures": c.failures,
                "openedAt": None if c.opened_at is None else iso(c.opened_at),
            }
            for c in stats.circuits
        ],
        "schedules": [
            {
                "id": str(schedule.id),
                "name": schedule.name,
                "tenant": schedule.tenant_id,
                "timing": schedule.cron or f"every {schedule.every} s",
                "nextRunAt": None if schedule.next_run_at is None else iso(schedule.next_run_at),
                "enabled": schedule.enabled,
                "adminUrl": reverse("admin:jobs_schedule_change", args=[quote(schedule.pk)]),
            }
            for schedule in stats.schedules
        ],
    }


@require_GET
@never_cache
@staff_member_required
@permission_required(WATCH_PERMISSION, raise_exception=True)
def index(request: HttpRequest) -> HttpResponse:
    """The live dashboard; `?tenant=` narrows every panel and the feed to one tenant."""
    context: dict[str, Any] = {
        **admin.site.each_context(request),
        "title": "Live dashboard",
        # The page is wide: the admin's app sidebar would squeeze the tables.
        "is_nav_sidebar_enabled": False,
    }
    try:
        tenant = _selected_tenant(request)
    except UnknownTenant as exc:
        context["unknown_tenant"] = str(exc)
        return render(request, "dashboard/index.html", context, status=404)
    stats = dashboard_stats(tenant=tenant)
    choices = [t.id for t in Tenant.objects.order_by("id").only("id")[:MAX_TENANTS]]
    if tenant is not None and tenant.id not in choices:
        choices.append(tenant.id)
    context.update(
        tenant=tenant,
        tenant_choices=choices,
        initial_stats=stats_payload(stats),
        page_config={
            "statsUrl": reverse("dashboard:stats"),
            "wsPath": "/ws",
            "tenant": tenant.id if tenant else None,
            "pollMs": POLL_MS,
            "feedLimit": FEED_LIMIT,
            "jobUrl": reverse("admin:jobs_job_change", args=[JOB_ID_PLACEHOLDER]),
            "jobIdPlaceholder": JOB_ID_PLACEHOLDER,
            "loginUrl": f"{reverse('admin:login')}?" + urlencode({"next": request.get_full_path()}),
        },
    )
    return render(request, "dashboard/index.html", context)


@require_GET
@never_cache
def stats(request: HttpRequest) -> JsonResponse:
    """The dashboard's numbers as JSON; 403 (not a login redirect) without a staff session, so
    the polling page can tell the operator to log in again."""
    if not can_watch_jobs(request.user):
        return JsonResponse(
            {"error": f"Staff session with the {WATCH_PERMISSION} permission required"},
            status=403,
        )
    try:
        tenant = _selected_tenant(request)
    except UnknownTenant as exc:
        return JsonResponse({"error": f"Unknown tenant {exc}"}, status=404)
    return JsonResponse(stats_payload(dashboard_stats(tenant=tenant)))
