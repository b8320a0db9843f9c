"""Workflows (SPEC section 13): jobs that run after other jobs complete.

Layout:
- `Job.depends_on`: the ids a job waits for, as shown on the wire.
- `JobDependency` (parent, child, open): the edges, read by parent. An edge is `open` while the
  child's `dependencies_left` counts that parent.
- `Job.dependencies_left`: how many of a WAITING job's dependencies have not ended.
- `Job.dependents_waiting`: jobs wait for this one (it has open edges). Set under the parent's
  row lock when a child is created; cleared when the parent's end is settled.

Creating a job with dependencies (`link`, in the creation's transaction) locks its parents'
rows (in id order), marks the unfinished ones, and decides the new job's status: WAITING while
any dependency is unfinished, PENDING when all are COMPLETED, CANCELLED at once when one has
FAILED or was CANCELLED. A parent that finishes meanwhile waits for that lock, so it sees the
new edge; a parent that finished first is seen finished.

Settling (`settle`) is what a dependency's end does to its dependents, in set-based statements
whose cost is proportional to the edges concerned, never to the waiting jobs (ids travel as
arrays, read by primary key or by the edges' parent index): a COMPLETED parent closes its open
edges, takes one off each child's count, and the children at 0 go WAITING -> PENDING (4
statements with the claim, however many children); a FAILED or CANCELLED parent cancels every
WAITING job below it, down the whole graph, with `error` naming the dependency that ended it (a
recursive read of the subtree, then its edges closed and its jobs cancelled: 4 or 5 statements,
however deep). Each parent is settled exactly once: the first statement clears its
`dependents_waiting` under its row lock, and only the parents it returns are settled.

Who settles, in the transaction of the final write: the API's cancel, and a worker writing
outcomes of jobs whose claim showed dependents. Right after the write, in a transaction of its
own: a dependent created while its dependency ran (the claim showed none), and the dependents
of a lease recovered as FAILED. The upkeep's sweep (`unsettled`) finds ended jobs whose flag is
still set through a small partial index and settles them: a crash before such a follow-up, any
other path that ends a job. The caller publishes what changed after commit.

PostgreSQL only (the statements use arrays, row locks and RETURNING); on SQLite (development) a
request with `dependsOn` is refused.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from jobs.errors import ApiError
from jobs.models import TERMINAL_STATUSES, Job, JobDependency, JobStatus

MAX_DEPENDENCIES = 100  # per job
MAX_BATCH_DEPENDENCIES = 10_000  # edges of one batch
SWEEP_LIMIT = 500
VALIDATION_FAILED = "Validation failed"
BATCH_REF = re.compile(r"\$(\d{1,4})")

TABLE = Job._meta.db_table
EDGES = JobDependency._meta.db_table
_FIELDS = [f.attname for f in Job._meta.concrete_fields]
_COLUMNS = ", ".join(f"j.{f.column}" for f in Job._meta.concrete_fields)
_TERMINAL = "('COMPLETED', 'FAILED', 'CANCELLED')"

# The status test of the jobs to change, written so that no index on status can serve it: they
# are found by id, never by a scan of the WAITING jobs (which stale statistics can make look
# cheap).
_IS_WAITING = "(j.status = 'WAITING') IS TRUE"
# Claims the ended parents (exactly once: the flag is cleared under the row lock). Also turns
# JIT compilation off for the rest of the transaction: the recursive statement's row estimates
# are far above the real counts, and compiling it cost more (200 ms) than running it.
_CLAIM = f"""
    UPDATE {TABLE} SET dependents_waiting = false
    WHERE id = ANY(%s::uuid[]) AND dependents_waiting AND status IN {_TERMINAL}
    RETURNING id, status, set_config('jit', 'off', true)
"""
# The open edges of the completed parents, closed: one child id per edge.
_CLOSE_EDGES = f"""
    UPDATE {EDGES} SET open = false WHERE parent_id = ANY(%s::uuid[]) AND open
    RETURNING child_id
