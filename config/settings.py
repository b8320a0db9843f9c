"""Django settings, parsed once from the environment (12-factor). See README for the table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

from config.env import env_bool, env_float, env_int, env_list, env_str, parse_email_url
from config.logging import logging_config
from jobs.redis_clients import RedisUrlError, check_redis_url, parse_cluster_url

BASE_DIR = Path(__file__).resolve().parent.parent
# Local state of a development run (embedded SQLite, private Redis, demo key); never committed.
VAR_DIR = Path(env_str("JOBS_VAR_DIR", str(BASE_DIR / "var"))).resolve()

TESTING = "pytest" in sys.modules
if not TESTING:
    # `make run` writes var/run.env (DEBUG=1, a generated SECRET_KEY, the Redis and database it
    # runs on) so that the README's `manage.py` commands, typed in any shell, act on that service.
    # The real environment always wins; the tests get theirs alone.
    load_dotenv(VAR_DIR / "run.env", override=False)
DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if DEBUG or TESTING:
        SECRET_KEY = "insecure-development-only-key-not-for-production-use-0123456789"
    else:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (for development: DEBUG=1, or `make run`"
            " once, which writes var/run.env)"
        )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
if DEBUG or TESTING:
    ALLOWED_HOSTS = [*ALLOWED_HOSTS, "testserver"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",
    "jobs",
    "realtime",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's, the API docs' and the dashboard's static files from this process.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Content-Security-Policy on every page this chain serves (the API's own paths take the
    # lean handler, config/handlers.py, and need none: they answer JSON).
    "config.csp.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

# --- Database -----------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    # No persistent per-thread connections: under ASGI every request may run in a thread of its
    # own, and each would keep a connection open. A pool (psycopg_pool) shares a few instead.
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("JOBS_DB_POOL_MIN", 2, minimum=0),
            "max_size": env_int("JOBS_DB_POOL_MAX", 10, minimum=1),
            # Backpressure: under load a request waits up to this long for a pooled connection
            # (a busy pool hands one over in milliseconds), then gets 503, as while the database
            # is down.
            "timeout": env_int("JOBS_DB_POOL_TIMEOUT_S", 3, minimum=1),
        }
else:
    VAR_DIR.mkdir(exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "jobs.sqlite3",
            # WAL lets the API read while the worker writes; the busy timeout absorbs short locks.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis -------------------------------------------------------------------------------------
# One server (`redis://...`) or a Sentinel set (`redis+sentinel://...`): jobs/redis_clients.py.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
try:
    check_redis_url(REDIS_URL)
except RedisUrlError as exc:
    raise ImproperlyConfigured(f"REDIS_URL: {exc}") from exc
# The queue on a Redis Cluster (docs/scaling.md): any of its nodes, `redis://h1:6379,h2:6379`.
# Pub/sub and the keys spanning slots stay on REDIS_URL (a plain server or a Sentinel set).
REDIS_CLUSTER_URL = env_str("REDIS_CLUSTER_URL", "")
if REDIS_CLUSTER_URL:
    try:
        parse_cluster_url(REDIS_CLUSTER_URL)
    except RedisUrlError as exc:
        raise ImproperlyConfigured(f"REDIS_CLUSTER_URL: {exc}") from exc
JOBS_REDIS_PREFIX = env_str("JOBS_REDIS_PREFIX", "jobs")
if not re.fullmatch(r"[A-Za-z0-9_\-.]{1,24}", JOBS_REDIS_PREFIX):
    raise ImproperlyConfigured("JOBS_REDIS_PREFIX must be 1-24 characters of [A-Za-z0-9_-.]")

# No channel layer: job updates travel on Redis pub/sub, one subscription per tenant per API
# process (realtime/hub.py), so consumers need no channel of their own.

# --- Email --------------------------------------------------------------------------------------
EMAIL_URL = env_str("EMAIL_URL", "console://")
for _name, _value in parse_email_url(EMAIL_URL).items():
    globals()[_name] = _value
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "jobs@localhost")

# --- Security -----------------------------------------------------------------------------------
HTTPS = env_bool("HTTPS", False)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# The admin, the dashboard and the API docs (Swagger UI, served from our own static files) have
# no inline script or style, so the policy needs no 'unsafe-inline' and no nonce. connect-src
# also gets this host's ws:// and wss:// origins (config/csp.py) for the dashboard's socket.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("JOBS_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024)

# Password logins (the admin's) are throttled per client address and per user name
# (config/login_throttle.py).
AUTHENTICATION_BACKENDS = ["config.login_throttle.ThrottledModelBackend"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # collectstatic's target; WhiteNoise expects it
# Files are found in the apps' static/ folders directly, so no collectstatic step is needed.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- Job queue ----------------------------------------------------------------------------------
JOBS = {
    "REDIS_PREFIX": JOBS_REDIS_PREFIX,
    "WEBHOOK_ALLOWED_HOSTS": env_list("JOBS_WEBHOOK_ALLOWED_HOSTS"),
    # How long a tenant's previous signing secrets keep signing after a rotation (docs/webhooks.md).
    "WEBHOOK_SECRET_OVERLAP_S": env_int("JOBS_WEBHOOK_SECRET_OVERLAP_S", 86400, minimum=0),
    # Destination protection (jobs/destinations.py, docs/webhooks.md): requests at once per host
    # over all workers, consecutive failures that open a host's circuit, and how long it stays
    # open before one probe request is let through.
    "WEBHOOK_HOST_CONCURRENCY": env_int("JOBS_WEBHOOK_HOST_CONCURRENCY", 8, minimum=1),
    "WEBHOOK_BREAKER_FAILURES": env_int("JOBS_WEBHOOK_BREAKER_FAILURES", 10, minimum=1),
    "WEBHOOK_BREAKER_COOLDOWN_S": env_int("JOBS_WEBHOOK_BREAKER_COOLDOWN_S", 60, minimum=1),
    "RETRY_BASE_MS": env_int("JOBS_RETRY_BASE_MS", 1000, minimum=0),
    "RETRY_MAX_MS": env_int("JOBS_RETRY_MAX_MS", 300000, minimum=0),
    "LEASE_S": env_int("JOBS_LEASE_S", 30, minimum=1),
    "RECONCILE_INTERVAL_S": env_int("JOBS_RECONCILE_INTERVAL_S", 30, minimum=1),
    "MAX_PAYLOAD_BYTES": env_int("JOBS_MAX_PAYLOAD_BYTES", 262144, minimum=64),
    "SLEEP_MAX_MS": env_int("JOBS_SLEEP_MAX_MS", 600000, minimum=0),
    "TENANT_RATE_LIMIT": env_int("JOBS_TENANT_RATE_LIMIT", 0, minimum=0),
    # Senders `email` jobs may use besides DEFAULT_FROM_EMAIL: addresses, `@domain` or `domain`
    # entries (jobs/email_policy.py). Tenants put their own address in `replyTo`.
    "EMAIL_ALLOWED_SENDERS": env_list("JOBS_EMAIL_ALLOWED_SENDERS"),
    # Recipients (to) each tenant's email jobs may address per sliding hour; 0 is unlimited.
    "EMAIL_RECIPIENTS_PER_HOUR": env_int("JOBS_EMAIL_RECIPIENTS_PER_HOUR", 1000, minimum=0),
    # While other tenants have ready jobs, a tenant running ceil(share x the cluster's slots)
    # jobs gets no more; alone it may take every free slot but RESERVE. 0 or 1: off.
    "TENANT_FAIR_SHARE": env_float("JOBS_TENANT_FAIR_SHARE", 0.5, minimum=0, maximum=1),
    "TENANT_FAIR_SHARE_RESERVE": env_int("JOBS_TENANT_FAIR_SHARE_RESERVE", 0, minimum=0),
    # Queue shards (each its own hash tag, so its own cluster slot): a tenant's jobs are in the
    # shard of its id's hash, workers claim from the shards in turn. Change it only with the
    # workers stopped (reconciliation re-indexes PENDING jobs in their new shard).
    "QUEUE_SHARDS": env_int("JOBS_QUEUE_SHARDS", 16 if REDIS_CLUSTER_URL else 1, minimum=1),
    "METRICS_TOKEN": env_str("JOBS_METRICS_TOKEN"),
    # Failed password logins per client address or user name before logins are refused for
    # LOGIN_WINDOW_S; 0 turns the throttle off.
    "LOGIN_ATTEMPTS": env_int("JOBS_LOGIN_ATTEMPTS", 10, minimum=0),
    "LOGIN_WINDOW_S": env_int("JOBS_LOGIN_WINDOW_S", 900, minimum=1),
    "SINCE_REPLAY_LIMIT": 1000,
    # Open WebSockets per API key and per tenant, over every API process (0: no cap), and rows
    # a tenant's `since` replays may read per second (0: no budget).
    "WS_MAX_PER_KEY": env_int("JOBS_WS_MAX_PER_KEY", 100, minimum=0),
    "WS_MAX_PER_TENANT": env_int("JOBS_WS_MAX_PER_TENANT", 300, minimum=0),
    "WS_REPLAY_ROWS_PER_S": env_int("JOBS_WS_REPLAY_ROWS_PER_S", 2000, minimum=0),
    # Bytes a WebSocket or /events stream may have waiting in the server for a client that
    # reads slowly; past it a socket's live updates are dropped (RESYNC once it has read half),
    # a stream waits before it reads more.
    "WS_SEND_BUFFER_BYTES": env_int("JOBS_WS_SEND_BUFFER_BYTES", 1024 * 1024, minimum=1024),
    # Schedules (jobs/scheduling.py, docs/schedules.md): the shortest `every` a schedule may
    # have, and how many schedules one tenant may keep.
    "SCHEDULE_MIN_EVERY_S": env_int("JOBS_SCHEDULE_MIN_EVERY_S", 1, minimum=1),
    "MAX_SCHEDULES_PER_TENANT": env_int("JOBS_MAX_SCHEDULES_PER_TENANT", 100, minimum=0),
    # PostgreSQL: months of jobs per partition of jobs_job (by created_at, docs/operations.md).
    "PARTITION_MONTHS": env_int("JOBS_PARTITION_MONTHS", 1, minimum=1),
    # How the API's hot endpoints reach the database: "postgres" (psycopg's async pool on the
    # event loop, jobs/api_store.py) or "orm" (the ORM in a thread: SQLite, and unit tests, whose
    # data lives in a transaction only Django's own connection sees).
    "API_STORE": "postgres"
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and not TESTING
    else "orm",
}
if JOBS["QUEUE_SHARDS"] > 256:  # every heartbeat and idle claim touches each shard
    raise ImproperlyConfigured("JOBS_QUEUE_SHARDS must be at most 256")

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
# `plain` for people, `json` (one object per line, `extra` fields as keys) for log shippers.
LOG_FORMAT = env_str("LOG_FORMAT", "plain").strip().lower()
LOGGING = logging_config(log_format=LOG_FORMAT, level=LOG_LEVEL)
