"""The REST API's URLs alone: what the lean handler (config/handlers.py) resolves against, so a
request does not walk the admin's and the dashboard's patterns first. `/events` is a plain async
view (a stream, which django-ninja's operations do not return), documented in docs/api.md."""

from __future__ import annotations

from django.urls import path

from config.api import api
from realtime.sse import events

urlpatterns = [path("events", events, name="events"), path("", api.urls)]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
