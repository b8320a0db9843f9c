"""Logging: `LOG_FORMAT=plain` (default) for people, `json` for log shippers.

Context passed as `extra={"job_id": ..., "tenant": ...}` is kept in both formats: top-level keys
of the JSON object, or a trailing `[job_id=... tenant=...]` on a plain line.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured

LOG_FORMATS = ("plain", "json")
ACCESS_LOGGER = "config.access"
# Attributes every LogRecord has (this Python's set, e.g. `taskName` from 3.12), plus the ones
# formatting adds: anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields the caller passed with `extra=`, in the order given."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class PlainFormatter(logging.Formatter):
    """`time level logger message [key=value ...]`, the extras appended to the line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = record_extras(record)
        if not extras:
            return line
        return f"{line} [{' '.join(f'{key}={value}' for key, value in extras.items())}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the `extra`
    fields as top-level keys, then `exc_info`/`stack_info` as text when present."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            # An extra named like a standard key must not hide it (nor be lost).
            data[f"extra_{key}" if key in data else key] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        # Objects in extras (Django passes `request`) are written as their str().
        return json.dumps(data, ensure_ascii=False, default=str)


class AccessLog:
    """Daphne's access log (its "action logger") through `logging`, in LOG_FORMAT like every
    other line: `GET /jobs 201` on the `config.access` logger, with the client, status, size and
    duration as fields. Daphne's own writes NCSA lines straight to stdout, the one thing a
    LOG_FORMAT=json process printed that was not JSON."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        if protocol == "http" and action == "complete":
            self.logger.info(
                "%s %s %s",
                details["method"],
                details["path"],
                details["status"],
                extra={
                    "client": details["client"],
                    "status": details["status"],
                    "size": details["size"],
                    "duration_ms": round(details["time_taken"] * 1000, 1),
                },
            )
        elif protocol == "websocket":
            self.logger.info(
                "WS%s %s", action.upper(), details["path"], extra={"client": details["client"]}
            )


def logging_config(*, log_format: str, level: str) -> dict[str, Any]:
    """Django's LOGGING for `LOG_FORMAT` and `LOG_LEVEL`: everything to stderr."""
    if log_format not in LOG_FORMATS:
        raise ImproperlyConfigured(
            f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}"
        )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"()": PlainFormatter},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": log_format},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Django's default configuration gives its `django` logger a handler of its own
            # (unformatted, to stderr, when DEBUG is on) and the level INFO: every 4xx came out
            # twice ("Bad Request: /jobs", then our line) and ignored LOG_LEVEL. No handler
            # here: its records reach the root's, once, in LOG_FORMAT, at LOG_LEVEL.
            "django": {"handlers": [], "level": "NOTSET", "propagate": True},
            "django.server": {"level": "WARNING"},
            "daphne": {"level": "WARNING"},
        },
    }
