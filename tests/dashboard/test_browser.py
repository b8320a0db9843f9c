"""The dashboard in a real headless Chromium (Playwright) against Daphne and a worker run as
subprocesses: log in through the admin form, watch jobs created over the REST API appear and
finish without reloading the page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.e2e.conftest import ROOT, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"
PASSWORD = "correct-horse-battery-staple-42"
WAIT_MS = 20_000
LOGIN_URL = re.compile(r"/admin/login/\?next=/dashboard/$")


@pytest.fixture(autouse=True)
def needs_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            "no /usr/bin/chromium: install Debian's chromium (apt-get install -y chromium); "
            ".ci/run installs it"
        )


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium. Playwright's sync API runs an event loop in this thread while it is
    open, so the ORM (sync only) must be done with before."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def admin_login(page: Page, stack: Stack, username: str) -> None:
    """Open the dashboard, get sent to the admin login, and submit its form."""
    page.goto(f"{stack.base_url}/dashboard/")
    expect(page).to_have_url(LOGIN_URL)
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")


def feed_row(page: Page, job_id: str, status: str) -> object:
    return page.locator(f'#feed tr[data-job-id="{job_id}"][data-status="{status}"]')


def test_staff_watch_jobs_run_live_on_the_dashboard(stack: Stack) -> None:
    acme = Tenant.objects.create(id="acme", name="Acme Inc.")
    Tenant.objects.create(id="globex", name="Globex")
    _, key = api_key_create(tenant=acme)
    get_user_model().objects.create_superuser("operator", password=PASSWORD)
    stack.start_api()
    with chromium() as browser:
        watch_jobs_run(stack, browser, key)


def watch_jobs_run(stack: Stack, browser: Browser, key: str) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console", lambda m: problems.append(f"{m.text} {m.location}") if _is_error(m) else None
    )
    page.on(
        "response",
        lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
    )

    admin_login(page, stack, "operator")
    expect(page).to_have_url(f"{stack.base_url}/dashboard/")
    # Connected over /ws with the session, and subscribed to both tenants shown.
    expect(page.locator("#ws-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    expect(page.locator("#ws-state")).to_contain_text("2 tenants")
    expect(page.locator("#count-total")).to_have_text("0")
    page.evaluate("window.sameDocument = true")

    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ) as api:
        sleeps = [
            api.post("/jobs", json={"type": "sleep", "payload": {"delayMs": 400}}).json()["jobId"]
            for _ in range(3)
        ]
        # Times out on its only attempt: a FAILED job for the feed and the chart.
        doomed = api.post(
            "/jobs",
            json={
                "type": "sleep",
                "payload": {"delayMs": 5000},
                "timeoutMs": 100,
                "maxAttempts": 1,
            },
        ).json()["jobId"]

    for job_id in [*sleeps, doomed]:
        expect(feed_row(page, job_id, "PENDING")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#count-PENDING")).to_have_text("4", timeout=WAIT_MS)

    stack.start_worker("--concurrency", "4")

    for job_id in sleeps:
        expect(feed_row(page, job_id, "RUNNING")).to_have_count(1, timeout=WAIT_MS)
        expect(feed_row(page, job_id, "COMPLETED")).to_have_count(1, timeout=WAIT_MS)
    expect(feed_row(page, doomed, "FAILED")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#count-COMPLETED")).to_have_text("3", timeout=WAIT_MS)
    expect(page.locator("#count-FAILED")).to_have_text("1", timeout=WAIT_MS)
    expect(page.locator("#count-PENDING")).to_have_text("0", timeout=WAIT_MS)
    expect(page.locator("#throughput-summary")).to_contain_text(
        "3 completed, 1 failed", timeout=WAIT_MS
    )
    worker = page.locator('#workers-table tr[data-worker="e2e-worker"]')
    expect(worker).to_contain_text("alive", timeout=WAIT_MS)
    acme_row = page.locator('#tenants-table tr[data-tenant-id="acme"]')
    expect(acme_row.locator('td[data-status="COMPLETED"]')).to_have_text("3")
    assert page.evaluate("window.sameDocument") is True, "the page reloaded"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"\ndashboard screenshot: {SCREENSHOT}")
    assert problems == []

    # The feed links each job to its admin page, whose timeline names the worker.
    feed_row(page, sleeps[0], "COMPLETED").locator("a code").click()
    expect(page).to_have_url(f"{stack.base_url}/admin/jobs/job/{sleeps[0]}/change/")
    expect(page.locator("table.job-timeline")).to_contain_text("on worker e2e-worker")


def test_a_non_staff_user_is_refused_by_page_api_and_websocket(stack: Stack) -> None:
    customer = get_user_model().objects.create_user("customer", password=PASSWORD)
    Tenant.objects.create(id="acme")
    # The admin's login form admits staff only, so a logged-in non-staff session is made here,
    # signed with the server's SECRET_KEY (the session keeps a hash keyed by it).
    original_key = settings.SECRET_KEY
    settings.SECRET_KEY = stack.env["SECRET_KEY"]
    try:
        client = Client()
        client.force_login(customer)
        session = client.cookies[settings.SESSION_COOKIE_NAME].value
    finally:
        settings.SECRET_KEY = original_key
    stack.start_api()
    with chromium() as browser:
        refuse_non_staff(stack, browser, session)


def refuse_non_staff(stack: Stack, browser: Browser, session: str) -> None:
    context = browser.new_context()
    page = context.new_page()

    admin_login(page, stack, "customer")
    expect(page.locator(".errornote")).to_contain_text("staff account")

    context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session, "url": stack.base_url}]
    )

    page.goto(f"{stack.base_url}/dashboard/")
    expect(page).to_have_url(LOGIN_URL)
    expect(page.locator("#content-main, .errornote").first).to_contain_text(
        "You are authenticated as customer, but are not authorized"
    )
    assert context.request.get(f"{stack.base_url}/dashboard/api/stats").status == 403
    outcome = page.evaluate(
        """() => new Promise((resolve) => {
            const ws = new WebSocket(`ws://${location.host}/ws`);
            ws.onopen = () => resolve("open");
            ws.onclose = () => resolve("refused");
        })"""
    )
    assert outcome == "refused"
    context.close()


def _is_error(message: ConsoleMessage) -> bool:
    # The admin's own pages (the login form) have no favicon; that 404 is not ours.
    return message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico")
