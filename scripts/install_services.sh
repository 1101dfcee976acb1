#!/usr/bin/env bash
# Best-effort, idempotent install of the services the durable-session and replica tests run for real:
# Debian's redis-server (the shared session store) and haproxy (the proxy in front of the replicas),
# plus the pinned `redis` Python client into the venv.
#
#   bash scripts/install_services.sh [VENV]     # VENV defaults to .venv
#
# It never fails the build itself: what cannot be installed is reported. The tests that claim Redis or
# HAProxy then FAIL under CI=true (they must not pass by skipping there) and skip with the reason elsewhere.
set -u

VENV="${1:-.venv}"
REDIS_SPEC="${REDIS_SPEC:-redis==8.1.0}"

say() { echo "install_services: $*"; }

apt_install() {  # apt_install BINARY PACKAGE
    local binary="$1" package="$2"
    if command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || [ -x "/usr/bin/$binary" ]; then
        say "$package present"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "$package missing and apt-get not found (not Debian?)"
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            say "$package missing and not root (run: sudo apt-get install -y $package)"
            return 0
        fi
    fi
    say "installing $package with apt-get"
    # Only the binaries: no service is started or enabled (policy-rc.d refuses), the tests start their own.
    local env="DEBIAN_FRONTEND=noninteractive RUNLEVEL=1"
    # `update` only when the install fails from the current lists (a fresh CI image may have none).
    if ! $sudo env $env apt-get install -y -q --no-install-recommends "$package" >/dev/null 2>&1; then
        $sudo apt-get update -q >/dev/null 2>&1 || say "apt-get update failed"
        $sudo env $env apt-get install -y -q --no-install-recommends "$package" >/dev/null 2>&1 \
            || { say "apt-get install $package failed"; return 0; }
    fi
    say "$package installed"
}

install_client() {
    local python="$VENV/bin/python"
    if [ ! -x "$python" ]; then
        say "no Python at $python (create the venv first)"
        return 0
    fi
    if "$python" -c "import redis" >/dev/null 2>&1; then
        say "redis client present in $VENV"
        return 0
    fi
    "$python" -m pip install -q "$REDIS_SPEC" || say "pip install $REDIS_SPEC failed"
}

apt_install redis-server redis-server
apt_install haproxy haproxy
install_client
exit 0
