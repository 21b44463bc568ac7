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
  # Bytecode is compiled once here: where PYTHONDONTWRITEBYTECODE is set, every process
  # (each CLI call, each subprocess of the tests) would otherwise recompile its imports,
  # about 10 s of start-up for the stream processor.
  .venv/bin/python -m uv pip install --quiet --compile-bytecode --python .venv/bin/python -e '.[dev]'
  echo "$want" > "$stamp"
fi
# The project's own modules change between installs; compiling them is quick and skips
# files whose bytecode is current.
.venv/bin/python -m compileall -q src >/dev/null || true
