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
# A binary named relative to where the script was started from, before moving to the repo root.
[ "${1:-}" = train ] && [ -n "${2:-}" ] && set -- train "$(realpath "$2")"
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

# PGO_REQUESTS requests of one kind through the demo, 16 at a time; fails unless every one is a 200.
load() {
    local what=$1 url=$2 config=$work/curl.conf codes
    shift 2
    : > "$config"
    for _ in $(seq "$requests"); do
        printf 'url = "%s"\noutput = "/dev/null"\n' "$url" >> "$config"
    done
    codes=$(curl -sk --no-progress-meter --parallel --parallel-max 16 -w '%{http_code}\n' "$@" -K "$config") || true
    local ok
    ok=$(grep -c '^200$' <<< "$codes" || true)
    [ "$ok" = "$requests" ] || die "$what: $ok of $requests requests answered 200"
    echo "  $what: $ok requests"
}

train() {
    local bin=$1
    [ -x "$bin" ] || die "no binary at $bin"
    command -v curl > /dev/null || die "the training needs curl"
    requests=${PGO_REQUESTS:-20000}
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
    load "edge HTTP/1.1" "https://127.0.0.1:$port/hello" --http1.1
    load "edge HTTP/2" "https://127.0.0.1:$port/echo" --http2 -d hi
    load "node-a to echo on node-b" "http://$outbound/from-node-a" -H 'Host: echo'
    if command -v gtlsclient > /dev/null; then
        local urls=() round
        for _ in $(seq 50); do urls+=("https://127.0.0.1:$port/hello"); done
        mkdir -p "$work/h3"
        # gtlsclient's exit status says nothing of HTTP statuses: the body of the round's last
        # answer (a 200's, from either version of hello) is checked instead.
        for round in $(seq $((requests / 50))); do
            rm -f "$work/h3/hello"
            gtlsclient -q --exit-on-all-streams-close --timeout=10s --download="$work/h3" 127.0.0.1 "$port" "${urls[@]}" \
                > /dev/null 2>&1 || die "edge HTTP/3: gtlsclient failed in round $round"
            grep -q '^hello from v' "$work/h3/hello" 2> /dev/null || die "edge HTTP/3: round $round was not answered by hello"
        done
        echo "  edge HTTP/3: $(((requests / 50) * 50)) requests"
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
    rm -rf "$dir/profiles"
    echo "== instrumented build (target/pgo-gen)"
    RUSTFLAGS="-Cprofile-generate=$dir/profiles" CARGO_TARGET_DIR=target/pgo-gen \
        cargo build --release --locked --bin quicmesh
    # The flags reached the build scripts too, whose runs just left counts of their own.
    rm -rf "$dir/profiles"
    echo "== training"
    train target/pgo-gen/release/quicmesh
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
