# The two commands of README.md. Both install first (scripts/setup is idempotent).
.PHONY: run test setup lint bench bench-growth bench-h2

VENV := .venv

setup:
	@bash scripts/setup

run: setup
	$(VENV)/bin/meshlet demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python bench/run.py

bench-growth: setup
	$(VENV)/bin/python bench/growth.py

bench-h2: setup
	$(VENV)/bin/python bench/h2_bench.py