"""
# Each WAITING child counted down by its closed edges. The ids come as arrays written into the
# statement, so the planner knows their number and reads the children by primary key.
_COUNT_DOWN = f"""
    UPDATE {TABLE} AS j SET dependencies_left = greatest(j.dependencies_left - v.n, 0)
    FROM unnest(%s::uuid[], %s::integer[]) AS v(id, n)
    WHERE j.id = v.id AND {_IS_WAITING}
    RETURNING j.id, j.dependencies_left
"""
_RELEASE = f"""
    UPDATE {TABLE} AS j SET status = 'PENDING', updated_at = %s, run_at = greatest(j.run_at, %s)
    WHERE j.id = ANY(%s::uuid[]) AND {_IS_WAITING} AND j.dependencies_left = 0
    RETURNING {_COLUMNS}
"""
# Every job reachable from the ended parents by open edges, with the dependency that reached
# it. UNION keeps each edge once however many paths lead to it; OFFSET 0 keeps the step a
# lookup of the edge index per job reached (joined as a whole, a deep chain had the planner
# scan the edges once per level).
_REACH = f"""
    WITH RECURSIVE reach(parent_id, child_id, parent_status) AS (
        SELECT e.parent_id, e.child_id, p.status::text
        FROM {EDGES} AS e JOIN {TABLE} AS p ON p.id = e.parent_id
        WHERE e.parent_id = ANY(%s::uuid[]) AND e.open
      UNION
        SELECT e.parent_id, e.child_id, 'CANCELLED'::text
        FROM reach AS r CROSS JOIN LATERAL (
            SELECT parent_id, child_id FROM {EDGES}
            WHERE parent_id = r.child_id AND open OFFSET 0
        ) AS e
    )
    SELECT parent_id, child_id, parent_status FROM reach
"""
_CLOSE_REACHED = f"""
    UPDATE {EDGES} AS e SET open = false
    FROM unnest(%s::uuid[], %s::uuid[]) AS v(parent_id, child_id)
    WHERE e.parent_id = v.parent_id AND e.child_id = v.child_id AND e.open
"""
_CANCEL = f"""
    UPDATE {TABLE} AS j SET status = 'CANCELLED', dependencies_left = 0, finished_at = %s,
        updated_at = %s, error = v.error
    FROM unnest(%s::uuid[], %s::text[]) AS v(id, error)
    WHERE j.id = v.id AND {_IS_WAITING}
    RETURNING {_COLUMNS}
"""
# The cancelled jobs whose own dependents are all settled now. Their rows are locked since the
# cancel, so no new dependent can appear meanwhile; one created before is seen (its edge is
# open) and left for the sweep.
_CLEAR_SETTLED = f"""
    UPDATE {TABLE} AS j SET dependents_waiting = false
    WHERE j.id = ANY(%s::uuid[]) AND j.dependents_waiting
      AND NOT EXISTS (SELECT FROM {EDGES} AS e WHERE e.parent_id = j.id AND e.open)
"""
_UNSETTLED = f"""
    SELECT id FROM {TABLE} WHERE dependents_waiting AND status IN {_TERMINAL} LIMIT %s
