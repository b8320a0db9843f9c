"""Schedules (SPEC section 12): the endpoints and their validation, the DST arithmetic of the
cron library against known dates, and the scheduler pass the workers run (downtime, overlap,
broken rows, tenants over their limits, what an idle worker costs)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from jobqueue_client.models import Job as ClientJob

from jobs import scheduling
from jobs.models import Job, JobStatus, Schedule, Tenant
from jobs.queue import sync_queue
from jobs.schemas import job_json
from jobs.upkeep import Upkeep
from tests.support.api import asgi_api, assert_error, get, post

SLEEP_JOB = {"type": "sleep", "payload": {"delayMs": 10}}


def schedule_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": f"s-{uuid.uuid4().hex[:8]}", "every": 60, "job": SLEEP_JOB}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def patch(client: Client, path: str, body: Any, key: str) -> Any:
    return client.patch(
        path,
        data=json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )


def delete(client: Client, path: str, key: str) -> Any:
    return client.delete(path, HTTP_AUTHORIZATION=f"Bearer {key}")


def create(client: Client, key: str, **fields: Any) -> dict[str, Any]:
    response = post(client, "/schedules", schedule_body(**fields), key)
    assert response.status_code == 201, response.content
    return response.json()


def fields_of(response: Any) -> list[str]:
    return [detail["field"] for detail in assert_error(response, 400)["details"]]


# --- the API --------------------------------------------------------------------------------
@pytest.mark.django_db
def test_create_get_list_patch_delete(client: Client, api_key: str, tenant: Tenant) -> None:
    body = create(
        client,
        api_key,
        name="nightly",
        every=...,
        cron="30 2 * * *",
        timezone="Europe/Berlin",
        job={"type": "sleep", "payload": {"delayMs": 5}, "priority": 3, "maxAttempts": 2},
        overlap="skip",
    )
    assert set(body) == {
        "id",
        "tenantId",
        "name",
        "cron",
        "every",
        "timezone",
        "job",
        "enabled",
        "overlap",
        "nextRunAt",
        "lastRunAt",
        "createdAt",
        "updatedAt",
    }
    assert body["tenantId"] == tenant.id
    assert body["every"] is None and body["enabled"] is True and body["lastRunAt"] is None
    assert body["job"] == {
        "type": "sleep",
        "payload": {"delayMs": 5},
        "priority": 3,
        "maxAttempts": 2,
    }
    next_run = datetime.fromisoformat(body["nextRunAt"]).astimezone(ZoneInfo("Europe/Berlin"))
    assert (next_run.hour, next_run.minute) in {(2, 30), (3, 0)}
    assert next_run > timezone.now()

    path = f"/schedules/{body['id']}"
    assert get(client, path, api_key).json() == body
    assert [s["id"] for s in get(client, "/schedules", api_key).json()["schedules"]] == [body["id"]]

    # Switching to an interval: the next run is planned again, on a multiple of 60 s.
    changed = patch(client, path, {"cron": None, "every": 60}, api_key)
    assert changed.status_code == 200, changed.content
    assert changed.json()["every"] == 60 and changed.json()["cron"] is None
    assert datetime.fromisoformat(changed.json()["nextRunAt"]).timestamp() % 60 == 0

    disabled = patch(client, path, {"enabled": False}, api_key).json()
    assert disabled["enabled"] is False and disabled["nextRunAt"] is None
    enabled = patch(client, path, {"enabled": True, "name": "renamed"}, api_key).json()
    assert enabled["nextRunAt"] is not None and enabled["name"] == "renamed"

    assert delete(client, path, api_key).status_code == 204
    assert_error(get(client, path, api_key), 404)
    assert get(client, "/schedules", api_key).json() == {"schedules": []}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cron": "0 0 30 2 *", "every": ...}, "cron"),  # never matches
        ({"cron": "61 * * * *", "every": ...}, "cron"),
        ({"cron": "* * * * * *", "every": ...}, "cron"),  # 6 fields
        ({"cron": "0 12 * * *", "every": 60}, "cron"),  # both
        ({"every": ...}, "cron"),  # neither
        ({"every": 0}, "every"),
        ({"every": "60"}, "every"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "../../../etc/passwd"}, "timezone"),
        ({"overlap": "queue"}, "overlap"),
        ({"name": ""}, "name"),
        ({"job": {"type": "nope", "payload": {}}}, "job.type"),
        ({"job": {"type": "event_delivery", "payload": {}}}, "job.type"),
        ({"job": {"type": "sleep", "payload": {"delayMs": -1}}}, "job.payload.delayMs"),
        ({"job": {**SLEEP_JOB, "priority": 11}}, "job.priority"),
        ({"job": {**SLEEP_JOB, "maxAttempts": 0}}, "job.maxAttempts"),
        ({"job": {**SLEEP_JOB, "runAt": "2030-01-01T00:00:00Z"}}, "job.runAt"),
    ],
)
def test_invalid_schedules_are_400_with_the_field(
    client: Client, api_key: str, fields: dict[str, Any], field: str
) -> None:
    response = post(client, "/schedules", schedule_body(**fields), api_key)
    assert field in fields_of(response)
    assert not Schedule.objects.exists()


@pytest.mark.django_db
def test_a_nul_character_is_400_not_a_failed_write(client: Client, api_key: str) -> None:
    # PostgreSQL stores no NUL in text or jsonb: refused in a schedule's name, and in a job's
    # payload (a webhook's body is free JSON), for schedules and POST /jobs alike.
    body = {"a": ["ok", "x\x00"]}
    webhook = {"type": "webhook", "payload": {"url": "https://example.com/", "body": body}}
    for path, request, field in [
        ("/schedules", schedule_body(name="a\x00b"), "name"),
        ("/schedules", schedule_body(job=webhook), "job.payload.body.a.1"),
        ("/jobs", webhook, "payload.body.a.1"),
    ]:
        (detail,) = assert_error(post(client, path, request, api_key), 400)["details"]
        assert detail["field"] == field
    assert not Schedule.objects.exists() and not Job.objects.exists()
    # A backslash followed by "u0000" is ordinary text.
    webhook["payload"]["body"] = {"a": "\\u0000"}
    assert post(client, "/jobs", webhook, api_key).status_code == 201


@pytest.mark.django_db
def test_minimum_interval_is_a_setting(client: Client, api_key: str, settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "SCHEDULE_MIN_EVERY_S": 30}
    assert fields_of(post(client, "/schedules", schedule_body(every=10), api_key)) == ["every"]
    assert post(client, "/schedules", schedule_body(every=30), api_key).status_code == 201


@pytest.mark.django_db
def test_patch_is_validated_too(client: Client, api_key: str) -> None:
    path = f"/schedules/{create(client, api_key)['id']}"
    assert fields_of(patch(client, path, {"cron": "0 0 * * *"}, api_key)) == ["cron"]  # both
    assert fields_of(patch(client, path, {"every": None}, api_key)) == ["cron"]  # neither
    assert fields_of(patch(client, path, {"name": None}, api_key)) == ["name"]
    assert "job.type" in fields_of(
        patch(client, path, {"job": {"type": "x", "payload": {}}}, api_key)
    )
    assert get(client, path, api_key).json()["every"] == 60


@pytest.mark.django_db
def test_name_is_unique_per_tenant(client: Client, api_key: str, other_api_key: str) -> None:
    first = create(client, api_key, name="hourly")
    second = create(client, api_key, name="daily")
    assert_error(post(client, "/schedules", schedule_body(name="hourly"), api_key), 409)
    assert_error(patch(client, f"/schedules/{second['id']}", {"name": "hourly"}, api_key), 409)
    # Another tenant may use the name.
    assert create(client, other_api_key, name="hourly")["id"] != first["id"]


@pytest.mark.django_db
def test_per_tenant_cap(client: Client, api_key: str, other_api_key: str, settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "MAX_SCHEDULES_PER_TENANT": 2}
    create(client, api_key)
    create(client, api_key)
    body = assert_error(post(client, "/schedules", schedule_body(), api_key), 409)
    assert body["details"] == {"max": 2}
    create(client, other_api_key)  # the cap is per tenant


@pytest.mark.django_db
def test_another_tenants_schedule_is_404(client: Client, api_key: str, other_api_key: str) -> None:
    path = f"/schedules/{create(client, api_key)['id']}"
    assert_error(get(client, path, other_api_key), 404)
    assert_error(patch(client, path, {"enabled": False}, other_api_key), 404)
    assert_error(delete(client, path, other_api_key), 404)
    assert get(client, "/schedules", other_api_key).json() == {"schedules": []}
    assert get(client, path, api_key).json()["enabled"] is True
    assert_error(get(client, "/schedules/not-a-uuid", api_key), 400)


@pytest.mark.django_db
def test_unauthenticated_is_401(client: Client) -> None:
    assert_error(get(client, "/schedules", None), 401)
    assert_error(post(client, "/schedules", schedule_body(), None), 401)


# --- DST arithmetic -------------------------------------------------------------------------
def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def next_times(cron: str, zone: str, start: str, count: int) -> list[datetime]:
    timing = scheduling.Timing(cron=cron, every=None, zone=ZoneInfo(zone))
    times, at = [], utc(start)
    for _ in range(count):
        at = timing.next_after(at)
        times.append(at)
    return times


@pytest.mark.parametrize(
    ("zone", "start", "expected"),
    [
        # Berlin springs forward at 02:00 CET on 2026-03-29: 02:30 does not exist that day, so
        # the job runs at the first minute after the gap, 03:00 CEST (01:00 UTC).
        (
            "Europe/Berlin",
            "2026-03-28T00:00",
            ["2026-03-28T01:30", "2026-03-29T01:00", "2026-03-30T00:30"],
        ),
        # Berlin falls back at 03:00 CEST on 2026-10-25: 02:30 happens twice; it runs once, at
        # the first (CEST, 00:30 UTC), and not again at 02:30 CET (01:30 UTC).
        (
            "Europe/Berlin",
            "2026-10-24T00:00",
            ["2026-10-24T00:30", "2026-10-25T00:30", "2026-10-26T01:30"],
        ),
        # New York springs forward at 02:00 EST on 2026-03-08: 02:30 runs at 03:00 EDT.
        (
            "America/New_York",
            "2026-03-07T00:00",
            ["2026-03-07T07:30", "2026-03-08T07:00", "2026-03-09T06:30"],
        ),
        # New York falls back at 02:00 EDT on 2026-11-01, so 02:30 is unambiguous (EST).
        (
            "America/New_York",
            "2026-10-31T00:00",
            ["2026-10-31T06:30", "2026-11-01T07:30", "2026-11-02T07:30"],
        ),
    ],
)
def test_daily_at_half_past_two_across_dst(zone: str, start: str, expected: list[str]) -> None:
    assert next_times("30 2 * * *", zone, start, 3) == [utc(t) for t in expected]


def test_new_york_repeated_hour_fires_once() -> None:
    # 01:30 happens twice on 2026-11-01 (EDT 05:30 UTC, then EST 06:30 UTC): once, the first.
    assert next_times("30 1 * * *", "America/New_York", "2026-10-31T12:00", 2) == [
        utc("2026-11-01T05:30"),
        utc("2026-11-02T06:30"),
    ]


def test_hourly_follows_elapsed_time_across_dst() -> None:
    # An expression with `*` in its hour field fires on each real hour: none is lost in the
    # spring gap, and the repeated hour of the fall is fired twice (two distinct instants).
    spring = next_times("0 * * * *", "Europe/Berlin", "2026-03-28T23:30", 3)
    assert spring == [utc("2026-03-29T00:00"), utc("2026-03-29T01:00"), utc("2026-03-29T02:00")]
    fall = next_times("0 * * * *", "Europe/Berlin", "2026-10-24T23:30", 3)
    assert fall == [utc("2026-10-25T00:00"), utc("2026-10-25T01:00"), utc("2026-10-25T02:00")]


def test_next_time_never_steps_back_from_the_repeated_hour() -> None:
    # From the second 02:15 of Berlin's fall back (CET), the next `*/30` time is 02:30 CET.
    timing = scheduling.Timing(cron="*/30 * * * *", every=None, zone=ZoneInfo("Europe/Berlin"))
    assert timing.next_after(utc("2026-10-25T01:15")) == utc("2026-10-25T01:30")


def test_every_is_aligned_to_the_epoch() -> None:
    timing = scheduling.Timing(cron=None, every=60, zone=ZoneInfo("UTC"))
    assert timing.next_after(utc("2026-01-01T10:00:00")) == utc("2026-01-01T10:01:00")
    assert timing.next_after(utc("2026-01-01T10:00:59.5")) == utc("2026-01-01T10:01:00")


# --- the scheduler pass ---------------------------------------------------------------------
def make_schedule(tenant: Tenant, **fields: Any) -> Schedule:
    now = timezone.now()
    values: dict[str, Any] = {
        "name": f"s-{uuid.uuid4().hex[:8]}",
        "every": 60,
        "job": {"type": "sleep", "payload": {"delayMs": 10}, "priority": 0, "maxAttempts": 3},
        "next_run_at": now.replace(microsecond=0) - timedelta(seconds=1),
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    return Schedule.objects.create(tenant=tenant, **values)


def jobs_of(schedule: Schedule) -> list[Job]:
    return list(Job.objects.filter(schedule_id=schedule.id).order_by("scheduled_for"))


@pytest.mark.django_db
def test_a_due_schedule_fires_once_and_moves_on(
    tenant: Tenant, django_capture_on_commit_callbacks: Any
) -> None:
    schedule = make_schedule(tenant)
    due = schedule.next_run_at
    with django_capture_on_commit_callbacks(execute=True):
        (job,) = scheduling.tick()
    assert scheduling.tick() == []  # nothing due any more
    assert [j.id for j in jobs_of(schedule)] == [job.id]
    assert job.status == JobStatus.PENDING and job.scheduled_for == due
    assert job.schedule_id == schedule.id and job.type == "sleep"
    wire = json.loads(job_json(job))
    assert wire["scheduleId"] == str(schedule.id)
    assert datetime.fromisoformat(wire["scheduledFor"]) == due
    sdk_job = ClientJob.from_api(wire)  # the Python SDK reads them too
    assert (sdk_job.schedule_id, sdk_job.scheduled_for) == (str(schedule.id), due)
    schedule.refresh_from_db()
    assert schedule.last_run_at == due and schedule.last_job_id == job.id
    assert schedule.next_run_at > timezone.now() - timedelta(seconds=1)
    assert schedule.next_run_at.timestamp() % 60 == 0
    # Published like any created job: indexed in Redis for the workers.
    assert sync_queue().ready_counts([tenant.id]) == {tenant.id: 1}


@pytest.mark.django_db
def test_after_downtime_only_the_latest_missed_due_time_fires(tenant: Tenant) -> None:
    long_ago = timezone.now() - timedelta(days=3)
    every = make_schedule(tenant, next_run_at=long_ago)
    cron = make_schedule(tenant, every=None, cron="*/5 * * * *", next_run_at=long_ago)
    scheduling.tick()
    now = timezone.now()
    (every_job,) = jobs_of(every)
    assert now - timedelta(seconds=60) < every_job.scheduled_for <= now
    assert every_job.scheduled_for.timestamp() % 60 == 0
    (cron_job,) = jobs_of(cron)
    assert now - timedelta(minutes=5) < cron_job.scheduled_for <= now
    assert cron_job.scheduled_for.minute % 5 == 0 and cron_job.scheduled_for.second == 0


@pytest.mark.django_db
def test_overlap_skip_waits_for_the_last_job(tenant: Tenant) -> None:
    schedule = make_schedule(tenant, overlap="skip")
    (first,) = scheduling.tick()
    Schedule.objects.filter(id=schedule.id).update(next_run_at=timezone.now())
    assert scheduling.tick() == []  # the first job is still PENDING: passed over
    schedule.refresh_from_db()
    assert schedule.next_run_at > timezone.now() - timedelta(seconds=1)  # not stuck due
    Job.objects.filter(id=first.id).update(status=JobStatus.COMPLETED)
    Schedule.objects.filter(id=schedule.id).update(next_run_at=timezone.now())
    assert len(scheduling.tick()) == 1
    assert len(jobs_of(schedule)) == 2


@pytest.mark.django_db
def test_overlap_allow_fires_while_the_last_job_runs(tenant: Tenant) -> None:
    schedule = make_schedule(tenant)
    scheduling.tick()
    Schedule.objects.filter(id=schedule.id).update(next_run_at=timezone.now())
    assert len(scheduling.tick()) == 1


@pytest.mark.django_db
def test_a_broken_schedule_is_disabled_and_does_not_stop_the_others(
    tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    broken = make_schedule(
        tenant,
        next_run_at=timezone.now() - timedelta(seconds=5),
        job={"type": "sleep", "payload": {"delayMs": "soon"}},
    )
    gone = make_schedule(tenant, job={"type": "no_such_type", "payload": {}})
    fine = make_schedule(tenant)
    assert [job.schedule_id for job in scheduling.tick()] == [fine.id]
    for schedule in (broken, gone):
        schedule.refresh_from_db()
        assert schedule.enabled is False and schedule.next_run_at is None
        assert f"schedule {schedule.id} disabled" in caplog.text


@pytest.mark.django_db
def test_a_tenant_over_its_rate_limit_loses_the_due_time_not_others(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.rate_limit = 1
    tenant.save()
    limited = [make_schedule(tenant) for _ in range(3)]
    other = make_schedule(other_tenant)
    created = scheduling.tick()
    assert sum(job.tenant_id == tenant.id for job in created) == 1
    assert [job.schedule_id for job in created if job.tenant_id == other_tenant.id] == [other.id]
    for schedule in limited:
        schedule.refresh_from_db()
        assert schedule.next_run_at > timezone.now() - timedelta(seconds=1)  # passed over


@pytest.mark.django_db
def test_disabled_and_inactive_tenants_schedules_do_not_fire(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    make_schedule(tenant, enabled=False)
    other_tenant.is_active = False
    other_tenant.save()
    make_schedule(other_tenant)
    assert scheduling.tick() == []


@pytest.mark.django_db
def test_run_now_fires_one_job_marked_with_the_schedule(tenant: Tenant) -> None:
    schedule = make_schedule(tenant, next_run_at=timezone.now() + timedelta(hours=1))
    job = scheduling.run_now(schedule=schedule)
    assert job.schedule_id == schedule.id and job.status == JobStatus.PENDING
    schedule.refresh_from_db()
    assert schedule.next_run_at > timezone.now()  # unchanged
    assert schedule.last_job_id == job.id


# --- what an idle worker costs --------------------------------------------------------------
IDLE_CHECKS = 20


@pytest.mark.django_db
def test_an_idle_check_is_one_query(tenant: Tenant, capsys: pytest.CaptureFixture) -> None:
    now = timezone.now()
    Schedule.objects.bulk_create(
        Schedule(
            tenant=tenant,
            name=f"later-{i}",
            every=3600,
            job=SLEEP_JOB,
            enabled=i % 2 == 0,
            next_run_at=now + timedelta(minutes=10 + i) if i % 2 == 0 else None,
            created_at=now,
            updated_at=now,
        )
        for i in range(1000)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_schedule")  # as autovacuum would have, for a real plan
    started = time.perf_counter()
    with CaptureQueriesContext(connection) as queries:
        for _ in range(IDLE_CHECKS):
            assert scheduling.tick() == []
    per_check_ms = (time.perf_counter() - started) * 1000 / IDLE_CHECKS
    assert len(queries) == IDLE_CHECKS
    sql = queries[0]["sql"]
    assert "LIMIT 1" in sql and "jobs_schedule" in sql
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}")
        plan = " / ".join(row[0].strip() for row in cursor.fetchall())
    with capsys.disabled():
        print(
            f"\nidle schedule check, 1,000 schedules not due: {len(queries) // IDLE_CHECKS} query"
            f" per check, {per_check_ms:.2f} ms per check; plan: {plan}"
        )


@pytest.mark.django_db(transaction=True)
def test_a_worker_checks_at_most_once_a_second(
    redis_prefix: str, capsys: pytest.CaptureFixture
) -> None:
    # The schedule loop uses none of the upkeep's stores.
    upkeep = Upkeep(
        name="idle-test",
        queue=None,  # type: ignore[arg-type]
        jobs=None,  # type: ignore[arg-type]
        transitions=None,  # type: ignore[arg-type]
        lease_s=30,
        reconcile_interval_s=30,
    )

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(upkeep.fire_schedules_forever())
        await asyncio.sleep(seconds)
        task.cancel()

    started = time.monotonic()
    asyncio.run(run_for(3.5))
    elapsed = time.monotonic() - started
    # One check just after each whole second of the clock: at most one per second (and it
    # keeps checking; a loaded machine may delay a wake-up, hence not "exactly 3").
    assert 2 <= upkeep.schedule_checks <= int(elapsed) + 1
    with capsys.disabled():
        print(f"\nidle worker: {upkeep.schedule_checks} schedule checks in {elapsed:.1f} s")


# --- the production request path ------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
async def test_schedules_and_their_jobs_on_the_lean_path(api_key: str, settings: Any) -> None:
    """/schedules goes through the lean handler like /jobs (JSON in and out, no CSRF token),
    and a scheduled job reads back with scheduleId and scheduledFor from psycopg's path."""
    settings.JOBS = {**settings.JOBS, "API_STORE": "postgres"}
    async with asgi_api(api_key) as api:
        created = await api.post("/schedules", json=schedule_body(every=1))
        assert created.status_code == 201, created.text
        path = f"/schedules/{created.json()['id']}"
        await sync_to_async(
            Schedule.objects.filter(id=created.json()["id"]).update, thread_sensitive=True
        )(next_run_at=timezone.now().replace(microsecond=0))
        (job,) = await sync_to_async(scheduling.tick)()
        read = (await api.get(f"/jobs/{job.id}")).json()
        assert read["scheduleId"] == created.json()["id"]
        assert read["scheduledFor"] is not None
        listed = (await api.get("/schedules")).json()["schedules"]
        assert [s["id"] for s in listed] == [created.json()["id"]]
        patched = await api.patch(path, json={"overlap": "skip"})
        assert patched.status_code == 200 and patched.json()["overlap"] == "skip"
        assert (await api.delete(path)).status_code == 204
        assert (await api.get(path)).status_code == 404
        # The lean handler's JSON 405 (Django's own handler answers it in HTML).
        wrong = await api.put("/schedules")
        assert wrong.status_code == 405 and wrong.json()["details"] == {"allowed": ["GET", "POST"]}
