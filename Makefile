# The two commands of README.md. Both install first (scripts/setup is idempotent).
.PHONY: run test setup lint bench bench-growth bench-h2 image image-test

VENV := .venv

setup:
	@bash scripts/setup

run: setup
	$(VENV)/bin/meshlet demo

# CI (.ci/run) sets MESHLET_IMAGE_TEST=1: the image build and its test come after the suite.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest
	@if [ "$${MESHLET_IMAGE_TEST:-0}" = 1 ]; then $(MAKE) --no-print-directory image-test; fi

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python bench/run.py

bench-growth: setup
	$(VENV)/bin/python bench/growth.py

bench-h2: setup
	$(VENV)/bin/python bench/h2_bench.py

# The container image and its -agent variant, as OCI archives under dist/ (scripts/image/build).
image:
	@bash scripts/setup --image
	bash scripts/image/build

# Builds the images, then runs what is in them (tests/image/, which plain pytest leaves out).
image-test: image
	$(VENV)/bin/python -m pytest tests/image
