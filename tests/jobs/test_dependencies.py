"""Workflows (SPEC section 13): jobs that depend on other jobs. Graphs run in order through the
worker in this process, the release of 1,000 dependents is a few statements in one transaction,
an ended dependency cancels its whole subtree, and the API validates and replays graphs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.core import mail
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pydantic import BaseModel, ConfigDict

from jobs import dependencies, lifecycle
from jobs.counts import job_counts
from jobs.handlers.registry import JobContext, PermanentError, register, unregister
from jobs.models import Job, JobDependency, JobStatus, Tenant
from jobs.selectors import tenant_queue_depths
from jobs.services import JobSpec, job_cancel, job_enqueue, job_enqueue_batch
from tests.support.api import asgi_api, assert_error, get, post
from tests.support.updates import listen_to_tenant
from tests.support.worker import run_burst

pytestmark = pytest.mark.django_db(transaction=True)

PROBE = "dependency_probe"
SLEEP = {"type": "sleep", "payload": {"delayMs": 0}}


class ProbePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    fail: bool = False


@pytest.fixture
def runs() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """A job type that records (name, dependency results) when it runs, in the order run."""
    seen: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    @register(PROBE, schema=ProbePayload, timeout_s=10)
    def probe(payload: ProbePayload, ctx: JobContext) -> dict[str, str]:
        with lock:
            seen.append((payload.name, dict(ctx.dependency_results)))
        if payload.fail:
            raise PermanentError(f"{payload.name} broke")
        return {"name": payload.name}

    yield seen
    unregister(PROBE)


def probe(tenant: Tenant, name: str, *after: Job, fail: bool = False) -> Job:
    spec = JobSpec(
        type=PROBE,
        payload={"name": name, "fail": fail},
        depends_on=tuple(str(job.id) for job in after),
    )
    job, _ = job_enqueue(tenant=tenant, spec=spec)
    return job


def ready_in_redis(tenant: Tenant) -> int:
    return tenant_queue_depths(tenant_ids=[tenant.id])[tenant.id].ready


def status_of(*jobs: Job) -> list[str]:
    by_id = dict(Job.objects.filter(id__in=[j.id for j in jobs]).values_list("id", "status"))
    return [by_id[job.id] for job in jobs]


def test_a_diamond_runs_in_order_with_its_dependencies_results(
    tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    a = probe(tenant, "A")
    b = probe(tenant, "B", a)
    c = probe(tenant, "C", a)
    d = probe(tenant, "D", b, c)
    assert status_of(a, b, c, d) == ["PENDING", "WAITING", "WAITING", "WAITING"]
    # WAITING jobs are in no queue: only A is ready.
    assert ready_in_redis(tenant) == 1

    run_burst()

    assert status_of(a, b, c, d) == ["COMPLETED"] * 4
    order = [name for name, _ in runs]
    assert order[0] == "A" and order[-1] == "D" and sorted(order[1:3]) == ["B", "C"]
    results = dict(runs)
    assert results["B"] == {str(a.id): {"name": "A"}}
    assert results["D"] == {str(b.id): {"name": "B"}, str(c.id): {"name": "C"}}
    assert Job.objects.get(id=d.id).depends_on == [str(b.id), str(c.id)]


def test_a_failed_dependency_cancels_the_whole_subtree_naming_the_dependency(
    tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    a = probe(tenant, "A", fail=True)
    b = probe(tenant, "B", a)
    c = probe(tenant, "C", b)
    d = probe(tenant, "D", a, c)
    unrelated = probe(tenant, "E")

    run_burst()

    assert [name for name, _ in runs] == ["A", "E"] or [n for n, _ in runs] == ["E", "A"]
    assert status_of(a, b, c, d, unrelated) == [
        "FAILED",
        "CANCELLED",
        "CANCELLED",
        "CANCELLED",
        "COMPLETED",
    ]
    errors = dict(Job.objects.filter(id__in=[b.id, c.id, d.id]).values_list("id", "error"))
    assert errors[b.id] == f"dependency {a.id} failed"
    assert errors[c.id] == f"dependency {b.id} was cancelled"
    # D waited for A and C: either names an ended dependency.
    assert errors[d.id] in (f"dependency {a.id} failed", f"dependency {c.id} was cancelled")
    assert not JobDependency.objects.filter(open=True).exists()


def test_cancelling_a_waiting_job_cancels_its_dependents_and_spares_its_parent(
    client: Client, api_key: str, tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    a = probe(tenant, "A")
    b = probe(tenant, "B", a)
    c = probe(tenant, "C", b)

    response = post(client, f"/jobs/{b.id}/cancel", {}, api_key)

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "CANCELLED"
    assert status_of(a, b, c) == ["PENDING", "CANCELLED", "CANCELLED"]
    assert Job.objects.get(id=c.id).error == f"dependency {b.id} was cancelled"
    run_burst()
    assert [name for name, _ in runs] == ["A"]
    assert status_of(a, b, c) == ["COMPLETED", "CANCELLED", "CANCELLED"]


def test_cancelling_a_running_parent_cancels_its_dependents(tenant: Tenant) -> None:
    parent, _ = job_enqueue(tenant=tenant, spec=JobSpec(**SLEEP))  # type: ignore[arg-type]
    child = probe(tenant, "child", parent)
    Job.objects.filter(id=parent.id).update(status=JobStatus.RUNNING)

    job_cancel(tenant=tenant, job_id=parent.id)

    assert status_of(child) == ["CANCELLED"]
    assert Job.objects.get(id=child.id).error == f"dependency {parent.id} was cancelled"


def test_ended_dependencies_at_creation_count_as_done_or_cancel_at_once(tenant: Tenant) -> None:
    done = probe(tenant, "done")
    failed = probe(tenant, "failed")
    Job.objects.filter(id=done.id).update(status=JobStatus.COMPLETED)
    Job.objects.filter(id=failed.id).update(status=JobStatus.FAILED)

    ready = probe(tenant, "ready", done)
    doomed = probe(tenant, "doomed", done, failed)

    assert status_of(ready, doomed) == ["PENDING", "CANCELLED"]
    assert Job.objects.get(id=doomed.id).error == f"dependency {failed.id} failed"
    assert ready_in_redis(tenant) == 3  # done, failed (made by hand) and ready


def test_1000_children_of_one_parent_are_released_in_one_transaction(tenant: Tenant) -> None:
    parent = probe(tenant, "parent")
    children = job_enqueue_batch(
        tenant=tenant,
        specs=[JobSpec(**SLEEP, depends_on=(str(parent.id),))] * 1000,  # type: ignore[arg-type]
    )
    assert {job.status for job in children} == {JobStatus.WAITING}
    Job.objects.filter(id=parent.id).update(status=JobStatus.COMPLETED)

    started = time.perf_counter()
    with CaptureQueriesContext(connection) as queries:
        settled = dependencies.settle([parent.id])
    elapsed_ms = (time.perf_counter() - started) * 1000
    lifecycle.publish_settled(settled)

    statements = [q["sql"].strip() for q in queries.captured_queries]
    print(f"released 1000 children: {len(statements) - 2} statements, {elapsed_ms:.1f} ms")
    # One transaction: claim the parent, close its edges, count its children down, release
    # the ones at 0.
    assert statements[0] == "BEGIN" and statements[-1] == "COMMIT"
    assert len(statements) == 2 + 4
    assert len(settled.released) == 1000 and not settled.cancelled
    assert Job.objects.filter(status=JobStatus.PENDING, tenant=tenant).count() == 1000
    assert ready_in_redis(tenant) == 1001  # the parent was completed by hand
    # Settled once: a second settlement (the sweep) finds nothing to do.
    assert not dependencies.settle([parent.id]) and dependencies.unsettled() == []


def test_a_dependency_ended_without_settling_is_settled_by_the_sweep(
    tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    parent = probe(tenant, "parent")
    child = probe(tenant, "child", parent)
    # An end written by a path that did not settle (a crash right after the final write).
    Job.objects.filter(id=parent.id).update(status=JobStatus.COMPLETED, finished_at=timezone.now())
    assert dependencies.unsettled() == [parent.id]

    run_burst()  # a burst settles at start-up, then runs what it released

    assert status_of(child) == ["COMPLETED"]
    assert dependencies.unsettled() == []


# --- the API --------------------------------------------------------------------------------------
def test_job_on_the_wire_shows_depends_on_and_waiting(
    client: Client, api_key: str, tenant: Tenant
) -> None:
    parent = post(client, "/jobs", SLEEP, api_key).json()
    response = post(client, "/jobs", {**SLEEP, "dependsOn": [parent["id"]]}, api_key)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "WAITING" and body["dependsOn"] == [parent["id"]]
    assert post(client, "/jobs", SLEEP, api_key).json()["dependsOn"] == []

    listed = get(client, "/jobs", api_key, status="WAITING").json()
    assert [job["id"] for job in listed["jobs"]] == [body["id"]]
    stats = get(client, "/stats", api_key).json()
    assert stats["jobs"]["WAITING"] == 1 and stats["jobs"]["PENDING"] == 2


def test_graph_batch_with_references_is_idempotent(
    client: Client, api_key: str, tenant: Tenant
) -> None:
    hooks = [
        {"type": "sleep", "payload": {"delayMs": n}} for n in range(3)
    ]  # stand-ins for webhooks
    graph = {"jobs": [*hooks, {**SLEEP, "dependsOn": ["$0", "$1", "$2"]}]}

    first = post(client, "/jobs/batch", graph, api_key, **{"Idempotency-Key": "graph-1"})
    again = post(client, "/jobs/batch", graph, api_key, **{"Idempotency-Key": "graph-1"})
    other = post(client, "/jobs/batch", {"jobs": hooks}, api_key, **{"Idempotency-Key": "graph-1"})

    assert first.status_code == 201, first.content
    assert again.status_code == 200 and again.json() == first.json()
    assert_error(other, 409, "Idempotency-Key was already used with a different request")
    ids = first.json()["jobIds"]
    assert Job.objects.filter(tenant=tenant).count() == 4
    last = Job.objects.get(id=ids[3])
    assert last.status == JobStatus.WAITING and last.depends_on == ids[:3]
    assert last.dependencies_left == 3


def test_dependency_validation(
    client: Client, api_key: str, tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs, _ = job_enqueue(tenant=other_tenant, spec=JobSpec(**SLEEP))  # type: ignore[arg-type]
    unknown = str(uuid.uuid4())

    for ref in (unknown, str(theirs.id)):
        body = assert_error(post(client, "/jobs", {**SLEEP, "dependsOn": [ref]}, api_key), 400)
        # The other tenant's job is answered exactly like a job that does not exist.
        assert body["details"] == [{"field": "dependsOn.0", "message": "no such job"}]
    forward = {"jobs": [SLEEP, {**SLEEP, "dependsOn": ["$5"]}]}
    body = assert_error(post(client, "/jobs/batch", forward, api_key), 400)
    assert body["details"][0]["field"] == "jobs.1.dependsOn.0"
    assert "earlier item" in body["details"][0]["message"]
    itself = {"jobs": [{**SLEEP, "dependsOn": ["$0"]}]}
    assert_error(post(client, "/jobs/batch", itself, api_key), 400)
    assert_error(post(client, "/jobs", {**SLEEP, "dependsOn": ["$0"]}, api_key), 400)
    assert_error(post(client, "/jobs", {**SLEEP, "dependsOn": ["nope"]}, api_key), 400)
    many = [str(uuid.uuid4()) for _ in range(101)]
    assert_error(post(client, "/jobs", {**SLEEP, "dependsOn": many}, api_key), 400)
    assert not Job.objects.filter(tenant=tenant).exists()
    assert Job.objects.get(id=theirs.id).dependents_waiting is False


def test_admin_job_page_shows_parents_and_children(admin_client: Client, tenant: Tenant) -> None:
    parent = probe(tenant, "parent")
    child = probe(tenant, "child", parent)

    parent_page = admin_client.get(f"/admin/jobs/job/{parent.id}/change/").content.decode()
    child_page = admin_client.get(f"/admin/jobs/job/{child.id}/change/").content.decode()
    waiting_list = admin_client.get("/admin/jobs/job/", {"status__exact": "WAITING"})

    assert f"/admin/jobs/job/{child.id}/change/" in parent_page and "WAITING" in parent_page
    assert f"/admin/jobs/job/{parent.id}/change/" in child_page and "PENDING" in child_page
    assert str(child.id) in waiting_list.content.decode()
    assert str(parent.id) not in waiting_list.content.decode()


async def test_the_event_loop_path_creates_and_shows_dependencies(
    settings: Any, api_key: str, tenant: Tenant
) -> None:
    settings.JOBS = {**settings.JOBS, "API_STORE": "postgres"}
    async with asgi_api(api_key) as api:
        parent = (await api.post("/jobs", json=SLEEP)).json()
        created = await api.post("/jobs", json={**SLEEP, "dependsOn": [parent["id"]]})
        graph = await api.post(
            "/jobs/batch", json={"jobs": [SLEEP, {**SLEEP, "dependsOn": ["$0", parent["id"]]}]}
        )
        child = (await api.get(f"/jobs/{created.json()['id']}")).json()
        last = (await api.get(f"/jobs/{graph.json()['jobIds'][1]}")).json()

    assert created.status_code == 201 and created.json()["status"] == "WAITING"
    assert child["status"] == "WAITING" and child["dependsOn"] == [parent["id"]]
    assert graph.status_code == 201, graph.text
    assert last["dependsOn"] == [graph.json()["jobIds"][0], parent["id"]]
    assert parent["dependsOn"] == []


def test_an_email_after_its_dependencies_carries_their_results(tenant: Tenant) -> None:
    sums = [
        job_enqueue(
            tenant=tenant,
            spec=JobSpec(type="data_processing", payload={"values": [n, 1], "operations": ["sum"]}),
        )[0]
        for n in (1, 2)
    ]
    email = {
        "to": "ops@example.com",
        "subject": "sums",
        "body": "Both done.",
        "includeDependencyResults": True,
    }
    job_enqueue(
        tenant=tenant,
        spec=JobSpec(type="email", payload=email, depends_on=tuple(str(j.id) for j in sums)),
    )

    run_burst()

    assert len(mail.outbox) == 1
    body = mail.outbox[0].body
    assert body.startswith("Both done.\n\nResults of the jobs this email waited for:\n")
    assert f'{sums[0].id}: {{"sum": 2.0}}' in body and f'{sums[1].id}: {{"sum": 3.0}}' in body


def test_a_deep_chain_is_cancelled_in_a_fixed_number_of_statements(tenant: Tenant) -> None:
    specs = [JobSpec(**SLEEP)]  # type: ignore[arg-type]
    specs += [JobSpec(**SLEEP, depends_on=(f"${i}",)) for i in range(299)]  # type: ignore[arg-type]
    head, *chain = job_enqueue_batch(tenant=tenant, specs=specs)
    Job.objects.filter(id=head.id).update(status=JobStatus.FAILED)

    with CaptureQueriesContext(connection) as queries:
        settled = dependencies.settle([head.id])

    assert len(settled.cancelled) == 299
    # BEGIN, claim, read the subtree, close its edges, cancel it, clear the flags, COMMIT.
    assert len(queries) == 7
    errors = dict(Job.objects.filter(id__in=[j.id for j in chain]).values_list("id", "error"))
    assert errors[chain[0].id] == f"dependency {head.id} failed"
    assert errors[chain[-1].id] == f"dependency {chain[-2].id} was cancelled"
    assert dependencies.unsettled() == []


def test_released_jobs_whose_redis_push_was_lost_are_queued_by_reconciliation(
    tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    parent = probe(tenant, "parent")
    children = [probe(tenant, f"child-{n}", parent) for n in range(3)]
    Job.objects.filter(id=parent.id).update(status=JobStatus.COMPLETED)
    # Released and committed, then the process dies before its Redis call.
    settled = dependencies.settle([parent.id])
    assert len(settled.released) == 3 and ready_in_redis(tenant) == 1  # the parent's old entry

    run_burst()  # a burst reconciles at start-up

    assert status_of(*children) == ["COMPLETED"] * 3
    assert sorted(name for name, _ in runs) == ["child-0", "child-1", "child-2"]


def test_waiting_release_and_cancel_are_broadcast_and_counted(
    tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    with listen_to_tenant(tenant.id) as listener:
        parent = probe(tenant, "parent")
        child = probe(tenant, "child", parent)
        doomed_parent = probe(tenant, "doomed-parent", fail=True)
        doomed = probe(tenant, "doomed", doomed_parent)
        assert job_counts()[("WAITING", PROBE)] == 2

        run_burst()
        listener.settle(0.3)

    assert listener.statuses(str(child.id)) == ["WAITING", "PENDING", "RUNNING", "COMPLETED"]
    assert listener.statuses(str(doomed.id)) == ["WAITING", "CANCELLED"]
    assert job_counts()[("WAITING", PROBE)] == 0
    assert job_counts()[("CANCELLED", PROBE)] == 1


def test_a_dependent_created_while_its_dependency_runs_is_released(
    tenant: Tenant, runs: list[tuple[str, dict[str, Any]]]
) -> None:
    made: list[Job] = []

    @register("dependency_spawner", schema=ProbePayload, timeout_s=10)
    def spawner(payload: ProbePayload, ctx: JobContext) -> dict[str, str]:
        # The claim said no job waits for this one; now one does.
        made.append(probe(Tenant.objects.get(id=ctx.tenant), "late", Job(id=ctx.job_id)))
        connection.close()
        return {"name": payload.name}

    try:
        job_enqueue(tenant=tenant, spec=JobSpec(type="dependency_spawner", payload={"name": "p"}))
        run_burst()
    finally:
        unregister("dependency_spawner")

    assert made and made[0].status == JobStatus.WAITING
    assert status_of(made[0]) == ["COMPLETED"]
    assert [name for name, _ in runs] == ["late"]
