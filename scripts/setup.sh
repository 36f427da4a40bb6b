#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu host for Ember and run the main job on the
# embedded default: build the default guest (kernel + root filesystem, from
# Debian packages) and boot it on Ember's VMM. Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

become_root setup.sh "$@"
ensure_host_packages
ensure_venv
log "building guest images (cached in ${EMBER_HOME:-~/.cache/ember}; the first build compiles a kernel, ~10 min)"
"$VENV/bin/ember" images build
log "booting the default guest (serial console below; it reboots by itself)"
"$VENV/bin/ember" run --boot-timer --cmdline-append "ember.exit=reboot"
log "done. For an interactive shell in a microVM: $VENV/bin/ember run"
