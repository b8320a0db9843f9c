"""The staff dashboard under /dashboard/."""

from __future__ import annotations

from django.urls import path

from dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.index, name="index"),
    path("api/stats", views.stats, name="stats"),
]
