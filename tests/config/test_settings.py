"""Settings as operators use them: parsed from the environment in a fresh process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import parse_email_url

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "HTTPS")}
    # An empty var directory: no var/run.env of a `make run` on this machine supplies settings.
    base["JOBS_VAR_DIR"] = tempfile.mkdtemp(prefix="settings-test-")
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_pass_check_deploy() -> None:
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        SECRET_KEY=secrets.token_urlsafe(50),
        DEBUG="0",
        HTTPS="1",
        ALLOWED_HOSTS="jobs.example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_without_https_check_deploy_warns() -> None:
    result = manage(
        "check", "--deploy", "--fail-level", "WARNING", SECRET_KEY=secrets.token_urlsafe(50)
    )
    assert result.returncode != 0
    assert "SECURE_SSL_REDIRECT" in result.stderr + result.stdout


def test_an_unreadable_redis_url_stops_the_start() -> None:
    result = manage("check", DEBUG="1", REDIS_URL="redis+sentinel://127.0.0.1:26379/")
    assert result.returncode != 0
    assert "REDIS_URL: a redis+sentinel URL ends with /<master name>[/<db>]" in result.stderr


def test_secret_key_is_required_when_debug_is_off() -> None:
    result = manage("check", DEBUG="0")
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("console://", {"EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend"}),
        ("locmem://", {"EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"}),
        (
            "smtp://user:p%40ss@mail.example.com:587?tls=1",
            {
                "EMAIL_HOST": "mail.example.com",
                "EMAIL_PORT": 587,
                "EMAIL_HOST_USER": "user",
                "EMAIL_HOST_PASSWORD": "p@ss",
                "EMAIL_USE_TLS": True,
                "EMAIL_USE_SSL": False,
            },
        ),
        ("smtps://mail.example.com", {"EMAIL_PORT": 465, "EMAIL_USE_SSL": True}),
    ],
)
def test_email_url(url: str, expected: dict[str, object]) -> None:
    parsed = parse_email_url(url)
    for key, value in expected.items():
        assert parsed[key] == value


def test_unknown_email_scheme_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured):
        parse_email_url("carrier-pigeon://coop")
