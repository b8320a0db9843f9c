"""The one application error type; config/api.py renders it as the spec's error JSON."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with an HTTP status, a short message and optional details."""

    def __init__(
        self,
        status: int,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details
        self.headers = headers or {}


class NotFound(ApiError):
    def __init__(self, message: str = "Job not found") -> None:
        super().__init__(404, message)


class Conflict(ApiError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(409, message, details)
