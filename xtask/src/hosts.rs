//! Demo and benchmark hosts: a server and a client network namespace joined by a veth pair,
//! and the processes started in them. Everything is torn down on drop.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The two hosts. Addresses are fixed: the namespaces are private to this run.
pub struct Hosts {
    pub server: String,
    pub client: String,
    /// The server's end of the veth pair, where Specter attaches.
    pub server_if: String,
    pub server_ip: &'static str,
}

impl Hosts {
    /// Creates `<prefix>-s` and `<prefix>-c`, replacing leftovers of an earlier run.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let hosts = Self {
            server: format!("{prefix}-s"),
            client: format!("{prefix}-c"),
            server_if: format!("{prefix}-s0"),
            server_ip: "10.200.0.1",
        };
        let client_if = format!("{prefix}-c0");
        hosts.remove();

        for ns in [&hosts.server, &hosts.client] {
            sh("ip", &["netns", "add", ns])?;
            sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(
            "ip",
            &[
                "link",
                "add",
                &hosts.server_if,
                "type",
                "veth",
                "peer",
                "name",
                &client_if,
            ],
        )?;
        for (ns, iface, ip) in [
            (&hosts.server, &hosts.server_if, "10.200.0.1/24"),
            (&hosts.client, &client_if, "10.200.0.2/24"),
        ] {
            sh("ip", &["link", "set", iface, "netns", ns])?;
            sh("ip", &["-n", ns, "addr", "add", ip, "dev", iface])?;
            sh("ip", &["-n", ns, "link", "set", iface, "up"])?;
        }
        Ok(hosts)
    }

    fn remove(&self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    /// Starts `program args` in namespace `ns`, logging to `log`.
    pub fn spawn(
        &self,
        ns: &str,
        name: &'static str,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Process> {
        let log = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Process { name, child })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `f` on a thread inside namespace `ns`, so the sockets it opens live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let handle = thread::spawn(move || -> anyhow::Result<T> {
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns with a valid namespace fd; it changes only this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({path}) failed: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// A child process that is stopped with SIGTERM (then killed) when dropped.
pub struct Process {
    pub name: &'static str,
    pub child: Child,
}

impl Process {
    /// Starts `command` with its output in `log`.
    pub fn spawn(name: &'static str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let log = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name, child })
    }

    /// Fails when the process has already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited early with {status}", self.name),
            None => Ok(()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we own; failure only means it already exited.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "xtask: {} did not stop after SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ready` every 100 ms for up to 60 s.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after 60 s waiting for {what}")
}

pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// True when running as root, which attaching eBPF programs and making namespaces need.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
