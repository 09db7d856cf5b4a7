#!/usr/bin/env bash
# mount/kvfs.example.toml documents exactly the keys kvfs's config file
# accepts (the fields of FileConfig in src/config.rs), each with its default,
# and kvfs mounts with it as it is, and with its commented-out keys set too.
. "$(dirname "$0")/lib.sh"

EXAMPLE=$REPO_ROOT/mount/kvfs.example.toml
CONFIG_RS=$REPO_ROOT/src/config.rs
[ -f "$EXAMPLE" ] || fail "$EXAMPLE is missing"
[ -f "$CONFIG_RS" ] || fail "$CONFIG_RS is missing"

# The keys of `struct FileConfig { ... }`.
accepted=$(awk '
    /^[[:space:]]*(pub[[:space:]]+)?struct FileConfig[[:space:]]*\{/ { inside = 1; next }
    inside && /^\}/ { exit }
    inside && match($0, /^[[:space:]]*(pub[[:space:]]+)?[a-z_][a-z0-9_]*[[:space:]]*:/) {
        s = substr($0, RSTART, RLENGTH); sub(/^[[:space:]]*(pub[[:space:]]+)?/, "", s); sub(/[[:space:]]*:$/, "", s)
        print s
    }' "$CONFIG_RS" | sort)
[ -n "$accepted" ] || fail "found no FileConfig fields in $CONFIG_RS"
# The keys the example sets or shows commented out ("key = ..." or "# key = ...").
documented=$(sed -nE 's/^#?[[:space:]]*([a-z_][a-z0-9_]*)[[:space:]]*=.*/\1/p' "$EXAMPLE" | sort -u)
assert_eq "$(echo $accepted)" "$(echo $documented)" "keys in $EXAMPLE vs FileConfig in src/config.rs"
# Each with its default stated in the comment just above it.
for key in $accepted; do
    awk -v k="$key" '
        /^#/ && /Default:/ { seen = 1 }
        /^[[:space:]]*$/ { seen = 0 }
        $0 ~ "^#?[[:space:]]*" k "[[:space:]]*=" { found = seen; exit }
        END { exit !found }' "$EXAMPLE" || fail "$EXAMPLE: key $key has no 'Default:' line in its comment"
done

# As it is.
M=$(new_mountpoint m)
start_kvfs "$M" --config "$EXAMPLE"
load_status "$M"
sget cap host.capacity
assert_eq $((8 << 30)) "$cap" "status host.capacity with the example config"
echo hello >"$M/f" || fail "cannot write to the mount made with the example config"
stop_kvfs "$M" "$KVFS_PID"

# With every commented-out key set too (the log file moved into TEST_TMP,
# the metrics on a free port), as a --daemon mount.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
    fail "cannot find a free port"
sed -E -e "s|^#[[:space:]]*log_file[[:space:]]*=.*|log_file = \"$TEST_TMP/kvfs.log\"|" \
    -e "s|^#[[:space:]]*metrics_addr[[:space:]]*=.*|metrics_addr = \"127.0.0.1:$port\"|" \
    -e 's|^#[[:space:]]*([a-z_][a-z0-9_]*[[:space:]]*=)|\1|' "$EXAMPLE" >"$TEST_TMP/all.toml"
set_keys=$(sed -nE 's/^([a-z_][a-z0-9_]*)[[:space:]]*=.*/\1/p' "$TEST_TMP/all.toml" | sort -u)
assert_eq "$(echo $accepted)" "$(echo $set_keys)" "keys set in the example with its comments removed"
out=$(t "$KVFS" mount "$M" --daemon --config "$TEST_TMP/all.toml" 2>"$TEST_TMP/err")
assert_eq 0 "$?" "kvfs mount --daemon --config (every key set): exit code (stderr: $(cat "$TEST_TMP/err"))"
_MOUNTS+=("$M")
[[ $out =~ \(pid\ ([0-9]+)\)$ ]] || fail "--daemon output [$out]"
pid=${BASH_REMATCH[1]}
track_daemon "$pid" "$M"
[ -s "$TEST_TMP/kvfs.log" ] || fail "log_file from the example was not written"
if grep -q '^metrics_addr' "$TEST_TMP/all.toml"; then
    metrics=$(t python3 -c 'import sys, urllib.request; print(urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=10).read().decode())' "$port" 2>&1) ||
        fail "metrics_addr from the example: GET http://127.0.0.1:$port/metrics failed: $metrics"
    assert_contains "$metrics" "# TYPE" "metrics_addr from the example: Prometheus text"
fi
out=$(t "$KVFS" unmount "$M" 2>&1) || fail "kvfs unmount: $out"
_wait_exit "$pid" 5 || fail "daemon $pid still running after kvfs unmount"
