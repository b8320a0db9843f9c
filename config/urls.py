"""URLs: the REST API at the root (as the seed had it), the admin under /admin/, the staff
dashboard under /dashboard/."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from config.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    path("", api.urls),
]

handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
