"""The dashboard in a real headless Chromium (Playwright) against Daphne and a worker run as
subprocesses: log in through the admin form, watch jobs created over the REST API appear and
finish without reloading the page; the admin, the dashboard and the API docs work under their
Content-Security-Policy, which the browser enforces."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Response,
    expect,
    sync_playwright,
)

from jobs.models import Tenant
from jobs.queue import sync_queue
from jobs.services import api_key_create
from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.django_db(transaction=True)

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


# Records every Content-Security-Policy violation of the page (the browser's own report of
# what it blocked), from before the page's first script runs.
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
    window.cspViolations.push(
        `${event.effectiveDirective} blocked ${event.blockedURI || "inline"} ` +
        `at ${event.sourceFile}:${event.lineNumber}`);
});
"""


def watch_csp(page: Page) -> list[str]:
    """Console messages about the policy, from now on; violations are also kept in the page."""
    page.add_init_script(RECORD_CSP_VIOLATIONS)
    messages: list[str] = []
    page.on(
        "console",
        lambda m: messages.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return messages


def csp_violations(page: Page) -> list[str]:
    return page.evaluate("window.cspViolations")


def policy_of(response: Response | None) -> dict[str, str]:
    """The enforced policy of a page's response, directive by directive."""
    assert response is not None
    header = response.headers.get("content-security-policy", "")
    directives = (part.strip().partition(" ") for part in header.split(";") if part.strip())
    return {name: value for name, _, value in directives}


def dashboard_page(stack: Stack) -> Callable[[Response], bool]:
    """Matches the dashboard page itself (not the redirect to the login form)."""
    return lambda response: response.url == f"{stack.base_url}/dashboard/" and response.ok


def open_circuit(host: str, *, failures: int) -> None:
    """Fail `failures` requests to `host` as workers report them, which opens its circuit."""
    queue = sync_queue()
    for n in range(failures):
        queue.acquire_host(host=host, holder=f"h{n}", limit=8, lease_ms=5000, cooldown_ms=60_000)
        queue.release_host(
            host=host,
            holder=f"h{n}",
            verdict="failed",
            failures_to_open=failures,
            cooldown_ms=60_000,
            keep_ms=600_000,
        )


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
    csp_messages = watch_csp(page)

    with page.expect_response(dashboard_page(stack)) as dashboard:
        admin_login(page, stack, "operator")
    expect(page).to_have_url(f"{stack.base_url}/dashboard/")
    # The live feed below works under the strict policy (no inline code, the socket allowed).
    assert policy_of(dashboard.value).get("script-src") == "'self'"
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
    # A webhook host whose circuit opens shows up in the open-circuits panel.
    expect(page.locator("#circuits-table")).to_contain_text("No open circuit")
    open_circuit("down.example:443", failures=2)
    circuit = page.locator('#circuits-table tr[data-host="down.example:443"]')
    expect(circuit).to_contain_text("open", timeout=WAIT_MS)
    expect(circuit.locator("td.num")).to_have_text("2")
    assert page.evaluate("window.sameDocument") is True, "the page reloaded"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"\ndashboard screenshot: {SCREENSHOT}")
    assert problems == []
    assert csp_violations(page) == [] and csp_messages == []

    # The feed links each job to its admin page, whose timeline names the worker.
    feed_row(page, sleeps[0], "COMPLETED").locator("a code").click()
    expect(page).to_have_url(f"{stack.base_url}/admin/jobs/job/{sleeps[0]}/change/")
    expect(page.locator("table.job-timeline")).to_contain_text("on worker e2e-worker")


def test_admin_dashboard_and_api_docs_work_under_their_content_security_policy(
    stack: Stack,
) -> None:
    Tenant.objects.create(id="acme", name="Acme Inc.")
    get_user_model().objects.create_superuser("operator", password=PASSWORD)
    stack.start_api()
    with chromium() as browser:
        browse_under_the_policy(stack, browser)


def browse_under_the_policy(stack: Stack, browser: Browser) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(f"{m.text} {m.location}") if _is_error(m) else None)
    csp_messages = watch_csp(page)
    policies: dict[str, dict[str, str]] = {}

    # The admin's login page.
    policies["login"] = policy_of(page.goto(f"{stack.base_url}/admin/login/"))
    expect(page.locator("#id_username")).to_be_visible()
    assert csp_violations(page) == []

    # The dashboard, its socket live, its stats polled.
    with page.expect_response(dashboard_page(stack)) as dashboard:
        page.fill("#id_username", "operator")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url(f"{stack.base_url}/admin/")
        page.goto(f"{stack.base_url}/dashboard/")
    policies["dashboard"] = policy_of(dashboard.value)
    expect(page.locator("#ws-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    expect(page.locator("#stats-time")).not_to_have_text("—", timeout=WAIT_MS)
    assert csp_violations(page) == [] and csp_messages == [] and errors == []

    # The control: the browser does enforce the policy, and a violation would be seen. An
    # injected inline script does not run.
    ran = page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.injectedScriptRan = true";
            document.body.append(script);
            return window.injectedScriptRan === true;
        }"""
    )
    assert ran is False
    page.wait_for_function("window.cspViolations.length > 0", timeout=WAIT_MS)
    assert [v.split(" ", 1)[0] for v in csp_violations(page)] == ["script-src-elem"]
    csp_messages.clear()
    errors.clear()  # the browser reports the blocked script as a console error too

    # The API docs (Swagger UI from our own static files), including a call made from them.
    policies["docs"] = policy_of(page.goto(f"{stack.base_url}/docs"))
    health = page.locator(".opblock-get", has_text="/health")
    expect(health).to_be_visible(timeout=WAIT_MS)
    health.locator(".opblock-summary").click()
    page.get_by_role("button", name="Try it out").click()
    page.get_by_role("button", name="Execute").click()
    status = health.locator(".live-responses-table tbody .response-col_status")
    expect(status).to_contain_text("200", timeout=WAIT_MS)
    assert csp_violations(page) == []

    for where, policy in policies.items():
        assert policy.get("default-src") == "'self'", where
        assert policy.get("script-src") == "'self'", where
        assert policy.get("style-src") == "'self'", where
    assert csp_messages == []
    assert errors == []


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
