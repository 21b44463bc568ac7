#!/usr/bin/env bash
# Creates or updates the project's virtual environment in .venv from the committed lock file
# (uv.lock), with every extra, idempotently: it syncs only when pyproject.toml or uv.lock
# changed since the last successful sync.
#
#   scripts/bootstrap.sh                 sync .venv with uv.lock (make install)
#   scripts/bootstrap.sh lock [ARGS...]  re-resolve uv.lock (uv lock ARGS), then sync
#                                        (make lock; make lock-upgrade passes --upgrade)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Always this folder's .venv, whatever environment the caller has active or configured.
export UV_PROJECT_ENVIRONMENT=.venv
# The interpreter is $PY: uv must not fetch one (only package registries are reachable).
export UV_PYTHON_DOWNLOADS=never
stamp=.venv/.driverscore-installed

ensure_uv() {
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  if [ ! -x .venv/bin/uv ]; then
    # uv is in the lock itself (dev extra), so the exact sync below keeps the uv that runs
    # it; installing the locked version first means that sync does not swap it.
    local version
    version=$(awk '$0 == "name = \"uv\"" { getline; gsub(/[^0-9.]/, ""); print; exit }' \
      uv.lock 2>/dev/null || true)
    .venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip --upgrade >/dev/null
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv${version:+==$version}"
  fi
}

if [ "${1:-}" = lock ]; then
  shift
  ensure_uv
  .venv/bin/uv lock "$@"
fi

want=$(cat pyproject.toml uv.lock | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  ensure_uv
  # A lock that no longer matches pyproject.toml fails here rather than installing stale pins.
  if ! .venv/bin/uv lock --check --quiet; then
    echo "bootstrap: uv.lock does not match pyproject.toml; run 'make lock' and commit uv.lock" >&2
    exit 1
  fi
  # Bytecode is compiled once here: where PYTHONDONTWRITEBYTECODE is set, every process
  # (each CLI call, each subprocess of the tests) would otherwise recompile its imports,
  # about 10 s of start-up for the stream processor.
  .venv/bin/uv sync --frozen --all-extras --compile-bytecode --quiet
  echo "$want" > "$stamp"
fi
# The project's own modules change between installs; compiling them is quick and skips
# files whose bytecode is current.
.venv/bin/python -m compileall -q src >/dev/null || true
