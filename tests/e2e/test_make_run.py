"""Smoke test of `make run`'s configuration: embedded SQLite, migrations, demo tenant and key,
Daphne and a worker; one job completes; Ctrl-C stops both."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.e2e.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.e2e


def test_make_run_serves_the_walkthrough(tmp_path: Path, redis_prefix: str) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY")},
        "JOBS_VAR_DIR": str(tmp_path / "var"),
        "PORT": str(port),
        "REDIS_URL": settings.REDIS_URL,
        "JOBS_REDIS_PREFIX": redis_prefix,
    }
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "run.py")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        match = wait_until(
            lambda: re.search(r"export KEY=(\S+)", log_path.read_text()),
            timeout=60,
            message="no demo key printed",
        )
        key = match.group(1)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}

        def created() -> str | None:
            try:
                response = httpx.post(
                    f"{base}/jobs",
                    json={"type": "sleep", "payload": {"delayMs": 100}},
                    headers=headers,
                    timeout=5,
                )
            except httpx.HTTPError:
                return None
            return response.json()["id"] if response.status_code == 201 else None

        job_id = wait_until(created, timeout=30, message="POST /jobs never succeeded")
        job = wait_until(
            lambda: (
                (j := httpx.get(f"{base}/jobs/{job_id}", headers=headers, timeout=5).json())[
                    "status"
                ]
                == "COMPLETED"
                and j
            ),
            timeout=30,
            message="the job did not complete",
        )
        assert job["tenantId"] == "demo" and job["result"] == {"sleptMs": 100}
        assert (tmp_path / "var" / "jobs.sqlite3").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log_path.read_text()
