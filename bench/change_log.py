"""What the event change log costs a write (jobs_jobchange, migration 0007).

One `UPDATE` of a batch of jobs, as the worker's outcome writer makes them, timed in four
settings interleaved round by round, so that a noisy machine weighs on all of them alike:

- `off`: the change-log trigger disabled (the cost of everything else);
- `none`: no event subscription anywhere (the trigger probes one small table and returns);
- `other`: another tenant has a subscription (the trigger filters the batch, logs nothing);
- `own`: the batch's tenant has one (every row is logged with its JSON snapshot).

    cd bench && DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres uv run python change_log.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

from common import setup_django, write_results

MODES = ("off", "none", "other", "own")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500, help="jobs per UPDATE (default 500)")
    parser.add_argument("--rounds", type=int, default=25, help="rounds of the four settings")
    args = parser.parse_args()
    setup_django("jobqueue_bench_change_log")
    from django.db import connection

    with connection.cursor() as cursor:
        results = measure(cursor, rows=args.rows, rounds=args.rounds)
    base = results["off"]
    for mode in MODES:
        print(
            f"{mode:6s} median {results[mode] * 1000:7.2f} ms per UPDATE of {args.rows} jobs"
            f"  ({results[mode] / base:.3f}x off)"
        )
    write_results("change_log", {"rows": args.rows, "rounds": args.rounds, "median_s": results})


def measure(cursor: Any, *, rows: int, rounds: int) -> dict[str, float]:
    cursor.execute("DELETE FROM jobs_eventsubscription")
    cursor.execute("DELETE FROM jobs_jobchange")
    cursor.execute("DELETE FROM jobs_job WHERE tenant_id IN ('bench-a', 'bench-b')")
    cursor.execute(
        "INSERT INTO jobs_tenant (id, name, is_active, created_at) VALUES "
        "('bench-a', '', true, now()), ('bench-b', '', true, now()) ON CONFLICT DO NOTHING"
    )
    ids = [uuid.uuid4() for _ in range(rows)]
    cursor.execute(
        "INSERT INTO jobs_job (id, tenant_id, type, payload, status, priority, attempts, "
        "max_attempts, run_at, created_at, updated_at) SELECT i, 'bench-a', 'sleep', "
        "'{\"delayMs\": 1}', 'PENDING', 0, 0, 3, now(), now(), now() FROM unnest(%s::uuid[]) i",
        [ids],
    )
    timings: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for _ in range(rounds):
            for mode in MODES:
                timings[mode].append(one_round(cursor, mode, ids))
    finally:
        cursor.execute("ALTER TABLE jobs_job ENABLE TRIGGER jobs_jobchange_update")
        cursor.execute("DELETE FROM jobs_eventsubscription")
        cursor.execute("DELETE FROM jobs_jobchange")
        cursor.execute("DELETE FROM jobs_job WHERE tenant_id IN ('bench-a', 'bench-b')")
    return {mode: statistics.median(values) for mode, values in timings.items()}


def one_round(cursor: Any, mode: str, ids: list[uuid.UUID]) -> float:
    """Seconds per UPDATE of every job in `ids`, in setting `mode` (the mean of four)."""
    cursor.execute("DELETE FROM jobs_eventsubscription")
    switch = "DISABLE" if mode == "off" else "ENABLE"
    cursor.execute(f"ALTER TABLE jobs_job {switch} TRIGGER jobs_jobchange_update")
    if mode in ("other", "own"):
        cursor.execute(
            "INSERT INTO jobs_eventsubscription (id, tenant_id, url, events, description, "
            "created_at, cursor) VALUES (%s, %s, 'https://example.com/', '[\"job.*\"]', '', "
            "now(), 0)",
            [uuid.uuid4(), "bench-a" if mode == "own" else "bench-b"],
        )
    statuses = ("RUNNING", "COMPLETED", "PENDING", "RUNNING")
    started = time.perf_counter()
    for status in statuses:
        cursor.execute(
            "UPDATE jobs_job SET status = %s, updated_at = now() WHERE id = ANY(%s)", [status, ids]
        )
    elapsed = (time.perf_counter() - started) / len(statuses)
    cursor.execute("DELETE FROM jobs_jobchange")
    return elapsed


if __name__ == "__main__":
    main()
