"""JSON error pages for paths outside the API (the API renders its own errors)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    # Also what a Host outside ALLOWED_HOSTS gets (Django's DisallowedHost) on any path.
    return JsonResponse({"error": "Bad request"}, status=400)


def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse({"error": "Not found"}, status=404)


def server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"error": "Internal server error"}, status=500)
