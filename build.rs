//! Release builds of the `quicmesh` binary lay out its code in the order its processes run it
//! (`link/symbol-order.txt`, written by `link/symbol_order.py`): what a node runs to start sits
//! together, so an idle node holds about half the binary's pages it held when the code was laid
//! out by the compiler (the kernel maps code in 64 KiB around each page touched).
//!
//! Only linkers that know `--symbol-ordering-file` take it (lld, which rustup's rustc uses by
//! default on x86_64 Linux; not GNU ld or mold). So the flags are first tried on an empty
//! program with this build's rustc, target, flags and linker, and passed on only when that
//! links; otherwise the build is the same as without this. `QUICMESH_SYMBOL_ORDER=0` turns it
//! off.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const ORDER: &str = "link/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["QUICMESH_SYMBOL_ORDER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC_LINKER"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let wanted = env::var("QUICMESH_SYMBOL_ORDER").map_or(true, |v| v != "0");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let order = dir.join(ORDER);
    if !(wanted && release && order.is_file()) {
        return;
    }
    // -Xlinker passes the path whole (-Wl, would split it at a comma).
    let args = [
        "-Xlinker".to_string(),
        format!("--symbol-ordering-file={}", order.display()),
        "-Xlinker".to_string(),
        "--no-warn-symbol-ordering".to_string(),
    ];
    if links_with(&args) {
        for arg in args {
            println!("cargo:rustc-link-arg-bin=quicmesh={arg}");
        }
    } else {
        println!("cargo:warning=the linker does not take --symbol-ordering-file; the binary keeps the compiler's code layout");
    }
}

/// Whether an empty program links with `args` added, as this build links (rustc, target,
/// RUSTFLAGS, configured linker).
fn links_with(args: &[String]) -> bool {
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else { return false };
    let src = out.join("order_probe.rs");
    if std::fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let mut cmd = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    cmd.arg(&src).arg("-o").arg(out.join("order_probe")).arg("--crate-type=bin");
    if let Ok(target) = env::var("TARGET") {
        cmd.arg("--target").arg(target);
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        cmd.arg("-C").arg(format!("linker={}", Path::new(&linker).display()));
    }
    for arg in args {
        cmd.arg("-C").arg(format!("link-arg={arg}"));
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}
