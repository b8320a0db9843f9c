"""Operator maintenance: pruning finished jobs past their retention period (whole partitions of
jobs_job where they can go at once, jobs/partitions.py, and row by row the rest)."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from django.utils import timezone

from jobs import partitions
from jobs.counts import job_counts_fold
from jobs.models import TERMINAL_STATUSES, Job

logger = logging.getLogger(__name__)

DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_PATTERN = re.compile(r"(\d+)\s*([smhdw]?)")


def parse_duration_arg(value: str) -> timedelta:
    """Parse `30d`, `12h`, `90m`, `45s`, `2w` or plain seconds (`3600`); raises ValueError."""
    match = DURATION_PATTERN.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid duration {value!r}: use a number with an optional unit s, m, h, d or w "
            "(e.g. 30d, 12h, 90m, 45s)"
        )
    amount, unit = match.groups()
    return timedelta(seconds=int(amount) * DURATION_UNITS_S[unit or "s"])


def jobs_prune(*, older_than: timedelta, batch_size: int, dry_run: bool) -> int:
    """Delete finished jobs whose `finished_at` is older than `older_than`; returns how many were
    deleted (or would be, with `dry_run`). On a partitioned jobs_job, a partition that lies
    before the cutoff and holds only such jobs is dropped whole; the rest go `batch_size` rows
    at a time. Also creates the partitions of this period and the next where missing."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = timezone.now() - older_than
    # PENDING and RUNNING jobs are never pruned, whatever their timestamps say.
    prunable = Job.objects.filter(status__in=TERMINAL_STATUSES, finished_at__lt=cutoff)
    if dry_run:
        return prunable.count()

    deleted = 0
    if partitions.enabled():
        partitions.partitions_ensure()
        deleted += partitions.partitions_drop_detached(cutoff=cutoff)
        for part in partitions.partitions():
            dropped = partitions.partition_drop(part, cutoff=cutoff)
            if dropped is not None:
                deleted += dropped
    while True:
        # order_by() drops the model's default ordering: no sort is needed to pick a batch.
        ids = list(prunable.order_by().values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        # The filter is repeated so a job retried since the SELECT (now PENDING) survives.
        _, per_model = prunable.filter(id__in=ids).delete()
        deleted += per_model.get(Job._meta.label, 0)
        if len(ids) < batch_size:
            break
    logger.info("pruned %d finished jobs with finished_at before %s", deleted, cutoff.isoformat())
    job_counts_fold()
    return deleted
