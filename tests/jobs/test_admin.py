"""The operator's admin: job browsing, bulk retry/cancel through the services, API keys."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.admin import EstimatedCountPaginator
from jobs.models import ApiKey, Job, JobStatus, Schedule, SigningSecret, Tenant
from jobs.queue import Keys
from jobs.selectors import signing_secrets_live
from jobs.services import (
    JobSpec,
    api_key_authenticate,
    api_key_create,
    hash_api_key,
    job_enqueue,
    schedule_create,
    tenant_create,
)
from jobs.signing import fingerprint
from tests.support.jobs import make_job
from tests.support.stack import wait_until
from tests.support.updates import listen_to_tenant

pytestmark = pytest.mark.django_db

RAW_KEY_PATTERN = re.compile(r"jq_[0-9a-f]{12}_[A-Za-z0-9_\-]{20,}")
JOBS_URL = "/admin/jobs/job/"


EMAIL = {"type": "email", "payload": {"to": "ops@example.com", "subject": "hi", "body": "hello"}}


def email_job(tenant: Tenant, *, status: str = JobStatus.PENDING, **fields: Any) -> Job:
    """An email job row in any state, written directly (the admin must cope with every state)."""
    return make_job(tenant, status=status, **{**EMAIL, **fields})


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def action(client: Client, url: str, name: str, objects: list[Any]) -> Any:
    return client.post(
        url,
        {"action": name, "_selected_action": [str(o.pk) for o in objects]},
        follow=True,
    )


# --- jobs ---------------------------------------------------------------------------------------
def test_job_changelist_shows_jobs_with_filters_and_tenant_link(
    admin_client: Client, tenant: Tenant
) -> None:
    underscored = Tenant.objects.create(id="acme_corp", name="Acme")
    job = email_job(tenant, status=JobStatus.FAILED, error="boom", attempts=3)
    make_job(underscored, payload={"delayMs": 10})

    response = admin_client.get(JOBS_URL)

    assert response.status_code == 200
    content = response.content.decode()
    assert str(job.id) in content
    assert "3/3" in content  # attempts/max_attempts
    assert "?status__exact=FAILED" in content
    assert "?type=sleep" in content or "type__exact=sleep" in content
    assert "tenant__id__exact=acme_corp" in content
    # The tenant column links to the tenant's page, even for ids the admin must escape.
    assert '<a href="/admin/jobs/tenant/tenant-1/change/">tenant-1</a>' in content
    assert admin_client.get("/admin/jobs/tenant/acme_5Fcorp/change/").status_code == 200

    filtered = admin_client.get(JOBS_URL, {"status__exact": "FAILED"})
    assert [j.id for j in filtered.context["cl"].result_list] == [job.id]


def test_job_search_matches_an_exact_uuid_or_tenant_id(
    admin_client: Client, tenant: Tenant, other_tenant: Tenant
) -> None:
    first = email_job(tenant)
    second = email_job(tenant)
    theirs = email_job(other_tenant)

    by_id = admin_client.get(JOBS_URL, {"q": str(second.id)})
    by_id_upper = admin_client.get(JOBS_URL, {"q": f"  {str(first.id).upper()} "})
    by_tenant = admin_client.get(JOBS_URL, {"q": "tenant-2"})
    by_two_ids = admin_client.get(JOBS_URL, {"q": f"{first.id} {theirs.id}"})
    by_garbage = admin_client.get(JOBS_URL, {"q": "not-a-uuid-or-tenant"})

    def ids(response: Any) -> set[uuid.UUID]:
        assert response.status_code == 200
        return {j.id for j in response.context["cl"].result_list}

    assert ids(by_id) == {second.id}
    assert ids(by_id_upper) == {first.id}
    assert ids(by_tenant) == {theirs.id}
    assert ids(by_two_ids) == {first.id, theirs.id}
    assert ids(by_garbage) == set()


def test_big_job_changelist_uses_the_row_estimate_instead_of_counting(
    admin_client: Client, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the row estimate comes from PostgreSQL's statistics")
    for _ in range(3):
        email_job(tenant, status=JobStatus.FAILED)
    email_job(tenant, status=JobStatus.COMPLETED)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_job")
    # Pretend 4 rows is big: the real threshold needs a table too large for a test.
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 1)

    with CaptureQueriesContext(connection) as queries:
        unfiltered = admin_client.get(JOBS_URL)
    filtered = admin_client.get(JOBS_URL, {"status__exact": "FAILED"})

    counts = [q["sql"] for q in queries.captured_queries if "COUNT(*)" in q["sql"]]
    assert counts == []
    assert unfiltered.context["cl"].result_count == 4
    assert filtered.context["cl"].result_count == 3


def test_job_change_page_is_read_only_with_pretty_escaped_json(
    admin_client: Client, tenant: Tenant
) -> None:
    job = email_job(
        tenant,
        status=JobStatus.FAILED,
        payload={"to": "a@example.com", "html": "<b>hi</b>", "nested": {"n": 1}},
        result={"sent": 0},
        error="Traceback <script>alert(1)</script>",
    )
    url = f"{JOBS_URL}{job.id}/change/"

    response = admin_client.get(url)

    assert response.status_code == 200
    content = response.content.decode()
    # Indented JSON in a <pre>, HTML escaped (keys sorted, so "html" comes first).
    assert "<pre>{\n  &quot;html&quot;: &quot;&lt;b&gt;hi&lt;/b&gt;&quot;," in content
    assert "\n  &quot;nested&quot;: {\n    &quot;n&quot;: 1\n  }," in content
    assert "<pre>{\n  &quot;sent&quot;: 0\n}</pre>" in content
    assert "<pre>Traceback &lt;script&gt;alert(1)&lt;/script&gt;</pre>" in content
    assert "<script>alert(1)</script>" not in content
    assert 'name="_save"' not in content

    # Jobs change only through services: no add page, and a posted form is refused.
    assert admin_client.post(url, {"status": "COMPLETED"}).status_code == 403
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert admin_client.get(f"{JOBS_URL}add/").status_code == 403


@pytest.mark.django_db(transaction=True)
def test_retry_action_requeues_failed_jobs_in_redis_and_skips_others(
    admin_client: Client, tenant: Tenant, redis_client: Any, redis_prefix: str
) -> None:
    failed = email_job(tenant, status=JobStatus.FAILED, attempts=3, error="boom")
    completed = email_job(tenant, status=JobStatus.COMPLETED, result={"sent": 1})
    ready_key = Keys(redis_prefix).ready(tenant.id)
    assert redis_client.zscore(ready_key, str(failed.id)) is None

    response = action(admin_client, JOBS_URL, "retry_selected", [failed, completed])

    assert response.status_code == 200
    assert messages_of(response) == ["1 job retried, 1 skipped (not FAILED or CANCELLED)."]
    failed.refresh_from_db()
    assert failed.status == JobStatus.PENDING
    assert failed.attempts == 0
    assert failed.error is None
    assert failed.finished_at is None
    # Committed, then pushed after commit by the service: a worker can claim it again.
    assert redis_client.zscore(ready_key, str(failed.id)) is not None
    completed.refresh_from_db()
    assert completed.status == JobStatus.COMPLETED
    assert redis_client.zscore(ready_key, str(completed.id)) is None


def test_cancel_action_cancels_pending_jobs_and_removes_them_from_redis(
    admin_client: Client,
    tenant: Tenant,
    redis_client: Any,
    redis_prefix: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        pending, _ = job_enqueue(
            tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": 1000})
        )
    done = email_job(tenant, status=JobStatus.COMPLETED)
    ready_key = Keys(redis_prefix).ready(tenant.id)
    assert redis_client.zscore(ready_key, str(pending.id)) is not None

    with django_capture_on_commit_callbacks(execute=True):
        response = action(admin_client, JOBS_URL, "cancel_selected", [pending, done])

    assert messages_of(response) == [
        "1 job cancelled, 1 skipped (not WAITING, PENDING or RUNNING)."
    ]
    pending.refresh_from_db()
    assert pending.status == JobStatus.CANCELLED
    assert pending.finished_at is not None
    assert redis_client.zscore(ready_key, str(pending.id)) is None
    done.refresh_from_db()
    assert done.status == JobStatus.COMPLETED


def test_action_with_nothing_applicable_warns(admin_client: Client, tenant: Tenant) -> None:
    done = email_job(tenant, status=JobStatus.COMPLETED)

    response = action(admin_client, JOBS_URL, "cancel_selected", [done])

    assert messages_of(response) == [
        "0 jobs cancelled, 1 skipped (not WAITING, PENDING or RUNNING)."
    ]
    assert "warning" in response.content.decode()


# --- tenants ------------------------------------------------------------------------------------
def test_tenant_page_lists_its_api_keys_read_only(admin_client: Client, tenant: Tenant) -> None:
    key, raw_key = api_key_create(tenant=tenant, name="deploy bot")

    listing = admin_client.get("/admin/jobs/tenant/", {"q": "tenant-1"})
    page = admin_client.get(f"/admin/jobs/tenant/{tenant.id}/change/")

    assert listing.status_code == 200
    assert [t.id for t in listing.context["cl"].result_list] == ["tenant-1"]
    content = page.content.decode()
    assert key.prefix in content
    assert "deploy bot" in content
    assert raw_key not in content
    assert key.key_hash not in content
    # The id is the tenant's identity in Redis and on the wire: it cannot be renamed here.
    assert 'name="id"' not in content


def test_tenant_can_be_added_in_the_admin(admin_client: Client, db: None) -> None:
    response = admin_client.post(
        "/admin/jobs/tenant/add/",
        {
            "id": "new-tenant",
            "name": "New",
            "is_active": "on",
            "max_concurrency": "4",
            "rate_limit": "",
            "api_keys-TOTAL_FORMS": "0",
            "api_keys-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 302
    assert Tenant.objects.get(id="new-tenant").max_concurrency == 4


# --- signing secrets ----------------------------------------------------------------------------
SECRET_PATTERN = re.compile(r"whsec_[A-Za-z0-9+/]{43}=")


def test_adding_a_tenant_shows_its_first_signing_secret_once(
    admin_client: Client, db: None
) -> None:
    response = admin_client.post(
        "/admin/jobs/tenant/add/",
        {
            "id": "acme",
            "name": "Acme",
            "is_active": "on",
            "api_keys-TOTAL_FORMS": "0",
            "api_keys-INITIAL_FORMS": "0",
        },
        follow=True,
    )

    shown = [m for m in messages_of(response) if "signing secret" in m]
    assert len(shown) == 1 and "will not be shown again" in shown[0]
    match = SECRET_PATTERN.search(shown[0])
    assert match is not None
    assert signing_secrets_live(tenant_id="acme") == [(match.group(0), None)]


def test_rotate_action_shows_the_new_secret_once_and_never_lists_secrets(
    admin_client: Client,
) -> None:
    tenant = tenant_create(tenant_id="acme")
    untouched = tenant_create(tenant_id="other")
    ((old, _),) = signing_secrets_live(tenant_id="acme")

    response = action(admin_client, "/admin/jobs/tenant/", "rotate_signing_secret", [tenant])

    shown = [m for m in messages_of(response) if "signing secret" in m]
    assert len(shown) == 1 and "the previous one signs until" in shown[0]
    match = SECRET_PATTERN.search(shown[0])
    assert match is not None
    new = match.group(0)
    assert [s for s, _ in signing_secrets_live(tenant_id="acme")] == [new, old]
    assert SigningSecret.objects.get(secret=old).expires_at is not None
    assert SigningSecret.objects.get(tenant=untouched).expires_at is None
    # Never again in clear: the tenant list and page show fingerprints only.
    page = admin_client.get(f"/admin/jobs/tenant/{tenant.id}/change/").content.decode()
    listing = admin_client.get("/admin/jobs/tenant/").content.decode()
    for secret in (old, new):
        assert secret not in page and secret not in listing
        assert fingerprint(secret) in page


# --- API keys -----------------------------------------------------------------------------------
def test_adding_an_api_key_shows_the_full_key_once_and_stores_only_its_hash(
    admin_client: Client, tenant: Tenant
) -> None:
    form = admin_client.get("/admin/jobs/apikey/add/").content.decode()
    assert 'name="tenant"' in form
    assert 'name="name"' in form
    assert 'name="prefix"' not in form
    assert 'name="key_hash"' not in form

    response = admin_client.post(
        "/admin/jobs/apikey/add/",
        {"tenant": tenant.id, "name": "ci", "_continue": "1"},
        follow=True,
    )

    assert response.status_code == 200
    shown = [m for m in messages_of(response) if "Copy it now" in m]
    assert len(shown) == 1
    assert "it will not be shown again" in shown[0]
    match = RAW_KEY_PATTERN.search(shown[0])
    assert match is not None
    raw_key = match.group(0)
    key = ApiKey.objects.get()
    assert key.tenant == tenant
    assert key.name == "ci"
    assert raw_key.startswith(f"jq_{key.prefix}_")
    assert key.key_hash == hash_api_key(raw_key)
    assert raw_key not in {key.prefix, key.key_hash, key.name}
    assert api_key_authenticate(raw_key=raw_key) == tenant
    # "Save and continue" went on to the created row's page: the admin's obj is that row.
    assert response.redirect_chain[-1][0] == f"/admin/jobs/apikey/{key.pk}/change/"
    # Shown once: neither the list nor the key's page shows it again.
    assert raw_key not in admin_client.get("/admin/jobs/apikey/").content.decode()
    detail = admin_client.get(f"/admin/jobs/apikey/{key.pk}/change/")
    assert raw_key not in detail.content.decode()
    assert key.key_hash not in detail.content.decode()


def test_api_key_change_form_edits_only_the_name(admin_client: Client, tenant: Tenant) -> None:
    key, raw_key = api_key_create(tenant=tenant, name="old")
    url = f"/admin/jobs/apikey/{key.pk}/change/"
    used_at = timezone.now() - timedelta(hours=1)
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=used_at)

    page = admin_client.get(url).content.decode()
    assert 'name="name"' in page
    assert 'name="prefix"' not in page
    assert 'name="revoked_at"' not in page

    response = admin_client.post(url, {"name": "renamed", "prefix": "hijack", "revoked_at": ""})

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.name == "renamed"
    assert raw_key.startswith(f"jq_{key.prefix}_")
    assert key.last_used_at == used_at
    assert api_key_authenticate(raw_key=raw_key) == tenant


def test_revoke_action_revokes_keys(admin_client: Client, tenant: Tenant) -> None:
    live, live_raw = api_key_create(tenant=tenant)
    dead, dead_raw = api_key_create(tenant=tenant)
    dead.revoked_at = timezone.now() - timedelta(days=1)
    dead.save(update_fields=["revoked_at"])
    assert api_key_authenticate(raw_key=live_raw) == tenant

    response = action(admin_client, "/admin/jobs/apikey/", "revoke_selected", [live, dead])

    assert messages_of(response) == ["1 key revoked, 1 already revoked."]
    live.refresh_from_db()
    assert live.revoked_at is not None
    assert api_key_authenticate(raw_key=live_raw) is None
    assert api_key_authenticate(raw_key=dead_raw) is None


@pytest.mark.django_db(transaction=True)
def test_tenant_changelist_shows_queue_depth(admin_client: Any, redis_prefix: str) -> None:
    from jobs.services import JobSpec, job_enqueue_batch

    tenant = Tenant.objects.create(id="deep")
    job_enqueue_batch(tenant=tenant, specs=[JobSpec(type="sleep", payload={"delayMs": 1})] * 3)
    response = admin_client.get("/admin/jobs/tenant/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'class="field-queue_ready">3<' in html
    assert 'class="field-queue_delayed">0<' in html


@pytest.mark.django_db(transaction=True)
def test_admin_actions_broadcast_the_state_changes(admin_client: Client, tenant: Tenant) -> None:
    failed = email_job(tenant, status=JobStatus.FAILED, attempts=3, error="boom")
    pending, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": 1}))
    with listen_to_tenant(tenant.id) as listener:
        action(admin_client, JOBS_URL, "retry_selected", [failed])
        action(admin_client, JOBS_URL, "cancel_selected", [pending])
        wait_until(
            lambda: (
                listener.statuses(str(failed.id)) == ["PENDING"]
                and listener.statuses(str(pending.id)) == ["CANCELLED"]
            ),
            timeout=5,
            message=f"updates seen: {listener.updates}",
        )


# --- schedules ----------------------------------------------------------------------------------
SCHEDULES_URL = "/admin/jobs/schedule/"


def a_schedule(tenant: Tenant, **values: Any) -> Schedule:
    job = {"type": "sleep", "payload": {"delayMs": 1}}
    return schedule_create(
        tenant=tenant, values={"name": "nightly", "every": 3600, "job": job, **values}
    )


def test_schedules_list_shows_next_run_and_enable_disable_actions(
    admin_client: Client, tenant: Tenant
) -> None:
    schedule = a_schedule(tenant)
    page = admin_client.get(SCHEDULES_URL)
    assert page.status_code == 200
    assert b"nightly" in page.content and b"every 3600 s" in page.content

    response = action(admin_client, SCHEDULES_URL, "disable_selected", [schedule])
    assert "1 schedule disabled." in messages_of(response)
    schedule.refresh_from_db()
    assert schedule.enabled is False and schedule.next_run_at is None

    action(admin_client, SCHEDULES_URL, "enable_selected", [schedule])
    schedule.refresh_from_db()
    assert schedule.enabled is True and schedule.next_run_at > timezone.now()


def test_run_now_fires_one_job_shown_on_the_schedule_page(
    admin_client: Client, tenant: Tenant, django_capture_on_commit_callbacks: Any
) -> None:
    schedule = a_schedule(tenant)
    planned = schedule.next_run_at
    with django_capture_on_commit_callbacks(execute=True):
        response = action(admin_client, SCHEDULES_URL, "run_now", [schedule])
    assert "1 job created." in messages_of(response)
    (job,) = Job.objects.filter(schedule_id=schedule.id)
    assert job.status == JobStatus.PENDING and job.tenant_id == tenant.id
    schedule.refresh_from_db()
    assert schedule.next_run_at == planned and schedule.last_job_id == job.id
    page = admin_client.get(f"{SCHEDULES_URL}{schedule.id}/change/")
    assert page.status_code == 200
    assert str(job.id).encode() in page.content
