"""Job handlers, one module per type, registered by type with their payload schema.

A handler is a plain function `handler(payload, ctx) -> result` (sync or async). Sync handlers run
in a thread so they never block the worker's event loop. Adding a type means adding a module here
and importing it below; the worker loop knows nothing about any particular type.
"""

from __future__ import annotations

# Importing the modules registers their handlers.
from jobs.handlers import data_processing, email, event_delivery, sleep, webhook
from jobs.handlers.registry import (
    HandlerSpec,
    HeldBack,
    JobContext,
    PermanentError,
    get_handler,
    register,
    registered_types,
    validate_payload,
)

__all__ = [
    "HandlerSpec",
    "HeldBack",
    "JobContext",
    "PermanentError",
    "data_processing",
    "email",
    "event_delivery",
    "get_handler",
    "register",
    "registered_types",
    "sleep",
    "validate_payload",
    "webhook",
]
