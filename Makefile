.DEFAULT_GOAL := help
VENV := .venv/bin

.PHONY: help install lock lock-upgrade demo test lint typecheck unit bench bench-service bench-stream bench-store bench-dashboard

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: ## Create or update the virtual environment (.venv) from uv.lock
	@bash scripts/bootstrap.sh

lock: ## Re-resolve uv.lock after editing dependencies in pyproject.toml, then sync .venv
	@bash scripts/bootstrap.sh lock

lock-upgrade: ## Refresh uv.lock to the newest versions pyproject.toml allows, then sync .venv
	@bash scripts/bootstrap.sh lock --upgrade

demo: install ## Simulate a fleet, train, register and score on embedded defaults
	$(VENV)/driverscore demo

lint: install ## ruff check, format check and the import-linter layer contracts
	$(VENV)/ruff check src tests bench
	$(VENV)/ruff format --check src tests bench
	$(VENV)/lint-imports

typecheck: install ## mypy --strict on the package
	$(VENV)/mypy

test: lint typecheck ## The whole test suite: lint, types, unit, model and integration tests
	$(VENV)/pytest

bench: install ## Benchmarks: cleaning + trips + features, then the simulator
	$(VENV)/python bench/bench_features.py
	$(VENV)/python bench/bench_simulation.py

bench-service: install ## Scoring service vs mlflow models serve vs bare ASGI (needs wrk)
	$(VENV)/python bench/bench_service.py

bench-stream: install ## Kafka stream processor vs the Quix Streams ceiling (local broker)
	$(VENV)/python bench/bench_stream.py --exactly-once

bench-store: install ## Score store: DuckDB ingest and queries at 1M/10M trips, Druid at 1M
	$(VENV)/python bench/bench_store.py
	$(VENV)/python bench/bench_store.py --trips 1000000 --druid

bench-dashboard: install ## Web dashboard: each page's server time at 1M stored trips (DuckDB)
	$(VENV)/python bench/bench_dashboard.py
