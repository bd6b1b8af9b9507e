//! Developer tasks: `cargo xtask setup | demo | bench | test | vm-test`.
//!
//! Everything the project needs beyond stable Rust is installed project-locally under `.tools/`
//! (bpf-linker) or as the nightly's `rust-src` component; nothing else on the machine changes.

mod bench;
mod demo;
mod hosts;
mod setup;
mod vm_test;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Specter's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain pieces: the nightly's rust-src and bpf-linker in .tools/bin.
    Setup,
    /// Build everything, start live and shadow test servers and Specter, drive traffic, and
    /// print the divergence summary.
    Demo {
        /// Requests the demo sends.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Run Specter as an inline proxy on loopback instead of attaching (no root needed).
        #[arg(long)]
        proxy: bool,
    },
    /// Measure passive capture under load: live throughput with and without Specter attached,
    /// and the highest rate captured with zero ring drops (root, wrk).
    Bench {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// wrk connection counts to step through.
        #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
        connections: Vec<u32>,
    },
    /// Run every test: formatting, lints, unit and integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Boot another kernel under qemu (virtme-ng, over this machine's filesystem) and run the
    /// attach-mode tests inside it, as root. Checks the attach mode that kernel calls for.
    VmTest {
        /// The kernel image (bzImage), e.g. boot/vmlinuz-6.1.0-57-amd64 from an extracted
        /// Debian linux-image package.
        #[arg(long)]
        kernel: PathBuf,
        /// Its lib/modules/<release> directory; found beside the kernel when not given.
        #[arg(long)]
        modules: Option<PathBuf>,
        /// Guest memory, as qemu's -m takes it.
        #[arg(long, default_value = "3G")]
        memory: String,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// KVM or TCG; auto takes KVM when /dev/kvm is usable.
        #[arg(long, value_enum, default_value_t = vm_test::Accel::Auto)]
        accel: vm_test::Accel,
        /// Minutes before the VM is stopped and the run fails.
        #[arg(long, default_value_t = 20)]
        timeout_minutes: u64,
        /// Threads per test binary (default: the guest's CPU count).
        #[arg(long)]
        test_threads: Option<u32>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Setup => setup::run(&root),
        Task::Demo { requests, proxy } => {
            setup::run(&root)?;
            demo::run(&root, requests, proxy)
        }
        Task::Bench {
            seconds,
            connections,
        } => {
            setup::run(&root)?;
            bench::run(&root, seconds, &connections)
        }
        Task::Test { args } => {
            setup::run(&root)?;
            test(&root, &args)
        }
        Task::VmTest {
            kernel,
            modules,
            memory,
            cpus,
            accel,
            timeout_minutes,
            test_threads,
        } => {
            setup::run(&root)?;
            vm_test::run(
                &root,
                &vm_test::Options {
                    kernel,
                    modules,
                    memory,
                    cpus,
                    accel,
                    timeout: Duration::from_secs(timeout_minutes * 60),
                    test_threads,
                },
            )
        }
    }
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    // The tests drive real tools and a real PostgreSQL; install and start them where we can.
    if hosts::is_root() {
        run(Command::new("bash").arg(root.join("scripts/test-deps.sh")))
            .context("installing the test dependencies failed")?;
    } else {
        eprintln!(
            "xtask: not root: the attach-mode tests will fail, and scripts/test-deps.sh \
             (tools, PostgreSQL) was not run"
        );
    }
    let dsn = std::env::var("SPECTER_TEST_POSTGRES_DSN").unwrap_or_else(|_| {
        "host=127.0.0.1 user=postgres password=postgres dbname=specter_test".to_owned()
    });

    run(Command::new("cargo")
        .current_dir(root)
        .args(["fmt", "--all", "--", "--check"]))
    .context("code is not formatted: run `cargo fmt --all`")?;
    // The default members: the eBPF crate only builds for the BPF target, inside `specter`'s
    // build script, where its warnings are shown.
    run(Command::new("cargo").current_dir(root).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems")?;
    run(Command::new("cargo")
        .current_dir(root)
        .arg("test")
        .args(args)
        .env("SPECTER_TEST_POSTGRES_DSN", dsn))
    .context("tests failed")
}

/// Runs a command, echoing it, and fails when it fails.
fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} exited with {status}");
    }
    Ok(())
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
