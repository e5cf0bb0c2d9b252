#!/usr/bin/env bash
# Builds the `quicmesh` binary with profile-guided optimisation: an instrumented build runs the
# demo mesh under load, and the counts it records steer the final build's inlining, branch layout
# and code placement: 10-19% less CPU per proxied request than `cargo build --release`
# (BENCHMARKS.md (19)).
#
#   link/pgo.sh              # both builds and the training run: target/pgo/release/quicmesh
#   link/pgo.sh train BIN    # only the training run, against BIN (what the tests check)
#
# Needs `llvm-profdata` of the LLVM that rustc uses (`rustc -vV`): Debian's `llvm-NN` package, or
# rustup's `llvm-tools` component; LLVM_PROFDATA names another. The training drives the demo
# with curl (HTTP/1.1 and HTTP/2 at the gateway, a local app on node-a calling node-b), and with
# ngtcp2's `gtlsclient` for HTTP/3 where it is installed (Debian's ngtcp2-client; skipped, saying
# so, without it). PGO_REQUESTS sets the requests per path. Both builds set RUSTFLAGS, so flags a
# user sets for cargo are not applied to them.
# Plain `cargo build --release` stays as it was: the profile is made here, not kept in the repo,
# because it holds only for the source and toolchain it was recorded with.
set -euo pipefail
# A binary named in `train BIN` is taken from where the script was started.
start=$PWD
cd "$(dirname "$0")/.."

die() {
    echo "link/pgo.sh: $*" >&2
    exit 1
}

# The llvm-profdata whose major version is rustc's LLVM's.
profdata() {
    local major host candidate version
    major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    host=$(rustc -vV | sed -n 's/^host: //p')
    for candidate in "${LLVM_PROFDATA:-}" "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
        "llvm-profdata-$major" llvm-profdata; do
        [ -n "$candidate" ] && command -v "$candidate" > /dev/null 2>&1 || continue
        version=$("$candidate" --version 2> /dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -n 1 || true)
        if [ "$version" = "$major" ]; then
            echo "$candidate"
            return
        fi
    done
    die "needs llvm-profdata from LLVM $major (rustc's): apt-get install llvm-$major, or rustup component add llvm-tools"
}

# PGO_REQUESTS requests of one kind through the demo, 16 at a time; fails unless every one is a
# 200 in the HTTP version asked for (curl would fall back from HTTP/2 to HTTP/1.1 unsaid).
load() {
    local what=$1 version=$2 url=$3 config=$work/curl.conf codes ok
    shift 3
    : > "$config"
    for _ in $(seq "$requests"); do
        printf 'url = "%s"\noutput = "/dev/null"\n' "$url" >> "$config"
    done
    codes=$(curl -sk --no-progress-meter --parallel --parallel-max 16 -w '%{http_code} %{http_version}\n' "$@" -K "$config") || true
    ok=$(grep -c "^200 $version\$" <<< "$codes" || true)
    [ "$ok" = "$requests" ] || die "$what: $ok of $requests requests answered 200 over HTTP/$version"
    echo "  $what: $ok requests"
}

