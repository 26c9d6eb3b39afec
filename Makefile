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

# The Docker side: `kvstack` (src/kvstack/ops) does the work and prints every command it runs; on
# a Debian/Ubuntu machine as root with no engine answering it installs and starts Docker first.
KVSTACK := $(VENV)/bin/kvstack

.PHONY: images
images: $(PY) ## Build every service's image (one Dockerfile)
	$(KVSTACK) images

.PHONY: up
up: $(PY) ## Run the whole system on the local Docker engine (Swarm) and run the client
	$(KVSTACK) up

.PHONY: dev
dev: $(PY) ## On every saved change: test, rebuild and roll out the affected services (local stack)
	$(KVSTACK) dev

.PHONY: down
down: $(PY) ## Remove the local stack, keeping its data (make down VOLUMES=1 removes that too)
	$(KVSTACK) down $(if $(VOLUMES),--volumes)

.PHONY: test
test: images ## Every test: unit, integration, containers (same set-up as `make up`)
	$(PY) -m pytest

.PHONY: test-fast
# Three workers on two cores: most of these tests wait (on real service processes, on timeouts),
# so a third worker still gains (measured: 4 min 36 s in one process, 2 min 55 s in three).
test-fast: $(PY) ## The tests that need no Docker engine nor images (every level but containers; under 3 min)
	$(PY) -m pytest -n 3 -m "not containers"

.PHONY: bench
bench: $(PY) ## Measure throughput, latency, logging's cost, etcd beside us and writes through rollouts (about 12 min; installs Debian's etcd-server if missing); writes docs/benchmarks.md
	$(PY) -m kvstack.dev.bench

.PHONY: lint
lint: $(PY) ## ruff, mypy, hadolint, shellcheck
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck .ci/run tests/*.sh

# CI (.github/workflows) calls these too; see docs/automation.md.
.PHONY: generate
generate: $(PY) ## Regenerate what is generated (protos, manifests); CI fails if that changes the tree
	$(PY) -m kvstack.dev.protogen
	$(KVSTACK) manifests

.PHONY: clean-tree
clean-tree: ## Fail if the work tree has changes (generated files out of date, or a test wrote one)
	@git status --porcelain --untracked-files=all | { ! grep .; } || { git diff; echo "work tree is dirty: run make generate and commit"; exit 1; }

.PHONY: e2e-kind
e2e-kind: images ## End to end on a kind cluster (CI runner): load images, apply, smoke, kill a pod, scale
	tests/e2e-kind.sh
