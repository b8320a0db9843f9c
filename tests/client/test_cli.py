"""`jobq`, the installed console script, run as a subprocess against the real API and worker:
its output (tables, `--json`) and its exit statuses."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.client.conftest import Service
from tests.support.stack import free_port

JOBQ = str(Path(sys.executable).parent / "jobq")

pytestmark = pytest.mark.e2e


def jobq(
    *args: str, url: str | None, key: str | None, timeout: float = 60
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQ_")}
    if url is not None:
        env["JOBQ_URL"] = url
    if key is not None:
        env["JOBQ_API_KEY"] = key
    return subprocess.run(
        [JOBQ, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_jobq_submits_waits_lists_and_watches(service: Service, tmp_path: Path) -> None:

    def run(*args: str) -> subprocess.CompletedProcess:
        return jobq(*args, url=service.url, key=service.key)

    done = run("submit", "sleep", "--payload", '{"delayMs": 50}', "--wait", "--json")
    assert done.returncode == 0, done.stderr
    completed = json.loads(done.stdout)
    assert (completed["status"], completed["result"]) == ("COMPLETED", {"sleptMs": 50})

    hook = tmp_path / "hook.json"
    hook.write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}/"}))
    failed = run(
        "submit", "webhook", "--payload", f"@{hook}", "--max-attempts", "1", "--wait", "--json"
    )
    assert failed.returncode == 1, failed.stderr
    failed_id = json.loads(failed.stdout)["id"]
    assert json.loads(failed.stdout)["status"] == "FAILED"

    shown = run("get", completed["id"])
    assert shown.returncode == 0
    assert any(line.split() == ["status", "COMPLETED"] for line in shown.stdout.splitlines())

    pending = run("submit", "sleep", "--delay-ms", "60000", "--payload", '{"delayMs": 0}')
    fields = dict(line.split(None, 1) for line in pending.stdout.splitlines())
    assert fields["status"] == "PENDING" and fields["type"] == "sleep"
    pending_id = fields["id"]
    cancelled = run("cancel", pending_id, "--json")
    assert json.loads(cancelled.stdout)["status"] == "CANCELLED"
    refused = run("cancel", pending_id)
    assert refused.returncode == 3
    assert refused.stderr.strip().splitlines() == [
        "jobq: error: 409 a CANCELLED job cannot be cancelled"
    ]
    retried = run("--json", "retry", pending_id)
    assert json.loads(retried.stdout)["status"] == "PENDING"

    listed = run("ls", "--limit", "2", "--json")
    assert [job["id"] for job in json.loads(listed.stdout)] == [pending_id, failed_id]
    table = run("ls", "--type", "sleep").stdout.splitlines()
    assert table[0].split() == ["ID", "TYPE", "STATUS", "ATTEMPTS", "PRIORITY", "CREATED"]
    assert len(table) == 3 and {row.split()[0] for row in table[1:]} == {
        completed["id"],
        pending_id,
    }

    # `watch --json` from the beginning: one JSON update per line, each job's final one among them.
    watcher = subprocess.Popen(
        [JOBQ, "watch", "--json", "--cursor", "0"],
        env={**os.environ, "JOBQ_URL": service.url, "JOBQ_API_KEY": service.key},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in watcher.stdout], daemon=True
    ).start()
    latest: dict[str, str] = {}
    expected = {completed["id"]: "COMPLETED", failed_id: "FAILED"}
    try:
        while any(latest.get(i) != s for i, s in expected.items()) or pending_id not in latest:
            update = json.loads(lines.get(timeout=20))
            assert update["type"] == "JOB_UPDATE" and update["tenantId"] == service.tenant.id
            latest[update["jobId"]] = update["status"]
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=10)
    assert watcher.returncode == 130  # interrupted: quietly, without a traceback
    assert watcher.stderr is not None and "Traceback" not in watcher.stderr.read()


def test_jobq_usage_and_network_errors(tmp_path: Path) -> None:
    key = "jq_000000000000_" + "x" * 43
    url = f"http://127.0.0.1:{free_port()}"
    assert jobq(url=url, key=key).returncode == 2
    assert jobq("submit", url=url, key=key).returncode == 2  # no TYPE
    assert jobq("get", "x", url=None, key=key).returncode == 2  # no URL
    assert jobq("get", "x", url=url, key=None).returncode == 2  # no key
    assert jobq("ls", "--limit", "0", url=url, key=key).returncode == 2
    not_json = jobq("submit", "sleep", "--payload", "{nope", url=url, key=key)
    assert not_json.returncode == 2 and "not JSON" in not_json.stderr

    unreachable = jobq("get", str(uuid.uuid4()), url=url, key=key)
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("jobq: error: no answer from http://127.0.0.1:")
    assert len(unreachable.stderr.strip().splitlines()) == 1  # no traceback


@pytest.mark.parametrize("args", [["--help"], ["submit", "--help"], ["watch", "--help"]])
def test_jobq_help(args: list[str]) -> None:
    shown = jobq(*args, url=None, key=None)
    assert shown.returncode == 0 and "usage: jobq" in shown.stdout
