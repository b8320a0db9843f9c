"""URLs: the REST API at the root (as the seed had it), the admin under /admin/."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from config.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", api.urls),
]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
