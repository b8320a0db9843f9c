"""`manage.py prune_jobs [--older-than 30d] [--batch-size 1000] [--dry-run]`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.maintenance import jobs_prune, parse_duration_arg


class Command(BaseCommand):
    help = (
        "Delete COMPLETED, FAILED and CANCELLED jobs that finished longer ago than --older-than, "
        "in batches. PENDING and RUNNING jobs are never touched. Safe to schedule (cron)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            default="30d",
            help="retention: 30d, 12h, 90m, 45s, 2w or plain seconds (default 30d)",
        )
        parser.add_argument(
            "--batch-size", type=int, default=1000, help="rows per DELETE (default 1000)"
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="only count the jobs that would be deleted"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # Parsed here, not with argparse's `type=`, so call_command(older_than="12h") works too.
        try:
            older_than = parse_duration_arg(str(options["older_than"]))
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        batch_size = int(options["batch_size"])
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        dry_run: bool = options["dry_run"]

        count = jobs_prune(older_than=older_than, batch_size=batch_size, dry_run=dry_run)
        what = f"{count} finished job{'' if count == 1 else 's'} older than {options['older_than']}"
        if dry_run:
            self.stdout.write(f"Would delete {what} (dry run).")
        else:
            self.stdout.write(f"Deleted {what}.")
