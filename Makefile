# One entry point: CI runs these same targets (see .ci/run and .github/workflows).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY): pyproject.toml uv.lock
	@echo "==> Python environment in $(VENV) (uv sync --frozen)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	@$(VENV)/bin/uv sync --frozen --quiet
	@touch $(PY)

.PHONY: venv
venv: $(PY) ## Create or update the Python environment

.PHONY: proto
proto: $(PY) ## Regenerate the Python code from protos/
	$(PY) -m kvstack.dev.protogen

.PHONY: lock
lock: $(PY) ## Re-resolve dependencies (uv.lock) and export the image's requirements.lock
	$(VENV)/bin/uv lock
	$(VENV)/bin/uv export --frozen --no-dev --no-emit-project --format requirements-txt --quiet -o requirements.lock
