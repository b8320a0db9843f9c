"""Fixtures of the jobs tests: the real local servers a handler talks to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.smtp_server import SMTPServer, smtp_server_for


@pytest.fixture
def smtp_server(settings: Any) -> Iterator[SMTPServer]:
    """A local SMTP server that Django's email settings point at for this test."""
    with smtp_server_for(settings) as server:
        yield server