"""
_RESULTS = f"SELECT id, result FROM {TABLE} WHERE id = ANY(%s::uuid[]) AND tenant_id = %s"


def supported() -> bool:
    return connection.vendor == "postgresql"


# --- creation -------------------------------------------------------------------------------------
def parse_ref(value: str, *, index: int | None) -> str:
    """One `dependsOn` entry as stored: a job id (canonical UUID text), or `$<n>` naming an
    earlier item of the same batch (`index` is the item's own; None outside a batch).
    Raises ValueError with a message for the client."""
    match = BATCH_REF.fullmatch(value)
    if match is not None:
        if index is None:
            raise ValueError("$<index> references are only allowed in POST /jobs/batch")
        if int(match.group(1)) >= index:
            raise ValueError("$<index> must name an earlier item of the batch")
        return f"${int(match.group(1))}"
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("must be a job id (UUID) or $<index> of an earlier batch item") from None


def _ended(job_id: uuid.UUID, status: str) -> str:
    return f"dependency {job_id} {'failed' if status == JobStatus.FAILED else 'was cancelled'}"


def link(
    *,
    tenant_id: str,
    jobs: Sequence[Job],
    depends_on: Sequence[Sequence[str]],
    locs: Sequence[tuple[Any, ...]],
    now: datetime,
) -> list[JobDependency]:
    """Inside the creation's transaction, before the INSERT: set each new job's dependencies,
    count and status (WAITING, PENDING or CANCELLED) from its parents' current states, and
    return the edges to insert after the jobs. `depends_on[i]` holds `parse_ref` values; an
    unknown id, or another tenant's, is the same 400 (nothing tells them apart)."""
    external = sorted({ref for refs in depends_on for ref in refs if not ref.startswith("$")})
    statuses: dict[str, str] = {}
    if external:
        # Locked in id order; the unfinished ones are marked, so that their end settles us.
        rows = list(
            Job.objects.select_for_update(no_key=True)
            .filter(tenant_id=tenant_id, id__in=external)
            .order_by("id")
            .values_list("id", "status")
        )
        statuses = {str(job_id): status for job_id, status in rows}
        unfinished = [job_id for job_id, status in rows if status not in TERMINAL_STATUSES]
        if unfinished:
            Job.objects.filter(id__in=unfinished, dependents_waiting=False).update(
                dependents_waiting=True
            )
    edges: list[JobDependency] = []
    for job, refs, loc in zip(jobs, depends_on, locs, strict=True):
        parents: list[tuple[uuid.UUID, str]] = []
        for position, ref in enumerate(refs):
            if ref.startswith("$"):
                parent = jobs[int(ref[1:])]
                parents.append((parent.id, parent.status))
            elif ref in statuses:
                parents.append((uuid.UUID(ref), statuses[ref]))
            else:
                field_name = ".".join(str(part) for part in (*loc, "dependsOn", position))
                raise ApiError(
                    400, VALIDATION_FAILED, [{"field": field_name, "message": "no such job"}]
                )
        job.depends_on = [str(parent_id) for parent_id, _ in parents]
        broken = next(
            ((pid, s) for pid, s in parents if s in TERMINAL_STATUSES and s != "COMPLETED"),
            None,
        )
        left = sum(1 for _, status in parents if status not in TERMINAL_STATUSES)
        if broken is not None:
            job.status, job.error, job.finished_at = JobStatus.CANCELLED, _ended(*broken), now
            left = 0
        elif left:
            job.status, job.dependencies_left = JobStatus.WAITING, left
        for parent_id, status in parents:
            counted = broken is None and status not in TERMINAL_STATUSES
            edges.append(JobDependency(parent_id=parent_id, child_id=job.id, open=counted))
        if broken is None:
            for ref in refs:
                if ref.startswith("$"):
                    jobs[int(ref[1:])].dependents_waiting = True
    return edges


def check_batch_size(depends_on: Sequence[Sequence[str]]) -> None:
    total = sum(len(refs) for refs in depends_on)
    if total > MAX_BATCH_DEPENDENCIES:
        raise ApiError(
            400,
            VALIDATION_FAILED,
            [
                {
                    "field": "jobs",
                    "message": f"a batch names at most {MAX_BATCH_DEPENDENCIES} dependencies "
                    f"in all (got {total})",
                }
            ],
        )


# --- settling -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Settled:
    """What settling changed: children released to PENDING, jobs cancelled down the graph."""

    released: list[Job] = field(default_factory=list)
    cancelled: list[Job] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.released or self.cancelled)

    def extend(self, other: Settled) -> None:
        self.released.extend(other.released)
        self.cancelled.extend(other.cancelled)


_JSON_POSITIONS = [
    i for i, f in enumerate(Job._meta.concrete_fields) if f.get_internal_type() == "JSONField"
]


def _json(value: Any) -> Any:
    # Django's own connections hand jsonb over as text (its fields decode it, raw rows do not).
    return json.loads(value) if isinstance(value, str) else value


