"""The REST API's URLs alone: what the lean handler (config/handlers.py) resolves against, so a
request does not walk the admin's and the dashboard's patterns first."""

from __future__ import annotations

from django.urls import path

from config.api import api

urlpatterns = [path("", api.urls)]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
