"""Garbage-collector settings for the long-running processes (API and worker).

After start-up, Django, the URL resolvers, ninja's schemas and the handlers are tens of thousands
of objects that live as long as the process. Each full (generation 2) collection walked them
all: about 75 ms per collection in an API process under load, which showed up as the p99 of
`POST /jobs`. `gc.freeze()` moves them out of the collector's way (measured: 9 ms per full
collection, p99 under 16 connections from about 90 ms to about 30 ms). Objects made later are
collected as usual.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once, then exempt everything alive now from later collections."""
    gc.collect()
    gc.freeze()
