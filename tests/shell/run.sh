#!/usr/bin/env bash
# Runs the kvfs shell tests: every tests/shell/test_*.sh (or the names given,
# e.g. `run.sh basic eviction`), each in its own bash process under a time
# limit (env KVFS_TEST_SUITE_TIMEOUT, default 600 s per test).
#
# Prints `ok NAME` or `FAILED NAME` (followed by that test's output) per test,
# then `N passed, M failed`. Exits 1 if any test failed.
#
# Needs root (FUSE mounts), a built binary (cargo build --release, or
# KVFS_BIN=...), python3, attr (getfattr/setfattr).

set -u

DIR=$(cd "$(dirname "$0")" && pwd)
LIMIT=${KVFS_TEST_SUITE_TIMEOUT:-600}

tests=()
if [ $# -gt 0 ]; then
    for name in "$@"; do
        name=${name%.sh}
        name=${name#test_}
        if [ ! -f "$DIR/test_$name.sh" ]; then
            echo "no such test: $DIR/test_$name.sh" >&2
            exit 2
        fi
        tests+=("$DIR/test_$name.sh")
    done
else
    for f in "$DIR"/test_*.sh; do
        [ -f "$f" ] && tests+=("$f")
    done
fi

logdir=$(mktemp -d "${TMPDIR:-/tmp}/kvfs-shell-tests.XXXXXX") || exit 1
trap 'rm -rf "$logdir"' EXIT

passed=0
failed=0
for f in "${tests[@]}"; do
    name=$(basename "$f" .sh)
    log=$logdir/$name.log
    timeout -k 30 "$LIMIT" bash "$f" >"$log" 2>&1 </dev/null
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok $name"
        passed=$((passed + 1))
    else
        echo "FAILED $name"
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            echo "    (killed after ${LIMIT} s)"
        else
            echo "    (exit code $rc)"
        fi
        sed 's/^/    /' "$log"
        failed=$((failed + 1))
    fi
done

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
