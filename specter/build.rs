//! Builds the eBPF object from `specter-ebpf` so it can be embedded in the `specter` binary.
//!
//! The eBPF crate is compiled with the nightly toolchain for `bpfel-unknown-none` and linked by
//! bpf-linker. A missing piece stops the build with one message naming it and the command that
//! installs it.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("specter crate has no parent directory")?;

    // `cargo xtask setup` installs bpf-linker under .tools/bin; look there before PATH.
    let tools_bin = workspace.join(".tools/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools_bin];
    dirs.extend(env::split_paths(&path));
    let joined = env::join_paths(dirs)?;
    // SAFETY: build scripts are single-threaded here; nothing else reads the environment yet.
    unsafe { env::set_var("PATH", &joined) };
    println!("cargo:rerun-if-env-changed=PATH");
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join(".tools/bin").display()
    );

    check_toolchain()?;

    let ebpf_dir = workspace.join("specter-ebpf");
    let package = aya_build::Package {
        name: "specter-ebpf",
        root_dir: ebpf_dir
            .to_str()
            .context("specter-ebpf path is not UTF-8")?,
        ..Default::default()
    };
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("specter-common/src").display()
    );
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}

fn check_toolchain() -> anyhow::Result<()> {
    const FIX: &str = "run `cargo xtask setup` (installs the nightly's rust-src and builds \
                       bpf-linker into .tools/bin)";

    if which("bpf-linker").is_none() {
        return Err(anyhow!(
            "the eBPF toolchain is incomplete: bpf-linker is missing; {FIX}"
        ));
    }

    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Err(anyhow!(
            "the eBPF toolchain is incomplete: the nightly Rust toolchain is missing; {FIX}"
        ));
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err(anyhow!(
            "the eBPF toolchain is incomplete: the nightly's rust-src component is missing; {FIX}"
        ));
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
