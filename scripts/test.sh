#!/usr/bin/env bash
# The test command: makes sure Debian's Chromium is there for the browser tests (installing it
# when running as root on Debian/Ubuntu), then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        echo "chromium is not installed: the browser tests will be skipped (apt-get install chromium)" >&2
    fi
fi
exec python -m pytest "$@"
