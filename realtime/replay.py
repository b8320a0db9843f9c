"""A tenant's changes after a cursor, read from the database: what `/ws` replays on a SUBSCRIBE
with `cursor` and what `/events` sends (realtime/consumers.py, realtime/sse.py).

The read stops at a watermark (jobs/cursors.py): a cursor up to which every change is committed,
so the cursor reached is a point the reader can resume from without a gap. Replays a client asks
for come out of its tenant's replay budget (realtime/limits.py), shared by all its sockets and
streams on every API process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings

from jobs import cursors
from jobs.orm import orm
from jobs.selectors import job_changes_after
from realtime.broadcast import job_update_message
from realtime.limits import take_replay_rows


class CursorAheadError(ValueError):
    """A cursor beyond every change this server has made (from another deployment or made up)."""

    def __init__(self) -> None:
        super().__init__("the cursor is ahead of every change this server has")


@dataclass(frozen=True, slots=True)
class Replay:
    """The JOB_UPDATE frames of the changes after a cursor, in cursor order, and the cursor the
    reader holds every change up to once it has them (the last frame's if the read was cut at
    its limit). `proven`: a watermark bounded the read (without one, transactions were still
    running after cursors.WAIT_S, and nothing beyond the cursor asked for is proven).
    `budget_spent`: the tenant's replay budget was empty, nothing was read; `retry_after_ms`
    says when it has rows again."""

    frames: list[dict[str, Any]]
    resume: int
    truncated: bool
    proven: bool = True
    budget_spent: bool = False
    retry_after_ms: int = 0


@orm
def changes_after(tenant_id: str, after: int, limit: int, *, proven_only: bool = False) -> Replay:
    """The current state of each of the tenant's jobs whose last change is after `after`, up to
    a watermark and at most `limit` of them. Raises CursorAheadError for a cursor beyond the
    watermark. `proven_only`: read nothing when no watermark could be taken."""
    upto = cursors.watermark()
    if upto is not None and after > upto:
        raise CursorAheadError()
    if upto is None and proven_only:
        return Replay([], after, truncated=False, proven=False)
    jobs = job_changes_after(tenant_id=tenant_id, after=after, upto=upto, limit=limit)
    truncated = len(jobs) >= limit > 0
    # Without a watermark (transactions still running), nothing beyond `after` is proven.
    proven = after if upto is None else upto
    resume = jobs[-1].cursor if truncated else proven
    frames = [job_update_message(job) for job in jobs]
    return Replay(frames, resume, truncated, proven=upto is not None)


async def replay_changes(tenant_id: str, after: int, *, proven_only: bool = False) -> Replay:
    """`changes_after` as much as the tenant's replay budget allows (at most
    SINCE_REPLAY_LIMIT); rows it did not need go back to the budget."""
    limit, retry_ms = await take_replay_rows(tenant_id, settings.JOBS["SINCE_REPLAY_LIMIT"])
    if limit == 0:
        return Replay([], after, truncated=True, budget_spent=True, retry_after_ms=retry_ms)
    try:
        replay = await changes_after(tenant_id, after, limit, proven_only=proven_only)
    except Exception:
        await take_replay_rows(tenant_id, -limit)
        raise
    if len(replay.frames) < limit:
        await take_replay_rows(tenant_id, len(replay.frames) - limit)
    return replay