def _jobs(rows: list[Sequence[Any]]) -> list[Job]:
    jobs = []
    for row in rows:
        values = list(row)
        for position in _JSON_POSITIONS:
            values[position] = _json(values[position])
        jobs.append(Job.from_db("default", _FIELDS, values))
    return jobs


def settle(parent_ids: Sequence[uuid.UUID | str]) -> Settled:
    """Settle the dependents of these ended jobs, in the caller's transaction (one of its own
    outside one). Parents not ended, or already settled, are skipped."""
    settled = Settled()
    if not parent_ids or not supported():
        return settled
    ids = sorted({str(job_id) for job_id in parent_ids})
    now = timezone.now()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_CLAIM, [ids])
        claimed = cursor.fetchall()
        completed = [job_id for job_id, status, _ in claimed if status == JobStatus.COMPLETED]
        ended = [job_id for job_id, status, _ in claimed if status != JobStatus.COMPLETED]
        if completed:
            settled.released = _release(cursor, completed, now)
        if ended:
            settled.cancelled = _cancel_down(cursor, ended, now)
    return settled


def _release(cursor: Any, parents: list[uuid.UUID], now: datetime) -> list[Job]:
    """Close the completed parents' open edges, count their children down, and release the
    children at 0: three statements whatever the number of children."""
    cursor.execute(_CLOSE_EDGES, [parents])
    counts = Counter(str(child_id) for (child_id,) in cursor.fetchall())
    if not counts:
        return []
    children = sorted(counts)
    cursor.execute(_COUNT_DOWN, [children, [counts[child] for child in children]])
    ready = sorted(str(job_id) for job_id, left in cursor.fetchall() if left == 0)
    if not ready:
        return []
    cursor.execute(_RELEASE, [now, now, ready])
    return _jobs(cursor.fetchall())


def _cancel_down(cursor: Any, parents: list[uuid.UUID], now: datetime) -> list[Job]:
    """Cancel every WAITING job below the ended parents, each naming one of its own
    dependencies that ended it: four statements whatever the size or depth of the subtree."""
    cursor.execute(_REACH, [parents])
    reached = cursor.fetchall()
    if not reached:
        return []
    cursor.execute(
        _CLOSE_REACHED,
        [[str(parent) for parent, _, _ in reached], [str(child) for _, child, _ in reached]],
    )
    # One reason per job: the dependency with the smallest id among those that reached it.
    reasons: dict[str, str] = {}
    for parent, child, status in sorted(reached, key=lambda row: (str(row[1]), str(row[0]))):
        reasons.setdefault(str(child), _ended(parent, status))
    victims = sorted(reasons)
    cursor.execute(_CANCEL, [now, now, victims, [reasons[victim] for victim in victims]])
    cancelled = _jobs(cursor.fetchall())
    with_dependents = [str(job.id) for job in cancelled if job.dependents_waiting]
    if with_dependents:
        cursor.execute(_CLEAR_SETTLED, [with_dependents])
    return cancelled


def unsettled(*, limit: int = SWEEP_LIMIT) -> list[uuid.UUID]:
    """Ended jobs whose dependents are not settled yet (read through a partial index)."""
    if not supported():
        return []
    with connection.cursor() as cursor:
        cursor.execute(_UNSETTLED, [limit])
        return [row[0] for row in cursor.fetchall()]


def sweep(*, limit: int = SWEEP_LIMIT) -> Settled:
    """Settle what a crash or another path left: the upkeep's durable follow-up."""
    return settle(unsettled(limit=limit))


# --- running ------------------------------------------------------------------------------------
def results(job: Job) -> dict[str, Any]:
    """`ctx.dependency_results`: the job's dependencies' results by id (a dependency pruned
    since is absent)."""
    if not job.depends_on:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(_RESULTS, [list(job.depends_on), job.tenant_id])
        found = {str(job_id): result for job_id, result in cursor.fetchall()}
    return {job_id: _json(found[job_id]) for job_id in job.depends_on if job_id in found}
