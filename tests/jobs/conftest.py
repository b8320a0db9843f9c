"""Fixtures of the jobs tests: the real local servers a handler talks to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from jobs.signing import secret_cache
from tests.support.handlers import allow_webhook_hosts
from tests.support.smtp_server import SMTPServer, smtp_server_for
from tests.support.webhook_server import WebhookServer, webhook_server


@pytest.fixture
def smtp_server(settings: Any) -> Iterator[SMTPServer]:
    """A local SMTP server that Django's email settings point at for this test."""
    with smtp_server_for(settings) as server:
        yield server


@pytest.fixture
def allowed_receiver(settings: Any) -> Iterator[WebhookServer]:
    """A local HTTP receiver on 127.0.0.1 that the webhook network policy lets jobs reach."""
    allow_webhook_hosts(settings, "127.0.0.1")
    with webhook_server("127.0.0.1") as receiver:
        yield receiver


@pytest.fixture
def fresh_secret_cache() -> Iterator[None]:
    """An empty signing-secret cache: it lives per process, and tests reuse tenant ids with new
    secrets."""
    secret_cache.clear()
    yield
    secret_cache.clear()
