#!/usr/bin/env bash
# Run Ember's test suite: unit tests, then integration tests that boot real
# microVMs on /dev/kvm. Installs what it needs first (idempotent). Extra
# arguments go to pytest (e.g. -k serial, -m "not linux").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

become_root test.sh "$@"
ensure_host_packages
ensure_venv
log "building guest images (cached)"
"$VENV/bin/ember" images build
log "running tests"
exec "$VENV/bin/python" -m pytest -ra "$@"
