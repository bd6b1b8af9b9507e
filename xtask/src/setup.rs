//! Installs the eBPF toolchain pieces, project-locally.
//!
//! - the nightly toolchain's `rust-src` component (the eBPF crate builds `core` from source);
//! - bpf-linker, built from crates.io against the nightly's own LLVM into `.tools/bin`.
//!
//! Each step is skipped when its result is already there, so running it again is cheap.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

/// The bpf-linker release that builds against the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run(root: &Path) -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(root, &sysroot)
}

fn nightly_sysroot() -> anyhow::Result<std::path::PathBuf> {
    let output = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("cannot run rustup; install rustup and a nightly toolchain")?;
    if !output.status.success() {
        bail!(
            "the nightly toolchain is missing; it builds the eBPF programs. Install it with \
             `rustup toolchain install nightly --profile minimal`"
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().into())
}

fn ensure_rust_src(sysroot: &Path) -> anyhow::Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly's rust-src component");
    crate::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn ensure_bpf_linker(root: &Path, sysroot: &Path) -> anyhow::Result<()> {
    let tools = root.join(".tools");
    if tools.join("bin/bpf-linker").is_file() {
        return Ok(());
    }

    // bpf-linker links against LLVM; the nightly ships one as lib/libLLVM.so.<ver>-rust-*.
    let lib = sysroot.join("lib");
    let llvm = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    let prefix = tools.join("llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), llvm.display()))?;

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} into {} (about a minute)",
        tools.display()
    );
    crate::run(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(&tools)
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker failed")
}
