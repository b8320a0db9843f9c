"""`cursors.watermark()` under concurrent writers, on the real PostgreSQL: every change with a
cursor up to the watermark is visible to the next statement (what /ws replays and /events rely
on to resume without a gap)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections
from django.utils import timezone

from jobs import cursors
from jobs.models import Job, Tenant

pytestmark = pytest.mark.django_db(transaction=True)


def test_every_change_up_to_the_watermark_is_visible(tenant: Tenant) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the watermark waits for PostgreSQL transactions")
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        # Inserts only: every cursor handed out stays on its row, so none may be missing.
        try:
            while not stop.is_set():
                now = timezone.now()
                Job.objects.bulk_create(
                    [
                        Job(
                            tenant=tenant,
                            type="sleep",
                            payload={},
                            run_at=now,
                            created_at=now,
                            updated_at=now,
                        )
                        for _ in range(4)
                    ]
                )
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)
        finally:
            connections.close_all()

    writers = [threading.Thread(target=write) for _ in range(4)]
    for writer in writers:
        writer.start()
    gaps: list[tuple[int, int, int]] = []
    checks = 0
    try:
        previous = cursors.watermark()
        assert previous is not None
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            upto = cursors.watermark()
            if upto is None:
                continue
            visible = Job.objects.filter(cursor__gt=previous, cursor__lte=upto).count()
            if visible != upto - previous:
                gaps.append((previous, upto, upto - previous - visible))
            previous, checks = upto, checks + 1
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert not failures, failures
    assert checks > 20
    assert gaps == [], f"{len(gaps)} of {checks} watermarks had changes not yet visible"
