#!/usr/bin/env bash
# Creates or updates the project's virtual environment in .venv, idempotently:
# it reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.driverscore-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # uv resolves this dependency set in seconds where pip takes minutes.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.4,<1"
  .venv/bin/python -m uv pip install --quiet --python .venv/bin/python -e '.[dev]'
  echo "$want" > "$stamp"
fi
