"""`manage.py rebuild_job_counts [--check]`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.counts import job_counts_drift, job_counts_rebuild


class Command(BaseCommand):
    help = (
        "Recount jobs into the per-status counts that /metrics reads (kept by database triggers; "
        "needed only after they were bypassed, e.g. a data-only restore with triggers disabled). "
        "Writes of jobs wait while it counts. --check only compares, exiting 1 on a difference."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--check", action="store_true", help="compare the kept counts with a real count only"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["check"]:
            drift = job_counts_drift()
            for (status, job_type), (kept, exact) in sorted(drift.items()):
                self.stdout.write(f"{status} {job_type}: kept {kept}, counted {exact}")
            if drift:
                raise CommandError("job counts differ: run rebuild_job_counts")
            self.stdout.write("Job counts are exact.")
            return
        counts = job_counts_rebuild()
        self.stdout.write(f"Rebuilt job counts: {sum(counts.values())} jobs.")
