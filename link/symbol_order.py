#!/usr/bin/env python3
"""Writes `link/symbol-order.txt`: the functions of the `quicmesh` binary in the order its
processes run them, which `build.rs` hands to the linker (`--symbol-ordering-file`) for release
builds.

Why: the kernel maps a binary's code in around each page a process touches (64 KiB at a time).
Laid out by the compiler, the code a node runs to start is spread over most of the 16 MB of
text, so an idle node held 10.5 MB of the binary resident. Laid out in the order below, what a
node runs to start sits together at the front, what it runs per request right after it.

How: each process runs under valgrind's callgrind, which records every function that executed.
Counters are dumped once the process is ready ("start") and again after requests ("serve"):
- a node pair with a static config (`quicmesh ca init`, two nodes, `quicmesh sample` behind), with
  requests through node-a to node-b and delivered locally at node-b;
- `quicmesh demo` (a gateway, two nodes joined to its control plane), with HTTP/1.1 and HTTP/2
  requests at the gateway and a request through node-a.
The order: what nodes run to start, what they run to serve, then the same for the gateway, then
the demo's own process. Functions no run reached keep the compiler's order after these.

Names are the binary's symbols, mangled, as the linker sees them. Their hashes come from cargo's
build of each crate, not from the source: they hold across code changes (new and renamed
functions fall back to the compiler's place), but differ between `cargo build --release` and the
benches' build of the same binary (dev-dependencies change some crates' features), so the file
holds both. A new rustc or a change to Cargo.lock changes nearly all of them (`cargo bench
--bench footprint` reports the node's idle RSS and how many of the listed functions the binary
has): run it again then, or when the layout decays:
    cargo build --release && python3 link/symbol_order.py --fresh
    cargo bench --bench footprint --no-run && python3 link/symbol_order.py
Needs valgrind and curl.
"""

import argparse
import glob
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path, text, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        time.sleep(0.2)
    sys.exit(f"{what} did not get ready in {timeout} s; its output is in {path}")


