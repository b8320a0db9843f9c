"""`GET /events` on the real server (`manage.py serve`) with a real worker, read by `curl -N`:
live events with their cursors as ids, a resume with `Last-Event-ID`, a job's stream that ends
after its final state, and a stop (SIGTERM) that does not wait for open streams."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connections
from playwright.sync_api import sync_playwright

from jobs.models import TERMINAL_STATUSES, Job, Tenant
from jobs.services import api_key_create
from realtime.broadcast import job_update_message
from tests.support.processes import child_pids
from tests.support.sse import Event, EventParser
from tests.support.stack import Stack, healthy, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is needed"),
]

GRACE_S = 10
CHROMIUM = Path("/usr/bin/chromium")
SLEEP_0 = {"type": "sleep", "payload": {"delayMs": 0}}


class Curl:
    """`curl -sN` on /events in a subprocess, its output parsed as it comes."""

    def __init__(self, stack: Stack, key: str | None, *args: str, query: str = "") -> None:
        auth = [] if key is None else ["-H", f"Authorization: Bearer {key}"]
        self.proc = subprocess.Popen(
            # The response head first, on stdout.
            ["curl", "-sN", "-D", "-", *auth, *args, f"{stack.base_url}/events{query}"],
            stdout=subprocess.PIPE,
        )
        self.head = ""
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        parser = EventParser()
        in_head = True
        for line in iter(self.proc.stdout.readline, b""):
            text = line.decode()
            if in_head:
                self.head += text
                in_head = text not in ("\r\n", "\n")
                continue
            for event in parser.feed(text):
                with self.lock:
                    self.events.append(event)

    def received(self) -> list[Event]:
        with self.lock:
            return list(self.events)

    def job_updates(self) -> list[Event]:
        return [e for e in self.received() if e.event == "job_update"]

    def wait_for(self, predicate: Any, message: str, timeout: float = 20) -> Any:
        return wait_until(lambda: predicate(self.received()), timeout=timeout, message=message)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)


def tenant_key() -> tuple[Tenant, str]:
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    return tenant, key


def post_job(stack: Stack, key: str, body: dict[str, Any]) -> str:
    response = httpx.post(
        f"{stack.base_url}/jobs", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def finished(ids: list[str]) -> bool:
    return Job.objects.filter(id__in=ids, status__in=TERMINAL_STATUSES).count() == len(ids)


def test_curl_gets_live_events_and_resumes_with_last_event_id(stack: Stack) -> None:
    tenant, key = tenant_key()
    stack.start_worker("--concurrency", "4")
    stack.start_api()
    curl = Curl(stack, key)
    try:
        curl.wait_for(lambda events: any(e.event == "subscribed" for e in events), "subscribed")
        live = stack.create_batch(key, [SLEEP_0] * 10)
        wait_until(lambda: finished(live), timeout=30, message="jobs did not finish")
        # Every job's final state arrives (earlier ones may be folded into it).
        final = {str(job.id): job_update_message(job) for job in Job.objects.filter(id__in=live)}
        curl.wait_for(
            lambda _: {e.json()["jobId"]: e.json() for e in curl.job_updates()} == final,
            "the final states did not all arrive",
        )
    finally:
        curl.stop()
    head = curl.head.lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: text/event-stream\r\n" in head
    ids = [int(e.id or 0) for e in curl.job_updates()]
    assert ids == sorted(set(ids)), "ids strictly increase"
    assert all(e.id == e.json()["cursor"] for e in curl.job_updates())
    last_id = curl.job_updates()[-1].id

    # Disconnected: more jobs run, then curl comes back from the last id it got.
    missed = stack.create_batch(key, [SLEEP_0] * 5)
    wait_until(lambda: finished(missed), timeout=30, message="jobs did not finish")
    again = Curl(stack, key, "-H", f"Last-Event-ID: {last_id}")
    try:
        again.wait_for(lambda events: any(e.event == "subscribed" for e in events), "caught up")
    finally:
        again.stop()
    expected = [
        job_update_message(job)
        for job in Job.objects.filter(tenant=tenant, cursor__gt=int(last_id or 0)).order_by(
            "cursor"
        )
    ]
    assert {frame["jobId"] for frame in expected} == set(missed)
    assert [e.json() for e in again.job_updates()] == expected


def test_curl_on_one_job_ends_after_its_final_state(stack: Stack) -> None:
    _, key = tenant_key()
    stack.start_worker("--concurrency", "2")
    stack.start_api()
    job_id = post_job(stack, key, {"type": "sleep", "payload": {"delayMs": 300}})
    # The key in the URL, as an EventSource sends it.
    curl = Curl(stack, None, query=f"?jobId={job_id}&token={key}")
    try:
        assert curl.proc.wait(timeout=30) == 0, "curl ends when the stream does"
    finally:
        curl.stop()
    updates = [e.json() for e in curl.job_updates()]
    assert {u["jobId"] for u in updates} == {job_id}
    assert updates[-1] == job_update_message(Job.objects.get(id=job_id))
    assert updates[-1]["status"] == "COMPLETED"
    log = stack.log("api")
    assert f"/events?jobId={job_id}&token=[redacted] 200" in log
    assert key not in log


def test_sigterm_with_an_open_stream_exits_within_the_grace_period(stack: Stack) -> None:
    _, key = tenant_key()
    api = stack.start_api("--grace", str(GRACE_S))
    curl = Curl(stack, key)
    try:
        curl.wait_for(lambda events: any(e.event == "subscribed" for e in events), "subscribed")
        api.send_signal(signal.SIGTERM)
        stopping_since = time.monotonic()
        code = api.wait(timeout=GRACE_S + 10)
        stop_s = time.monotonic() - stopping_since
        # The client sees the end of the response (an EventSource then reconnects).
        assert curl.proc.wait(timeout=5) == 0
    finally:
        curl.stop()
    log = stack.log("api")
    print(f"\nSIGTERM with an open /events stream: exit {code} after {stop_s:.2f}s")
    assert code == 0, log[-3000:]
    assert stop_s < GRACE_S / 2, "the stream did not hold the stop for its grace period"
    assert "grace period over" not in log and "SIGKILL" not in log


# Collects a stream's events in the page, as an application would.
OPEN_EVENT_SOURCE = """
(url) => {
    window.received = [];
    window.opened = 0;
    const source = new EventSource(url);
    source.onopen = () => { window.opened += 1; };
    source.addEventListener("job_update", (e) => {
        window.received.push({id: e.lastEventId, frame: JSON.parse(e.data)});
    });
}
"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
def test_browser_event_source_resumes_by_itself_after_the_api_process_dies(
    stack: Stack,
) -> None:
    tenant, key = tenant_key()
    stack.start_worker("--concurrency", "4")
    api = stack.start_api(processes=1)
    (daphne,) = wait_until(lambda: child_pids(api.pid), timeout=10, message="no API process")
    before = stack.create_batch(key, [SLEEP_0] * 3)
    wait_until(lambda: finished(before), timeout=30, message="jobs did not finish")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(f"{stack.base_url}/health")  # a page of the same origin
            page.evaluate(OPEN_EVENT_SOURCE, f"/events?token={key}&cursor=0")
            page.wait_for_function("window.received.length >= 3", timeout=20_000)

            os.kill(daphne, signal.SIGKILL)  # `serve` starts another process
            # The ORM from another thread: Playwright runs an event loop in this one.
            with ThreadPoolExecutor(1) as orm_thread:
                expected = orm_thread.submit(jobs_after_restart, stack, key, tenant).result()
            page.wait_for_function(
                "(n) => new Set(window.received.map((r) => r.frame.jobId)).size >= n"
                " && window.opened >= 2",
                arg=len(expected),
                timeout=30_000,
            )
            page.wait_for_timeout(300)
            received = page.evaluate("window.received")
        finally:
            browser.close()
    latest = {r["frame"]["jobId"]: r["frame"] for r in received}
    assert latest == expected
    assert [r["id"] for r in received] == [r["frame"]["cursor"] for r in received]
    cursors = [int(r["id"]) for r in received]
    assert cursors == sorted(set(cursors)), "in cursor order, nothing twice"


def jobs_after_restart(stack: Stack, key: str, tenant: Tenant) -> dict[str, dict[str, Any]]:
    """Once the restarted API answers, jobs created and run; then every job of the tenant as
    the database has it."""
    try:
        wait_until(lambda: healthy(stack.base_url), timeout=30, message="the API is not back")
        during = stack.create_batch(key, [SLEEP_0] * 5)
        wait_until(lambda: finished(during), timeout=30, message="jobs did not finish")
        return {str(job.id): job_update_message(job) for job in Job.objects.filter(tenant=tenant)}
    finally:
        connections.close_all()
