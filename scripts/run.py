"""`make run`: migrations, a demo tenant and its key, then the API (`manage.py serve`: Daphne
processes on one port) and one worker in the foreground until Ctrl-C stops both. Embedded SQLite
unless DATABASE_URL says otherwise; a private redis-server under var/ unless REDIS_URL does.

It writes var/run.env (DEBUG=1, a SECRET_KEY generated once, the Redis and database it uses),
which config/settings.py reads: `manage.py createsuperuser` and the other commands work as the
README shows them, in any shell.

Stopping: the first Ctrl-C or SIGTERM stops the worker gracefully (running jobs get its grace
period), then the API (WebSockets closed with 1001); a second one stops both at once (the worker
puts its running jobs back to PENDING); a third kills them. A process that exits on its own is
named, the others are stopped, and `make run` exits 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import dj_database_url
import psycopg
import redis
from dotenv import dotenv_values
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.serve import describe_exit, stop_with_parent_hook  # noqa: E402 - needs ROOT on the path
from jobs.redis_clients import RedisUrlError, describe_redis_url, sync_redis  # noqa: E402

VAR = Path(os.environ.get("JOBS_VAR_DIR", ROOT / "var")).resolve()
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8000"))
DEMO_TENANT = "demo"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# More than the worker's and the API's grace periods (30 s each by default).
STOP_TIMEOUT_S = 40.0
REDIS_STOP_TIMEOUT_S = 10.0
POLL_S = 0.1
# Signals to make and to us this close together are one Ctrl-C of the terminal.
SAME_SIGNAL_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RUN_ENV_HEADER = """\
# Written by `make run` (scripts/run.py) at each start. config/settings.py reads it, so that
# `manage.py` commands typed in any shell act on the service `make run` runs; variables set in
# the environment win. Deleting it makes the next `make run` generate a new SECRET_KEY.
"""
# Checks the demo key in a fresh process (Django set up, nothing printed), the key on stdin.
KEY_WORKS = (
    "import sys, django; django.setup(); "
    "from jobs.services import api_key_authenticate; "
    "sys.exit(0 if api_key_authenticate(raw_key=sys.stdin.read().strip()) else 1)"
)


class SetupFailed(Exception):
    """A step before the services start failed; the message says which and what to do."""


def say(message: str = "") -> None:
    # The terminal may be gone (SIGHUP): nothing to tell then.
    with contextlib.suppress(OSError):
        print(message, flush=True)


# --- var/run.env ----------------------------------------------------------------------------------
def write_run_env(
    var_dir: Path,
    *,
    debug: str = "1",
    redis_url: str | None = None,
    redis_prefix: str | None = None,
    database_url: str | None = None,
) -> Path:
    """Write `var_dir/run.env` (mode 0600): DEBUG, a SECRET_KEY generated on the first run and
    kept afterwards, and the Redis and database `make run` uses when they are not the defaults."""
    path = var_dir / "run.env"
    previous = dotenv_values(path) if path.exists() else {}
    values = {
        "DEBUG": debug,
        "SECRET_KEY": previous.get("SECRET_KEY") or secrets.token_urlsafe(50),
        "REDIS_URL": redis_url,
        "JOBS_REDIS_PREFIX": redis_prefix,
        "DATABASE_URL": database_url,
    }
    lines = [f"{name}={dotenv_quote(value)}" for name, value in values.items() if value]
    staged = path.with_name(f"{path.name}.tmp")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(RUN_ENV_HEADER + "\n".join(lines) + "\n")
    staged.chmod(0o600)  # os.open keeps the mode of a file left over from an interrupted write
    staged.replace(path)
    return path


def dotenv_quote(value: str) -> str:
    """Single quotes, in which python-dotenv reads `\\\\` and `\\'` and nothing else."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- PostgreSQL -----------------------------------------------------------------------------------
def ensure_database(url: str) -> None:
    """For a PostgreSQL URL: create the database if the server has none of that name. Stops
    with one line if the server does not answer."""
    config = dj_database_url.parse(url)
    if config["ENGINE"] != "django.db.backends.postgresql":
        return
    name = config["NAME"]
    server = f"{config['HOST'] or 'localhost'}:{config['PORT'] or 5432}"
    params = {
        "host": config["HOST"] or None,
        "port": config["PORT"] or None,
        "user": config["USER"] or None,
        "password": config["PASSWORD"] or None,
        "connect_timeout": 3,
        **config.get("OPTIONS", {}),
    }
    try:
        psycopg.connect(dbname=name, **params).close()
        return
    except psycopg.OperationalError as exc:
        refused = one_line(exc)
    try:
        # The maintenance database every server has: does ours exist there?
        with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
            query = "SELECT 1 FROM pg_database WHERE datname = %s"
            exists = conn.execute(query, (name,)).fetchone()
            if exists:
                raise SetupFailed(f"PostgreSQL at {server} refuses database {name}: {refused}")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        raise SetupFailed(
            f"PostgreSQL does not answer at {server} ({one_line(exc)}). Start it (Debian/Ubuntu:"
            " sudo service postgresql start; macOS: brew services start postgresql), or unset"
            " DATABASE_URL to use the embedded SQLite file."
        ) from exc
    except psycopg.Error as exc:
        raise SetupFailed(f"cannot create database {name} on {server}: {one_line(exc)}") from exc
    say(f"Database: created the database {name} on {server}")


