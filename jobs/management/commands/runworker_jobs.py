"""`python manage.py runworker_jobs`: parse options, start a Worker, exit with its code."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from config.memory import freeze_startup_objects
from jobs.worker import Worker, WorkerOptions, default_worker_name


class Command(BaseCommand):
    help = "Run a job worker: claims jobs from Redis and runs them until SIGTERM/SIGINT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency", "-c", type=int, default=10, help="jobs run at once (default 10)"
        )
        parser.add_argument(
            "--burst", action="store_true", help="exit when no runnable job is left"
        )
        parser.add_argument(
            "--name", default=None, help="worker name, unique per process (default host-pid-rand)"
        )
        parser.add_argument(
            "--max-jobs", type=int, default=None, help="exit cleanly after this many jobs"
        )
        parser.add_argument(
            "--max-memory-mb",
            type=int,
            default=None,
            help="exit cleanly once resident memory exceeds this (MiB)",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=30.0,
            help="seconds running jobs get to finish after SIGTERM (default 30)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["concurrency"] < 1:
            self.stderr.write("--concurrency must be at least 1")
            sys.exit(2)
        worker_options = WorkerOptions(
            name=options["name"] or default_worker_name(),
            concurrency=options["concurrency"],
            burst=options["burst"],
            max_jobs=options["max_jobs"],
            max_memory_mb=options["max_memory_mb"],
            grace_s=options["grace"],
        )
        freeze_startup_objects()
        sys.exit(asyncio.run(_run(worker_options)))


async def _run(options: WorkerOptions) -> int:
    worker = Worker(options)
    with worker.signal_handlers():
        return await worker.run()
