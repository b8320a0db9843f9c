"""Dashboard fixtures: staff and non-staff sessions (`staff_user` and the end-to-end `stack`
come from tests/conftest.py)."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client


@pytest.fixture
def staff_client(staff_user: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def customer_client(db: None) -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user(username="customer"))
    return client