def without_password(url: str) -> str:
    return re.sub(r"^([a-z0-9+]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# --- Redis ----------------------------------------------------------------------------------------
def redis_answers(url: str) -> bool:
    try:
        client = sync_redis(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, RedisUrlError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    """REDIS_URL if set (it must answer); else a private redis-server under var/, so nothing is
    left in the machine's Redis; else, without redis-server, the machine's Redis.
    The URL, and the private server's process if one was started."""
    if "REDIS_URL" in os.environ:
        url = os.environ["REDIS_URL"]
        if not redis_answers(url):
            raise SetupFailed(
                f"no Redis answers at REDIS_URL={describe_redis_url(url)}: start it, or unset"
                " REDIS_URL to let"
                " `make run` start a private redis-server under var/"
            )
        say(f"Redis: {describe_redis_url(url)}")
        return url, None
    server = shutil.which("redis-server")
    if server is None:
        if redis_answers(DEFAULT_REDIS_URL):
            say(f"Redis: {DEFAULT_REDIS_URL} (redis-server is not installed to run a private one)")
            return DEFAULT_REDIS_URL, None
        raise SetupFailed(
            "redis-server is not installed and no Redis answers at"
            f" {DEFAULT_REDIS_URL}. Install it (Debian/Ubuntu: apt-get install redis-server;"
            " macOS: brew install redis) or point REDIS_URL at a running Redis."
        )
    port = free_port()
    data = VAR / "redis"
    data.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
            "--logfile",
            str(data / "redis.log"),
        ],
        # Stopped by run.py after the worker and the API, not by the terminal's Ctrl-C.
        start_new_session=True,
        preexec_fn=stop_with_parent_hook(),
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, REDIS_STOP_TIMEOUT_S)
            raise SetupFailed(f"the private redis-server did not start; see {data / 'redis.log'}")
        time.sleep(POLL_S)
    say(f"Redis: a private redis-server at {url} (no persistence, files under {data})")
    return url, process


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Django steps ---------------------------------------------------------------------------------
def manage(*args: str, capture: bool = False) -> str:
    command = f"manage.py {' '.join(args[:1])}"
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            check=True,
            text=True,
            cwd=ROOT,
            stdout=subprocess.PIPE if capture else None,
        )
    except subprocess.CalledProcessError as exc:
        raise SetupFailed(f"{command} failed ({describe_exit(exc.returncode)}); see above") from exc
    return result.stdout or ""


def demo_key() -> str:
    """The demo tenant's key: reused from var/demo-key while it still works, else a new one."""
    key_file = VAR / "demo-key"
    if key_file.exists():
        key = key_file.read_text().strip()
        works = subprocess.run([sys.executable, "-c", KEY_WORKS], cwd=ROOT, input=key, text=True)
        if works.returncode == 0:
            return key
    output = manage(
        "create_tenant", DEMO_TENANT, "--name", "Demo tenant", "--if-missing", capture=True
    )
    key = output.strip().splitlines()[-1]
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def walkthrough(key: str) -> None:
    host = f"[{HOST.strip('[]')}]" if ":" in HOST else HOST
    base = f"http://{host}:{PORT}"
    ws = f"ws://{host}:{PORT}/ws?token={key}"
    say()
    say("=" * 78)
    say(f"Demo tenant '{DEMO_TENANT}', API key (also in {VAR / 'demo-key'}):")
    say(f"  export KEY={key}")
    say()
    say("Create a job:")
    say(f'  curl -s -X POST {base}/jobs -H "Authorization: Bearer $KEY" \\')
    say("       -H 'Content-Type: application/json' \\")
    say('       -d \'{"type": "sleep", "payload": {"delayMs": 2000}}\'')
    say("List jobs:")
    say(f'  curl -s {base}/jobs -H "Authorization: Bearer $KEY"')
    say('Watch updates (then type {"type": "SUBSCRIBE", "tenantId": "demo"}):')
    say(f'  uv run python -m websockets "{ws}"')
    say(f"API docs: {base}/docs    Dashboard: {base}/dashboard/")
    say(f"Admin: {base}/admin/ (a login: uv run python manage.py createsuperuser)")
    say("=" * 78)
    say()


