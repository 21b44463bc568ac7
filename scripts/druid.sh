#!/usr/bin/env bash
# Local single-machine Apache Druid: scripts/druid.sh up|down|reset|status (see the script it runs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHON=${PYTHON:-$root/.venv/bin/python}
exec bash "$root/src/driverscore/adapters/druid/druid.sh" "$@"
