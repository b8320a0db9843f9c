# The API (`manage.py serve`: Daphne processes on one port) and the worker share this image;
# docker-compose.yml picks the command.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH="/opt/venv/bin:$PATH"

# Pinned: the same uv resolves uv.lock the same way on every build (keep in step with the
# version developers use, `uv --version`).
RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /app
COPY pyproject.toml uv.lock ./
# The Python SDK (client/) is a path dependency of the dev group: uv reads it to check the lock,
# though --no-dev does not install it.
COPY client/ client/
RUN uv sync --locked --no-dev --no-install-project

COPY . .
RUN useradd --system --uid 1000 app && mkdir -p /app/var && chown app /app/var
USER app

EXPOSE 8000
# docker-compose.yml overrides this for the migrate step and the worker.
CMD ["python", "manage.py", "serve", "--host", "0.0.0.0", "--port", "8000"]
