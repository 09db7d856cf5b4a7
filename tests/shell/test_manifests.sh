#!/usr/bin/env bash
# The deployment files under mount/:
# - the Kubernetes manifests (mount/k8s/) pass scripts/validate-manifests
#   (kubernetes-validate, strict: unknown fields are errors), and a misspelt
#   field in a copy fails it, so the check is known to bite;
# - the engine configuration in vllm-deployment.yaml is the README's, exactly
#   (the --kv-transfer-config JSON of vLLM's fs tier, and the commented
#   llm-d alternative);
# - the systemd unit passes `systemd-analyze verify` without a warning (if
#   systemd-analyze is installed).
#
# Skips the manifest checks (exit 0, with a message) only if the validator is
# not installed and cannot be, because the package registry is unreachable.
. "$(dirname "$0")/lib.sh"

VALIDATE=$REPO_ROOT/scripts/validate-manifests
K8S=$REPO_ROOT/mount/k8s
UNIT=$REPO_ROOT/mount/kvfs@.service

# --- Kubernetes manifests ---------------------------------------------------------

out=$(t "$VALIDATE" 2>&1)
rc=$?
if [ $rc -eq 3 ]; then
    echo "SKIP: $TEST_NAME: the manifest validator cannot be installed, the package registry is unreachable:" >&2
    echo "$out" | sed 's/^/    /' >&2
    manifests=skipped
else
    assert_eq 0 "$rc" "scripts/validate-manifests: exit code; its output: $out"
    assert_contains "$out" "ok: $(find "$K8S" -type f -name '*.yaml' | wc -l) file(s) valid" "scripts/validate-manifests summary"
    manifests=checked
fi

if [ $manifests = checked ]; then
    # A misspelt field deep in a pod template.
    sed 's/mountPropagation: Bidirectional/mountPropogation: Bidirectional/' "$K8S/daemonset.yaml" >"$TEST_TMP/misspelt.yaml"
    assert_contains "$(cat "$TEST_TMP/misspelt.yaml")" "mountPropogation" "planted misspelling"
    out=$(t "$VALIDATE" "$TEST_TMP/misspelt.yaml" 2>&1)
    assert_eq 1 "$?" "validate-manifests on a misspelt field: exit code; its output: $out"
    assert_contains "$out" "'mountPropogation' was unexpected" "validate-manifests names the misspelt field"
    # A kind with no schema is an error, not a warning.
    sed 's/^kind: Deployment$/kind: Deploymnet/' "$K8S/vllm-deployment.yaml" >"$TEST_TMP/kind.yaml"
    out=$(t "$VALIDATE" "$TEST_TMP/kind.yaml" 2>&1)
    assert_eq 1 "$?" "validate-manifests on an unknown kind: exit code; its output: $out"
    assert_contains "$out" "Deploymnet" "validate-manifests names the unknown kind"
    # A value the schema types only as a string.
    sed 's/mountPropagation: HostToContainer/mountPropagation: HostToContainr/' "$K8S/vllm-deployment.yaml" >"$TEST_TMP/enum.yaml"
    out=$(t "$VALIDATE" "$TEST_TMP/enum.yaml" 2>&1)
    assert_eq 1 "$?" "validate-manifests on a bad mountPropagation: exit code; its output: $out"
    assert_contains "$out" "HostToContainr" "validate-manifests names the bad mountPropagation"
fi

# --- the engine configuration is the README's --------------------------------------

out=$(python3 - "$REPO_ROOT/README.md" "$K8S/vllm-deployment.yaml" <<'EOF'
import json, re, sys

readme = open(sys.argv[1]).read()
manifest = open(sys.argv[2]).read()

# vLLM's fs tier: the README's `vllm serve ... --kv-transfer-config '{...}'`.
m = re.search(r"--kv-transfer-config '(\{[^']*\})'", readme)
if not m:
    print("SKIP README has no --kv-transfer-config example")
    sys.exit(0)
want_fs = json.loads(m.group(1))
# The manifest's (uncommented) argument after --kv-transfer-config.
got = re.findall(r"^[ \t]*-[ \t]*'(\{.*\})'[ \t]*$", manifest, re.M)
got_commented = re.findall(r"^[ \t]*#[ \t]*-[ \t]*'(\{.*\})'[ \t]*$", manifest, re.M)
if len(got) != 1:
    print("FAIL expected one --kv-transfer-config JSON argument in the manifest, found %d" % len(got))
    sys.exit(1)
if json.loads(got[0]) != want_fs:
    print("FAIL manifest's --kv-transfer-config %s differs from the README's %s" % (got[0], m.group(1)))
    sys.exit(1)
if want_fs["kv_connector_extra_config"]["secondary_tiers"][0].get("root_dir") != "/mnt/kv":
    print("FAIL README's fs tier root_dir is not /mnt/kv")
    sys.exit(1)

# The llm-d connector: the README's JSON block with shared_storage_path.
blocks = re.findall(r"```json\n(.*?)```", readme, re.S)
llmd = [json.loads(b) for b in blocks if "shared_storage_path" in b]
if not llmd:
    print("SKIP README has no llm-d example")
    sys.exit(0)
if len(got_commented) != 1:
    print("FAIL expected one commented llm-d --kv-transfer-config in the manifest, found %d" % len(got_commented))
    sys.exit(1)
if json.loads(got_commented[0]) != llmd[0]:
    print("FAIL manifest's llm-d config %s differs from the README's %s" % (got_commented[0], json.dumps(llmd[0])))
    sys.exit(1)
if llmd[0]["kv_connector_extra_config"]["shared_storage_path"] != "/mnt/kv":
    print("FAIL README's shared_storage_path is not /mnt/kv")
    sys.exit(1)
print("OK")
EOF
)
rc=$?
case $out in
    OK) ;;
    SKIP*) note "engine configuration not compared: ${out#SKIP }" ;;
    *) fail "engine configuration in vllm-deployment.yaml (rc $rc): $out" ;;
esac

# --- the systemd unit ----------------------------------------------------------------

if command -v systemd-analyze >/dev/null; then
    mkdir "$TEST_TMP/units"
    # The unit names the installed binary; verify checks that it exists.
    sed "s|/usr/local/bin/kvfs|$KVFS|g" "$UNIT" >"$TEST_TMP/units/kvfs@.service"
    out=$(cd "$TEST_TMP/units" && t systemd-analyze verify "$TEST_TMP/units/kvfs@mnt-kv.service" 2>&1)
    rc=$?
    assert_eq 0 "$rc" "systemd-analyze verify kvfs@mnt-kv.service: exit code; output: $out"
    # Warnings (unknown keys, bad values) do not change the exit code.
    assert_eq "" "$(printf '%s\n' "$out" | grep -i kvfs)" "systemd-analyze verify kvfs@mnt-kv.service: warnings"
    # ... and it does catch one.
    sed 's/^Restart=on-failure/Restrat=on-failure/' "$TEST_TMP/units/kvfs@.service" >"$TEST_TMP/units/bad@.service"
    out=$(cd "$TEST_TMP/units" && t systemd-analyze verify "$TEST_TMP/units/bad@mnt-kv.service" 2>&1)
    assert_contains "$out" "Restrat" "systemd-analyze verify of a misspelt key"
    # What the template promises: %f is the unescaped path of the instance.
    assert_contains "$(grep '^ExecStart=' "$UNIT")" "mount %f" "ExecStart mounts %f"
else
    note "systemd-analyze not installed: kvfs@.service not verified"
fi
