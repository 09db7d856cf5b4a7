#!/usr/bin/env bash
# The mount(8) helper, mount/mount.kvfs installed as /sbin/mount.fuse.kvfs:
# `mount -t fuse.kvfs none M -o host_capacity=64MiB` mounts (options map to
# kvfs flags), `umount M` unmounts and the daemon exits by itself, an unknown
# option or a bad value fails with exit code 2 and a message naming it and
# mounts nothing, and an fstab line (mount -T FILE) works, idempotently with
# `mount -a`.
#
# /sbin/mount.fuse.kvfs is made a symlink to this repository's helper only if
# nothing is there yet, and removed at the end only if this test made it.
. "$(dirname "$0")/lib.sh"

HELPER=$REPO_ROOT/mount/mount.kvfs
LINK=/sbin/mount.fuse.kvfs
MIB=$((1024 * 1024))

[ -x "$HELPER" ] || fail "$HELPER is missing or not executable"
if ! command -v mount >/dev/null || ! command -v umount >/dev/null; then
    fail "mount/umount (util-linux) not found"
fi

# Remove the link at any exit, then lib.sh's cleanup (unmounts, processes,
# TEST_TMP), which exits with the test's status.
_made_link=0
_helper_cleanup() {
    local rc=$?
    if [ "$_made_link" = 1 ] && [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$HELPER" ]; then
        rm -f "$LINK"
    fi
    (exit $rc)
    _cleanup
}
trap _helper_cleanup EXIT

if [ ! -e "$LINK" ] && [ ! -L "$LINK" ]; then
    ln -s "$HELPER" "$LINK" || fail "cannot create $LINK"
    _made_link=1
elif [ "$(readlink -f "$LINK")" != "$(readlink -f "$HELPER")" ]; then
    note "$LINK exists and is not this repository's helper; testing the installed one"
fi

# The binary the helper runs (mount(8) passes the environment on, less PATH).
export KVFS_BIN=$KVFS

# helper_mount MOUNT CMD...: CMD (a `mount -v ...` or `HELPER ... -v`) must
# exit 0 with kvfs's "mounted on" line; the daemon is tracked for cleanup and
# its pid left in DAEMON_PID.
helper_mount() {
    local mnt=$1 out rc
    shift
    _MOUNTS+=("$mnt")
    out=$(t "$@" 2>"$TEST_TMP/err")
    rc=$?
    assert_eq 0 "$rc" "\`$*\`: exit code (stderr: $(cat "$TEST_TMP/err"))"
    [[ $out =~ kvfs\ mounted\ on\ (.+)\ \(pid\ ([0-9]+)\) ]] ||
        fail "\`$*\`: no 'kvfs mounted on $mnt (pid P)' line in its output [$out]"
    assert_eq "$mnt" "${BASH_REMATCH[1]}" "\`$*\`: mountpoint in kvfs's message"
    DAEMON_PID=${BASH_REMATCH[2]}
    track_daemon "$DAEMON_PID" "$mnt"
    is_mounted "$mnt" || fail "\`$*\` returned, but $mnt is not mounted"
}

# helper_umount MOUNT PID: `umount` (the kernel unmount, no helper) and the
# daemon must exit by itself.
helper_umount() {
    local out
    out=$(t umount "$1" 2>&1) || fail "umount $1: $out"
    ! is_mounted "$1" || fail "$1 still mounted after umount"
    _wait_exit "$2" 5 || fail "kvfs daemon $2 still running 5 s after umount $1"
}

# expect_refused DESCRIPTION MOUNT NEEDLE CMD...: CMD exits 2, its stderr
# names NEEDLE (case-insensitive), nothing is mounted on MOUNT, and no kvfs
# process for MOUNT is left.
expect_refused() {
    local desc=$1 mnt=$2 needle=$3 out err rc
    shift 3
    _MOUNTS+=("$mnt")
    out=$(t "$@" 2>"$TEST_TMP/err")
    rc=$?
    err=$(cat "$TEST_TMP/err")
    assert_eq 2 "$rc" "$desc: exit code of \`$*\` (stderr: $err)"
    assert_eq "" "$out" "$desc: stdout"
    shopt -s nocasematch
    [[ $err == *"$needle"* ]] || fail "$desc: stderr [$err] does not mention [$needle]"
    shopt -u nocasematch
    ! is_mounted "$mnt" || fail "$desc: $mnt got mounted"
    assert_eq "" "$(pgrep -f -- "kvfs mount $mnt" || true)" "$desc: kvfs processes for $mnt"
}

# --- mount -t fuse.kvfs, use, umount ----------------------------------------------

M=$(new_mountpoint m)
# The caller's KVFS_* settings do not leak into the helper's mount.
helper_mount "$M" env KVFS_DATA_PATH=bogus KVFS_HOST_CAPACITY=1GiB \
    mount -v -t fuse.kvfs none "$M" -o host_capacity=64MiB
pid=$DAEMON_PID
head -c 3000000 /dev/urandom >"$TEST_TMP/src"
assert_ok "cp into the helper's mount" cp "$TEST_TMP/src" "$M/f"
assert_same_file "$TEST_TMP/src" "$M/f" "file read back from the helper's mount"
load_status "$M"
sget cap host.capacity
assert_eq $((64 * MIB)) "$cap" "status host.capacity after -o host_capacity=64MiB"
sget files files
assert_eq 1 "$files" "status files"
helper_umount "$M" "$pid"

# Without -v, mount(8) and the helper print nothing.
out=$(t mount -t fuse.kvfs none "$M" -o host_capacity=64MiB 2>&1)
assert_eq 0 "$?" "quiet mount: exit code ($out)"
assert_eq "" "$out" "quiet mount: output"
is_mounted "$M" || fail "quiet mount: $M not mounted"
# Find the daemon by its command line (this test's mountpoint is unique).
pid=""
for p in $(pgrep -x kvfs); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- " mount $M "; then pid=$p; fi
done
[ -n "$pid" ] || fail "quiet mount: no kvfs daemon for $M found"
track_daemon "$pid" "$M"
helper_umount "$M" "$pid"

# --- every kvfs option and the generic ones, straight through the helper ----------

M2=$(new_mountpoint m2)
helper_mount "$M2" "$HELPER" none "$M2" -v -o "rw,defaults,auto,noauto,nofail,_netdev,user,users,nouser,owner,group,nodev,nosuid,noexec,exec,suid,dev,async,x-systemd.automount,comment=\"a,b\",daemon,config=$REPO_ROOT/mount/kvfs.example.toml,host_capacity=48MiB,threads=3,data_path=fallback,lock_memory=off,log_level=debug,log_format=json,log_file=$TEST_TMP/kvfs.log,allow_other"
pid=$DAEMON_PID
load_status "$M2"
sget cap host.capacity
assert_eq $((48 * MIB)) "$cap" "status host.capacity (flag over config file)"
sget dp data_path
assert_eq fallback "$dp" "status data_path after data_path=fallback"
sget lp host.lock_policy
assert_eq off "$lp" "status host.lock_policy after lock_memory=off"
opts=$(awk -v m="$M2" '$2 == m { print $4 }' /proc/self/mounts)
assert_contains "$opts" allow_other "mount options after allow_other"
[ -s "$TEST_TMP/kvfs.log" ] || fail "log_file=$TEST_TMP/kvfs.log was not written"
assert_contains "$(cat "$TEST_TMP/kvfs.log")" "mounted" "kvfs log after log_file="
head -n 1 "$TEST_TMP/kvfs.log" | python3 -c 'import json, sys; json.loads(sys.stdin.read())' 2>/dev/null ||
    fail "log_format=json: first log line is not JSON: $(head -n 1 "$TEST_TMP/kvfs.log")"
# Later occurrences win, and dashes work as well as underscores.
helper_umount "$M2" "$pid"
helper_mount "$M2" mount -v -t fuse.kvfs none "$M2" -o host-capacity=16MiB,host_capacity=40MiB
pid=$DAEMON_PID
load_status "$M2"
sget cap host.capacity
assert_eq $((40 * MIB)) "$cap" "status host.capacity after a repeated option"
helper_umount "$M2" "$pid"

# -f (fake): the options are checked, nothing is mounted; -s (sloppy): an
# unknown option is only warned about.
assert_ok "helper -f" "$HELPER" none "$M2" -f -o host_capacity=64MiB
! is_mounted "$M2" || fail "helper -f mounted $M2"
out=$(t "$HELPER" none "$M2" -f -s -o bogus=1,host_capacity=64MiB 2>&1)
assert_eq 0 "$?" "helper -f -s with an unknown option: exit code ($out)"
assert_contains "$out" "bogus=1" "helper -s warning"

# --- refused --------------------------------------------------------------------

M3=$(new_mountpoint m3)
expect_refused "unknown option" "$M3" "bogus" mount -t fuse.kvfs none "$M3" -o bogus=1
expect_refused "unknown option among good ones" "$M3" "noatime" \
    mount -t fuse.kvfs none "$M3" -o host_capacity=64MiB,noatime
expect_refused "ro" "$M3" "read-only" mount -t fuse.kvfs none "$M3" -o ro,host_capacity=64MiB
expect_refused "mount -r" "$M3" "read-only" mount -r -t fuse.kvfs none "$M3"
expect_refused "option without its value" "$M3" "threads" mount -t fuse.kvfs none "$M3" -o threads
# Bad values are kvfs's own errors (one line each), passed through.
expect_refused "bad host_capacity" "$M3" "8XB" mount -t fuse.kvfs none "$M3" -o host_capacity=8XB
lines=$(grep -c . "$TEST_TMP/err")
assert_eq 1 "$lines" "bad host_capacity: lines on stderr [$(cat "$TEST_TMP/err")]"
expect_refused "bad data_path" "$M3" "sideways" mount -t fuse.kvfs none "$M3" -o data_path=sideways
expect_refused "missing config file" "$M3" "no-such.toml" \
    mount -t fuse.kvfs none "$M3" -o "config=$TEST_TMP/no-such.toml"
expect_refused "missing mountpoint" "$TEST_TMP/nowhere" "does not exist" \
    "$HELPER" none "$TEST_TMP/nowhere" -o host_capacity=64MiB
out=$(KVFS_BIN=$TEST_TMP/no-kvfs t "$HELPER" none "$M3" -o host_capacity=64MiB 2>&1)
assert_eq 1 "$?" "missing kvfs binary: exit code ($out)"
assert_contains "$out" "KVFS_BIN" "missing kvfs binary: message"

# --- fstab ------------------------------------------------------------------------

M4=$(new_mountpoint m4)
M5=$(new_mountpoint m5)
cat >"$TEST_TMP/fstab" <<EOF
# kvfs, as in /etc/fstab
kvfs  $M4  fuse.kvfs  host_capacity=32MiB,threads=2,nofail  0 0
none  $M5  fuse.kvfs  host_capacity=24MiB,nofail,noauto  0 0
EOF
helper_mount "$M4" mount -v -T "$TEST_TMP/fstab" "$M4"
pid4=$DAEMON_PID
load_status "$M4"
sget cap host.capacity
assert_eq $((32 * MIB)) "$cap" "fstab mount: status host.capacity"
echo hello >"$M4/hello" || fail "fstab mount: cannot write"
assert_eq hello "$(t cat "$M4/hello")" "fstab mount: read back"
# mount -a sees it is mounted already (source "kvfs" is what the kernel
# lists), and skips the noauto line.
out=$(t mount -a -T "$TEST_TMP/fstab" 2>&1)
assert_eq 0 "$?" "mount -a with the kvfs line mounted already: exit code ($out)"
assert_eq 1 "$(mount_count "$M4")" "mounts on $M4 after mount -a"
! is_mounted "$M5" || fail "mount -a mounted the noauto line"
# A line with source "none" mounts by its mountpoint too.
helper_mount "$M5" mount -v -T "$TEST_TMP/fstab" "$M5"
pid5=$DAEMON_PID
load_status "$M5"
sget cap host.capacity
assert_eq $((24 * MIB)) "$cap" "fstab mount (source none): status host.capacity"
helper_umount "$M5" "$pid5"
helper_umount "$M4" "$pid4"

assert_eq "" "$(grep -F -e " $TEST_TMP/" /proc/self/mounts)" "mounts left under $TEST_TMP"
