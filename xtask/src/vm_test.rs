//! `cargo xtask vm-test`: the attach-mode tests on another kernel, booted under qemu.
//!
//! virtme-ng boots the given kernel over this machine's own filesystem (read-only, with
//! throwaway overlays on /etc, /tmp and the like), so the guest runs the very test binaries
//! Cargo built here, with this machine's `ip`, `tc`, `bpftool`, `capsh` and `nft`. Inside, the
//! guest runs `scripts/kernel-attach-checks.sh`: it loads the modules capture needs, loads every
//! eBPF program through that kernel's verifier, runs the `attach_mode` and `ebpf_load` tests,
//! and checks that `specter attach` chose the attach mode that kernel calls for (netlink
//! filters on a clsact qdisc before 6.6, TCX from 6.6). The results come back through
//! `target/vm-test/<release>/results`, the one directory the guest may write to.
//!
//! This is how CI proves the netlink path on a real pre-TCX kernel (Debian's 6.1) while the
//! machine itself runs a recent one; `vagrant/` does the same on full VMs where boxes can be
//! downloaded.

use std::{
    fs,
    io::Read,
    os::unix::{fs::symlink, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

/// The integration test targets the guest runs.
const TEST_TARGETS: [&str; 2] = ["ebpf_load", "attach_mode"];

/// How qemu runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm is usable, TCG (emulation) otherwise.
    Auto,
    Kvm,
    /// Pure emulation: slower, but needs nothing from the host kernel.
    Tcg,
}

/// What `cargo xtask vm-test` was asked to do.
#[derive(Debug)]
pub struct Options {
    /// A bzImage (e.g. `boot/vmlinuz-6.1.0-57-amd64` from an extracted Debian package).
    pub kernel: PathBuf,
    /// `lib/modules/<release>` for that kernel; found beside the kernel when not given.
    pub modules: Option<PathBuf>,
    pub memory: String,
    pub cpus: u32,
    pub accel: Accel,
    pub timeout: Duration,
    /// Passed to each test binary; emulated CPUs are slow, so fewer threads keep the tests'
    /// own deadlines comfortable.
    pub test_threads: Option<u32>,
}

pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    require_tools()?;

    let kernel = fs::canonicalize(&options.kernel)
        .with_context(|| format!("kernel image {} not found", options.kernel.display()))?;
    let release = kernel_release(&kernel)?;
    eprintln!("xtask: kernel {} is release {release}", kernel.display());

    // virtme-ng finds a kernel's modules by walking up from the image to a directory holding
    // lib/modules/<release>; a staging tree of two symlinks gives it exactly that, wherever the
    // kernel and its modules really are.
    let work = root.join("target/vm-test").join(&release);
    let staged_kernel = stage_kernel(&work, &kernel, &release, options.modules.as_deref())?;
    let results = work.join("results");
    let _ = fs::remove_dir_all(&results);
    fs::create_dir_all(&results).with_context(|| format!("cannot create {}", results.display()))?;

    let binaries = build_test_binaries(root)?;
    let accel = choose_accel(options.accel)?;

    let script = root.join("scripts/kernel-attach-checks.sh");
    let mut guest_command = vec![
        script.display().to_string(),
        "--specter".into(),
        binaries.specter.display().to_string(),
        "--out".into(),
        results.display().to_string(),
        "--workdir".into(),
        root.join("specter").display().to_string(),
    ];
    if let Some(threads) = options.test_threads {
        guest_command.extend(["--test-threads".into(), threads.to_string()]);
    }
    guest_command.extend(binaries.tests.iter().map(|t| t.display().to_string()));
    let guest_command = guest_command
        .iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ");

    let mut vng = Command::new("vng");
    vng.arg("--run")
        .arg(&staged_kernel)
        .args([
            "--memory",
            &options.memory,
            "--cpus",
            &options.cpus.to_string(),
        ])
        .arg("--rwdir")
        .arg(&results)
        .arg("--cwd")
        .arg(root)
        // The guest's console (boot messages, the checks' progress) is the only trace of a
        // guest that fails before writing its results.
        .arg("--verbose")
        .args(["--exec", &guest_command]);
    if accel == Accel::Tcg {
        vng.arg("--disable-kvm");
    }
    eprintln!(
        "xtask: booting {release} ({} memory, {} CPUs, {accel:?}); up to {} min",
        options.memory,
        options.cpus,
        options.timeout.as_secs() / 60
    );
    let vng_status = run_with_deadline(&mut vng, options.timeout)?;

    let summary = fs::read_to_string(results.join("summary")).unwrap_or_default();
    let exit = fs::read_to_string(results.join("exit")).unwrap_or_default();
    let tests = fs::read_to_string(results.join("tests.txt")).unwrap_or_default();
    eprintln!(
        "\nxtask: vm-test on {release} ({accel:?}), results in {}",
        results.display()
    );
    eprint!("{tests}");
    eprint!("{summary}");
    let took = started.elapsed().as_secs();
    eprintln!("xtask: vm-test took {} min {} s", took / 60, took % 60);

    let Some(vng_code) = vng_status else {
        bail!(
            "the VM did not finish within {} min; the logs so far are in {}",
            options.timeout.as_secs() / 60,
            results.display()
        );
    };
    if exit.trim().is_empty() {
        bail!(
            "the guest stopped before the checks finished (vng exited with {vng_code}); see the \
             console output above and {}",
            results.display()
        );
    }
    show_failed_logs(&results, &summary);
    let (passed, failed) = count_results(&tests, &summary);
    println!("vm-test: {passed} passed, {failed} failed");
    if exit.trim() != "0" {
        bail!(
            "attach checks failed on {release}; each check's log is in {}",
            results.display()
        );
    }
    Ok(())
}

