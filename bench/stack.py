"""The real service as subprocesses for the benchmarks: Daphne and `runworker_jobs` against the
benchmark database and one Redis prefix, with their logs kept, always stopped at the end."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
FD_LIMIT = 65536
SECRET_KEY = "bench-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFGH"
# Lines of a service log that the report lists as problems.
PROBLEM_RE = re.compile(r"\b(ERROR|CRITICAL|Traceback|Exception)\b")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+\s*")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout: float, message: str) -> Any:
    """Poll `predicate` every 50 ms until it returns something truthy; raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g}s: {message}")


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process (VmRSS, KiB), or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _raise_child_fd_limit() -> None:
    # Runs in the child between fork and exec: Daphne holding thousands of sockets needs it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None
PR_SET_PDEATHSIG = 1


def child_setup() -> None:
    """`preexec_fn` of every process the benchmarks start: the open-file limit raised, and
    SIGKILL if the benchmark process itself dies without stopping it (killed with SIGKILL, say),
    so that no server or load generator outlives the run. Spawn from the main thread only: the
    signal follows the thread that forked."""
    _raise_child_fd_limit()
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Process:
    """One subprocess of the stack and the file its output goes to."""

    label: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The last lines of the process's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_until_healthy(proc: Process, base_url: str, *, what: str, timeout: float) -> None:
    """Poll `base_url`/health until it answers 200; fail at once if `proc` exits first."""

    def healthy() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{what} exited early:\n{proc.tail()}")
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=timeout, message=f"{what} did not answer /health")


@dataclass
class Stack:
    """The API and workers of one benchmark, sharing an environment; `stop_all` ends them all."""

    database_url: str
    redis_url: str
    prefix: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    port: int = 0
    # Daphne processes of `manage.py serve`; None: its default (one per CPU).
    api_processes: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def env(self) -> dict[str, str]:
        """The service's environment: the benchmark database, Redis and prefix, no debug."""
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "JOBS_REDIS_PREFIX": self.prefix,
            "SECRET_KEY": SECRET_KEY,
            "DEBUG": "0",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "EMAIL_URL": "locmem://",
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "config.settings",
            **self.extra_env,
        }

    def start_api(self, *, timeout: float = 60) -> Process:
        """Start the API as deployed (`manage.py serve`: `api_processes` Daphne processes on
        one port) on a free port and wait until /health answers."""
        self.port = free_port()
        cmd = [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(self.port)]
        if self.api_processes:
            cmd += ["--processes", str(self.api_processes)]
        proc = self._spawn("api", cmd)
        wait_until_healthy(proc, self.base_url, what="the API", timeout=timeout)
        return proc

    def start_worker(self, *, name: str, concurrency: int, extra: tuple[str, ...] = ()) -> Process:
        """Start one `runworker_jobs` process (it claims work as soon as it is up)."""
        cmd = [sys.executable, str(ROOT / "manage.py"), "runworker_jobs"]
        args = ["--concurrency", str(concurrency), "--name", name, *extra]
        return self._spawn(name, [*cmd, *args])

    def start_script(self, label: str, cmd: list[str]) -> Process:
        """Start any other helper process (the baseline's worker) under the same rules."""
        return self._spawn(label, cmd)

    def _spawn(self, label: str, cmd: list[str]) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{label}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_setup,
            )
        proc = Process(label=label, popen=popen, log_path=log_path)
        self.processes.append(proc)
        return proc

    def stop(self, proc: Process, *, grace: float = 15) -> int | None:
        """SIGTERM (warm stop), then SIGKILL after `grace` seconds; returns the exit code."""
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            return proc.popen.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop every process, newest first; nothing outlives the benchmark."""
        for proc in reversed(self.processes):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)


@contextmanager
def running_stack(**kwargs: Any) -> Iterator[Stack]:
    """A Stack whose processes are stopped however the block ends."""
    stack = Stack(**kwargs)
    try:
        yield stack
    finally:
        stack.stop_all()


def log_problems(log_dir: Path, *, limit: int = 30) -> list[str]:
    """Error-looking lines of the service logs under `log_dir`, grouped: the same message
    (times and numbers aside) from any file is one entry with its count and first file."""
    seen: dict[str, tuple[int, str, str]] = {}
    for path in sorted(log_dir.rglob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not PROBLEM_RE.search(line):
                continue
            text = TIMESTAMP_RE.sub("", line).strip()[:300]
            key = re.sub(r"\d+", "#", text)
            count, first, sample = seen.get(key, (0, str(path.relative_to(log_dir)), text))
            seen[key] = (count + 1, first, sample)
    ranked = sorted(seen.values(), key=lambda item: -item[0])
    return [f"{count} x {sample}  (first in {first})" for count, first, sample in ranked[:limit]]


def clean_prefix(client: Any, prefix: str) -> int:
    """Delete every Redis key under `prefix:` (the channel layer's `prefix:asgi...` too)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    return len(keys)


def truncate_tables(database_url: str, tables: list[str]) -> None:
    """Empty the given tables of the benchmark database (never another database)."""
    import psycopg

    if not tables:
        return
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")


# --- CPU accounting -------------------------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far, or None once it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def server_pids(database: str) -> dict[str, list[int]]:
    """The local PostgreSQL processes that serve `database` (its backends and the shared
    writers), and redis-server. Backends of other databases are left out."""
    groups: dict[str, list[int]] = {"postgres": [], "redis-server": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm == "redis-server":
            groups["redis-server"].append(int(entry.name))
        elif comm == "postgres":
            backend = re.search(r"postgres: [^:]+: \S+ (\S+) ", cmdline)
            if backend is None or backend.group(1) == database:
                groups["postgres"].append(int(entry.name))
    return groups


@dataclass
class CpuSnapshot:
    """CPU seconds per process of each group, and of the machine, at one moment."""

    groups: dict[str, dict[int, float]]
    machine: float
    at: float

    @classmethod
    def take(cls, groups: dict[str, list[int]]) -> CpuSnapshot:
        taken = {
            name: {pid: s for pid in pids if (s := cpu_seconds(pid)) is not None}
            for name, pids in groups.items()
        }
        return cls(taken, machine_busy_seconds(), time.monotonic())

    def since(self, start: CpuSnapshot) -> dict[str, float]:
        """CPU seconds each group used between `start` and this snapshot (a process that
        started in between counts fully; one that exited in between is lost)."""
        used = {
            name: sum(s - start.groups.get(name, {}).get(pid, 0.0) for pid, s in pids.items())
            for name, pids in self.groups.items()
        }
        used["machine (all processes)"] = self.machine - start.machine
        used["wall"] = self.at - start.at
        return used
