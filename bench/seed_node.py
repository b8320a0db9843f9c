"""The seed tutorial transcribed to Node (`../shared/seed-node`, Express 5 + Prisma 7 + ioredis +
ws) as the suite's side-by-side baseline: copied to `bench/.cache/seed-node` (the shared copy may
be read-only), set up once (`scripts/setup.sh`: npm install, Prisma client, build, database), and
its backend (`node dist/backend/index.js`) and worker (`node dist/worker/index.js`) started as
subprocesses with their logs kept, always stopped at the end.

It has a database of its own (`seednode_bench`, or SEED_NODE_DATABASE) on the suite's PostgreSQL
server and a Redis db index of its own (9, or SEED_NODE_REDIS_DB) on the suite's Redis, because its
key name is fixed (`job_queue`). Its pub/sub channel `job_updates` ignores the db index: it is
shared with anything else on that Redis server that publishes or listens on the same name.

Its contract differs from ours: no auth, `tenantId` in the body of `POST /jobs`, no
`GET /jobs/:id`, WebSocket at `/ws` with `{"type":"SUBSCRIBE","tenantId":...}` (no
acknowledgement) and `JOB_UPDATE` frames `{tenantId, jobId, status, error}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from stack import Process, child_setup, free_port, wait_until, wait_until_healthy

BENCH = Path(__file__).resolve().parent
SOURCE = Path(os.environ.get("SEED_NODE_SRC", BENCH.parent.parent / "shared" / "seed-node"))
CACHE = BENCH / ".cache" / "seed-node"
DATABASE = os.environ.get("SEED_NODE_DATABASE", "seednode_bench")
REDIS_DB = int(os.environ.get("SEED_NODE_REDIS_DB", "9"))
QUEUE_KEY = "job_queue"
UPDATES_CHANNEL = "job_updates"
TABLE = '"Job"'
# Not copied from the shared tree: what setup.sh and the build make, and local files.
SKIP_DIRS = {"node_modules", "dist", "generated", ".git"}
SKIP_NAMES = {".env"}
STAMP = ".bench-setup"


def _source_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name in SKIP_NAMES or name.endswith(".log"):
                continue
            files.append(Path(dirpath, name).relative_to(root))
    return files


def sync_copy(source: Path = SOURCE, target: Path = CACHE) -> str:
    """Copy the seed's source files into `target` (only those whose content differs, so that
    npm's and setup.sh's up-to-date checks hold), writable by us; returns the digest of the
    source tree. node_modules, dist and the generated Prisma client of `target` are kept."""
    if not (source / "scripts" / "setup.sh").exists():
        raise FileNotFoundError(f"no seed-node source at {source} (SEED_NODE_SRC)")
    digest = hashlib.sha256()
    for rel in _source_files(source):
        data = (source / rel).read_bytes()
        digest.update(str(rel).encode() + b"\0" + data + b"\0")
        dest = target / rel
        if dest.exists() and dest.read_bytes() == data:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.chmod(0o644)
        dest.write_bytes(data)
        # Keep the executable bits (scripts/no-schema-engine), add our write bit.
        dest.chmod(((source / rel).stat().st_mode & 0o777) | 0o200)
    return digest.hexdigest()


def server_urls(database_url: str, redis_url: str) -> tuple[str, str]:
    """The seed's DATABASE_URL (its own database on the suite's server) and REDIS_URL (its own
    db index on the suite's Redis)."""
    database = urlsplit(database_url)
    redis_parts = urlsplit(redis_url)
    return (
        urlunsplit(("postgresql", database.netloc, f"/{DATABASE}", "", "")),
        urlunsplit((redis_parts.scheme, redis_parts.netloc, f"/{REDIS_DB}", "", "")),
    )


@dataclass
class SeedNode:
    """The seed's processes and state; `stop_all` ends every process it started."""

    database_url: str
    redis_url: str
    log_dir: Path
    root: Path = CACHE
    port: int = 0
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def on_servers_of(cls, database_url: str, redis_url: str, log_dir: Path) -> SeedNode:
        db, rd = server_urls(database_url, redis_url)
        return cls(database_url=db, redis_url=rd, log_dir=log_dir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, *, timeout: float = 900) -> bool:
        """Copy the source and run `scripts/setup.sh` if anything changed or is missing (npm
        install, prisma generate, build, database). Returns True if setup.sh ran."""
        digest = sync_copy(SOURCE, self.root)
        stamp_text = json.dumps({"source": digest, "database_url": self.database_url})
        stamp = self.root / STAMP
        built = all(
            (self.root / "dist" / app / "index.js").exists() for app in ("backend", "worker")
        )
        if built and stamp.exists() and stamp.read_text() == stamp_text and self._has_table():
            return False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "seed-node-setup.log"
        with log_path.open("ab") as log:
            code, _ = run_group(
                ["bash", "scripts/setup.sh"],
                cwd=self.root,
                env={**os.environ, "DATABASE_URL": self.database_url},
                stdout=log,
                stderr=log,
                timeout=timeout,
            )
        if code != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"seed-node setup.sh failed ({code}):\n{tail}")
        stamp.write_text(stamp_text)
        return True

    def _has_table(self) -> bool:
        try:
            with psycopg.connect(self.database_url, connect_timeout=5) as conn:
                row = conn.execute("SELECT to_regclass('public.\"Job\"') IS NOT NULL").fetchone()
                return bool(row and row[0])
        except psycopg.OperationalError:
            return False

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def foreign_state(self) -> list[str]:
        """What else uses the seed's Redis names: keys other than `job_queue` in its db index,
        listeners on `job_updates` (the channel ignores the db index). Empty if nothing."""
        client = self.redis()
        try:
            others = [k for k in client.scan_iter(count=1000) if k != QUEUE_KEY.encode()][:5]
            listeners = client.pubsub_numsub(UPDATES_CHANNEL)[0][1]
        finally:
            client.close()
        found = []
        if others:
            found.append(f"seed-node: Redis db {REDIS_DB} holds other keys, e.g. {others}")
        if listeners:
            found.append(
                f"seed-node: {listeners} other listener(s) on the `{UPDATES_CHANNEL}` channel"
            )
        return found

    def reset(self) -> None:
        """Between rounds (no seed process running): no rows, an empty queue."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"TRUNCATE {TABLE}")
        client = self.redis()
        try:
            client.delete(QUEUE_KEY)
        finally:
            client.close()

    # --- state --------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows per status."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(f"SELECT status::text, count(*) FROM {TABLE} GROUP BY 1")
            return {status: n for status, n in rows.fetchall()}

    def row_count(self) -> int:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            return int(row[0]) if row else 0

    def completed_span_s(self) -> tuple[int, float]:
        """COMPLETED rows, and seconds from the first to the last of their `updatedAt` (the
        row's last write, set by Prisma from the worker's clock)."""
        query = (
            f'SELECT count(*), EXTRACT(EPOCH FROM max("updatedAt") - min("updatedAt")) '
            f"FROM {TABLE} WHERE status = 'COMPLETED'"
        )
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0]), float(row[1] or 0.0)

    # --- processes ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {**os.environ, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}
        # As the tutorial runs it: no NODE_ENV, no options inherited from the caller.
        for name in ("NODE_ENV", "NODE_OPTIONS", "PORT"):
            env.pop(name, None)
        return env

    def _spawn(
        self, label: str, cmd: list[str], extra_env: dict[str, str] | None = None
    ) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{label}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                cmd,
                cwd=self.root,
                env={**self.env(), **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_setup,
            )
        proc = Process(label=label, popen=popen, log_path=log_path)
        self.processes.append(proc)
        return proc

    def start_backend(self, *, timeout: float = 60) -> Process:
        """`node dist/backend/index.js` on a free port; waits until /health answers."""
        self.port = free_port()
        proc = self._spawn(
            "seed-backend", ["node", "dist/backend/index.js"], {"PORT": str(self.port)}
        )
        wait_until_healthy(proc, self.base_url, what="seed backend", timeout=timeout)
        return proc

    def start_worker(self, label: str = "seed-node-worker", *, timeout: float = 30) -> Process:
        """`node dist/worker/index.js` (one job at a time); waits for its start line."""
        proc = self._spawn(label, ["node", "dist/worker/index.js"])

        def started() -> bool:
            if not proc.alive():
                raise RuntimeError(f"seed worker exited early:\n{proc.tail()}")
            return "Worker started" in proc.log_path.read_text(errors="replace")

        wait_until(started, timeout=timeout, message="seed worker did not start")
        return proc

    def enqueue_bulk(self, tenant: str, count: int, *, timeout: float = 600) -> dict[str, Any]:
        """Queue `count` PENDING no-op jobs the way POST /jobs would, in bulk
        (`bench/enqueue-bulk.ts`, run with tsx): rows through Prisma, then LPUSH job_queue."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "seed-node-enqueue-bulk.log").open("ab") as log:
            code, out = run_group(
                ["node", "--import", "tsx", "bench/enqueue-bulk.ts", tenant, str(count)],
                cwd=self.root,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=timeout,
            )
            log.write(out)
        if code != 0:
            raise RuntimeError(f"seed enqueue-bulk failed ({code})")
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        return json.loads(lines[-1])

    def stop_all(self, *, grace: float = 10) -> None:
        """SIGTERM every process still running (newest first), SIGKILL after `grace`."""
        for proc in reversed(self.processes):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)


def run_group(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    stdout: Any,
    stderr: Any,
    timeout: float,
) -> tuple[int, bytes]:
    """Run a command that starts children of its own (npm, node) in a process group of its
    own; the whole group is killed if the wait ends any other way than its exit (timeout,
    Ctrl-C, SIGTERM to the suite). Returns the exit code and the output if it was piped."""
    popen = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=child_setup,
    )
    try:
        out, _ = popen.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=10)
        raise
    return popen.returncode, out or b""


@contextmanager
def running(seed: SeedNode) -> Iterator[SeedNode]:
    """The seed's processes for one block; stopped however the block ends."""
    try:
        yield seed
    finally:
        seed.stop_all()
        seed.processes.clear()
