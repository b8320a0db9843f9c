"""The environment files: var/run.env, which `make run` writes so that the README's `manage.py`
commands work in any shell, and .env.example, which must name every variable the code reads."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from dotenv import dotenv_values

from jobs.models import Tenant
from scripts.run import write_run_env
from tests.support.redis_server import unreachable_redis

ROOT = Path(__file__).resolve().parents[2]
# What a user's shell has: none of the variables `make run` sets or writes.
MAKE_RUN_VARIABLES = ("SECRET_KEY", "DEBUG", "DATABASE_URL", "REDIS_URL", "JOBS_REDIS_PREFIX")
# Where the code reads the environment: env_str("X", ...), env_int(\n "X", ...), os.environ["X"],
# os.environ.get("X"), os.getenv("X").
ENV_READ = re.compile(
    r"""(?:env_(?:str|int|bool|float|list)\(|os\.environ\.get\(|os\.getenv\(|os\.environ\[)"""
    r"""\s*["']([A-Z][A-Z0-9_]*)["']"""
)
SOURCES = ("config", "jobs", "realtime", "dashboard", "scripts")
# Read by the code, but not settings an operator chooses.
INTERNAL_VARIABLES = {"DJANGO_SETTINGS_MODULE"}


def manage(*args: str, var_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in MAKE_RUN_VARIABLES}
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env={**base, "JOBS_VAR_DIR": str(var_dir), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_a_secret_key_a_command_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    result = manage("check", var_dir=tmp_path)

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: SECRET_KEY must be set when DEBUG is off")
    assert "Traceback" not in result.stderr


def test_a_command_not_in_django_core_also_fails_in_one_line(tmp_path: Path) -> None:
    # createsuperuser comes from an app: Django finds it only once the settings load.
    result = manage("createsuperuser", "--noinput", var_dir=tmp_path)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "SECRET_KEY" in result.stderr


def test_commands_work_with_the_run_env_make_run_writes(tmp_path: Path) -> None:
    write_run_env(tmp_path)

    result = manage("check", var_dir=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_the_environment_wins_over_run_env(tmp_path: Path) -> None:
    write_run_env(tmp_path, debug="1")
    show = "from django.conf import settings; print(settings.DEBUG, settings.SECRET_KEY)"

    result = manage("shell", "-v", "0", "-c", show, var_dir=tmp_path, DEBUG="0")

    assert result.returncode == 0, result.stderr
    secret_key = dotenv_values(tmp_path / "run.env")["SECRET_KEY"]
    assert result.stdout.split() == ["False", secret_key]


def test_run_env_is_private_keeps_its_secret_key_and_quotes_values(tmp_path: Path) -> None:
    odd_url = "postgres://jobs:it's\\a#secret@127.0.0.1:5432/jobs"

    first = dotenv_values(write_run_env(tmp_path, redis_url="redis://127.0.0.1:7777/0"))
    second = dotenv_values(path := write_run_env(tmp_path, database_url=odd_url))

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first["SECRET_KEY"] or "") >= 50
    assert second == {"DEBUG": "1", "SECRET_KEY": first["SECRET_KEY"], "DATABASE_URL": odd_url}


@pytest.fixture
def redis_down() -> Iterator[None]:
    with unreachable_redis():
        yield


def test_a_key_change_while_redis_is_down_is_a_warning_line_per_change(
    db: None,
    redis_down: None,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks,  # type: ignore[no-untyped-def]
) -> None:
    # What `create_tenant` in another shell meets once `make run`'s Redis is stopped: the
    # tenant and its key are created, and each of the two changes is one line, no traceback.
    with caplog.at_level(logging.WARNING), django_capture_on_commit_callbacks(execute=True):
        call_command("create_tenant", "acme")

    assert Tenant.objects.filter(id="acme", api_keys__isnull=False).exists()
    records = [r for r in caplog.records if r.name == "jobs.auth"]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.WARNING, None)] * 2
    assert all("could not announce an auth change tenant=acme" in r.message for r in records)


def variables_read_by_the_code() -> set[str]:
    names: set[str] = set()
    for source in SOURCES:
        for path in (ROOT / source).rglob("*.py"):
            names.update(ENV_READ.findall(path.read_text()))
    return names - INTERNAL_VARIABLES


@pytest.mark.parametrize("document", [".env.example", "README.md"])
def test_every_variable_the_code_reads_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    if document == ".env.example":
        documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    else:  # the configuration table: | `NAME`, `OTHER` | ...
        rows = re.findall(r"^\| (`[A-Z].*?) \|", text, re.MULTILINE)
        documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row)}

    read = variables_read_by_the_code()

    assert {"SECRET_KEY", "HOST", "JOBS_VAR_DIR", "JOBS_API_GRACE_S"} <= read  # the scan works
    assert sorted(read - documented) == []


def test_env_example_allows_the_hosts_the_default_allows() -> None:
    values = dotenv_values(ROOT / ".env.example")

    assert values["ALLOWED_HOSTS"] == "localhost,127.0.0.1,[::1]"
