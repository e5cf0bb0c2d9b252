#!/usr/bin/env bash
# Checks the Kubernetes manifests offline, from the repository root wherever it
# is called from:
#   yamllint -s deploy/kubernetes
#   kubectl kustomize deploy/kubernetes/base            (and overlays/example)
#   kubernetes-validate --strict -k 1.31.0 on each rendered output
#
# kubernetes-validate has no schema for custom resources: for them (and for a
# mistyped apiVersion) it prints WARN and still exits 0, having validated
# nothing. So the Prometheus Operator's ServiceMonitor documents are taken out
# of the rendered output before validation (their number is checked), and any
# WARN from the validator fails this script.
#
# Exit status: 0 all passed; 1 a check failed; 77 a tool is missing
# (`pip3 install kubernetes-validate yamllint`, and kubectl).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

K8S_VERSION=1.31.0

for tool in yamllint kubectl kubernetes-validate awk; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "check.sh: $tool is not installed" >&2
        exit 77
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
    echo "check.sh: FAILED: $*" >&2
    exit 1
}

# Prints the documents of a rendered kustomization except ServiceMonitors;
# writes how many it left out to $2.
without_servicemonitors() {
    awk -v count_file="$2" '
        function flush() {
            if (doc != "") {
                if (doc ~ /(^|\n)kind: ServiceMonitor\n/ &&
                    doc ~ /(^|\n)apiVersion: monitoring\.coreos\.com\/v1\n/) {
                    skipped++
                } else {
                    printf "---\n%s", doc
                }
            }
            doc = ""
        }
        /^---$/ { flush(); next }
        { doc = doc $0 "\n" }
        END { flush(); print skipped + 0 > count_file }
    ' "$1"
}

# validate NAME DIR SERVICEMONITORS: renders DIR, leaves out the expected
# number of ServiceMonitors, validates the rest.
validate() {
    local name=$1 dir=$2 expected=$3
    echo "== kubectl kustomize $dir"
    kubectl kustomize "$dir" >"$work/$name.yaml"
    without_servicemonitors "$work/$name.yaml" "$work/$name.count" >"$work/$name.core.yaml"
    local skipped
    skipped=$(cat "$work/$name.count")
    if [ "$skipped" != "$expected" ]; then
        fail "$dir renders $skipped ServiceMonitors, expected $expected"
    fi
    echo "   (left $skipped ServiceMonitor out of schema validation)"
    echo "== kubernetes-validate --strict -k $K8S_VERSION ($name)"
    kubernetes-validate --strict -k "$K8S_VERSION" "$work/$name.core.yaml" \
        | tee "$work/$name.log" \
        || fail "kubernetes-validate refused $dir"
    if grep -q '^WARN' "$work/$name.log"; then
        fail "kubernetes-validate could not validate everything in $dir (see WARN)"
    fi
}

echo "== yamllint -s deploy/kubernetes"
yamllint -s deploy/kubernetes || fail "yamllint"

validate base deploy/kubernetes/base 0
validate example deploy/kubernetes/overlays/example 1

echo "check.sh: all passed"
