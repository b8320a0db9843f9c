"""`make run`: migrations, a demo tenant and its key, then the API (`manage.py serve`: Daphne
processes on one port) and one worker in the foreground until Ctrl-C stops both. Embedded SQLite
unless DATABASE_URL says otherwise."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("JOBS_VAR_DIR", ROOT / "var")).resolve()
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8000"))
DEMO_TENANT = "demo"


def say(message: str = "") -> None:
    print(message, flush=True)


def manage(*args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout or ""


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_redis(children: list[subprocess.Popen]) -> None:
    """Use REDIS_URL if it answers; else start a private redis-server under var/."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        say(f"Redis: {url}")
        return
    if "REDIS_URL" in os.environ:
        say(f"No Redis answers at REDIS_URL={url}. Start it, or unset REDIS_URL to let")
        say("`make run` use a local one (or start a private redis-server under var/).")
        sys.exit(1)
    server = shutil.which("redis-server")
    if server is None:
        say(f"No Redis answers at {url} and redis-server is not installed.")
        say("Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)")
        say("or point REDIS_URL at a running Redis, then run `make run` again.")
        sys.exit(1)
    port = free_port()
    (VAR / "redis").mkdir(parents=True, exist_ok=True)
    children.append(
        subprocess.Popen(
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
                str(VAR / "redis"),
                "--logfile",
                str(VAR / "redis" / "redis.log"),
            ],
            # Stopped by run.py after the worker, not by the terminal's Ctrl-C.
            start_new_session=True,
        )
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if time.monotonic() > deadline:
            say("The private redis-server did not start; see var/redis/redis.log")
            sys.exit(1)
        time.sleep(0.1)
    os.environ["REDIS_URL"] = url
    say(f"Redis: started a private redis-server at {url} (data under {VAR / 'redis'})")


def demo_key() -> str:
    """The demo tenant's key: reused from var/demo-key while it still works, else a new one."""
    key_file = VAR / "demo-key"
    if key_file.exists():
        key = key_file.read_text().strip()
        check = (
            "from jobs.services import api_key_authenticate as a;"
            f"import sys; sys.exit(0 if a(raw_key={key!r}) else 1)"
        )
        if (
            subprocess.run(
                [sys.executable, str(ROOT / "manage.py"), "shell", "-c", check]
            ).returncode
            == 0
        ):
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
    say(f"API docs: {base}/docs    Admin: {base}/admin/ (manage.py createsuperuser)")
    say("=" * 78)
    say()


def main() -> int:
    VAR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    database = os.environ.get("DATABASE_URL") or f"embedded SQLite at {VAR / 'jobs.sqlite3'}"
    say(f"Database: {database}")
    children: list[subprocess.Popen] = []
    try:
        ensure_redis(children)
        manage("migrate", "--noinput", "-v", "0")
        walkthrough(demo_key())
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "manage.py"),
                    "serve",
                    "--host",
                    HOST,
                    "--port",
                    str(PORT),
                ],
                cwd=ROOT,
                start_new_session=True,
            )
        )
        children.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "runworker_jobs", "--concurrency", "10"],
                cwd=ROOT,
                start_new_session=True,
            )
        )
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        # Newest first, one at a time: the worker and the API finish (and release their claims
        # in Redis) before a private redis-server, started first, is stopped last. 40 s: more
        # than either's default grace period (30 s).
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.kill()
        say("Stopped.")


if __name__ == "__main__":
    sys.exit(main())