/// The end of each failed check's log, where the cause usually is (the verifier's verdict,
/// a test's panic, the last thing `specter attach` said).
fn show_failed_logs(results: &Path, summary: &str) {
    for line in summary.lines().filter(|l| l.starts_with("FAIL ")) {
        let Some(check) = line.split_whitespace().nth(1) else {
            continue;
        };
        let log = match check.strip_prefix("attach-mode-") {
            Some(_) => results.join("attach-mode.log"),
            None => results.join(format!("{check}.log")),
        };
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("\nxtask: the end of {}:", log.display());
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("  {line}");
        }
    }
}

/// Fails with the install command for the first missing tool.
fn require_tools() -> anyhow::Result<()> {
    let tools = [
        ("vng", "pip install virtme-ng"),
        ("qemu-system-x86_64", "apt-get install qemu-system-x86"),
        // virtme-ng builds an initramfs (distribution kernels have 9p and virtio as modules)
        // around a static busybox, and refreshes module indexes with depmod.
        ("busybox", "apt-get install busybox-static"),
        ("depmod", "apt-get install kmod"),
        // What the tests and the checks run inside the guest, from this machine's filesystem.
        ("ip", "apt-get install iproute2"),
        ("bpftool", "apt-get install bpftool"),
        ("capsh", "apt-get install libcap2-bin"),
        ("nft", "apt-get install nftables"),
        ("curl", "apt-get install curl"),
    ];
    for (tool, install) in tools {
        if !on_path(tool) {
            bail!("{tool} is missing; vm-test needs it. Install it with `{install}`");
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(tool).is_file())
}

/// The release string a bzImage carries in its setup header (`kernel_version`, x86 boot
/// protocol 2.00+), e.g. "6.1.0-57-amd64".
fn kernel_release(kernel: &Path) -> anyhow::Result<String> {
    let mut image = Vec::new();
    fs::File::open(kernel)
        .and_then(|file| file.take(64 * 1024).read_to_end(&mut image))
        .with_context(|| format!("cannot read {}", kernel.display()))?;
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!(
            "{} is not an x86 bzImage (no HdrS boot header); pass the vmlinuz file",
            kernel.display()
        );
    }
    let pointer = u16::from_le_bytes([image[0x20e], image[0x20f]]) as usize + 0x200;
    let text = image
        .get(pointer..)
        .and_then(|rest| rest.split(|&b| b == 0).next())
        .map(String::from_utf8_lossy)
        .with_context(|| format!("{} has no kernel version string", kernel.display()))?;
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("{} has an empty kernel version string", kernel.display()))
}

/// Lays out `work/root/boot/vmlinuz-<release>` and `work/root/lib/modules/<release>` as
/// symlinks and returns the staged kernel path.
fn stage_kernel(
    work: &Path,
    kernel: &Path,
    release: &str,
    modules: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let stage = work.join("root");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("boot"))?;
    fs::create_dir_all(stage.join("lib/modules"))?;
    let staged_kernel = stage.join(format!("boot/vmlinuz-{release}"));
    symlink(kernel, &staged_kernel)
        .with_context(|| format!("cannot link {}", staged_kernel.display()))?;

    let modules = match modules {
        Some(dir) => Some(
            fs::canonicalize(dir)
                .with_context(|| format!("modules directory {} not found", dir.display()))?,
        ),
        None => modules_beside(kernel, release),
    };
    let Some(modules) = modules else {
        eprintln!(
            "xtask: warning: no lib/modules/{release} beside {}; the kernel must have veth, \
             sch_ingress, cls_bpf, 9p and virtio built in. Pass --modules DIR otherwise",
            kernel.display()
        );
        return Ok(staged_kernel);
    };
    if !modules.join("kernel").is_dir() {
        bail!(
            "{} does not look like lib/modules/{release} (it has no kernel/ directory)",
            modules.display()
        );
    }
    symlink(&modules, stage.join("lib/modules").join(release))?;

    // Kernel packages ship modules without their index; the guest's modprobe needs it.
    if !modules.join("modules.dep").is_file() {
        eprintln!("xtask: indexing {} with depmod", modules.display());
        crate::run(Command::new("depmod").arg("-b").arg(&stage).arg(release))
            .context("depmod failed on the kernel's modules")?;
    }
    Ok(staged_kernel)
}

