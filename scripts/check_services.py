"""Before the test suite: check that the PostgreSQL and Redis it needs answer, or say how to
start them."""

from __future__ import annotations

import os
import sys

import psycopg
import redis

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
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        problems.append(
            f"Redis at {REDIS_URL} does not answer ({exc}).\n"
            '  Start it: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save ""'
        )
    for problem in problems:
        print(f"make test: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