# --- running and stopping -------------------------------------------------------------------------
@dataclass
class Service:
    """A process `make run` started and stops."""

    name: str
    process: subprocess.Popen[bytes]
    signalled_at: float | None = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, unless it was already sent one."""
        if self.signalled_at is None:
            self.send(signal.SIGTERM)

    def send(self, signum: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)
            if self.signalled_at is None:
                self.signalled_at = time.monotonic()


def start_service(name: str, *args: str) -> Service:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        # Signals reach it only from run.py, which orders the stop; SIGTERM if run.py dies.
        start_new_session=True,
        preexec_fn=stop_with_parent_hook(),
    )
    return Service(name, process)


@dataclass
class StopRequests:
    """Counts the stop signals: SIGINT, SIGTERM, SIGHUP, and a SIGINT sent to `make` alone."""

    count: int = 0
    last_signal_at: float | None = None
    make_interrupted_at: float | None = None
    make_checked: bool = False

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last_signal_at = time.monotonic()

    def check_parent_make(self) -> None:
        """GNU make passes SIGTERM on to its recipe but not SIGINT, which it expects the terminal
        to have sent to the whole process group: after `kill -INT <make pid>` it would wait for
        us forever. While make handles a SIGINT it blocks it, which Linux shows in /proc: that
        is a stop request, unless we got a signal of our own at the same moment (the terminal's
        Ctrl-C reaches make and us: one request)."""
        if self.make_checked:
            return
        now = time.monotonic()
        if self.make_interrupted_at is None:
            if make_is_handling_sigint(os.getppid()):
                self.make_interrupted_at = now
            return
        if now - self.make_interrupted_at < SAME_SIGNAL_S:
            return
        self.make_checked = True
        if (
            self.last_signal_at is None
            or abs(self.last_signal_at - self.make_interrupted_at) > SAME_SIGNAL_S
        ):
            self.count += 1


def make_is_handling_sigint(pid: int) -> bool:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = re.search(r"^SigBlk:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    if name not in ("make", "gmake") or blocked is None:
        return False
    return bool(int(blocked.group(1), 16) & (1 << (signal.SIGINT - 1)))


def supervise(worker: Service, api: Service, stops: StopRequests) -> int:
    """Run until a stop request or a service exiting on its own, then stop both: the worker
    first, so the API still relays its last updates, then the API. 0, or 1 if a service
    exited on its own."""
    services = (worker, api)
    stage = 0  # 1: stopping gracefully, 2: stopping now, 3: killed
    requests_seen = 0
    code = 0
    while any(service.running for service in services):
        stops.check_parent_make()
        if stops.count > requests_seen:
            requests_seen += 1
            stage += 1
            if stage == 1:
                say(
                    "Stopping: the worker finishes its running jobs (up to 30 s), then the API"
                    " stops. Ctrl-C again to stop now."
                )
            elif stage == 2:
                say("Stopping now: running jobs go back to PENDING. Ctrl-C again to kill.")
                for service in services:
                    service.send(signal.SIGTERM)
            else:
                say("Killing the worker and the API.")
                for service in services:
                    if service.running:
                        service.process.kill()
        elif stage == 0:
            exited = next((service for service in services if not service.running), None)
            if exited is not None:
                others = " and ".join(s.name for s in services if s is not exited)
                say(
                    f"make run: the {exited.name} exited on its own with"
                    f" {describe_exit(exited.process.returncode)} (its output is above);"
                    f" stopping the {others}."
                )
                code = 1
                stage = 1
        if stage >= 1:
            worker.stop()
            if not worker.running:
                api.stop()
            for service in services:
                overdue = service.signalled_at is not None and (
                    time.monotonic() - service.signalled_at > STOP_TIMEOUT_S
                )
                if service.running and overdue:
                    say(
                        f"The {service.name} still ran {STOP_TIMEOUT_S:.0f} s after SIGTERM: killed"
                    )
                    service.process.kill()
        time.sleep(POLL_S)
    return code


def main() -> int:
    VAR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    stops = StopRequests()
    stops.install()
    redis_server: subprocess.Popen[bytes] | None = None
    try:
        database_url = os.environ.get("DATABASE_URL") or None
        if database_url:
            ensure_database(database_url)
        shown = without_password(database_url) if database_url else None
        say(f"Database: {shown or 'embedded SQLite at ' + str(VAR / 'jobs.sqlite3')}")
        redis_url, redis_server = ensure_redis()
        os.environ["REDIS_URL"] = redis_url
        write_run_env(
            VAR,
            debug=os.environ["DEBUG"],
            redis_url=redis_url if redis_url != DEFAULT_REDIS_URL else None,
            redis_prefix=os.environ.get("JOBS_REDIS_PREFIX"),
            database_url=database_url,
        )
        manage("migrate", "--noinput", "-v", "0")
        key = demo_key()
        if stops.count:
            return 0
        walkthrough(key)
        worker = start_service("worker", "runworker_jobs", "--concurrency", "10")
        api = start_service("API", "serve", "--host", HOST, "--port", str(PORT))
        return supervise(worker, api, stops)
    except SetupFailed as exc:
        if stops.count:
            return 0  # interrupted during a step (Ctrl-C reached it too): nothing to report
        say(f"make run: {exc}")
        return 1
    finally:
        if redis_server is not None:
            stop_process(redis_server, REDIS_STOP_TIMEOUT_S)
            # Its URL would now point at nothing: commands fall back to the default Redis.
            write_run_env(
                VAR,
                debug=os.environ["DEBUG"],
                redis_prefix=os.environ.get("JOBS_REDIS_PREFIX"),
                database_url=os.environ.get("DATABASE_URL") or None,
            )
        say("Stopped.")


if __name__ == "__main__":
    sys.exit(main())
