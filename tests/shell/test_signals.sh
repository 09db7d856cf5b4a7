#!/usr/bin/env bash
# SIGTERM and SIGINT to a foreground `kvfs mount` unmount cleanly and the
# process exits 0 within 5 s; a busy mount is detached at once and the
# process exits once the last open file is closed; a --daemon process obeys
# SIGTERM too.
. "$(dirname "$0")/lib.sh"

signal_run() { # data path, signal
    local dp=$1 sig=$2 M pid
    M=$(new_mountpoint "mnt-$dp-$sig")
    start_kvfs "$M" --data-path "$dp" --host-capacity 128MiB
    pid=$KVFS_PID
    head -c 1000000 /dev/urandom >"$TEST_TMP/src"
    assert_ok "[$dp $sig] cp" cp "$TEST_TMP/src" "$M/f"
    kill -s "$sig" "$pid" || fail "[$dp $sig] kill -s $sig $pid"
    expect_exit "$pid" 0 5 "[$dp] kvfs mount after SIG$sig"
    ! is_mounted "$M" || fail "[$dp] $M still mounted after SIG$sig"
    assert_eq "" "$(mount | grep -F " $M ")" "[$dp] mount | grep $M after SIG$sig"
    assert_eq "" "$(ls -A "$M")" "[$dp] underlying directory after SIG$sig"
}

busy_run() { # data path
    local dp=$1 M pid got
    M=$(new_mountpoint "mnt-$dp-busy")
    start_kvfs "$M" --data-path "$dp" --host-capacity 128MiB
    pid=$KVFS_PID
    t bash -c 'printf "held open" >"$1"' _ "$M/held" || fail "[$dp busy] write held"
    exec 4<"$M/held" || fail "[$dp busy] open held"
    kill -TERM "$pid"
    # Detached from the namespace at once...
    local n
    for ((n = 0; n < 50; n++)); do
        is_mounted "$M" || break
        sleep 0.1
    done
    ! is_mounted "$M" || { exec 4<&-; fail "[$dp busy] $M still mounted 5 s after SIGTERM with a file open"; }
    # ...while the open file still reads through the daemon.
    kill -0 "$pid" 2>/dev/null || { exec 4<&-; fail "[$dp busy] kvfs exited while a file was still open"; }
    got=$(t cat <&4)
    exec 4<&-
    assert_eq "held open" "$got" "[$dp busy] read from a file held open across SIGTERM"
    expect_exit "$pid" 0 5 "[$dp busy] kvfs mount after the last open file closed"
}

daemon_sigterm() { # data path
    local dp=$1 M out pid
    M=$(new_mountpoint "mnt-$dp-daemon")
    out=$(t "$KVFS" mount "$M" --daemon --data-path "$dp" --host-capacity 64MiB 2>&1)
    _MOUNTS+=("$M")
    [[ $out =~ \(pid\ ([0-9]+)\) ]] || fail "[$dp daemon] kvfs mount --daemon said [$out]"
    pid=${BASH_REMATCH[1]}
    track_daemon "$pid" "$M"
    kill -TERM "$pid" || fail "[$dp daemon] kill -TERM $pid"
    _wait_exit "$pid" 5 || fail "[$dp daemon] daemon $pid still running 5 s after SIGTERM"
    ! is_mounted "$M" || fail "[$dp daemon] $M still mounted after SIGTERM"
}

for dp in $DATA_PATHS; do
    signal_run "$dp" TERM
    signal_run "$dp" INT
    busy_run "$dp"
    daemon_sigterm "$dp"
done
