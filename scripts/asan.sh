#!/usr/bin/env bash
# The C extension under AddressSanitizer and UndefinedBehaviorSanitizer: built with them in a
# copy of the checkout (the in-place build stays as it is), then the shared-memory and msgpack
# tests run against that build.  Callers load it through PYTHONPATH, and so do the workers they
# start (their PYTHONPATH is built from sys.path); every process writes what the sanitizers
# report to a log of its own, and any report fails the run, even one from a worker whose death
# a test took in its stride.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests run against the sanitized build.  Not the ones that start the service manager: it
# drops PYTHONPATH, so its workers would load the normal build.
# The TCP client's C paths (call_alone, TcpMethod, ConnectionCore) and the workers' (LocalWay,
# ServerConnectionCore) run in test_tcp_calls and test_tcp_blocking_reader.  (Not
# test_tcp_gateway_short_way: it needs a worker to answer within the gateway's brief spin, which a
# sanitized worker is too slow for.)
ASAN_TESTS="tests/shm tests/codecs tests/test_c_contract.py tests/tcp/test_framing.py tests/tcp/test_tcp_calls.py
    tests/tcp/test_tcp_blocking_reader.py"

PYTHON=${PYTHON:-python}
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
    if [ ! -e "$lib" ]; then
        echo "asan.sh: gcc has no $lib (Debian: apt-get install libasan8 libubsan1)" >&2
        exit 1
    fi
done

COPY=$(mktemp -d /tmp/speedysvc-asan.XXXXXX)
trap 'rm -rf "$COPY"' EXIT
# what the build and the tests need, less the in-place build (which would pass for up to date)
cp -a setup.py pyproject.toml MANIFEST.in README.md speedysvc tests "$COPY"/
find "$COPY" \( -name '*.so' -o -name '*.pyc' \) -delete
start=$SECONDS
(cd "$COPY" && CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g" \
    "$PYTHON" setup.py -q build_ext --inplace --force)
so=$(ls "$COPY"/speedysvc/_shmcore*.so)
if ! readelf -d "$so" | grep -q 'libasan'; then
    echo "asan.sh: $so is not built with AddressSanitizer" >&2
    exit 1
fi

LOGS="$COPY/sanitizer-logs"
mkdir "$LOGS"
export PYTHONPATH="$COPY"
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# (Python's own allocations go through malloc, so that the sanitizer sees the bounds of the
# bytes and lists the extension writes into; leaks are Python's business, not ours)
export PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0:log_path=$LOGS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan"
cd "$COPY"
"$PYTHON" -c 'import sys, speedysvc._shmcore as c; assert c.__file__.startswith(sys.argv[1]), c.__file__' "$COPY"
status=0
# shellcheck disable=SC2086
"$PYTHON" -m pytest -q -p no:cacheprovider $ASAN_TESTS || status=$?
if compgen -G "$LOGS/*" >/dev/null; then
    echo "asan.sh: the sanitizers reported errors:" >&2
    cat "$LOGS"/* >&2
    status=1
fi
echo "asan.sh: $((SECONDS - start)) s, exit $status"
exit $status
