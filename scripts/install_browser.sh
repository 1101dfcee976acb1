#!/usr/bin/env bash
# Best-effort, idempotent install of what tests/test_playground.py needs: Debian's chromium and the
# Playwright Python package (which drives /usr/bin/chromium; Playwright's own browser download is never used).
#
#   bash scripts/install_browser.sh [VENV]     # VENV defaults to .venv
#
# It never fails the build: whatever cannot be installed is reported, and the browser tests then skip
# with the reason.
set -u

VENV="${1:-.venv}"
PLAYWRIGHT_SPEC="${PLAYWRIGHT_SPEC:-playwright==1.65.2}"
CHROMIUM="${PLAYGROUND_CHROMIUM:-/usr/bin/chromium}"

say() { echo "install_browser: $*"; }

install_chromium() {
    if [ -x "$CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then
        say "chromium present: $(chromium --version 2>/dev/null | head -n 1)"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "chromium missing and apt-get not found (not Debian?): the browser tests will skip"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "chromium missing and not root (run: sudo apt-get install -y chromium): the browser tests will skip"
        return 0
    fi
    say "installing chromium with apt-get"
    # `update` only when the install fails from the current lists (a fresh CI image may have none).
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 || say "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
            || { say "apt-get install chromium failed: the browser tests will skip"; return 0; }
    fi
    say "chromium installed: $(chromium --version 2>/dev/null | head -n 1)"
}

install_playwright() {
    local python="$VENV/bin/python"
    if [ ! -x "$python" ]; then
        say "no Python at $python (create the venv first): the browser tests will skip"
        return 0
    fi
    if "$python" -c "import playwright.sync_api" >/dev/null 2>&1; then
        say "playwright present in $VENV"
        return 0
    fi
    say "installing $PLAYWRIGHT_SPEC into $VENV"
    "$python" -m pip install -q "$PLAYWRIGHT_SPEC" \
        || say "pip install $PLAYWRIGHT_SPEC failed: the browser tests will skip"
}

install_chromium
install_playwright
exit 0
