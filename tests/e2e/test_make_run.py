"""`make run` (scripts/run.py) as a newcomer uses it: embedded SQLite or a PostgreSQL database it
creates, a private Redis, migrations, the demo tenant and key, the API and a worker; the README's
`manage.py` commands in another shell; and every way of stopping it."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from django.conf import settings
from dotenv import dotenv_values
from psycopg import sql
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.processes import child_pids, is_running
from tests.support.stack import ROOT, free_port, wait_until

RUN_PY = ROOT / "scripts" / "run.py"
# What `make run` sets or writes itself; a user's shell has none of them.
MAKE_RUN_VARIABLES = ("SECRET_KEY", "DEBUG", "DATABASE_URL", "REDIS_URL", "JOBS_REDIS_PREFIX")
ADMIN_PASSWORD = "correct-horse-battery-9137"


@dataclass
class MakeRun:
    """One `make run` (or scripts/run.py) process, its output in `log_path`."""

    process: subprocess.Popen[bytes]
    log_path: Path
    var_dir: Path
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def key(self, timeout: float = 90) -> str:
        """The demo key, once printed."""
        match = wait_until(
            lambda: re.search(r"export KEY=(\S+)", self.log()) or self.process.poll() is not None,
            timeout=timeout,
            message="no demo key printed",
        )
        assert isinstance(match, re.Match), self.log()
        return match.group(1)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.log()}") from None


def user_shell(var_dir: Path) -> dict[str, str]:
    """The environment of a shell the user opens next to `make run`'s (JOBS_VAR_DIR aside: the
    test's var/ is not the default one)."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_RUN_VARIABLES}
    env.pop("PYTEST_CURRENT_TEST", None)
    return {**env, "JOBS_VAR_DIR": str(var_dir), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def start_make_run(tmp_path: Path) -> Iterator[Callable[..., MakeRun]]:
    """Start scripts/run.py (or `command`) with the given environment on top of a user's shell;
    whatever still runs at the end is stopped."""
    started: list[MakeRun] = []

    def start(*command: str, **env: str) -> MakeRun:
        port = free_port()
        var_dir = tmp_path / "var"
        log_path = tmp_path / f"make-run-{len(started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                list(command) or [sys.executable, str(RUN_PY)],
                cwd=ROOT,
                env={**user_shell(var_dir), "PORT": str(port), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = MakeRun(process, log_path, var_dir, port)
        started.append(run)
        return run

    yield start
    for run in started:
        for signum, seconds in ((signal.SIGTERM, 45), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if run.process.poll() is None:
                run.process.send_signal(signum)
                try:
                    run.process.wait(timeout=seconds)
                except subprocess.TimeoutExpired:
                    continue


def create_job(run: MakeRun, key: str, delay_ms: int) -> str:
    def created() -> str | None:
        try:
            response = httpx.post(
                f"{run.base_url}/jobs",
                json={"type": "sleep", "payload": {"delayMs": delay_ms}},
                headers={"Authorization": f"Bearer {key}"},
                timeout=5,
            )
        except httpx.HTTPError:
            return None
        return response.json()["id"] if response.status_code == 201 else None

    return wait_until(created, timeout=30, message="POST /jobs never succeeded")


def job_status(run: MakeRun, key: str, job_id: str) -> dict[str, object]:
    response = httpx.get(
        f"{run.base_url}/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=5
    )
    return response.json()


def test_make_run_serves_the_walkthrough_and_the_admin_and_stops_cleanly(
    start_make_run: Callable[..., MakeRun], redis_prefix: str, redis_client: redis.Redis
) -> None:
    # As on a fresh clone: no REDIS_URL, no DATABASE_URL, no DEBUG. (The prefix only tells this
    # run's keys apart, should any reach the machine's Redis.)
    run = start_make_run(JOBS_REDIS_PREFIX=redis_prefix)
    key = run.key()

    job_id = create_job(run, key, delay_ms=100)
    job = wait_until(
        lambda: (j := job_status(run, key, job_id))["status"] == "COMPLETED" and j,
        timeout=30,
        message="the job did not complete",
    )
    assert job["tenantId"] == "demo" and job["result"] == {"sleptMs": 100}
    assert (run.var_dir / "jobs.sqlite3").exists()

    # The README's admin step, typed in another shell: no DEBUG, no SECRET_KEY there.
    createsuperuser = ("createsuperuser", "--noinput", "--username", "admin")
    created = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *createsuperuser, "--email", "a@example.com"],
        cwd=ROOT,
        env={**user_shell(run.var_dir), "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    assert created.stderr == ""
    with httpx.Client(base_url=run.base_url, timeout=10) as browser:
        assert browser.get("/admin/login/").status_code == 200
        admin = browser.post(
            "/admin/login/?next=/admin/",
            data={
                "username": "admin",
                "password": ADMIN_PASSWORD,
                "csrfmiddlewaretoken": browser.cookies["csrftoken"],
                "next": "/admin/",
            },
            follow_redirects=True,
        )
        assert admin.status_code == 200 and admin.url.path == "/admin/", admin.text[:2000]
        assert "Site administration" in admin.text
        # "View site" leads to a page that exists.
        assert 'href="/dashboard/">View site' in admin.text
        assert browser.get("/dashboard/").status_code == 200

    # Ctrl-C: an open WebSocket is told the server is going away (1001), not dropped (1006).
    with connect(f"ws://127.0.0.1:{run.port}/ws?token={key}", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "CONNECTED"
        run.process.send_signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=45)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert run.wait(timeout=45) == 0
    log = run.log()
    assert "Traceback" not in log and "objects imported automatically" not in log
    assert "Stopping: the worker finishes its running jobs" in log and "Stopped." in log
    # Its Redis was a private one: nothing left in the machine's.
    assert list(redis_client.scan_iter(match=f"{redis_prefix}:*")) == []


def test_the_next_make_run_reuses_the_key_and_the_secret_key_and_prints_no_stray_line(
    start_make_run: Callable[..., MakeRun],
) -> None:
    first = start_make_run(JOBS_API_PROCESSES="1")
    key = first.key()
    first.process.send_signal(signal.SIGINT)
    assert first.wait(timeout=45) == 0
    secret_key = dotenv_values(first.var_dir / "run.env")["SECRET_KEY"]

    second = start_make_run(JOBS_API_PROCESSES="1")

    assert second.key() == key
    assert dotenv_values(second.var_dir / "run.env")["SECRET_KEY"] == secret_key
    # The key's check once went through `manage.py shell`, which announced its auto-imports.
    assert "objects imported automatically" not in second.log()


def test_a_second_ctrl_c_stops_at_once_and_puts_the_running_job_back(
    start_make_run: Callable[..., MakeRun],
) -> None:
    run = start_make_run(JOBS_API_PROCESSES="1")
    key = run.key()
    job_id = create_job(run, key, delay_ms=20_000)
    wait_until(
        lambda: job_status(run, key, job_id)["status"] == "RUNNING",
        timeout=30,
        message="the job did not start",
    )

    run.process.send_signal(signal.SIGINT)
    wait_until(
        lambda: "stop signal: finishing running jobs" in run.log(),
        timeout=10,
        message="the worker was not asked to stop",
    )
    second = time.monotonic()
    run.process.send_signal(signal.SIGINT)

    assert run.wait(timeout=30) == 0
    assert time.monotonic() - second < 10, "the second Ctrl-C did not stop at once"
    with sqlite3.connect(run.var_dir / "jobs.sqlite3") as db:
        rows = db.execute("SELECT status, attempts FROM jobs_job").fetchall()
    assert rows == [("PENDING", 0)]  # put back, the attempt not counted


def test_a_process_that_exits_on_its_own_is_named_and_make_run_exits_1(
    start_make_run: Callable[..., MakeRun],
) -> None:
    run = start_make_run(JOBS_API_PROCESSES="1")
    run.key()
    worker = wait_until(
        lambda: next(
            (pid for pid in child_pids(run.process.pid) if b"runworker_jobs" in cmdline(pid)),
            None,
        ),
        timeout=10,
        message="no worker process",
    )

    os.kill(worker, signal.SIGKILL)

    assert run.wait(timeout=45) == 1
    log = run.log()
    assert "make run: the worker exited on its own with signal SIGKILL" in log
    assert "stopping the API" in log
    assert not child_pids(run.process.pid)


@pytest.mark.parametrize("to", ["make alone", "the terminal's process group"])
def test_one_sigint_to_make_run_is_one_graceful_stop(
    start_make_run: Callable[..., MakeRun], to: str
) -> None:
    # The terminal's Ctrl-C signals the whole foreground group; a supervisor (an IDE's stop
    # button, `timeout -s INT`) signals the process it started, make, alone.
    run = start_make_run("make", "--no-print-directory", "run", JOBS_API_PROCESSES="1")
    run.key(timeout=110)
    [script] = child_pids(run.process.pid)  # run.py itself: no shell, no `uv run` between
    assert b"scripts/run.py" in cmdline(script)

    if to == "make alone":
        run.process.send_signal(signal.SIGINT)
    else:
        os.killpg(run.process.pid, signal.SIGINT)  # make leads its session's group

    run.wait(timeout=45)
    assert not is_running(script)
    log = run.log()
    assert "Stopping: the worker finishes its running jobs" in log
    assert "Stopping now" not in log, "one Ctrl-C was taken for two"


@pytest.fixture
def fresh_database_url() -> Iterator[str]:
    """A PostgreSQL URL naming a database that does not exist yet on the test server; the
    database is dropped at the end if something created it."""
    db = settings.DATABASES["default"]
    params = {
        "host": db["HOST"] or "127.0.0.1",
        "port": db["PORT"] or 5432,
        "user": db["USER"],
        "password": db["PASSWORD"] or None,
    }
    name = f"jobs_mkrun_{uuid.uuid4().hex[:12]}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    yield f"postgres://{auth}@{params['host']}:{params['port']}/{name}"
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_make_run_creates_a_missing_postgresql_database(
    start_make_run: Callable[..., MakeRun], fresh_database_url: str
) -> None:
    name = fresh_database_url.rsplit("/", 1)[1]
    run = start_make_run(DATABASE_URL=fresh_database_url, JOBS_API_PROCESSES="1")

    key = run.key(timeout=110)
    run.process.send_signal(signal.SIGINT)

    assert run.wait(timeout=45) == 0, run.log()
    log = run.log()
    assert f"Database: created the database {name} on " in log
    assert key.startswith("jq_") and "Traceback" not in log


def test_make_run_says_in_one_line_when_postgresql_does_not_answer(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, str(RUN_PY)],
        cwd=ROOT,
        env={
            **user_shell(tmp_path / "var"),
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/jobs",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr == ""
    first, stopped = result.stdout.splitlines()
    assert first.startswith(f"make run: PostgreSQL does not answer at 127.0.0.1:{port} (")
    assert "Start it (" in first and stopped == "Stopped."


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""
