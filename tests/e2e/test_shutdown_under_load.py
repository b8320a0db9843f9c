"""SIGTERM to `manage.py serve` right after, and while, every kind of request it serves is under
load: static files and the admin (Django's handler, WhiteNoise's middleware handing each request
back to the event loop from a thread: the threads that once kept Daphne from exiting), and the
REST API (the lean handler). The processes exit within the grace period, cleanly."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.support.processes import child_pids, is_running
from tests.support.stack import Stack, wait_until
from tests.support.wrk import finish_wrk, start_wrk

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

GRACE_S = 10
LOAD_S = 3
PATHS = ("/static/dashboard/dashboard.css", "/admin/login/", "/jobs")


@pytest.mark.parametrize("when", ["right after", "during"])
def test_sigterm_under_mixed_load_exits_cleanly_within_the_grace_period(
    stack: Stack, tmp_path: Path, when: str
) -> None:
    _, key = api_key_create(tenant=Tenant.objects.create(id="acme"))
    bearer = tmp_path / "bearer.lua"
    bearer.write_text(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    api = stack.start_api("--grace", str(GRACE_S), processes=2)
    daphnes = wait_until(
        lambda: len(pids := child_pids(api.pid)) == 2 and pids,
        timeout=30,
        message="the supervisor did not run 2 processes",
    )
    loads = [
        start_wrk(
            f"{stack.base_url}{path}",
            connections=32,
            duration_s=LOAD_S,
            script=bearer if path == "/jobs" else None,
        )
        for path in PATHS
    ]
    if when == "right after":
        results = [finish_wrk(load) for load in loads]
    else:
        time.sleep(LOAD_S / 2)

    api.send_signal(signal.SIGTERM)
    stopping_since = time.monotonic()
    try:
        code = api.wait(timeout=GRACE_S + 10)
    except subprocess.TimeoutExpired:
        code = None
    stop_s = time.monotonic() - stopping_since
    if when == "during":
        results = [finish_wrk(load) for load in loads]

    log = stack.log("api")
    for path, result in zip(PATHS, results, strict=True):
        print(f"\n{path}: {result.requests} requests, {result.non_2xx_3xx} non-2xx/3xx")
        assert result.requests > 0, result.output
        if when == "right after":
            assert result.non_2xx_3xx == 0, result.output  # /jobs: the key worked
    print(f"SIGTERM {when} the load: exit {code} after {stop_s:.2f}s (grace {GRACE_S}s)")
    assert code == 0, log[-4000:]
    assert stop_s < GRACE_S
    assert "SIGKILL" not in log and "exit blocked" not in log
    assert "stopped cleanly" in log
    assert not any(is_running(pid) for pid in daphnes)
