#!/usr/bin/env bash
# Everyday use of a mount with default settings, as a user would: cp, dd with
# O_DIRECT, ls, stat, du, df, xattrs, mkdir/rm/mv, truncate/chmod/touch,
# `kvfs status`, `kvfs unmount`. Run with the default data path and with each
# of DATA_PATHS.
. "$(dirname "$0")/lib.sh"

MIB=1048576
GIB=$((1024 * MIB))

# The default host capacity: 25% of RAM, at most 16 GiB.
mem_total=$(( $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) * 1024 ))
default_cap=$((mem_total / 4))
[ $default_cap -le $((16 * GIB)) ] || default_cap=$((16 * GIB))

basic() { # label [mount args...]
    local label=$1
    shift
    local M W pid dp want_dp cap used nfiles n size line out expected_sum dir_sum du_b du_alloc
    M=$(new_mountpoint "mnt-$label")
    W=$TEST_TMP/work-$label
    mkdir -p "$W"
    start_kvfs "$M" "$@"
    pid=$KVFS_PID

    load_status "$M"
    sget dp data_path
    case $label in
        default) [[ $dp == passthrough || $dp == fallback ]] || fail "[$label] data_path is [$dp]" ;;
        *) assert_eq "$label" "$dp" "[$label] status data_path" ;;
    esac
    sget cap host.capacity
    assert_eq "$default_cap" "$cap" "[$label] default host capacity (25% of RAM, at most 16 GiB)"
    sget n files
    assert_eq 0 "$n" "[$label] files in a fresh mount"

    # cp in and out, an odd size.
    head -c $((5 * MIB + 123)) /dev/urandom >"$W/src1"
    assert_ok "[$label] cp into the mount" cp "$W/src1" "$M/copied.bin"
    assert_ok "[$label] cp out of the mount" cp "$M/copied.bin" "$W/copied.out"
    assert_same_file "$W/src1" "$W/copied.out" "[$label] cp round trip"
    assert_same_file "$W/src1" "$M/copied.bin" "[$label] cmp in place"

    # dd with O_DIRECT both ways.
    assert_ok "[$label] dd oflag=direct from urandom" \
        dd if=/dev/urandom of="$M/direct.bin" bs=1M count=8 iflag=fullblock oflag=direct status=none
    assert_ok "[$label] dd iflag=direct" \
        dd if="$M/direct.bin" of="$W/direct.out" bs=1M iflag=direct status=none
    assert_eq $((8 * MIB)) "$(stat -c %s "$W/direct.out")" "[$label] bytes read back with iflag=direct"
    assert_same_file "$M/direct.bin" "$W/direct.out" "[$label] O_DIRECT read vs buffered read"
    head -c $((4 * MIB)) /dev/urandom >"$W/src2"
    assert_ok "[$label] dd oflag=direct of a known file" \
        dd if="$W/src2" of="$M/direct2.bin" bs=1M oflag=direct status=none
    assert_ok "[$label] dd iflag=direct of a known file" \
        dd if="$M/direct2.bin" of="$W/direct2.out" bs=1M iflag=direct status=none
    assert_same_file "$W/src2" "$W/direct2.out" "[$label] O_DIRECT round trip"

    # Nested directories.
    assert_ok "[$label] mkdir -p" mkdir -p "$M/a/b/c"
    assert_ok "[$label] cp into a/b/c" cp "$W/src2" "$M/a/b/c/deep.bin"
    assert_same_file "$W/src2" "$M/a/b/c/deep.bin" "[$label] nested file"

    # ls -l and stat tell the sizes.
    out=$(t ls -l "$M") || fail "[$label] ls -l failed"
    line=$(printf '%s\n' "$out" | awk '$NF == "copied.bin" { print $1, $5 }')
    assert_eq "-rw-r--r-- $((5 * MIB + 123))" "$line" "[$label] ls -l line of copied.bin"
    line=$(printf '%s\n' "$out" | awk '$NF == "a" { print substr($1, 1, 1) }')
    assert_eq d "$line" "[$label] ls -l shows a/ as a directory"
    assert_eq $((5 * MIB + 123)) "$(t stat -c %s "$M/copied.bin")" "[$label] stat -c %s copied.bin"
    assert_eq $((8 * MIB)) "$(t stat -c %s "$M/direct.bin")" "[$label] stat -c %s direct.bin"
    assert_eq $((4 * MIB)) "$(t stat -c %s "$M/a/b/c/deep.bin")" "[$label] stat -c %s deep.bin"
    assert_eq "regular file" "$(t stat -c %F "$M/copied.bin")" "[$label] stat -c %F"

    # du: apparent sizes add up (files we wrote + the directories' own sizes),
    # and allocated blocks are reported (st_blocks is not 0).
    expected_sum=$((5 * MIB + 123 + 8 * MIB + 4 * MIB + 4 * MIB))
    dir_sum=$(t find "$M" -type d -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    du_b=$(t du -sb "$M" | cut -f1)
    assert_eq $((expected_sum + dir_sum)) "$du_b" "[$label] du -sb of the mount"
    du_alloc=$(t du -s --block-size=1 "$M" | cut -f1)
    assert_int "$du_alloc" -ge "$expected_sum" "[$label] du (allocated) of the mount"

    # df shows the capacity (in whole blocks) and the host tier's use.
    out=$(t df -B1 --output=size,used "$M" | tail -n 1) || fail "[$label] df failed"
    size=$(echo "$out" | awk '{ print $1 }')
    used=$(echo "$out" | awk '{ print $2 }')
    assert_int $((cap - size)) -ge 0 "[$label] df size ($size) vs capacity ($cap)"
    assert_int $((cap - size)) -lt 4096 "[$label] df size ($size) vs capacity ($cap)"
    load_status "$M"
    sget n host.used
    assert_int $((n - used)) -ge 0 "[$label] df used ($used) vs host.used ($n)"
    assert_int $((n - used)) -lt 4096 "[$label] df used ($used) vs host.used ($n)"
    assert_int "$used" -ge "$expected_sum" "[$label] df used"

    # xattrs.
    out=$(t getfattr -d "$M/copied.bin" 2>&1) || fail "[$label] getfattr -d: $out"
    assert_contains "$out" 'user.kvfs.tier="host"' "[$label] getfattr -d"
    assert_contains "$out" 'user.kvfs.state="sealed"' "[$label] getfattr -d"
    assert_ok "[$label] setfattr user.x" setfattr -n user.x -v y "$M/copied.bin"
    assert_eq y "$(t getfattr -n user.x --only-values "$M/copied.bin" 2>/dev/null)" "[$label] getfattr -n user.x"
    out=$(t getfattr -d "$M/copied.bin" 2>&1)
    assert_contains "$out" 'user.x="y"' "[$label] getfattr -d after setfattr"
    assert_ok "[$label] setfattr -x user.x" setfattr -x user.x "$M/copied.bin"
    out=$(t getfattr -d "$M/copied.bin" 2>&1)
    assert_not_contains "$out" 'user.x=' "[$label] getfattr -d after setfattr -x"
    assert_fails "[$label] user.kvfs.tier is read-only" setfattr -n user.kvfs.tier -v nvme "$M/copied.bin"
    assert_fails "[$label] user.kvfs.state is read-only" setfattr -n user.kvfs.state -v writing "$M/copied.bin"
    # state is "writing" while the writer holds the file open.
    exec 3>"$M/open.bin" || fail "[$label] cannot create open.bin"
    printf 'some bytes' >&3
    assert_eq writing "$(t getfattr -n user.kvfs.state --only-values "$M/open.bin" 2>/dev/null)" "[$label] state while open for writing"
    exec 3>&-
    # The kernel sends RELEASE after close returns: wait (up to 3 s) for it.
    for _ in $(seq 300); do
        [ "$(t getfattr -n user.kvfs.state --only-values "$M/open.bin" 2>/dev/null)" = writing ] || break
        sleep 0.01
    done
    assert_eq sealed "$(t getfattr -n user.kvfs.state --only-values "$M/open.bin" 2>/dev/null)" "[$label] state after close"
    assert_eq "some bytes" "$(t cat "$M/open.bin")" "[$label] content of open.bin"

    # truncate, chmod, atime/mtime.
    cp "$W/src1" "$W/trunc.src"
    assert_ok "[$label] cp trunc.bin" cp "$W/trunc.src" "$M/trunc.bin"
    assert_ok "[$label] truncate shrink" truncate -s 1000 "$M/trunc.bin"
    truncate -s 1000 "$W/trunc.src"
    assert_same_file "$W/trunc.src" "$M/trunc.bin" "[$label] after truncate to 1000"
    assert_ok "[$label] truncate grow" truncate -s 5000 "$M/trunc.bin"
    truncate -s 5000 "$W/trunc.src"
    assert_same_file "$W/trunc.src" "$M/trunc.bin" "[$label] after truncate to 5000 (zero-filled)"
    assert_ok "[$label] chmod" chmod 600 "$M/trunc.bin"
    assert_eq 600 "$(t stat -c %a "$M/trunc.bin")" "[$label] mode after chmod 600"
    assert_ok "[$label] touch -a" touch -a -d '2020-01-02 03:04:05 UTC' "$M/trunc.bin"
    assert_ok "[$label] touch -m" touch -m -d '2021-01-02 03:04:05 UTC' "$M/trunc.bin"
    assert_eq "1577934245 1609556645" "$(t stat -c '%X %Y' "$M/trunc.bin")" "[$label] atime and mtime set by touch"

    # mv: a file across directories, over an existing file, a directory.
    assert_ok "[$label] mv file" mv "$M/copied.bin" "$M/a/b/moved.bin"
    assert_missing "$M/copied.bin" "[$label] source of mv"
    assert_same_file "$W/src1" "$M/a/b/moved.bin" "[$label] moved file"
    assert_ok "[$label] mv over an existing file" mv "$M/direct2.bin" "$M/a/b/moved.bin"
    assert_missing "$M/direct2.bin" "[$label] source of mv over a file"
    assert_same_file "$W/src2" "$M/a/b/moved.bin" "[$label] file replaced by mv"
    assert_ok "[$label] mv directory" mv "$M/a/b" "$M/a/b2"
    assert_missing "$M/a/b" "[$label] old directory name"
    assert_same_file "$W/src2" "$M/a/b2/c/deep.bin" "[$label] file under a renamed directory"

    # .kvfs is reachable but not listed.
    out=$(t ls -A "$M")
    assert_not_contains "$out" ".kvfs" "[$label] ls -A of the root"
    assert_contains "$(t ls "$M/.kvfs")" "status" "[$label] ls .kvfs"

    # kvfs status: table and JSON agree with what is in the mount.
    nfiles=$(t find "$M" -type f | wc -l)
    assert_eq 5 "$nfiles" "[$label] files found by find"
    out=$(t "$KVFS" status "$M" 2>&1) || fail "[$label] kvfs status: $out"
    assert_contains "$out" "data path: $dp" "[$label] kvfs status table"
    assert_contains "$out" "host" "[$label] kvfs status table"
    load_status "$M"
    sget n files
    assert_eq "$nfiles" "$n" "[$label] status files"
    sget n host.files
    assert_eq "$nfiles" "$n" "[$label] status host.files"
    sget n host.evictions
    assert_eq 0 "$n" "[$label] evictions"
    # Opens of data files take the configured path. (Reads of .kvfs/status
    # are served by the daemon and may count as fallback opens, so compare
    # the counters around three data-file opens, allowing the one status read.)
    local pt0 fb0 pt1 fb1
    load_status "$M"
    sget pt0 counters.passthrough_opens
    sget fb0 counters.fallback_opens
    t cat "$M/direct.bin" "$M/open.bin" "$M/a/b2/c/deep.bin" >/dev/null || fail "[$label] cat of three files"
    load_status "$M"
    sget pt1 counters.passthrough_opens
    sget fb1 counters.fallback_opens
    case $dp in
        passthrough)
            assert_eq 3 $((pt1 - pt0)) "[$label] passthrough_opens for 3 opens"
            assert_int $((fb1 - fb0)) -le 1 "[$label] fallback_opens for 3 opens in passthrough mode"
            ;;
        fallback)
            assert_eq 0 "$pt1" "[$label] passthrough_opens in fallback mode"
            assert_int $((fb1 - fb0)) -ge 3 "[$label] fallback_opens for 3 opens"
            sget n counters.daemon_read_bytes
            assert_int "$n" -gt 0 "[$label] daemon_read_bytes in fallback mode"
            ;;
    esac

    # rm -r empties it again.
    assert_ok "[$label] rm -r" rm -r "$M/a"
    assert_missing "$M/a" "[$label] a after rm -r"
    assert_ok "[$label] rm files" rm "$M/direct.bin" "$M/open.bin" "$M/trunc.bin"
    assert_eq "" "$(t ls -A "$M")" "[$label] ls -A after removing everything"
    load_status "$M"
    sget n files
    assert_eq 0 "$n" "[$label] status files after rm"
    sget n host.used
    assert_eq 0 "$n" "[$label] host.used after rm"

    # kvfs unmount: the mount goes, the daemon exits 0.
    stop_kvfs "$M" "$pid"
}

basic default
for dp in $DATA_PATHS; do
    basic "$dp" --data-path "$dp"
done
