#!/usr/bin/env bash
# The operator commands end to end on a mount with an NVMe tier and a small
# host tier: `kvfs drain` after writes, `kvfs ls-tier` (text and --json)
# showing the demoted files on NVMe, `kvfs warm` bringing one back into the
# host tier, and the exit codes: 1 for a missing file, 2 for a path that is
# not a kvfs mount.
. "$(dirname "$0")/lib.sh"

MIB=1048576
NFILES=6

M=$(new_mountpoint)
NVME=$TEST_TMP/nvme
mkdir -p "$NVME" "$TEST_TMP/src"
for ((i = 0; i < NFILES; i++)); do
    head -c $((3 * MIB)) /dev/urandom >"$TEST_TMP/src/f$i"
done

start_kvfs "$M" --host-capacity 8MiB --nvme-dir "$NVME"
pid=$KVFS_PID
t mkdir -p "$M/model/layer0" || fail "mkdir"
for ((i = 0; i < NFILES; i++)); do
    assert_ok "dd of f$i" dd if="$TEST_TMP/src/f$i" of="$M/model/layer0/f$i" bs=1M status=none
done

# drain: exit 0 once every closed file is on NVMe.
out=$(t "$KVFS" drain "$M" --timeout 30s 2>"$TEST_TMP/drain.err")
rc=$?
assert_eq 0 "$rc" "kvfs drain exit code ($(cat "$TEST_TMP/drain.err"))"
assert_contains "$out" "drained in" "kvfs drain output"
load_status "$M"
sget pending nvme.pending_flushes
assert_eq 0 "$pending" "nvme.pending_flushes after drain"
sget nfiles nvme.files
assert_eq "$NFILES" "$nfiles" "nvme.files after drain"

# ls-tier: 18 MiB through an 8 MiB host tier left the oldest only on NVMe.
out=$(t "$KVFS" ls-tier "$M") || fail "kvfs ls-tier failed: $out"
read -r tiers size path < <(printf '%s\n' "$out" | head -n 1)
assert_eq "nvme $((3 * MIB)) model/layer0/f0" "$tiers $size $path" "first line of ls-tier"
assert_eq nvme "$(t getfattr --only-values -n user.kvfs.tier "$M/model/layer0/f0")" "user.kvfs.tier of f0"
total=$(printf '%s\n' "$out" | awk '$1 == "total" { print $2, $4 }')
assert_eq "$NFILES $((NFILES * 3 * MIB))" "$total" "ls-tier total line"
nvme_only=$(printf '%s\n' "$out" | awk 'NF == 3 && $1 == "nvme"' | wc -l)
assert_int "$nvme_only" -ge 3 "files only on NVMe"
assert_eq "$nvme_only" "$(printf '%s\n' "$out" | awk '$1 == "nvme" && $3 == "files" { print $2 }')" "nvme summary line"
assert_not_contains "$out" ".kvfs" "ls-tier skips the control directory"

# --json: one object per file and a summary that adds up.
out=$(t "$KVFS" ls-tier "$M" --json) || fail "kvfs ls-tier --json failed: $out"
check=$(printf '%s\n' "$out" | python3 -c '
import json, sys
files, summary = [], None
for line in sys.stdin:
    v = json.loads(line)
    if "path" in v:
        files.append(v)
    else:
        summary = v
per = {}
for f in files:
    k = ",".join(f["tiers"])
    per.setdefault(k, [0, 0])
    per[k][0] += 1
    per[k][1] += f["size"]
ok = all(summary["summary"][k] == {"files": n, "bytes": b} for k, (n, b) in per.items())
print(len(files), summary["total"]["files"], summary["total"]["bytes"], ok)
') || fail "ls-tier --json is not one JSON object per line: $out"
assert_eq "$NFILES $NFILES $((NFILES * 3 * MIB)) True" "$check" "ls-tier --json"

# warm: f0 comes back into the host tier, with its bytes.
out=$(t "$KVFS" warm "$M" model/layer0/f0 --threads 2 2>"$TEST_TMP/warm.err")
rc=$?
assert_eq 0 "$rc" "kvfs warm exit code ($(cat "$TEST_TMP/warm.err"))"
assert_contains "$out" "warmed 1 of 1 files" "kvfs warm summary"
# stderr is not a terminal: whole lines, no carriage returns.
assert_not_contains "$(cat "$TEST_TMP/warm.err")" $'\r' "warm progress in a log"
assert_contains "$(cat "$TEST_TMP/warm.err")" "warm: 1/1 files" "warm progress"
assert_eq host,nvme "$(t getfattr --only-values -n user.kvfs.tier "$M/model/layer0/f0")" "user.kvfs.tier of f0 after warm"
out=$(t "$KVFS" ls-tier "$M" "$M/model/layer0/f0") || fail "kvfs ls-tier of one file: $out"
assert_contains "$out" "host,nvme" "ls-tier of f0 after warm"
assert_same_file "$TEST_TMP/src/f0" "$M/model/layer0/f0" "f0 after warm"

# A missing file: listed with its error, exit 1.
out=$(t "$KVFS" warm "$M" model/layer0/f1 model/nope 2>&1)
rc=$?
assert_eq 1 "$rc" "kvfs warm with a missing file: exit code ($out)"
assert_contains "$out" "model/nope: No such file or directory" "kvfs warm with a missing file"

# Opens and promotions leave no write-back behind: drain again returns 0.
out=$(t "$KVFS" drain "$M" --timeout 10s 2>&1)
rc=$?
assert_eq 0 "$rc" "kvfs drain after warm: exit code ($out)"

# Not a kvfs mount: exit 2, for all three.
mkdir -p "$TEST_TMP/plain"
for cmd in "drain" "ls-tier" "warm"; do
    args=("$cmd" "$TEST_TMP/plain")
    [ "$cmd" = warm ] && args+=(x)
    out=$(t "$KVFS" "${args[@]}" 2>&1)
    rc=$?
    assert_eq 2 "$rc" "kvfs $cmd on a plain directory: exit code ($out)"
    assert_contains "$out" "is not a kvfs mount" "kvfs $cmd on a plain directory"
done

stop_kvfs "$M" "$pid"
