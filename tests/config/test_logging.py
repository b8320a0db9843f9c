"""Structured logs: `LOG_FORMAT=json` writes one JSON object per line, `extra` fields as keys;
the plain format keeps those fields at the end of the line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.logging import AccessLog, JsonFormatter, PlainFormatter, logging_config

ROOT = Path(__file__).resolve().parents[2]
WORKER_CONTEXT = {
    "job_id": "0b6c7f7e-1111-4222-8333-944445555666",
    "tenant": "acme",
    "job_type": "sleep",
    "attempt": 2,
    "worker": "w-1",
}
# What a worker line looks like once it passes its context as `extra`.
EMIT = (
    "import logging, sys; "
    "logging.getLogger('jobs.worker').warning('handler raised %s', 'boom', "
    f"extra={WORKER_CONTEXT!r}); "
    "logging.getLogger('jobs.worker').info('plain line'); "
    "sys.stderr.flush()"
)


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("jobs.worker")
    return logger.makeRecord(
        "jobs.worker", logging.INFO, __file__, 1, msg, args or ("world",), None, extra=extra
    )


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LOG_FORMAT", "LOG_LEVEL")}
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env={**base, "DEBUG": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    line = JsonFormatter().format(record(**WORKER_CONTEXT))

    data = json.loads(line)
    assert "\n" not in line
    assert data == {
        "time": data["time"],
        "level": "INFO",
        "logger": "jobs.worker",
        "message": "hello world",
        **WORKER_CONTEXT,
    }
    assert data["time"].endswith("Z")
    assert list(data)[:4] == ["time", "level", "logger", "message"]


def test_json_lines_keep_exceptions_and_odd_extras_on_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        entry = record(request=object(), level="mine", status_code=500)
        entry.exc_info = sys.exc_info()

    line = JsonFormatter().format(entry)

    data = json.loads(line)
    assert "\n" not in line
    assert data["level"] == "INFO"
    assert data["extra_level"] == "mine"  # an extra never hides a standard key
    assert data["status_code"] == 500
    assert data["request"].startswith("<object object")  # written as str()
    assert "ValueError: bad" in data["exc_info"]


def test_plain_lines_end_with_the_extra_fields() -> None:
    with_extras = PlainFormatter().format(record(job_id="j1", tenant="acme"))
    without = PlainFormatter().format(record())

    assert with_extras.endswith("INFO jobs.worker hello world [job_id=j1 tenant=acme]")
    assert without.endswith("INFO jobs.worker hello world")


def test_log_format_json_from_the_environment_writes_json_lines() -> None:
    result = manage("shell", "-c", EMIT, LOG_FORMAT="json")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert [(line["level"], line["message"]) for line in lines] == [
        ("WARNING", "handler raised boom"),
        ("INFO", "plain line"),
    ]
    assert {key: lines[0][key] for key in WORKER_CONTEXT} == WORKER_CONTEXT


def test_log_format_defaults_to_plain() -> None:
    result = manage("shell", "-c", EMIT)

    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert " WARNING jobs.worker handler raised boom [job_id=" in first
    assert "tenant=acme job_type=sleep attempt=2 worker=w-1]" in first


# What Django's request handler does for a 4xx (django.utils.log.log_response).
LOG_A_4XX = (
    "import logging, sys; "
    "logging.getLogger('django.request').warning('Bad Request: %s', '/jobs', "
    "extra={'status_code': 400}); "
    "logging.getLogger('django.request').info('below LOG_LEVEL'); "
    "sys.stderr.flush()"
)


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_4xx_is_logged_once_in_the_log_format(log_format: str) -> None:
    # DEBUG on, as under `make run`: Django's own `django` handler printed it a second time.
    result = manage("shell", "-v", "0", "-c", LOG_A_4XX, LOG_FORMAT=log_format, LOG_LEVEL="WARNING")

    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    if log_format == "json":
        assert json.loads(line)["message"] == "Bad Request: /jobs"
    else:
        assert " WARNING django.request Bad Request: /jobs [status_code=400]" in line


def test_the_access_log_is_a_log_line_with_the_request_as_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    details = {"method": "POST", "path": "/jobs", "status": 201, "client": "127.0.0.1:50000"}

    with caplog.at_level(logging.INFO, logger="config.access"):
        AccessLog()("http", "complete", {**details, "size": 312, "time_taken": 0.0042})
        AccessLog()("websocket", "connected", {"path": "/ws", "client": "127.0.0.1:50001"})

    http, websocket = (json.loads(JsonFormatter().format(r)) for r in caplog.records)
    assert {k: http[k] for k in ("logger", "message", "client", "status", "size")} == {
        "logger": "config.access",
        "message": "POST /jobs 201",
        "client": "127.0.0.1:50000",
        "status": 201,
        "size": 312,
    }
    assert http["duration_ms"] == 4.2
    assert (websocket["message"], websocket["client"]) == ("WSCONNECTED /ws", "127.0.0.1:50001")


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="LOG_FORMAT must be one of plain, json"):
        logging_config(log_format="xml", level="INFO")

    result = manage("check", LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "LOG_FORMAT must be one of plain, json" in result.stderr
