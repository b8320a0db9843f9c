"""`jobq`: the job queue from a shell.

    jobq [--url URL] [--key KEY] [--json] COMMAND ...

The service's URL and API key come from `--url`/`--key` or `JOBQ_URL`/`JOBQ_API_KEY`. Output
is a human table by default, JSON with `--json` (one object per line for `watch`). Exit status:
0 success, 1 the awaited job ended FAILED or CANCELLED, 2 usage error, 3 API or network error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, TextIO

import httpx

from jobqueue_client._calls import MAX_PAGE_SIZE, normalize_base_url
from jobqueue_client._version import __version__
from jobqueue_client.client import Client
from jobqueue_client.errors import JobQueueError
from jobqueue_client.models import STATUSES, Job, JobUpdate, format_time

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3

LIST_COLUMNS = ("id", "type", "status", "attempts", "priority", "created_at")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `jobq` with `argv` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    url = args.url or os.environ.get("JOBQ_URL")
    key = args.key or os.environ.get("JOBQ_API_KEY")
    if not url:
        parser.error("the service's URL is needed: --url or JOBQ_URL")
    if not key:
        parser.error("an API key is needed: --key or JOBQ_API_KEY")
    try:
        normalize_base_url(url)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "submit":
        args.payload = read_payload(parser, args.payload)
    try:
        with Client(url, key, timeout=args.timeout) as client:
            return COMMANDS[args.command](client, args, sys.stdout)
    except (JobQueueError, httpx.HTTPError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `jobq watch | head`: the reader left
            _silence_stdout()
            return EXIT_OK
        print(f"jobq: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    # The connection and output options work before or after the command (`jobq --json ls`,
    # `jobq ls --json`); on the command they default to SUPPRESS so as not to undo the former.
    def common(suppress: bool) -> argparse.ArgumentParser:
        default = argparse.SUPPRESS if suppress else None
        options = argparse.ArgumentParser(add_help=False)
        options.add_argument("--url", default=default, help="the service, e.g. http://host:8000")
        options.add_argument("--key", default=default, help="API key (default: $JOBQ_API_KEY)")
        options.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS if suppress else False,
            help="print JSON instead of a table",
        )
        options.add_argument(
            "--timeout",
            type=positive_float,
            default=argparse.SUPPRESS if suppress else 10.0,
            metavar="SECONDS",
            help="of each HTTP request (default 10)",
        )
        return options

    parser = argparse.ArgumentParser(
        prog="jobq",
        description="Submit, inspect and watch jobs of the job queue service.",
        epilog="URL and key default to $JOBQ_URL and $JOBQ_API_KEY. Exit status: 0 success, "
        "1 the awaited job ended FAILED or CANCELLED, 2 usage error, 3 API or network error.",
        parents=[common(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"jobq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = [common(suppress=True)]

    submit = commands.add_parser("submit", parents=shared, help="create a job")
    submit.add_argument("type", metavar="TYPE", help="email, webhook, sleep, data_processing, ...")
    submit.add_argument(
        "--payload",
        default="{}",
        metavar="JSON|@FILE",
        help="the payload as JSON, or @file to read it from a file (@- for stdin)",
    )
    submit.add_argument("--priority", type=int, help="-10 to 10, higher runs first")
    submit.add_argument("--delay-ms", type=int, metavar="N", help="run N ms from now")
    submit.add_argument("--max-attempts", type=int, metavar="N", help="1 to 25 (default 3)")
    submit.add_argument("--timeout-ms", type=int, metavar="N", help="lower the type's timeout")
    submit.add_argument("--idempotency-key", metavar="KEY", help="default: a new UUID")
    submit.add_argument(
        "--depends-on",
        action="append",
        metavar="ID",
        help="run after this job completes (repeatable)",
    )
    submit.add_argument(
        "--wait", action="store_true", help="wait for the job to finish; exit 1 unless COMPLETED"
    )
    submit.add_argument(
        "--wait-timeout", type=positive_float, metavar="SECONDS", help="give up waiting (exit 3)"
    )

    get = commands.add_parser("get", parents=shared, help="show one job")
    get.add_argument("id", metavar="ID")

    ls = commands.add_parser("ls", parents=shared, help="list jobs, newest first")
    ls.add_argument("--status", metavar="S", choices=STATUSES, help=", ".join(STATUSES))
    ls.add_argument("--type", metavar="T", help="a job type")
    ls.add_argument(
        "--limit", type=positive_int, default=20, metavar="N", help="at most N jobs (default 20)"
    )

    cancel = commands.add_parser(
        "cancel", parents=shared, help="cancel a WAITING, PENDING or RUNNING job (and dependents)"
    )
    cancel.add_argument("id", metavar="ID")

    retry = commands.add_parser("retry", parents=shared, help="run a FAILED or CANCELLED job again")
    retry.add_argument("id", metavar="ID")

    watch = commands.add_parser(
        "watch", parents=shared, help="print every update of the tenant's jobs as it happens"
    )
    watch.add_argument(
        "--cursor", metavar="C", help="start after this cursor (0: from the beginning)"
    )
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def read_payload(parser: argparse.ArgumentParser, text: str) -> Any:
    """`--payload`: JSON, `@file` or `@-` (stdin); a usage error if it is not JSON."""
    source = "--payload"
    if text.startswith("@"):
        source = text[1:]
        try:
            if source == "-":
                text = sys.stdin.read()
            else:
                with open(source, encoding="utf-8") as file:
                    text = file.read()
        except OSError as exc:
            parser.error(f"cannot read the payload: {exc}")
    try:
        return json.loads(text)
    except ValueError as exc:
        parser.error(f"{source} is not JSON: {exc}")


# --- commands: each returns the exit status ---------------------------------------------------


def cmd_submit(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = client.create(
        args.type,
        args.payload,
        priority=args.priority,
        delay_ms=args.delay_ms,
        max_attempts=args.max_attempts,
        timeout_ms=args.timeout_ms,
        depends_on=args.depends_on,
        idempotency_key=args.idempotency_key,
    )
    if not args.wait:
        print_job(job, args.json, out)
        return EXIT_OK
    if not args.json:
        print(f"created {job.id}; waiting for it to finish", file=sys.stderr)
    job = client.wait(job.id, timeout=args.wait_timeout)
    print_job(job, args.json, out)
    return EXIT_OK if job.status == "COMPLETED" else EXIT_JOB_FAILED


def cmd_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    print_job(client.get(args.id), args.json, out)
    return EXIT_OK


def cmd_ls(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    jobs = client.list(status=args.status, type=args.type, page_size=min(args.limit, MAX_PAGE_SIZE))
    chosen = list(islice(jobs, args.limit))
    if args.json:
        out.write(json.dumps([job.to_api() for job in chosen]) + "\n")
    else:
        rows = [[cell(getattr(job, name)) for name in LIST_COLUMNS] for job in chosen]
        print_table([name.upper().replace("_AT", "") for name in LIST_COLUMNS], rows, out)
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    print_job(client.cancel(args.id), args.json, out)
    return EXIT_OK


def cmd_retry(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    print_job(client.retry(args.id), args.json, out)
    return EXIT_OK


def cmd_watch(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    for update in client.watch(cursor=args.cursor):
        if args.json:
            out.write(json.dumps(update.to_api()) + "\n")
        else:
            out.write(update_line(update) + "\n")
        out.flush()
    return EXIT_OK


COMMANDS = {
    "submit": cmd_submit,
    "get": cmd_get,
    "ls": cmd_ls,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "watch": cmd_watch,
}


# --- output -------------------------------------------------------------------------------------


def print_job(job: Job, as_json: bool, out: TextIO) -> None:
    """One job: its API JSON, or one `field  value` line per field."""
    if as_json:
        out.write(json.dumps(job.to_api()) + "\n")
        return
    fields = job.to_api()
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        out.write(f"{name.ljust(width)}  {cell(value)}\n")


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO) -> None:
    rows = [list(header), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        out.write("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() + "\n")


def update_line(update: JobUpdate) -> str:
    parts = [
        format_time(update.updated_at) or "-",
        update.job_id,
        update.job_type or "-",
        update.status,
        f"attempts={update.attempts}",
    ]
    if update.progress is not None and not update.is_terminal:
        parts.append(f"progress={update.progress}%")
    if update.error:
        parts.append(f"error={one_line(update.error)}")
    if update.cursor is not None:
        parts.append(f"cursor={update.cursor}")
    return "  ".join(parts)


def cell(value: Any) -> str:
    """A value for a table cell: times in the API's spelling, JSON for structures."""
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return format_time(value) or "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return one_line(value)


def one_line(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
