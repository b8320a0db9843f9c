"""Environment parsing helpers: every setting is read once, here and in settings.py."""

from __future__ import annotations

import math
import os
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

TRUE_VALUES = {"1", "true", "yes", "on"}
FALSE_VALUES = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_float(
    name: str, default: float, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value):
        raise ImproperlyConfigured(f"{name} must be a finite number, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be <= {maximum}, got {value}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def parse_email_url(url: str) -> dict[str, object]:
    """Turn `EMAIL_URL` into Django's EMAIL_* settings.

    Supported: `smtp://user:pass@host:port` (`?tls=1` for STARTTLS), `smtps://...` (implicit TLS),
    `console://`, `locmem://`, `file:///path`, `dummy://`.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    simple_backends = {
        "console": "django.core.mail.backends.console.EmailBackend",
        "locmem": "django.core.mail.backends.locmem.EmailBackend",
        "dummy": "django.core.mail.backends.dummy.EmailBackend",
    }
    if scheme in simple_backends:
        return {"EMAIL_BACKEND": simple_backends[scheme]}
    if scheme == "file":
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
            "EMAIL_FILE_PATH": unquote(parts.path) or "var/mail",
        }
    if scheme in {"smtp", "smtps"}:
        implicit_tls = scheme == "smtps" or query.get("ssl", "").lower() in TRUE_VALUES
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": parts.hostname or "localhost",
            "EMAIL_PORT": parts.port or (465 if implicit_tls else 25),
            "EMAIL_HOST_USER": unquote(parts.username or ""),
            "EMAIL_HOST_PASSWORD": unquote(parts.password or ""),
            "EMAIL_USE_SSL": implicit_tls,
            "EMAIL_USE_TLS": not implicit_tls and query.get("tls", "").lower() in TRUE_VALUES,
            "EMAIL_TIMEOUT": int(query.get("timeout", "30")),
        }
    raise ImproperlyConfigured(
        f"EMAIL_URL scheme {scheme!r} is not supported (smtp, smtps, console, locmem, file, dummy)"
    )
