#!/usr/bin/env bash
# The reference connectors' exact syscalls (`kvfs bench connector`, which
# verifies every byte on load) against a mount: both patterns, store then
# load, no temp files left behind, a second store is all hits.
. "$(dirname "$0")/lib.sh"

MIB=1048576
FILES=8
SIZE=$((4 * MIB))

# check_report JSON_LINE PHASE PATTERN SKIPPED MESSAGE
check_report() {
    local got
    got=$(printf '%s' "$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(r["phase"], r["pattern"], r["files"], r["skipped"], r["bytes"], r["seconds"] > 0, r["gbps"] > 0)
' 2>&1) || fail "$5: report is not the expected JSON: [$1] ($got)"
    local moved=$(((FILES - $4) * SIZE))
    assert_eq "$2 $3 $FILES $4 $moved True $([ $moved -gt 0 ] && echo True || echo False)" "$got" "$5: report [$1]"
}

connector_run() { # data path
    local dp=$1 M pid pattern out rc lines tmps n
    M=$(new_mountpoint "mnt-$dp")
    start_kvfs "$M" --data-path "$dp" --host-capacity 256MiB
    pid=$KVFS_PID
    for pattern in vllm llmd; do
        local args=(bench connector --dir "$M" --pattern "$pattern" --files $FILES --file-size 4MiB --threads 2)
        out=$(t "$KVFS" "${args[@]}" --phase both 2>"$TEST_TMP/err")
        rc=$?
        assert_eq 0 "$rc" "[$dp $pattern] bench connector --phase both exit code (stderr: $(cat "$TEST_TMP/err"))"
        lines=$(printf '%s\n' "$out" | grep -c .)
        assert_eq 2 "$lines" "[$dp $pattern] report lines [$out]"
        check_report "$(printf '%s\n' "$out" | sed -n 1p)" store "$pattern" 0 "[$dp $pattern] store"
        check_report "$(printf '%s\n' "$out" | sed -n 2p)" load "$pattern" 0 "[$dp $pattern] load"

        tmps=$(t find "$M" -name '*.tmp')
        assert_eq "" "$tmps" "[$dp $pattern] *.tmp files left after the run"

        # The blocks are there: a second store finds every one (no writes), a
        # second load reads them all back correctly.
        out=$(t "$KVFS" "${args[@]}" --phase store 2>"$TEST_TMP/err")
        assert_eq 0 "$?" "[$dp $pattern] second store exit code (stderr: $(cat "$TEST_TMP/err"))"
        check_report "$out" store "$pattern" $FILES "[$dp $pattern] second store"
        out=$(t "$KVFS" "${args[@]}" --phase load 2>"$TEST_TMP/err")
        assert_eq 0 "$?" "[$dp $pattern] second load exit code (stderr: $(cat "$TEST_TMP/err"))"
        check_report "$out" load "$pattern" 0 "[$dp $pattern] second load"

        # The checker does check: blocks of another seed do not verify.
        out=$(t "$KVFS" "${args[@]}" --phase load --seed 99 2>&1)
        rc=$?
        assert_ne 0 "$rc" "[$dp $pattern] load with the wrong seed must report corruption: $out"
        assert_ne 124 "$rc" "[$dp $pattern] load with the wrong seed timed out"
    done

    n=$(t find "$M" -type f -name '*.bin' | wc -l)
    load_status "$M"
    sget files files
    assert_eq "$n" "$files" "[$dp] status files vs find"
    assert_eq $((2 * FILES)) "$n" "[$dp] block files in the mount (both patterns)"
    sget n counters.sealed_files
    assert_int "$n" -ge $((2 * FILES)) "[$dp] sealed_files"
    sget n host.evictions
    assert_eq 0 "$n" "[$dp] evictions with room for every block"
    assert_eq "" "$(t find "$M" -name '*.tmp')" "[$dp] *.tmp files at the end"
    stop_kvfs "$M" "$pid"
}

for dp in $DATA_PATHS; do
    connector_run "$dp"
done
