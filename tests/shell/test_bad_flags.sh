#!/usr/bin/env bash
# Bad input to `kvfs mount`: exit code 2, exactly one line on stderr naming
# the problem, nothing on stdout, nothing mounted, no process left behind.
. "$(dirname "$0")/lib.sh"

# expect_usage_error DESCRIPTION MOUNTPOINT NEEDLE [kvfs mount args...]
# NEEDLE must appear in the error line (case-insensitive).
expect_usage_error() {
    local desc=$1 mnt=$2 needle=$3 out err rc lines before procs
    shift 3
    before=$(mount_count "$mnt")
    procs=$(pgrep -f -- "kvfs mount $mnt" || true)
    out=$(t "$KVFS" mount "$mnt" "$@" 2>"$TEST_TMP/err")
    rc=$?
    err=$(cat "$TEST_TMP/err")
    assert_eq 2 "$rc" "$desc: exit code (stderr: $err)"
    assert_eq "" "$out" "$desc: stdout"
    lines=$(printf '%s\n' "$err" | grep -c .)
    assert_eq 1 "$lines" "$desc: lines on stderr [$err]"
    shopt -s nocasematch
    [[ $err == *"$needle"* ]] || fail "$desc: stderr [$err] does not mention [$needle]"
    shopt -u nocasematch
    assert_eq "$before" "$(mount_count "$mnt")" "$desc: mounts on $mnt"
    if [ "$before" = 0 ]; then
        assert_eq "" "$(mount | grep -F " $mnt ")" "$desc: mount | grep $mnt"
    fi
    # Nothing new left running for this mountpoint.
    assert_eq "$procs" "$(pgrep -f -- "kvfs mount $mnt" || true)" "$desc: kvfs processes for $mnt"
}

M=$(new_mountpoint mnt)
touch "$TEST_TMP/regular-file"
printf 'host_capacity = "1GiB"\nbogus_key = 3\n' >"$TEST_TMP/unknown-key.toml"
printf 'host_capacity = "1GiB"\nthreads = [\n' >"$TEST_TMP/syntax.toml"
printf 'host_capacity = 0\n' >"$TEST_TMP/zero.toml"

expect_usage_error "--host-capacity 8XB" "$M" "8XB" --host-capacity 8XB
expect_usage_error "--host-capacity 0" "$M" "capacity" --host-capacity 0
expect_usage_error "--host-capacity -1GiB" "$M" "-1GiB" --host-capacity=-1GiB
expect_usage_error "missing mountpoint" "$TEST_TMP/no-such-dir" "does not exist"
expect_usage_error "mountpoint is a regular file" "$TEST_TMP/regular-file" "not a directory"
expect_usage_error "unknown key in --config" "$M" "bogus_key" --config "$TEST_TMP/unknown-key.toml"
expect_usage_error "unparsable --config" "$M" "syntax.toml" --config "$TEST_TMP/syntax.toml"
expect_usage_error "host_capacity = 0 in --config" "$M" "capacity" --config "$TEST_TMP/zero.toml"
expect_usage_error "missing --config file" "$M" "no-such.toml" --config "$TEST_TMP/no-such.toml"
expect_usage_error "--threads 0" "$M" "threads" --threads 0
expect_usage_error "--data-path bogus" "$M" "bogus" --data-path bogus
expect_usage_error "--log-level loud" "$M" "loud" --log-level loud

# The environment variable on its own is checked the same way.
out=$(KVFS_HOST_CAPACITY=8XB t "$KVFS" mount "$M" 2>"$TEST_TMP/err")
assert_eq 2 "$?" "KVFS_HOST_CAPACITY=8XB: exit code"
assert_contains "$(cat "$TEST_TMP/err")" "8XB" "KVFS_HOST_CAPACITY=8XB: stderr"
! is_mounted "$M" || fail "KVFS_HOST_CAPACITY=8XB mounted $M"

# Already a kvfs mount: refused, the first mount is untouched and still works.
start_kvfs "$M" --host-capacity 64MiB
first=$KVFS_PID
expect_usage_error "mountpoint already a kvfs mount" "$M" "already a mount point"
expect_usage_error "mountpoint already a kvfs mount (--daemon)" "$M" "already a mount point" --daemon
assert_eq 1 "$(mount_count "$M")" "mounts stacked on $M"
t bash -c 'echo hello >"$1"' _ "$M/still-works" || fail "first mount unusable after a refused second mount"
assert_eq hello "$(t cat "$M/still-works")" "first mount after a refused second mount"
stop_kvfs "$M" "$first"
