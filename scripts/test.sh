#!/usr/bin/env bash
# The test command: makes sure Debian's Chromium (for the browser tests) and promtool (for the
# check of /metrics) are there, installing them when running as root on Debian/Ubuntu, then runs
# the whole suite in three processes.
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
# promtool (Debian's prometheus package) checks /metrics in tests/web/test_metrics.py
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } \
            || echo "prometheus could not be installed: the promtool check will be skipped" >&2
    else
        echo "promtool is not installed: its check of /metrics will be skipped (apt-get install prometheus)" >&2
    fi
fi
# Three test processes (pytest-xdist; most tests wait on processes, sockets and timers, so three
# fit two cores), each file in one of them; each has its own namespace, ports and runtime folder
# (tests/conftest.py).  SPEEDYSVC_TEST_JOBS=0 runs everything in this process.
exec python -m pytest -n "${SPEEDYSVC_TEST_JOBS:-3}" --dist loadfile "$@"
