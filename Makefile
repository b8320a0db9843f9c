# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/jobs
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: uv install run test lint format bench

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

install: uv
	@$(UV) sync --locked

# `exec`: make's child is run.py itself, with no shell or `uv run` in between, so each stop
# signal reaches it once: the terminal's Ctrl-C (sent to the whole group), the SIGTERM make
# passes on, and a SIGINT sent to make alone (run.py watches for it: make does not pass it on).
run: install
	@exec "$${UV_PROJECT_ENVIRONMENT:-.venv}/bin/python" scripts/run.py

test: install
	@DATABASE_URL="$${DATABASE_URL:-$(TEST_DATABASE_URL)}" REDIS_URL="$${REDIS_URL:-$(TEST_REDIS_URL)}" \
		$(UV) run python scripts/check_services.py && \
	DATABASE_URL="$${DATABASE_URL:-$(TEST_DATABASE_URL)}" REDIS_URL="$${REDIS_URL:-$(TEST_REDIS_URL)}" \
		$(UV) run pytest $(PYTEST_ARGS)

lint:
	@$(UV) run ruff check . && $(UV) run ruff format --check .

format:
	@$(UV) run ruff check --fix . && $(UV) run ruff format .

# The performance suite (bench/README.md; about 20 minutes, `make bench BENCH_ARGS=--quick` about 3),
# then the fairness benchmark (FAIRNESS_ARGS). Both run; the target fails if either did.
bench: install
	@cd bench && export DATABASE_URL="$${DATABASE_URL:-$(TEST_DATABASE_URL)}" \
		REDIS_URL="$${REDIS_URL:-$(TEST_REDIS_URL)}"; \
	$(UV) run python suite.py $(BENCH_ARGS); suite=$$?; \
	$(UV) run python fairness.py $(FAIRNESS_ARGS); fairness=$$?; \
	exit $$(( suite || fairness ))
