# Helpers for the kvfs shell tests. Source it first thing in a test:
#
#   . "$(dirname "$0")/lib.sh"
#
# It gives the test:
#   KVFS          the binary (env KVFS_BIN, default target/release/kvfs of
#                 this repository)
#   TEST_TMP      a fresh directory from mktemp -d, removed at exit
#   DATA_PATHS    data paths to run path-dependent checks in (env
#                 KVFS_TEST_DATA_PATHS, default "passthrough fallback")
#   t CMD...      CMD under `timeout` (env KVFS_TEST_TIMEOUT, default 60 s)
#   start_kvfs MOUNT [ARGS...]
#                 runs `kvfs mount MOUNT ARGS...` in the foreground of a
#                 background job, waits (<= 10 s) until MOUNT/.kvfs/status is
#                 readable; sets KVFS_PID and KVFS_LOG (its stdout+stderr)
#   stop_kvfs MOUNT PID
#                 `kvfs unmount MOUNT`, then waits (<= 5 s) for PID to exit 0
#   load_status MOUNT; sget VAR PATH
#                 `kvfs status --json` into STATUS; VAR = its value at the
#                 dotted PATH (e.g. host.used)
#   assert_* / fail
#                 print "FAIL: <test>:<line>: <message>" and exit 1
#
# A trap cleans up on any exit (success, failure, SIGINT/SIGTERM): every mount
# the test made is unmounted (`kvfs unmount`, else `umount -l`, else the FUSE
# connection is aborted), only the processes this test started are killed and
# waited for, and TEST_TMP is removed.
#
# Tests stay quiet on success: print only on failure (or with KVFS_TEST_VERBOSE=1
# through `note`).

set -u
set -o pipefail

TEST_NAME=$(basename "$0" .sh)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KVFS=${KVFS_BIN:-$REPO_ROOT/target/release/kvfs}
# Tests run with the host tier only (an --nvme-dir flag still wins): they
# must not share the embedded default NVMe directory under /var/lib/kvfs.
export KVFS_NVME_DIR=${KVFS_NVME_DIR:-none}
T=${KVFS_TEST_TIMEOUT:-60}
DATA_PATHS=${KVFS_TEST_DATA_PATHS:-"passthrough fallback"}

if [ ! -x "$KVFS" ]; then
    echo "FAIL: $TEST_NAME: kvfs binary $KVFS not found or not executable (cargo build --release, or set KVFS_BIN)" >&2
    exit 1