/// `<root>/lib/modules/<release>` for a kernel at `<root>/boot/<image>`, as a kernel package
/// extracted with `dpkg-deb -x` lays them out.
fn modules_beside(kernel: &Path, release: &str) -> Option<PathBuf> {
    kernel.ancestors().skip(1).find_map(|dir| {
        ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|sub| dir.join(sub).join(release))
            .find(|candidate| candidate.join("kernel").is_dir())
    })
}

struct TestBinaries {
    specter: PathBuf,
    tests: Vec<PathBuf>,
}

/// Builds the test binaries with the whole workspace selected, as `cargo xtask test` does, so
/// features resolve the same way and nothing is rebuilt after it; returns the specter binary and the test executables the guest runs.
fn build_test_binaries(root: &Path) -> anyhow::Result<TestBinaries> {
    eprintln!("xtask: building the test binaries");
    let output = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .args(TEST_TARGETS.iter().flat_map(|target| ["--test", target]))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        bail!("building the test binaries failed");
    }

    let mut specter = None;
    let mut tests = Vec::new();
    for line in output.stdout.split(|&b| b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        let kinds = &message["target"]["kind"];
        let is = |kind: &str| {
            kinds
                .as_array()
                .is_some_and(|k| k.iter().any(|v| v == kind))
        };
        if is("bin") && name == "specter" {
            specter = Some(PathBuf::from(executable));
        } else if is("test") && TEST_TARGETS.contains(&name) {
            tests.push(PathBuf::from(executable));
        }
    }
    // The test binaries find specter at the path Cargo uplifts it to.
    let specter = specter.unwrap_or_else(|| root.join("target/debug/specter"));
    if tests.len() != TEST_TARGETS.len() {
        bail!("cargo built {tests:?}; expected the test targets {TEST_TARGETS:?}");
    }
    tests.sort_by_key(|t| {
        TEST_TARGETS.iter().position(|n| {
            t.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(n))
        })
    });
    Ok(TestBinaries { specter, tests })
}

fn choose_accel(requested: Accel) -> anyhow::Result<Accel> {
    let kvm_usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    match requested {
        Accel::Kvm if !kvm_usable => {
            bail!("--accel kvm needs a usable /dev/kvm (as root, with KVM enabled in the host)")
        }
        Accel::Auto if kvm_usable => Ok(Accel::Kvm),
        Accel::Auto => {
            eprintln!(
                "xtask: warning: /dev/kvm is missing or not usable; emulating the guest's CPUs \
                 with TCG, which is several times slower"
            );
            Ok(Accel::Tcg)
        }
        other => Ok(other),
    }
}

/// Runs `command` in a process group of its own; kills the whole group (qemu included) when
/// it runs past `timeout`. Returns the exit code, or `None` when it was killed.
///
/// The guest's console is copied through pipes: qemu reopens `/proc/self/fd/1` and `2` for its
/// console, and reopening a regular file (CI's log, say) would start writing at offset 0 over
/// what is already there.
fn run_with_deadline(command: &mut Command, timeout: Duration) -> anyhow::Result<Option<i32>> {
    eprintln!("xtask: running {command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start vng")?;
    let copiers = [
        child
            .stdout
            .take()
            .map(|from| copy_to_stderr(Box::new(from))),
        child
            .stderr
            .take()
            .map(|from| copy_to_stderr(Box::new(from))),
    ];

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status.code().unwrap_or(-1));
        }
        if Instant::now() >= deadline {
            let group = child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group this function created; no memory involved.
            unsafe { libc::kill(-group, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: as above.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for copier in copiers.into_iter().flatten() {
        let _ = copier.join();
    }
    Ok(status)
}

fn copy_to_stderr(mut from: Box<dyn Read + Send>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut std::io::stderr());
    })
}

/// Passed and failed counts: each test function from the guest's per-test result lines, and
/// each check of the summary that is not a whole test binary.
fn count_results(tests: &str, summary: &str) -> (usize, usize) {
    let mut passed = tests.lines().filter(|l| l.ends_with(" ok")).count();
    let mut failed = tests.lines().filter(|l| l.ends_with(" FAILED")).count();
    for line in summary.lines() {
        let mut words = line.split_whitespace();
        let (Some(verdict), Some(check)) = (words.next(), words.next()) else {
            continue;
        };
        if TEST_TARGETS.contains(&check) {
            continue;
        }
        match verdict {
            "PASS" => passed += 1,
            "FAIL" => failed += 1,
            _ => {}
        }
    }
    (passed, failed)
}

fn shell_quote(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests;
