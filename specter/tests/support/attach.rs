//! The passive-capture stack on the real kernel: a server host running the live test server
//! (and the shadow), a client host, a veth pair between them, and `specter attach` on the
//! server's veth. Needs root.

#![allow(
    dead_code,
    reason = "shared by test files that each use a different subset"
)]

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::harness::{ChildGuard, SPECTER};
use super::netns::{Netns, Topology};

/// The live service's port on the server host.
pub const LIVE_PORT: u16 = 8080;
/// The shadow's port on the server host's loopback (in the tests that do not move it).
pub const SHADOW_PORT: u16 = 8081;
/// The admin API, on the server host's loopback.
pub const API: &str = "127.0.0.1:9090";

pub struct AttachStack {
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    pub live: ChildGuard,
    pub shadow: Option<ChildGuard>,
    pub specter: Option<ChildGuard>,
    pub config: PathBuf,
    pub exchange_log: PathBuf,
}

impl AttachStack {
    /// Hosts and test servers; Specter is started by [`AttachStack::start_specter`].
    /// `extra` is appended to the config (YAML sections other than `specter` and `capture`).
    pub fn new(extra: &str) -> Self {
        let topo = Topology::new();
        let dir = tempfile::tempdir().expect("tempdir");

        let live = spawn_in(
            &topo.server,
            "live",
            &[
                "testserver",
                "--port",
                &LIVE_PORT.to_string(),
                "--mode",
                "live",
                "--bind",
                "::",
            ],
            &dir.path().join("live.log"),
        );
        wait_listening(
            &topo.server,
            format!("127.0.0.1:{LIVE_PORT}").parse().unwrap(),
        );
        let shadow = spawn_in(
            &topo.server,
            "shadow",
            &[
                "testserver",
                "--port",
                &SHADOW_PORT.to_string(),
                "--mode",
                "shadow",
            ],
            &dir.path().join("shadow.log"),
        );
        wait_listening(
            &topo.server,
            format!("127.0.0.1:{SHADOW_PORT}").parse().unwrap(),
        );

        let exchange_log = dir.path().join("exchanges.jsonl");
        let config = dir.path().join("specter.yaml");
        let yaml = format!(
            "specter:\n  listen: 127.0.0.1:18080\n  live_target: http://127.0.0.1:{LIVE_PORT}\n  \
             shadow_target: http://127.0.0.1:{SHADOW_PORT}\n  routing_key: X-User-ID\n\
             capture:\n  ports: [{LIVE_PORT}]\n  ring_bytes: 67108864\n  max_body_bytes: 4194304\n  exchange_log: {}\n\
             store:\n  path: {}\napi:\n  listen: {API}\n{extra}",
            exchange_log.display(),
            dir.path().join("specter.redb").display(),
        );
        std::fs::write(&config, yaml).expect("write config");

        Self {
            topo,
            dir,
            live,
            shadow: Some(shadow),
            specter: None,
            config,
            exchange_log,
        }
    }

    /// Runs `specter attach` on the server's veth and waits for its API.
    pub fn start_specter(&mut self, extra_args: &[&str]) {
        let mut args = vec![
            "attach",
            "--iface",
            &self.topo.server_if,
            "--config",
            self.config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra_args);
        let log = self.dir.path().join("specter.log");
        self.specter = Some(spawn_in(&self.topo.server, "specter", &args, &log));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.try_api("/healthz").is_some() {
                return;
            }
            if let Some(specter) = self.specter.as_mut()
                && let Some(status) = specter.try_exit()
            {
                panic!(
                    "specter attach exited with {status}:\n{}",
                    specter.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "specter attach did not serve its API within 30 s:\n{}",
            self.specter_log()
        );
    }

    /// Everything Specter logged, also after it stopped.
    pub fn specter_log(&self) -> String {
        let bytes = std::fs::read(self.dir.path().join("specter.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn try_api(&self, path: &str) -> Option<String> {
        let url = format!("http://{API}{path}");
        self.topo.server.enter(move || {
            let client = reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .ok()?;
            client.get(&url).send().ok()?.text().ok()
        })
    }

    /// GETs an admin API path as JSON.
    pub fn api(&self, path: &str) -> Value {
        let text = self
            .try_api(path)
            .unwrap_or_else(|| panic!("admin API {path} unreachable"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {text}"))
    }

    /// Polls `/api/stats` until `done` holds.
    pub fn wait_stats(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(text) = self.try_api("/api/stats")
                && let Ok(stats) = serde_json::from_str::<Value>(&text)
            {
                if done(&stats) {
                    return stats;
                }
                last = stats;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; last stats: {last:#}\n{}",
            self.specter_log()
        );
    }

    /// Polls `/api/stats` until `exchanges.seen` has not moved for 1.5 s, then returns them.
    pub fn wait_settled(&self) -> Value {
        let mut last_seen = u64::MAX;
        let mut since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            let stats = self.api("/api/stats");
            let seen = stat(&stats, "exchanges.seen");
            if seen != last_seen {
                last_seen = seen;
                since = Instant::now();
            } else if since.elapsed() > Duration::from_millis(1500) {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("exchanges.seen never settled:\n{}", self.specter_log());
    }

    /// Runs `specter traffic` on the client host against the live service.
    pub fn traffic(&self, target: &str, args: &[&str]) -> Value {
        let mut command = self.topo.client.command(SPECTER);
        command.args(["traffic", "--target", target]).args(args);
        let output = command.output().expect("run specter traffic");
        assert!(
            output.status.success(),
            "specter traffic failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("traffic summary is JSON")
    }

    /// Stops Specter with SIGTERM and waits for it to exit.
    pub fn stop_specter(&mut self) -> std::process::ExitStatus {
        let mut specter = self.specter.take().expect("specter is running");
        specter.terminate();
        specter.wait_exit(Duration::from_secs(30))
    }

    /// The exchange log's lines.
    pub fn exchanges(&self) -> Vec<Value> {
        read_jsonl(&self.exchange_log)
    }
}

pub fn read_jsonl(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect()
}

pub fn spawn_in(ns: &Netns, name: &str, args: &[&str], log: &std::path::Path) -> ChildGuard {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.name, SPECTER])
        .args(args);
    command.env("RUST_LOG", "info");
    ChildGuard::spawn(name, command, log)
}

pub fn wait_listening(ns: &Netns, addr: SocketAddr) {
    let ready = ns.enter(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        false
    });
    assert!(ready, "nothing listens on {addr} in {} after 20 s", ns.name);
}

/// A counter from a stats object, by dotted path ("exchanges.seen", "capture.gaps").
pub fn stat(stats: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(stats, |v, key| &v[key])
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no number at {path}: {stats:#}"))
}
