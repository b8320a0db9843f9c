"""URLs: the REST API at the root (as the seed had it), the admin under /admin/, the staff
dashboard under /dashboard/."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, reverse_lazy

from config.api import api
from realtime.sse import events

# The admin's "View site" link: the root has no page (it is the API's), the staff dashboard does.
admin.site.site_url = reverse_lazy("dashboard:index")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    # Served by the lean handler (config/api_urls.py); here too so that it resolves everywhere.
    path("events", events, name="events"),
    path("", api.urls),
]

handler400 = "config.views.bad_request"
handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
