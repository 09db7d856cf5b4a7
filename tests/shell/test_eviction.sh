#!/usr/bin/env bash
# The host tier holds at most --host-capacity: writing 16 files of 8 MiB into
# 64 MiB evicts the least recently used ones (a cache miss: ENOENT), keeps the
# newest whole and correct, and reports evictions.
. "$(dirname "$0")/lib.sh"

MIB=1048576
CAP=$((64 * MIB))
NFILES=16

# Sources kept in the temp dir, to cmp against.
for ((i = 0; i < NFILES + 1; i++)); do
    head -c $((8 * MIB)) /dev/urandom >"$TEST_TMP/src$i"
done

eviction_run() { # data path
    local dp=$1 M pid i present=() missing=() n used cap evictions files listed df_used df_size
    M=$(new_mountpoint "mnt-$dp")
    start_kvfs "$M" --data-path "$dp" --host-capacity 64MiB
    pid=$KVFS_PID
    t mkdir "$M/blocks" || fail "[$dp] mkdir blocks"
    for ((i = 0; i < NFILES; i++)); do
        assert_ok "[$dp] dd of file $i" dd if="$TEST_TMP/src$i" of="$M/blocks/f$i" bs=1M status=none
    done

    assert_missing "$M/blocks/f0" "[$dp] the oldest file after writing 128 MiB into 64 MiB"
    assert_same_file "$TEST_TMP/src$((NFILES - 1))" "$M/blocks/f$((NFILES - 1))" "[$dp] the newest file"
    # Whatever is present is whole and correct; what is not is ENOENT.
    for ((i = 0; i < NFILES; i++)); do
        if t test -e "$M/blocks/f$i"; then
            assert_eq $((8 * MIB)) "$(t stat -c %s "$M/blocks/f$i")" "[$dp] size of resident f$i"
            assert_same_file "$TEST_TMP/src$i" "$M/blocks/f$i" "[$dp] resident f$i"
            present+=("f$i")
        else
            assert_missing "$M/blocks/f$i" "[$dp] evicted f$i"
            missing+=("f$i")
        fi
    done
    assert_int "${#present[@]}" -le 8 "[$dp] files resident in 64 MiB"
    assert_int "${#present[@]}" -ge 1 "[$dp] files resident in 64 MiB"
    # Eviction is least-recently-used first: what is resident is the newest ones.
    assert_eq "f$((NFILES - ${#present[@]}))" "${present[0]}" "[$dp] oldest resident file (resident: ${present[*]})"
    # readdir agrees.
    listed=$(t ls "$M/blocks" | sort | tr '\n' ' ')
    assert_eq "$(printf '%s\n' "${present[@]}" | sort | tr '\n' ' ')" "$listed" "[$dp] ls of blocks/"

    load_status "$M"
    sget evictions host.evictions
    sget used host.used
    sget cap host.capacity
    sget files files
    assert_eq "$CAP" "$cap" "[$dp] host.capacity"
    assert_int "$evictions" -gt 0 "[$dp] host.evictions"
    assert_int "$evictions" -ge "${#missing[@]}" "[$dp] host.evictions vs missing files"
    assert_int "$used" -le "$cap" "[$dp] host.used vs capacity"
    assert_eq "${#present[@]}" "$files" "[$dp] status files"
    read -r df_size df_used < <(t df -B1 --output=size,used "$M" | tail -n 1)
    assert_int "$df_used" -le "$df_size" "[$dp] df used vs size"

    # LRU, not FIFO: a file read recently survives the next eviction, the
    # least recently used one goes.
    local keep=${present[0]} victim=${present[1]}
    t cat "$M/blocks/$keep" >/dev/null || fail "[$dp] read $keep"
    assert_ok "[$dp] dd of one more file" dd if="$TEST_TMP/src$NFILES" of="$M/blocks/extra" bs=1M status=none
    assert_same_file "$TEST_TMP/src$NFILES" "$M/blocks/extra" "[$dp] the file written last"
    assert_same_file "$TEST_TMP/src${keep#f}" "$M/blocks/$keep" "[$dp] $keep, read just before the last write"
    assert_missing "$M/blocks/$victim" "[$dp] $victim, least recently used before the last write"

    # Removing files frees their bytes.
    assert_ok "[$dp] rm -r blocks" rm -r "$M/blocks"
    load_status "$M"
    sget used host.used
    assert_eq 0 "$used" "[$dp] host.used after rm -r"
    stop_kvfs "$M" "$pid"
}

for dp in $DATA_PATHS; do
    eviction_run "$dp"
done