fi
case $KVFS in /*) ;; *) KVFS=$PWD/$KVFS ;; esac

TEST_TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvfs-$TEST_NAME.XXXXXX") || {
    echo "FAIL: $TEST_NAME: mktemp -d failed" >&2
    exit 1
}
# Canonical, because /proc/self/mounts lists canonical paths.
TEST_TMP=$(realpath "$TEST_TMP")

_KVFS_PIDS=()      # children started by start_kvfs (foreground kvfs mount)
_DAEMON_PIDS=()    # "pid:mountpoint" of --daemon processes this test started
_MOUNTS=()         # every mountpoint handed to kvfs by this test

note() {
    if [ "${KVFS_TEST_VERBOSE:-0}" = 1 ]; then echo "# $*" >&2; fi
}

t() {
    timeout -k 5 "$T" "$@"
}

# --- failure reporting -------------------------------------------------------

fail() {
    local line=${BASH_LINENO[0]} i
    # Report the line in the test, not in this file.
    for ((i = 0; i < ${#BASH_SOURCE[@]}; i++)); do
        if [ "${BASH_SOURCE[$i]}" != "${BASH_SOURCE[0]}" ]; then
            line=${BASH_LINENO[$((i - 1))]}
            break
        fi
    done
    echo "FAIL: $TEST_NAME:$line: $*" >&2
    if [ -n "${KVFS_LOG:-}" ] && [ -s "${KVFS_LOG:-}" ]; then
        echo "--- last lines of the kvfs log ($KVFS_LOG):" >&2
        tail -n 20 "$KVFS_LOG" | sed "s/\x1b\[[0-9;]*m//g" >&2
    fi
    exit 1
}

assert_eq() { # expected actual message
    [ "$1" = "$2" ] || fail "$3: expected [$1], got [$2]"
}

assert_ne() { # unexpected actual message
    [ "$1" != "$2" ] || fail "$3: got [$2], which it must not be"
}

assert_int() { # a OP b message   (OP: -eq -ne -lt -le -gt -ge)
    [[ $1 =~ ^-?[0-9]+$ && $3 =~ ^-?[0-9]+$ ]] || fail "$4: not integers: [$1] [$3]"
    [ "$1" "$2" "$3" ] || fail "$4: expected $1 $2 $3"
}

assert_contains() { # haystack needle message
    case $1 in
        *"$2"*) ;;
        *) fail "$3: [$2] not found in: $1" ;;
    esac
}

assert_not_contains() { # haystack needle message
    case $1 in
        *"$2"*) fail "$3: [$2] found in: $1" ;;
        *) ;;
    esac
}

# assert_ok MESSAGE CMD...: CMD (under timeout) must exit 0.
assert_ok() {
    local msg=$1 out rc
    shift
    out=$(t "$@" 2>&1)
    rc=$?
    [ $rc -eq 0 ] || fail "$msg: \`$*\` exited $rc: $out"
}

# assert_fails MESSAGE CMD...: CMD (under timeout) must exit non-zero, and not
# by the timeout.
assert_fails() {
    local msg=$1 out rc
    shift
    out=$(t "$@" 2>&1)
    rc=$?
    [ $rc -ne 0 ] || fail "$msg: \`$*\` succeeded, expected failure: $out"
    [ $rc -ne 124 ] && [ $rc -ne 137 ] || fail "$msg: \`$*\` timed out"
}

assert_same_file() { # expected actual message
    t cmp -s "$1" "$2" || fail "$3: $2 differs from $1 ($(t cmp "$1" "$2" 2>&1 | head -n 1))"
}

assert_exists() {
    t test -e "$1" || fail "$2: $1 does not exist"
}

assert_missing() {
    local err
    if t test -e "$1"; then fail "$2: $1 exists"; fi
    # And the error is ENOENT, not EIO or a hang.
    err=$(t stat -c %s "$1" 2>&1)
    assert_contains "$err" "No such file or directory" "$2: stat of $1"
}

# --- mounts and processes -------------------------------------------------------

is_mounted() { # canonical path
    awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/self/mounts
}

mount_count() { # canonical path -> how many mounts are stacked there
    awk -v m="$1" '$2 == m { n++ } END { print n + 0 }' /proc/self/mounts
}

# load_status MOUNT: reads `kvfs status MOUNT --json` into STATUS (checked to
# be JSON, parsed once). Then `sget VAR PATH` sets VAR to the value at the
# dotted PATH, e.g. `sget used host.used`; a missing key fails the test.
declare -A _S=()
load_status() {
    local flat k v
    STATUS=$(t "$KVFS" status "$1" --json 2>"$TEST_TMP/status.err") ||
        fail "kvfs status $1 --json failed: $(cat "$TEST_TMP/status.err")"
    flat=$(printf '%s' "$STATUS" | python3 -c '
import json, sys
def walk(p, v):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(p + [k], x)
    else:
        print(".".join(p) + "\t" + (json.dumps(v) if isinstance(v, bool) or v is None else str(v)))
walk([], json.load(sys.stdin))
' 2>/dev/null) || fail "kvfs status $1 --json is not JSON: $STATUS"
    _S=()
    while IFS=$'\t' read -r k v; do
        _S[$k]=$v
    done <<<"$flat"
}

sget() { # VAR PATH
    [ -n "${_S[$2]+set}" ] || fail "status has no key $2: $STATUS"
    printf -v "$1" '%s' "${_S[$2]}"
}

new_mountpoint() { # [name] -> prints a fresh, canonical, empty directory
    local d
    d=$(mktemp -d "$TEST_TMP/${1:-mnt}.XXXXXX") || fail "mktemp -d failed"
    realpath "$d"
}

_is_my_child() { # pid
    local ppid
    ppid=$(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ')
    [ "$ppid" = "$$" ]
}

_wait_exit() { # pid seconds -> 0 once the pid is gone (or a zombie of ours)
    local pid=$1 n=$(($2 * 10)) state
    while [ $n -gt 0 ]; do
        state=$(ps -o stat= -p "$pid" 2>/dev/null)
        case $state in "" | Z*) return 0 ;; esac
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

_forget_pid() {
    local p keep=()
    for p in "${_KVFS_PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    _KVFS_PIDS=("${keep[@]}")
}

# start_kvfs MOUNT [ARGS...]: mounts in the foreground, as a background job.
start_kvfs() {
    local mnt=$1 n
    shift
    _MOUNTS+=("$mnt")
    KVFS_LOG=$(mktemp "$TEST_TMP/kvfs-log.XXXXXX")
    "$KVFS" mount "$mnt" "$@" >"$KVFS_LOG" 2>&1 &
    KVFS_PID=$!
    _KVFS_PIDS+=("$KVFS_PID")
    for ((n = 0; n < 100; n++)); do
        if t cat "$mnt/.kvfs/status" >/dev/null 2>&1; then
            note "kvfs pid $KVFS_PID mounted $mnt $*"
            return 0
        fi
        if ! kill -0 "$KVFS_PID" 2>/dev/null; then
            wait "$KVFS_PID"
            local rc=$?
            _forget_pid "$KVFS_PID"
            fail "kvfs mount $mnt $* exited $rc before mounting: $(cat "$KVFS_LOG")"
        fi
        sleep 0.1
    done
    fail "kvfs mount $mnt $* did not come up within 10 s"
}

# stop_kvfs MOUNT PID: unmount with `kvfs unmount`, then the foreground
# process must exit 0 within 5 s and the mount must be gone.
stop_kvfs() {
    local mnt=$1 pid=$2 out rc
    out=$(t "$KVFS" unmount "$mnt" 2>&1) || fail "kvfs unmount $mnt failed: $out"
    expect_exit "$pid" 0 5 "kvfs daemon after kvfs unmount $mnt"
    ! is_mounted "$mnt" || fail "$mnt is still mounted after kvfs unmount"
}

# expect_exit PID CODE SECONDS MESSAGE: PID (started by start_kvfs) exits with
# CODE within SECONDS.
expect_exit() {
    local pid=$1 code=$2 secs=$3 msg=$4 rc
    _wait_exit "$pid" "$secs" || fail "$msg: pid $pid still running after $secs s"
    wait "$pid"
    rc=$?
    _forget_pid "$pid"
    assert_eq "$code" "$rc" "$msg: exit code"
}

# Remember a --daemon process (not our child) so that cleanup can end it.
track_daemon() { # pid mountpoint
    _DAEMON_PIDS+=("$1:$2")
    _MOUNTS+=("$2")
}

_abort_fuse() { # mountpoint: abort its FUSE connection (last resort)
    local dev
    dev=$(awk -v m="$1" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n 1)
    [ -n "$dev" ] || return 0
    if [ -w "/sys/fs/fuse/connections/${dev#*:}/abort" ]; then
        echo 1 >"/sys/fs/fuse/connections/${dev#*:}/abort" 2>/dev/null
    fi
}

_stop_pid() { # pid: give it 3 s to exit after its unmount, then TERM, then KILL
    _wait_exit "$1" 3 && return 0
    kill -TERM "$1" 2>/dev/null
    kill -CONT "$1" 2>/dev/null
    _wait_exit "$1" 3 && return 0
    echo "cleanup: pid $1 ignored SIGTERM; killing it" >&2
    kill -KILL "$1" 2>/dev/null
    _wait_exit "$1" 2
}

_cleanup() {
    local rc=$? m p i entry pid
    trap - EXIT
    # Finish cleaning up even if a signal comes now (run.sh's timeout sends
    # SIGTERM, then SIGKILL 30 s later).
    trap '' INT TERM
    # Unmount in reverse order of mounting.
    for ((i = ${#_MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${_MOUNTS[$i]}
        is_mounted "$m" || continue
        timeout -k 2 10 "$KVFS" unmount "$m" >/dev/null 2>&1
        if is_mounted "$m"; then
            _abort_fuse "$m"
            timeout -k 2 10 umount -l "$m" >/dev/null 2>&1
        fi
        if is_mounted "$m"; then
            echo "cleanup: $m is still mounted" >&2
            rc=1
        fi
    done
    for p in "${_KVFS_PIDS[@]}"; do
        _is_my_child "$p" || continue
        _stop_pid "$p"
        wait "$p" 2>/dev/null
    done
    for entry in "${_DAEMON_PIDS[@]}"; do
        pid=${entry%%:*}
        m=${entry#*:}
        # Only if that pid is still a kvfs serving this mountpoint (no pid reuse).
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$m"; then
            _stop_pid "$pid"
        fi
    done
    if [ -n "$TEST_TMP" ] && [ -d "$TEST_TMP" ]; then
        # Never descend into a mount that refused to go.
        rm -rf --one-file-system "$TEST_TMP" 2>/dev/null
        # Mounts made through the mount helper (which clears KVFS_* variables)
        # got the embedded default NVMe directory, named after the mount point.
        rm -rf --one-file-system "/var/lib/kvfs/$(printf '%s' "${TEST_TMP#/}" | tr / -)"-* 2>/dev/null
    fi
    exit $rc
}

trap _cleanup EXIT
trap 'echo "FAIL: $TEST_NAME: interrupted" >&2; exit 130' INT
trap 'echo "FAIL: $TEST_NAME: terminated" >&2; exit 143' TERM
