"""The project's NinjaAPI: mounts the routers, parses JSON strictly, renders every error as
`{"error": ..., "details": ...}`."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import psycopg
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError, connection
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic.alias_generators import to_camel

from jobs.api import router as jobs_router
from jobs.errors import ApiError
from jobs.metrics import metrics_authorized, metrics_exposed, render_metrics
from jobs.orm import orm
from jobs.pg import DatabaseUnavailable
from jobs.queue import sync_queue
from jobs.schemas import ErrorOut, HealthOut, ReadyOut
from jobs.validation import VALIDATION_FAILED, error_details

logger = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ApiError(
                400, VALIDATION_FAILED, [{"field": "", "message": "JSON nested too deeply"}]
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _parse_error(exc: Exception) -> str:
    """What was wrong with a body that is not JSON, without Python's advice to programmers."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    message = str(exc)
    if "integer string conversion" in message:
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return message[:200]


class StrictJSONParser(Parser):
    """JSON bodies only; no NaN/Infinity, bounded nesting, clear errors."""

    def parse_body(self, request: HttpRequest) -> Any:
        if request.content_type != "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        try:
            data = json.loads(request.body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "Malformed JSON", _parse_error(exc)) from exc
        _check_depth(data, MAX_JSON_DEPTH)
        return data


api = NinjaAPI(
    title="Job queue API",
    version="1.0.0",
    description=(
        "Multi-tenant real-time job queue. Authenticate with `Authorization: Bearer <key>`."
    ),
    parser=StrictJSONParser(),
    urls_namespace="api",
)
api.add_router("", jobs_router)


def error_response(
    request: HttpRequest,
    status: int,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    body: dict[str, Any] = {"error": message}
    if details is not None:
        body["details"] = details
    response = api.create_response(request, body, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


@api.exception_handler(ApiError)
def on_api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error_response(request, exc.status, exc.message, exc.details, exc.headers)


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = []
    for err in exc.errors:
        loc = list(err.get("loc", ()))
        # ninja prefixes the source ("body", "query", "path") and the parameter's name.
        if loc and loc[0] in ("body", "query", "path", "header"):
            source = loc[0]
            loc = loc[2:] if source == "body" and len(loc) > 1 else loc[1:]
            if source in ("query", "path") and loc:
                # Python's parameter name (`job_id`), as the API spells it (`jobId`).
                loc = [to_camel(str(loc[0])), *loc[1:]]
        errors.append({**err, "loc": loc})
    return error_response(request, 400, VALIDATION_FAILED, error_details(errors))


@api.exception_handler(AuthenticationError)
def on_authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(
        request, 401, "Missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
    )


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja wraps parser errors; show ours (415, 413, malformed JSON) rather than its generic one.
    if isinstance(exc.__cause__, ApiError):
        return on_api_error(request, exc.__cause__)
    return error_response(request, exc.status_code, str(exc.message))


@api.exception_handler(RequestDataTooBig)
def on_body_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(
        request, 413, "Request body too large", {"maxBytes": settings.DATA_UPLOAD_MAX_MEMORY_SIZE}
    )


@api.exception_handler(Http404)
def on_not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, 404, "Not found")


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
@api.exception_handler(DatabaseUnavailable)
@api.exception_handler(psycopg.OperationalError)
def on_database_down(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.error("database unavailable: %s", exc)
    return error_response(request, 503, "Database unavailable", headers={"Retry-After": "5"})


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(request, 500, "Internal server error")


@api.get("/health", response=HealthOut, by_alias=True, tags=["service"])
async def health(request: HttpRequest) -> dict:
    """Liveness: answers as long as the process serves requests; checks no dependency."""
    return {"status": "ok", "timestamp": timezone.now()}


@api.get(
    "/metrics",
    tags=["service"],
    include_in_schema=True,
    openapi_extra={
        "responses": {
            200: {
                "description": "Prometheus text exposition",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            },
            401: {"description": "JOBS_METRICS_TOKEN is set and was not sent"},
            404: {"description": "JOBS_METRICS_TOKEN is not set (and DEBUG is off)"},
        }
    },
)
async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition, with `Authorization: Bearer <JOBS_METRICS_TOKEN>`. Without
    that setting it is not served (404) unless DEBUG is on."""
    if not metrics_exposed():
        return error_response(request, 404, "Not found")
    if not metrics_authorized(request.headers.get("Authorization", "")):
        return error_response(request, 401, "Missing or invalid metrics token")
    body = await orm(render_metrics)()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


@api.get("/ready", response={200: ReadyOut, 503: ErrorOut}, by_alias=True, tags=["service"])
async def ready(request: HttpRequest) -> Any:
    """Readiness: the database and Redis answer; 503 names what is down."""
    checks = await orm(_readiness)()
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        return error_response(request, 503, f"not ready: {', '.join(down)} down", checks)
    return {"status": "ok", "checks": checks}


def _readiness() -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        sync_queue().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}"
    return checks
