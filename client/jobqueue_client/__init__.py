"""Python SDK for the multi-tenant job queue service: `Client` and `AsyncClient` over its REST
API and WebSocket, typed results (`Job`, `JobUpdate`) and typed errors (`JobQueueError` and its
subclasses). The `jobq` command line is `jobqueue_client.cli`."""

from __future__ import annotations

from jobqueue_client._version import __version__
from jobqueue_client.async_client import AsyncClient
from jobqueue_client.client import Client
from jobqueue_client.errors import (
    APIError,
    AuthenticationError,
    Conflict,
    JobQueueError,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    ValidationError,
    WaitTimeout,
)
from jobqueue_client.models import STATUSES, TERMINAL_STATUSES, Job, JobUpdate

__all__ = [
    "STATUSES",
    "TERMINAL_STATUSES",
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "Conflict",
    "Job",
    "JobQueueError",
    "JobUpdate",
    "NotFound",
    "RateLimited",
    "ServiceUnavailable",
    "ValidationError",
    "WaitTimeout",
    "__version__",
]
