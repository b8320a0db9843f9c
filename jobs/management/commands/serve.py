"""`python manage.py serve`: parse options, run the Supervisor (one port, N Daphne processes)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.env import env_bool, env_int, env_str
from config.serve import ServeOptions, Supervisor, default_processes
from jobs.metrics import log_metrics_access


class Command(BaseCommand):
    # A server start (and each restart of it) should not pay for them: `manage.py check`.
    requires_system_checks: list[str] = []
    help = (
        "Serve the API and WebSockets on one port with several Daphne processes sharing its "
        "socket; SIGTERM/SIGINT stop them within the grace period. Options after `--` go to "
        "every Daphne."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host",
            default=env_str("HOST", "127.0.0.1"),
            help="address to bind, IPv4 or IPv6 (env HOST, default 127.0.0.1)",
        )
        parser.add_argument(
            "--port",
            type=int,
            default=env_int("PORT", 8000, minimum=0),
            help="port to bind (env PORT, default 8000)",
        )
        parser.add_argument(
            "--processes",
            type=int,
            default=env_int("JOBS_API_PROCESSES", default_processes(), minimum=1),
            help="Daphne processes (env JOBS_API_PROCESSES, default: the number of CPUs)",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=float(env_int("JOBS_API_GRACE_S", 30, minimum=0)),
            help="seconds open requests get after SIGTERM, then SIGKILL (env JOBS_API_GRACE_S, 30)",
        )
        parser.add_argument(
            "--proxy-headers",
            action="store_true",
            default=env_bool("JOBS_API_PROXY_HEADERS", False),
            help="take the client address from X-Forwarded-For/-Port, the scheme from "
            "X-Forwarded-Proto (env JOBS_API_PROXY_HEADERS)",
        )
        parser.add_argument("daphne_args", nargs="*", help="more daphne options, after `--`")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["processes"] < 1:
            raise CommandError("--processes must be at least 1")
        if not 0 <= options["port"] <= 65535:
            raise CommandError("--port must be 0-65535")
        if options["grace"] < 0:
            raise CommandError("--grace must not be negative")
        daphne_args = tuple(options["daphne_args"])
        if options["proxy_headers"]:
            daphne_args = ("--proxy-headers", *daphne_args)
        serve_options = ServeOptions(
            host=options["host"],
            port=options["port"],
            processes=options["processes"],
            grace_s=options["grace"],
            daphne_args=daphne_args,
        )
        log_metrics_access()
        sys.exit(asyncio.run(Supervisor(serve_options).run()))