train() {
    local bin
    bin=$(cd "$start" && realpath -e -- "$1" 2> /dev/null) && [ -x "$bin" ] || die "no binary at $1"
    command -v curl > /dev/null || die "the training needs curl"
    requests=${PGO_REQUESTS:-20000}
    [ "$requests" -ge 50 ] || die "PGO_REQUESTS must be 50 or more"
    work=$(mktemp -d)
    "$bin" demo --port 0 --admin-port 0 --outbound-port 0 > "$work/demo.out" 2> "$work/demo.err" &
    demo=$!
    # Each process of the demo writes its counts as it exits, so it is stopped, never killed.
    trap 'kill -TERM "$demo" 2> /dev/null || true; wait "$demo" 2> /dev/null || true; rm -rf "$work"' EXIT
    local waited=0
    until grep -q 'Ctrl-C stops everything' "$work/demo.out"; do
        kill -0 "$demo" 2> /dev/null || die "the demo exited: $(tail -n 5 "$work/demo.err")"
        [ "$waited" -lt 600 ] || die "the demo was not up within 60 s"
        sleep 0.1
        waited=$((waited + 1))
    done
    local port outbound
    port=$(sed -n 's|^  gateway  https://127.0.0.1:\([0-9]*\) .*|\1|p' "$work/demo.out")
    outbound=$(sed -n 's|^  node-a .*outbound http://\([^ ]*\) .*|\1|p' "$work/demo.out")
    [ -n "$port" ] && [ -n "$outbound" ] || die "could not read the demo's addresses: $(cat "$work/demo.out")"
    echo "training $bin on the demo (gateway port $port, node-a outbound $outbound)"
    load "edge HTTP/1.1" 1.1 "https://127.0.0.1:$port/hello" --http1.1
    load "edge HTTP/2" 2 "https://127.0.0.1:$port/echo" --http2 -d hi
    load "node-a to echo on node-b" 1.1 "http://$outbound/from-node-a" -H 'Host: echo'
    if command -v gtlsclient > /dev/null; then
        local urls=() round ok=0 hits
        for i in $(seq 50); do urls+=("https://127.0.0.1:$port/hello/h3-$i"); done
        # gtlsclient's exit status says nothing of HTTP statuses: each answer's body (saved under
        # its path's last part) must be hello's, from either version.
        for round in $(seq $((requests / 50))); do
            rm -rf "$work/h3" && mkdir "$work/h3"
            gtlsclient -q --exit-on-all-streams-close --timeout=10s --download="$work/h3" 127.0.0.1 "$port" "${urls[@]}" \
                > /dev/null 2>&1 || die "edge HTTP/3: gtlsclient failed in round $round"
            hits=$(grep -l '^hello from v' "$work"/h3/h3-* 2> /dev/null | wc -l || true)
            ok=$((ok + hits))
        done
        [ "$ok" = $(((requests / 50) * 50)) ] || die "edge HTTP/3: $ok of $(((requests / 50) * 50)) requests answered by hello"
        echo "  edge HTTP/3: $ok requests"
    else
        echo "  edge HTTP/3: skipped (no gtlsclient; Debian's ngtcp2-client has it)"
    fi
    kill -TERM "$demo"
    wait "$demo" || die "the demo did not stop cleanly"
    trap 'rm -rf "$work"' EXIT
}

build() {
    local tool dir=$PWD/target/pgo
    tool=$(profdata)
    # A failed run must not leave an earlier run's binary looking like this one's.
    rm -f "$dir/quicmesh.profdata" "$dir/release/quicmesh"
    echo "== instrumented build (target/pgo-gen)"
    RUSTFLAGS="-Cprofile-generate=$dir/profiles" CARGO_TARGET_DIR=target/pgo-gen \
        cargo build --release --locked --bin quicmesh
    # The flags reached the build scripts too, whose runs just left counts of their own.
    rm -rf "$dir/profiles"
    echo "== training"
    train "$PWD/target/pgo-gen/release/quicmesh"
    [ -n "$(ls -A "$dir/profiles" 2> /dev/null)" ] || die "the training run wrote no counts"
    "$tool" merge -o "$dir/quicmesh.profdata" "$dir/profiles"
    echo "== optimised build (target/pgo)"
    RUSTFLAGS="-Cprofile-use=$dir/quicmesh.profdata" CARGO_TARGET_DIR=target/pgo \
        cargo build --release --locked --bin quicmesh
    echo "built target/pgo/release/quicmesh"
}

case "${1:-build}" in
    build) build ;;
    train) train "${2:?usage: link/pgo.sh train BIN}" ;;
    *) die "usage: link/pgo.sh [build | train BIN]" ;;
esac
