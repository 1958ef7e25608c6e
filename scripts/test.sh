#!/usr/bin/env bash
# Runs the checks and the whole test suite: generated code up to date, lint, import contracts,
# tests.
# Arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/client`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/ruff check --quiet .
# The import direction of the packages (contracts in pyproject.toml); no cache in the work tree.
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -q "$@"
