"""The Content-Security-Policy of the HTML pages (admin, dashboard, API docs): django-csp's
middleware with `connect-src` naming this host's own WebSocket origins.

CSP Level 3 lets `'self'` match `ws:`/`wss:` on the page's own host, but browsers before it
(Safari until 15.4, for one) do not, and `ws:`/`wss:` alone would let a page connect to any
host. So `ws://<host>` and `wss://<host>` are added for the host of each request (already
checked against ALLOWED_HOSTS; `wss:` too, for a TLS proxy that does not tell us it is one).
"""

from __future__ import annotations

import re

from csp.middleware import CSPMiddleware, PolicyParts
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponseBase

# A host as CSP's host-source grammar spells it: a name or IPv4 address, an optional port.
# (Bracketed IPv6 literals are not valid there; such a page keeps `'self'` alone.)
_CSP_HOST_RE = re.compile(r"[a-z0-9.-]+(:[0-9]{1,5})?", re.IGNORECASE)


def websocket_sources(request: HttpRequest) -> list[str]:
    """`ws://` and `wss://` sources for the host the request came to, if it can be named."""
    try:
        host = request.get_host()
    except DisallowedHost:
        return []
    if not _CSP_HOST_RE.fullmatch(host):
        return []
    return [f"ws://{host}", f"wss://{host}"]


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    """django-csp's middleware, with the request's own WebSocket origins in `connect-src`."""

    def get_policy_parts(
        self, request: HttpRequest, response: HttpResponseBase, report_only: bool = False
    ) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        sources = websocket_sources(request)
        if sources:
            update = dict(parts.update or {})
            update["connect-src"] = [*(update.get("connect-src") or ()), *sources]
            parts.update = update
        return parts
