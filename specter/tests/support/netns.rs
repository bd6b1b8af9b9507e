//! Test hosts in network namespaces: a server and a client joined by a veth pair, each with
//! IPv4 and IPv6 addresses. Needs root. Everything is removed on drop.

#![allow(dead_code)]

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(1);

/// Runs `ip` with arguments, panicking with its output when it fails.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} {args:?}: {e}");
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter_current_thread(&name);
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two hosts, `server` and `client`, joined by a veth pair.
pub struct Topology {
    pub server: Netns,
    pub client: Netns,
    /// The server side's veth, where Specter attaches.
    pub server_if: String,
    pub client_if: String,
    pub server_v4: String,
    pub client_v4: String,
    pub server_v6: String,
    pub client_v6: String,
}

impl Topology {
    pub fn new() -> Self {
        let id = std::process::id() % 10_000 * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        let server = Netns::new(format!("spt{id}s"));
        let client = Netns::new(format!("spt{id}c"));
        let server_if = format!("spt{id}s0");
        let client_if = format!("spt{id}c0");
        ip(&[
            "link", "add", &server_if, "type", "veth", "peer", "name", &client_if,
        ]);
        ip(&["link", "set", &server_if, "netns", &server.name]);
        ip(&["link", "set", &client_if, "netns", &client.name]);

        // Each topology has namespaces of its own, so the same addresses never collide.
        let server_v4 = "10.201.0.1".to_owned();
        let client_v4 = "10.201.0.2".to_owned();
        let server_v6 = "fd5e::1".to_owned();
        let client_v6 = "fd5e::2".to_owned();
        for (ns, iface, v4, v6) in [
            (&server, &server_if, &server_v4, &server_v6),
            (&client, &client_if, &client_v4, &client_v6),
        ] {
            ns.exec_ok(&["ip", "addr", "add", &format!("{v4}/30"), "dev", iface]);
            ns.exec_ok(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                iface,
                "nodad",
            ]);
            ns.exec_ok(&["ip", "link", "set", iface, "up"]);
        }
        Self {
            server,
            client,
            server_if,
            client_if,
            server_v4,
            client_v4,
            server_v6,
            client_v6,
        }
    }
}

/// Moves the calling thread into network namespace `name`.
pub fn enter_current_thread(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "setns({path}) failed: {}",
        std::io::Error::last_os_error()
    );
}
