"""The ASGI side of HTTP: the REST API's own paths take a lean handler that stays on the event
loop; everything else (admin, dashboard, API docs, static files) takes Django's standard one.

Why: Django's ASGIHandler costs several thread hops per request even for an `async def` view
(the `request_started`/`request_finished` signals and `response.close()` run through
`sync_to_async`, each request gets a thread-sensitive context, and sync-only middleware such as
WhiteNoise, sessions and CSRF run in threads). The API needs none of that: its views are
`async def`, authenticate with a Bearer key (no cookies, so no session, CSRF or messages), and
do their database work on psycopg's async pool or, for the ORM, through
`jobs.orm.orm`, which returns its connection to the pool itself. The lean handler keeps what the
API does need: URL resolution and django-ninja, the ALLOWED_HOSTS check, the security headers
and HTTPS redirect of SecurityMiddleware, and 413 for oversized bodies. Streaming responses
(the event stream of `/events`) are stopped as soon as the client disconnects, as Django's
handler does, and closed however they end.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.middleware.security import SecurityMiddleware
from django.urls import set_script_prefix, set_urlconf

from realtime.hub import get_hub

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths the lean handler serves: the REST API's (django-ninja) operations and its event stream
# (realtime/sse.py). /docs and /openapi.json stay with Django's handler (they need static files
# and are not hot).
API_PATH_PREFIXES = (
    "/jobs",
    "/stats",
    "/health",
    "/ready",
    "/metrics",
    "/events",
    "/event-subscriptions",
    "/signing-secrets",
    "/schedules",
)
API_URLCONF = "config.api_urls"
PROBE_PATHS = frozenset({"/health", "/ready"})


def is_api_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in API_PATH_PREFIXES)


def _json_error(status: int, message: str) -> HttpResponse:
    return JsonResponse({"error": message}, status=status)


class ApiHandler(ASGIHandler):
    """Django's ASGI handler without the thread hops, for the API's `async def` views."""

    def load_middleware(self, is_async: bool = False) -> None:
        # No middleware chain: the one piece the API needs (SecurityMiddleware, whose methods
        # do no I/O) is called inline in `_respond`.
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        # Unmatched paths and unexpected errors become Django's error responses (config.views).
        self._middleware_chain = convert_exception_to_response(self._get_response_async)
        self.security = SecurityMiddleware(lambda request: HttpResponse())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = io.BytesIO()
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            # Bounded: a client cannot make the process buffer an unbounded body.
            if chunk and body.tell() <= limit:
                body.write(chunk)
            if not message.get("more_body", False):
                break
        body.seek(0)
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body)
        response = error_response if request is None else await self._respond(request)
        if response.streaming:
            await self._send_streaming(response, receive, send)
        else:
            await self.send_response(response, send)

    async def _send_streaming(
        self, response: HttpResponseBase, receive: Receive, send: Send
    ) -> None:
        """Send a streaming response (an event stream, which runs until its client leaves):
        stopped as soon as the client disconnects, and closed however it ends."""
        sending = asyncio.ensure_future(self.send_response(response, send))
        leaving = asyncio.ensure_future(_disconnected(receive))
        client_left = False
        try:
            await asyncio.wait({sending, leaving}, return_when=asyncio.FIRST_COMPLETED)
            client_left = leaving.done()
        finally:
            for task in (leaving, sending):
                task.cancel()
            await asyncio.gather(sending, leaving, return_exceptions=True)
            # What Django's handler does after every response: run the response's closers.
            await sync_to_async(response.close, thread_sensitive=True)()
        if client_left or sending.cancelled() or sending.exception() is None:
            return
        logger.error("a streaming response failed", exc_info=sending.exception())
        # End the response the client is reading (the server ignores it if it has ended).
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _respond(self, request: HttpRequest) -> HttpResponse:
        # Probes (a container's health check, a load balancer) call by IP address, a Host that
        # ALLOWED_HOSTS need not list; these two paths build no URL from it, so any is fine.
        if request.path not in PROBE_PATHS:
            try:
                request.get_host()  # ALLOWED_HOSTS
            except DisallowedHost:
                return _json_error(400, "Invalid Host header")
        redirect = self.security.process_request(request)
        if redirect is not None:
            return redirect
        if request.method in ("POST", "PUT", "PATCH"):
            try:
                request.body  # noqa: B018 -- enforces DATA_UPLOAD_MAX_MEMORY_SIZE
            except RequestDataTooBig:
                response = _json_error(413, "Request body too large")
                return self.security.process_response(request, response)
        request.urlconf = API_URLCONF
        set_urlconf(API_URLCONF)
        response = await self._middleware_chain(request)
        if response.status_code == 405:
            response = _method_not_allowed(response)
        return self.security.process_response(request, response)


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (all of the request body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _method_not_allowed(response: HttpResponse) -> HttpResponse:
    """django-ninja answers a method a path does not take with Django's plain-text 405: say it
    in the API's JSON, keeping the `Allow` header."""
    # Sorted: ninja builds the header from a set, whose order changes from process to process.
    allowed = sorted({m.strip() for m in response.get("Allow", "").split(",") if m.strip()})
    json_response = JsonResponse(
        {"error": "Method not allowed", "details": {"allowed": allowed}}, status=405
    )
    json_response["Allow"] = ", ".join(allowed)
    return json_response


def http_router(api: ASGIApp, django: ASGIApp) -> ASGIApp:
    """Send the API's paths to `api` and every other HTTP request to `django`. Also starts the
    process's realtime hub, whose `P:auth` subscription lets API keys be cached."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        get_hub().start()
        app = api if is_api_path(scope.get("path", "")) else django
        await app(scope, receive, send)

    return route
