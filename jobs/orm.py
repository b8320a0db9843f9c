"""Run ORM code from the event loop: in the process's sync thread, with its connection given
back to the pool afterwards (the API keeps no connection per thread)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import SyncToAsync
from django.db import connections


def close_idle_connections() -> None:
    """Close (return to the pool) every connection of this thread that is not inside a
    transaction. Unlike Django's `close_old_connections`, a connection inside an atomic block
    is left alone: that block belongs to a caller (a test's transaction, for one)."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


class OrmSyncToAsync(SyncToAsync):
    """`sync_to_async` for ORM work, thread-sensitive, tidying connections before and after."""

    def __init__(self, func: Any, thread_sensitive: bool = True, **kwargs: Any) -> None:
        super().__init__(func, thread_sensitive=thread_sensitive, **kwargs)

    def thread_handler(self, loop: Any, *args: Any, **kwargs: Any) -> Any:
        close_idle_connections()
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            close_idle_connections()


orm = OrmSyncToAsync
