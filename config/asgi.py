"""ASGI entry point (Daphne): the REST API on a lean handler, the rest of Django on the standard
one (config/handlers.py), and the job-updates consumer for WebSockets."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# Sets Django up; must run before importing anything that touches models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.handlers import ApiHandler, http_router  # noqa: E402
from realtime.auth import JobsAuthMiddlewareStack  # noqa: E402
from realtime.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http_router(ApiHandler(), django_asgi_app),
        "websocket": JobsAuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
