"""Real processes for end-to-end tests: the API (`manage.py serve`) and `runworker_jobs` started
as subprocesses against the test database and this test's Redis prefix, plus the small helpers
every process test needs (a free port, a poll with a deadline, the health check)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
SECRET_KEY = "e2e-test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"


def free_port() -> int:
    """A local TCP port nothing listens on (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_database_url() -> str:
    """The URL of the database this test session runs on, for a subprocess to use."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def wait_until(predicate: Callable[[], Any], *, timeout: float, message: str) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s: {message}")


def healthy(base_url: str) -> bool:
    """Whether an API answers /health at `base_url`."""
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Stack:
    """Environment and processes of one end-to-end test; everything is stopped at the end."""

    env: dict[str, str]
    tmp: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def use_redis(self, url: str) -> None:
        """Point the processes started from now on at `url` (a private server, a Sentinel set)
        instead of the suite's Redis."""
        self.env["REDIS_URL"] = url

    def start_api(self, *args: str, processes: int = 1) -> subprocess.Popen:
        """`manage.py serve` on a free port (`args`: more of its options); returns the
        supervisor once /health answers."""
        self.port = free_port()
        return self.spawn_api("api", self.port, *args, processes=processes)

    def host(self, name: str) -> dict[str, str]:
        """The environment of a process "on another machine": its own working directory, local
        state (`JOBS_VAR_DIR`), temporary files and mail directory, under `tmp/hosts/<name>`;
        only the database, Redis and the settings are shared. Pass it as `env=`."""
        root = self.tmp / "hosts" / name
        for sub in ("tmp", "var", "mail"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return {
            **self.env,
            "TMPDIR": str(root / "tmp"),
            "JOBS_VAR_DIR": str(root / "var"),
            "EMAIL_URL": f"file://{root / 'mail'}",
        }

    def spawn_api(
        self,
        label: str,
        port: int,
        *args: str,
        processes: int = 1,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """`manage.py serve` on `port`, logged as `label`, once /health answers there (a second
        API, as on another host, takes a port of its own; `env`: `host(...)`'s)."""
        proc = self._spawn(
            label,
            [
                sys.executable,
                str(ROOT / "manage.py"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--processes",
                str(processes),
                *args,
            ],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url), timeout=30, message=f"{label} did not answer /health")
        return proc

    def start_worker(
        self, *args: str, name: str = "e2e-worker", env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        return self._spawn(
            name,
            [sys.executable, str(ROOT / "manage.py"), "runworker_jobs", "--name", name, *args],
            env=env,
        )

    def create_batch(self, key: str, jobs: list[dict[str, Any]]) -> list[str]:
        """Create jobs through `POST /jobs/batch`, 1,000 per call; their ids in order."""
        ids: list[str] = []
        for start in range(0, len(jobs), 1000):
            response = httpx.post(
                f"{self.base_url}/jobs/batch",
                json={"jobs": jobs[start : start + 1000]},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert response.status_code == 201, response.text
            ids.extend(response.json()["jobIds"])
        return ids

    def _spawn(
        self, label: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """`cmd` logged to `tmp/<label>.log`; with a `host(...)` environment, run from that
        host's own directory."""
        env = env or self.env
        hosts = self.tmp / "hosts"
        tmpdir = Path(env.get("TMPDIR", "/"))
        cwd = tmpdir.parent if tmpdir.parent.parent == hosts else ROOT
        log = open(self.tmp / f"{label}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def log(self, label: str) -> str:
        path = self.tmp / f"{label}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM everything; a second signal (cold stop) for what still runs after 3 s."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for signum, seconds in ((signal.SIGINT, 3), (signal.SIGKILL, 15)):
            deadline = time.monotonic() + seconds
            for proc in self.processes:
                try:
                    proc.wait(timeout=max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signum)
        for proc in self.processes:
            proc.wait()


def stack_env(*, redis_prefix: str, tmp: Path) -> dict[str, str]:
    """The environment of this test's processes: the test database, this test's Redis prefix,
    mail to files under `tmp`, short leases and retries, webhooks allowed to 127.0.0.1."""
    env = {
        **os.environ,
        "DATABASE_URL": session_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "JOBS_REDIS_PREFIX": redis_prefix,
        "SECRET_KEY": SECRET_KEY,
        "DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "JOBS_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "EMAIL_URL": f"file://{tmp / 'mail'}",
        "JOBS_LEASE_S": "2",
        "JOBS_RETRY_BASE_MS": "50",
        "JOBS_RETRY_MAX_MS": "200",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@contextmanager
def running_stack(*, redis_prefix: str, tmp: Path) -> Iterator[Stack]:
    """A Stack with nothing started yet; whatever the test starts is stopped at the end."""
    stack = Stack(env=stack_env(redis_prefix=redis_prefix, tmp=tmp), tmp=tmp)
    try:
        yield stack
    finally:
        stack.stop()


@contextmanager
def producing(stack: Stack, keys: list[str]) -> Iterator[tuple[list[str], list[str]]]:
    """20 ms sleep jobs created one by one (every 20 ms), the keys' tenants in turn, in a thread
    while the caller's block runs: (ids created, failures)."""
    created: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        with httpx.Client(timeout=15) as client:
            n = 0
            while not stop.is_set():
                key = keys[n % len(keys)]
                n += 1
                try:
                    response = client.post(
                        f"{stack.base_url}/jobs",
                        json={"type": "sleep", "payload": {"delayMs": 20}},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code == 201:
                    created.append(response.json()["id"])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.02)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        yield created, failures
    finally:
        stop.set()
        thread.join(timeout=20)
