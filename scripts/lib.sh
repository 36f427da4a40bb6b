# Shared by setup.sh and test.sh.
VENV="${EMBER_VENV:-$PWD/.venv}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Host packages Ember itself needs (the guest image build installs its own).
HOST_PACKAGES=(python3 python3-venv python3-dev gcc make libffi-dev iproute2 e2fsprogs busybox-static cpio acpica-tools nftables conntrack util-linux libseccomp2)

# Re-run the calling script ($1: its name under scripts/) as root through sudo when not root
# already; a root shell (where sudo may not even be installed) runs it as it is.
become_root() {
    local script=$1
    shift
    [ "$(id -u)" = 0 ] && return 0
    if command -v sudo >/dev/null; then
        exec sudo --preserve-env=EMBER_HOME,EMBER_VENV "$PWD/scripts/$script" "$@"
    fi
    echo "Ember needs root (for /dev/kvm, TAP devices and package installs): run this as root" >&2
    exit 1
}

ensure_host_packages() {
    [ -e /dev/kvm ] || { echo "/dev/kvm is missing: Ember needs KVM" >&2; exit 1; }
    local missing=()
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing host packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_venv() {
    local stamp="$VENV/.ember-installed"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing Ember and its Python dependencies"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e ".[test]"
        touch "$stamp"
    fi
    # Byte-compile Ember so every VMM process starts without compiling its
    # sources (the interpreter reads .pyc files even when told not to write them).
    "$VENV/bin/python" -m compileall -q vmm snapshot poolsvc guest >/dev/null
}
