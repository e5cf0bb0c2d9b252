//! Release builds of the `quicmesh` binary lay out its code in the order its processes run it
//! (`link/symbol-order.txt`, written by `link/symbol_order.py`): what a node runs to start sits
//! together, so an idle node holds about half the binary's pages it held when the code was laid
//! out by the compiler (the kernel maps code in 64 KiB around each page touched).
//!
//! The flag goes only to the linker rustc picks by default for x86_64 Linux since 1.90 (its own
//! lld), which takes it; with a linker of the user's choice, another target or an older rustc,
//! the build is the same as without this. `QUICMESH_SYMBOL_ORDER=0` turns it off.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER: &str = "link/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=QUICMESH_SYMBOL_ORDER");
    let wanted = env::var("QUICMESH_SYMBOL_ORDER").map_or(true, |v| v != "0");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    if !(wanted && release && target && default_linker() && rustc_minor().is_some_and(|m| m >= 90)) {
        return;
    }
    let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let order = Path::new(&dir).join(ORDER);
    if order.is_file() {
        println!("cargo:rustc-link-arg-bin=quicmesh=-Wl,--symbol-ordering-file={}", order.display());
        // Functions renamed since the file was written are skipped without a word.
        println!("cargo:rustc-link-arg-bin=quicmesh=-Wl,--no-warn-symbol-ordering");
    }
}

/// No linker chosen by config or flags (cargo names a configured one in `RUSTC_LINKER`).
fn default_linker() -> bool {
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    env::var_os("RUSTC_LINKER").is_none() && !flags.contains("linker") && !flags.contains("link-self-contained")
}

/// The minor version of the rustc building this (`1.95.0` gives 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().nth(1)?.split('.').nth(1)?.parse().ok()
}
