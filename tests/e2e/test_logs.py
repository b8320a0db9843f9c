"""What the API process (`manage.py serve`) logs for a request, as an operator reads it: one line
per 4xx (Django's own `django` handler no longer repeats it), and with LOG_FORMAT=json nothing on
the log stream but JSON objects."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.support.stack import ROOT, Stack, free_port, healthy, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def start_api(stack: Stack, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """`manage.py serve` with DEBUG on (as under `make run`), stdout and stderr kept apart in
    api.out and api.err; its base URL."""
    stack.port = free_port()
    stack.env.update({"DEBUG": "1", **env})
    with (
        open(stack.tmp / "api.out", "wb") as out,
        open(stack.tmp / "api.err", "wb") as err,
    ):
        serve = ("serve", "--port", str(stack.port), "--processes", "1")
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *serve],
            cwd=ROOT,
            env=stack.env,
            stdout=out,
            stderr=err,
        )
    stack.processes.append(process)
    wait_until(lambda: healthy(stack.base_url), timeout=30, message="the API did not start")
    return process, stack.base_url


def requests_with_4xx(base_url: str) -> None:
    assert httpx.get(f"{base_url}/no-such-page", timeout=10).status_code == 404
    assert httpx.get(f"{base_url}/jobs", timeout=10).status_code == 401


def stopped_output(stack: Stack, process: subprocess.Popen[bytes]) -> tuple[str, str]:
    stack.stop()
    assert process.returncode == 0
    return (
        (stack.tmp / "api.out").read_text(errors="replace"),
        (stack.tmp / "api.err").read_text(errors="replace"),
    )


def test_a_4xx_is_logged_once(stack: Stack) -> None:
    process, base_url = start_api(stack)

    requests_with_4xx(base_url)

    out, err = stopped_output(stack, process)
    not_found = [line for line in (out + err).splitlines() if "Not Found: /no-such-page" in line]
    assert len(not_found) == 1, out + err
    assert " WARNING django.request Not Found: /no-such-page [status_code=404 " in not_found[0]


def test_with_log_format_json_every_log_line_is_json(stack: Stack) -> None:
    process, base_url = start_api(stack, LOG_FORMAT="json")

    requests_with_4xx(base_url)

    _, err = stopped_output(stack, process)
    lines = [json.loads(line) for line in err.splitlines()]
    assert [line["message"] for line in lines if line["logger"] == "django.request"] == [
        "Not Found: /no-such-page"
    ]
    assert any(line["logger"] == "config.serve" for line in lines)  # the process did log


def test_with_log_format_json_the_access_log_is_json_too(stack: Stack) -> None:
    process, base_url = start_api(stack, LOG_FORMAT="json")

    requests_with_4xx(base_url)

    out, err = stopped_output(stack, process)
    lines = [json.loads(line) for line in (out + err).splitlines()]
    access = [line["message"] for line in lines if line["logger"] == "config.access"]
    assert "GET /no-such-page 404" in access and "GET /jobs 401" in access