def callgrind(binary, out_dir, args, log, children=False):
    cmd = [
        "valgrind", "--tool=callgrind", "--demangle=no", "--dump-instr=no",
        "--compress-strings=no", "--compress-pos=no",
        f"--callgrind-out-file={out_dir}/cg.%p",
    ]
    if children:
        cmd.append("--trace-children=yes")
    return subprocess.Popen(cmd + [binary] + args, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def session(leader):
    """The pids of the processes in `leader`'s session (the demo's children with it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == leader.pid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def dump(tag, leaders, d, count):
    """Dumps the counters of these runs' processes only (`count` of them), and checks the files
    appeared: callgrind_control says nothing useful when it reaches no run."""
    pids = [pid for p in leaders for pid in session(p)]
    for pid in pids:
        subprocess.run(["callgrind_control", "-d", tag, str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    part = {"start": 1, "serve": 2}[tag]
    deadline = time.monotonic() + 60
    while len(glob.glob(f"{d}/cg.*.{part}")) < count:
        if time.monotonic() > deadline:
            sys.exit(f"callgrind wrote {len(glob.glob(f'{d}/cg.*.{part}'))} of {count} '{tag}' dumps (pids {pids})")
        time.sleep(0.2)


def stop(procs):
    """SIGTERM to each run's process group, SIGKILL to what is left after a minute."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def get(url, host=None, tries=3):
    """One GET; True when it was answered 2xx."""
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    for _ in range(tries):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                return True
        except (OSError, http.client.HTTPException):
            time.sleep(0.5)
    return False


def served(what, ok, total):
    if ok == 0:
        sys.exit(f"no request to {what} succeeded: the serving phase would hold only error paths")
    if ok < total:
        print(f"warning: {total - ok} of {total} requests to {what} failed")


def node_pair(binary, d):
    """Two nodes from static config files, the `hello` sample app behind node-b."""
    backend_port = free_port()
    subprocess.run([binary, "ca", "init", "--dir", f"{d}/state", "--trust-domain", "order.local",
                    "--issue", "node-a", "--issue", "node-b"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    ports = {k: free_port() for k in ["a_out", "a_in", "a_admin", "b_out", "b_in", "b_admin"]}
    for n in "ab":
        peers = f'[[nodes]]\nname = "node-b"\naddress = "127.0.0.1:{ports["b_in"]}"\n' if n == "a" else ""
        open(f"{d}/node-{n}.toml", "w").write(
            f'[mesh]\ntrust_domain = "order.local"\n[node]\nname = "node-{n}"\n'
            f'outbound = "127.0.0.1:{ports[n + "_out"]}"\ninbound = "127.0.0.1:{ports[n + "_in"]}"\n'
            f'admin = "127.0.0.1:{ports[n + "_admin"]}"\n[node.tls]\nstate_dir = "{d}/state"\n{peers}'
            f'[[services]]\nname = "hello"\n[[services.endpoints]]\nnode = "node-b"\n'
            f'address = "127.0.0.1:{backend_port}"\n')
    procs = [subprocess.Popen([binary, "sample", "--listen", f"127.0.0.1:{backend_port}"],
                              stdout=open(f"{d}/sample.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    try:
        wait_for(f"{d}/sample.log", "listening on", "the sample app", timeout=30)
        for n in "ba":
            procs.append(callgrind(binary, d, ["node", "--config", f"{d}/node-{n}.toml"], f"{d}/node-{n}.log"))
        for n in "ab":
            wait_for(f"{d}/node-{n}.log", " ready: ", f"node-{n}")
        dump("start", procs[1:], d, 2)
        ok = 0
        for _ in range(30):
            ok += get(f"http://127.0.0.1:{ports['a_out']}/", "hello")
            ok += get(f"http://127.0.0.1:{ports['b_out']}/", "hello")
        served("the node pair", ok, 60)
        get(f"http://127.0.0.1:{ports['a_admin']}/metrics")
        dump("serve", procs[1:], d, 2)
    finally:
        stop(procs)


def demo(binary, d):
    """`quicmesh demo`: gateway and nodes as child processes of the demo's."""
    port, admin, outbound = free_port(), free_port(), free_port()
    log = f"{d}/demo.log"
    before = {k: len(glob.glob(f"{d}/cg.*.{k}")) for k in (1, 2)}
    p = callgrind(binary, d, ["demo", "--port", str(port), "--admin-port", str(admin),
                              "--outbound-port", str(outbound)], log, children=True)
    try:
        wait_for(log, "Ctrl-C stops everything.", "the demo", timeout=600)
        # the demo, its gateway and two nodes (valgrind also follows the short-lived commands
        # the demo runs, which are gone by now)
        dump("start", [p], d, before[1] + 4)
        ok = 0
        for _ in range(20):
            for proto in ["--http1.1", "--http2"]:
                for extra in [[f"https://127.0.0.1:{port}/hello"], ["-d", "hi", f"https://127.0.0.1:{port}/echo"]]:
                    run = subprocess.run(["curl", "-skf", proto, "-o", "/dev/null"] + extra)
                    ok += run.returncode == 0
            ok += get(f"http://127.0.0.1:{outbound}/from-node-a", "echo")
        served("the demo", ok, 100)
        get(f"http://127.0.0.1:{admin}/metrics")
        dump("serve", [p], d, before[2] + 4)
    finally:
        stop([p])


def functions(path, binary):
    """The binary's functions that ran in one callgrind dump, as symbol names."""
    out, ours = [], False
    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            ours = os.path.realpath(line[3:].strip()) == os.path.realpath(binary)
        elif line.startswith("fn=") and ours:
            # callgrind marks recursion depth with a 'N suffix, and names code without a symbol
            # by its address or as "(below main)"
            name = re.sub(r"'\d+$", "", line[3:].strip())
            # (LLVM's numbered copies, `.1234` or `.constprop.0`, are kept: they are renumbered
            # by the next change, but until then they hold 0.6 MB of an idle node's pages)
            if not name.startswith(("0x", "(")):
                out.append(name)
    return out


def role(path):
    """`node`, `gateway` or `demo`: the subcommand on the dump's command line."""
    for line in open(path, errors="replace"):
        if line.startswith("cmd:"):
            words = line.split()
            return words[2] if len(words) > 2 else "?"
    return "?"


PHASES = [(r, p) for r in ["node", "gateway", "demo"] for p in ["start", "serve"]]


def read_phases(path):
    """The file's names per phase (`# node start` and so on mark them; lld skips `#` lines)."""
    phases, key = {k: [] for k in PHASES}, PHASES[0]
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("# ") and tuple(line[2:].split()) in phases:
                key = tuple(line[2:].split())
            elif line and not line.startswith("#"):
                phases[key].append(line)
    return phases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/quicmesh"))
    ap.add_argument("--out", default=os.path.join(ROOT, "link/symbol-order.txt"))
    ap.add_argument("--fresh", action="store_true", help="drop the names the file holds (else this run's are added)")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    phases = {k: [] for k in PHASES} if args.fresh else read_phases(args.out)
    with tempfile.TemporaryDirectory(prefix="symbol-order-") as d:
        node_pair(binary, d)
        demo(binary, d)
        for f in sorted(glob.glob(f"{d}/cg.*.[12]")):
            key = (role(f), "start" if f.endswith(".1") else "serve")
            if key in phases:
                phases[key].extend(functions(f, binary))
    seen = set()
    with open(args.out, "w") as out:
        out.write("# Written by link/symbol_order.py: the functions of the quicmesh binary in the order its\n"
                  "# processes run them, for the linker (see build.rs), from each kind of build it was run\n"
                  "# on (release, bench: their hashes differ), merged phase by phase.\n")
        for key in PHASES:
            out.write(f"# {key[0]} {key[1]}\n")
            fresh = [n for n in phases[key] if not (n in seen or seen.add(n))]
            out.write("".join(n + "\n" for n in fresh))
            print(f"{key[0]:8} {key[1]:6} {len(fresh):6} functions")
    print(f"wrote {len(seen)} functions to {args.out}")


if __name__ == "__main__":
    main()
