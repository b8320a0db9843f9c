"""The Content-Security-Policy of the HTML pages (admin, dashboard, API docs): present, strict
(no inline script or style allowed), with the page's own WebSocket origin, and pages that need
nothing it forbids. tests/dashboard/test_browser.py runs the same pages in Chromium."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, RequestFactory

from config.csp import websocket_sources

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery-staple-42"

STRICT_DIRECTIVES = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}


def directives(header: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


@pytest.fixture
def staff_client() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("operator", password=PASSWORD))
    return client


@pytest.mark.parametrize(
    ("path", "as_staff", "status"),
    [
        ("/admin/login/", False, 200),
        ("/admin/", True, 200),
        ("/admin/jobs/job/", True, 200),
        ("/admin/jobs/tenant/add/", True, 200),
        ("/dashboard/", True, 200),
        ("/docs", False, 200),
        ("/no-such-page", False, 404),
    ],
)
def test_html_pages_carry_the_strict_policy(
    client: Client, staff_client: Client, path: str, as_staff: bool, status: int
) -> None:
    response = (staff_client if as_staff else client).get(path)
    assert response.status_code == status
    policy = directives(response["Content-Security-Policy"])
    assert {name: policy.get(name) for name in STRICT_DIRECTIVES} == STRICT_DIRECTIVES
    # The dashboard's socket: this host's ws:// and wss:// origins, and no other host.
    assert policy["connect-src"] == ["'self'", "ws://testserver", "wss://testserver"]
    # Nothing that would let an injected script or style run.
    assert "'unsafe-inline'" not in response["Content-Security-Policy"]
    assert "'unsafe-eval'" not in response["Content-Security-Policy"]


def test_the_websocket_origin_follows_the_host_of_the_request(staff_client: Client) -> None:
    response = staff_client.get("/dashboard/", HTTP_HOST="localhost:8000")
    policy = directives(response["Content-Security-Policy"])
    assert policy["connect-src"] == ["'self'", "ws://localhost:8000", "wss://localhost:8000"]


def test_websocket_sources_name_only_a_valid_allowed_host(rf: RequestFactory) -> None:
    assert websocket_sources(rf.get("/", HTTP_HOST="127.0.0.1:8000")) == [
        "ws://127.0.0.1:8000",
        "wss://127.0.0.1:8000",
    ]
    # Not in ALLOWED_HOSTS: no source from it (the page is a 400 anyway).
    assert websocket_sources(rf.get("/", HTTP_HOST="evil.example")) == []
    # CSP has no syntax for an IPv6 literal; 'self' covers it in current browsers.
    assert websocket_sources(rf.get("/", HTTP_HOST="[::1]:8000")) == []


class InlineCode(HTMLParser):
    """Collects what a policy without 'unsafe-inline' blocks: inline scripts, event handler
    attributes, style elements and style attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        values = dict(attrs)
        if tag == "script" and "src" not in names and values.get("type") != "application/json":
            self.found.append(f"inline <script> at line {self.getpos()[0]}")
        if tag == "style":
            self.found.append(f"<style> at line {self.getpos()[0]}")
        for name in names:
            if name == "style" or re.fullmatch(r"on[a-z]+", name):
                self.found.append(f"{name}= on <{tag}> at line {self.getpos()[0]}")


@pytest.mark.parametrize(
    ("path", "as_staff"),
    [("/dashboard/", True), ("/admin/jobs/job/", True), ("/admin/login/", False), ("/docs", False)],
)
def test_pages_have_no_inline_script_or_style(
    client: Client, staff_client: Client, path: str, as_staff: bool
) -> None:
    response = (staff_client if as_staff else client).get(path)
    assert response.status_code == 200
    parser = InlineCode()
    parser.feed(response.content.decode())
    assert parser.found == []
