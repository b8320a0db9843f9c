"""Password logins are throttled: 40 wrong passwords then the right one used to get in."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-and-correct-password"


@pytest.fixture
def staff(settings: Any) -> Any:
    settings.JOBS = {**settings.JOBS, "LOGIN_ATTEMPTS": 5, "LOGIN_WINDOW_S": 60}
    return get_user_model().objects.create_user(
        username="operator", password=PASSWORD, is_staff=True, is_superuser=True
    )


def log_in(client: Client, username: str, password: str) -> bool:
    client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"})
    return "_auth_user_id" in client.session


def test_right_password_works(staff: Any) -> None:
    assert log_in(Client(), "operator", PASSWORD)


def test_after_too_many_failures_even_the_right_password_is_refused(
    staff: Any, redis_client: Any, redis_prefix: str
) -> None:
    client = Client()
    for _ in range(5):
        assert not log_in(client, "operator", "wrong")
    assert not log_in(client, "operator", PASSWORD)
    # From another address, the user name alone is locked too.
    assert not log_in(Client(REMOTE_ADDR="10.9.8.7"), "operator", PASSWORD)
    # Once the window has passed (the counters expire), the right password works again.
    for key in redis_client.scan_iter(match=f"{redis_prefix}:login:*"):
        assert 0 < redis_client.ttl(key) <= 60
        redis_client.delete(key)
    assert log_in(client, "operator", PASSWORD)


def test_one_address_guessing_many_names_is_locked(staff: Any) -> None:
    client = Client()
    for n in range(5):
        assert not log_in(client, f"guess-{n}", "wrong")
    assert not log_in(client, "operator", PASSWORD)
    assert log_in(Client(REMOTE_ADDR="10.9.8.7"), "operator", PASSWORD)


def test_a_success_clears_the_user_names_count(staff: Any) -> None:
    client = Client(REMOTE_ADDR="10.1.1.1")
    for _ in range(4):
        assert not log_in(client, "operator", "wrong")
    assert log_in(Client(REMOTE_ADDR="10.1.1.2"), "operator", PASSWORD)
    assert not log_in(Client(REMOTE_ADDR="10.1.1.3"), "operator", "wrong")
    assert log_in(Client(REMOTE_ADDR="10.1.1.4"), "operator", PASSWORD)
