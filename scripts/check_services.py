"""Before the test suite: check that the PostgreSQL and Redis it needs answer, or say how to
start them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jobs.redis_clients import RedisUrlError, describe_redis_url, sync_redis  # noqa: E402 - needs ROOT on the path

DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def main() -> int:
    problems = []
    if not DATABASE_URL.startswith(("postgres://", "postgresql://")):
        problems.append("DATABASE_URL must name a PostgreSQL server for the tests")
    else:
        try:
            psycopg.connect(DATABASE_URL.rsplit("/", 1)[0] + "/postgres", connect_timeout=3).close()
        except psycopg.Error as exc:
            problems.append(
                f"PostgreSQL at {DATABASE_URL} does not answer ({exc}).\n"
                "  Start it: pg_ctlcluster --skip-systemctl-redirect "
                "$(ls /etc/postgresql) main start"
            )
    try:
        sync_redis(REDIS_URL, socket_connect_timeout=3, socket_timeout=3).ping()
    except RedisUrlError as exc:
        problems.append(f"REDIS_URL cannot be read: {exc}")
    except redis.RedisError as exc:
        hint = (
            "Check the sentinels and the master they monitor."
            if REDIS_URL.startswith("redis+sentinel:")
            else "Start it: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379"
            ' --save ""'
        )
        shown = describe_redis_url(REDIS_URL)
        problems.append(f"Redis at {shown} does not answer ({exc}).\n  {hint}")
    for problem in problems:
        print(f"make test: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
