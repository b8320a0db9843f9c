"""WebSocket routes, mounted by `config.asgi` behind the authentication middleware."""

from __future__ import annotations

from django.urls import path

from realtime.consumers import JobUpdatesConsumer

websocket_urlpatterns = [
    path("ws", JobUpdatesConsumer.as_asgi()),
]
