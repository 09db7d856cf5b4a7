#!/usr/bin/env bash
# `kvfs mount --daemon`: returns 0 once mounted and says so, the mount works
# from other processes, `kvfs unmount` ends the daemon. A bad mount with
# --daemon fails in the foreground with exit code 2 and mounts nothing.
. "$(dirname "$0")/lib.sh"

daemon_run() { # data path
    local dp=$1 M out rc pid dp_now
    M=$(new_mountpoint "mnt-$dp")
    out=$(t "$KVFS" mount "$M" --daemon --data-path "$dp" --host-capacity 256MiB 2>"$TEST_TMP/err")
    rc=$?
    _MOUNTS+=("$M")
    assert_eq 0 "$rc" "[$dp] kvfs mount --daemon exit code (stderr: $(cat "$TEST_TMP/err"))"
    [[ $out =~ ^kvfs\ mounted\ on\ (.+)\ \(pid\ ([0-9]+)\)$ ]] ||
        fail "[$dp] --daemon output is [$out], expected 'kvfs mounted on $M (pid P)'"
    assert_eq "$M" "${BASH_REMATCH[1]}" "[$dp] mountpoint in the --daemon message"
    pid=${BASH_REMATCH[2]}
    track_daemon "$pid" "$M"
    assert_eq "" "$(cat "$TEST_TMP/err")" "[$dp] --daemon stderr"

    # Mounted by the time --daemon returned: no waiting.
    is_mounted "$M" || fail "[$dp] $M not in /proc/self/mounts right after --daemon returned"
    assert_contains "$(mount)" " $M " "[$dp] mount lists $M"
    kill -0 "$pid" 2>/dev/null || fail "[$dp] daemon pid $pid is not running"
    # Detached from us: a session of its own, not our child.
    assert_eq "$pid" "$(ps -o sid= -p "$pid" | tr -d ' ')" "[$dp] daemon is a session leader"

    load_status "$M"
    sget dp_now data_path
    assert_eq "$dp" "$dp_now" "[$dp] status data_path"
    head -c 3000000 /dev/urandom >"$TEST_TMP/src"
    assert_ok "[$dp] cp into the daemon's mount" cp "$TEST_TMP/src" "$M/f"
    assert_same_file "$TEST_TMP/src" "$M/f" "[$dp] file in the daemon's mount"

    out=$(t "$KVFS" unmount "$M" 2>&1) || fail "[$dp] kvfs unmount: $out"
    ! is_mounted "$M" || fail "[$dp] $M still mounted after kvfs unmount"
    _wait_exit "$pid" 5 || fail "[$dp] daemon pid $pid still running 5 s after kvfs unmount"
    assert_fails "[$dp] kvfs status after unmount" "$KVFS" status "$M"
}

for dp in $DATA_PATHS; do
    daemon_run "$dp"
done

# Bad input with --daemon: the parent checks it, exit 2, nothing mounted.
M=$(new_mountpoint mnt-bad)
out=$(t "$KVFS" mount "$M" --daemon --host-capacity 0 2>"$TEST_TMP/err")
rc=$?
_MOUNTS+=("$M")
assert_eq 2 "$rc" "--daemon --host-capacity 0: exit code"
assert_eq "" "$out" "--daemon --host-capacity 0: stdout"
assert_contains "$(cat "$TEST_TMP/err")" "capacity" "--daemon --host-capacity 0: stderr"
! is_mounted "$M" || fail "--daemon --host-capacity 0 mounted $M"
out=$(t "$KVFS" mount "$TEST_TMP/does-not-exist" --daemon 2>"$TEST_TMP/err")
assert_eq 2 "$?" "--daemon on a missing mountpoint: exit code"
assert_contains "$(cat "$TEST_TMP/err")" "does not exist" "--daemon on a missing mountpoint: stderr"
