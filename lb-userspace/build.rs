//! Builds the XDP program (lb-ebpf) for the BPF target with the nightly
//! toolchain and leaves the object in OUT_DIR, where `datapath.rs` embeds it.
//! The CPU level v3 is needed for the atomic fetch and compare-and-swap
//! operations the connection table relies on.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap();
    let ebpf = root.join("lb-ebpf");
    for watched in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = root.join("target").join("bpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-cpu=v3\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf");
    // The outer build's toolchain settings must not leak into the nightly one.
    for var in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTC_WRAPPER", "RUSTUP_TOOLCHAIN", "CARGO"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run rustup to build the XDP program ({e}); run `cargo xtask setup` first")
    });
    if !status.success() {
        panic!(
            "building the XDP program failed; `cargo xtask setup` installs the nightly rust-src \
             component and bpf-linker it needs"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/lb");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("lb-ebpf.o");
    std::fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
}
