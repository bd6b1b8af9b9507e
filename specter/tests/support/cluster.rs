//! A Specter cluster on the real network stack: three (or more) nodes, each in a network
//! namespace of its own with its own address, plugged into a bridge in a fourth "hub"
//! namespace. The hub also runs the live and shadow test servers and is where the test's HTTP
//! client lives, so every node, and nothing outside the namespaces, is reachable from it.
//! Needs root. Every namespace (and with it every interface) is removed on drop.
//!
//! A node is `specter proxy` in front of the hub's live server, or (with [`NodeSpec::attach`])
//! a live test server of its own with `specter attach` on the node's end of its veth, as on a
//! host where Specter watches a service it does not sit in front of.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use reqwest::blocking::Client;
use serde_json::Value;

use crate::{
    harness::{ChildGuard, SPECTER, client, wait_until},
    netns::{Netns, ip},
};

static NEXT: AtomicU32 = AtomicU32::new(1);

/// The hub's address on the bridge, where the test servers listen.
const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 254);
pub const LIVE_PORT: u16 = 9001;
pub const SHADOW_PORT: u16 = 9002;
pub const PROXY_PORT: u16 = 8080;
pub const API_PORT: u16 = 9090;
pub const GOSSIP_PORT: u16 = 7946;
/// How long a node may take to start answering.
const STARTUP: Duration = Duration::from_secs(30);

/// The address of node `index` (0-based) on the bridge.
pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 203, 0, u8::try_from(index + 1).expect("few nodes"))
}

/// The hub and the node namespaces, wired to one bridge.
pub struct Topology {
    pub hub: Netns,
    pub nodes: Vec<Netns>,
    /// The hub-side end of each node's veth, the one a partition takes down.
    pub hub_ifs: Vec<String>,
    /// An HTTP client whose sockets live in the hub namespace.
    pub client: Client,
}

impl Topology {
    pub fn new(nodes: usize) -> Self {
        let id = std::process::id() % 10_000 * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        let hub = Netns::new(format!("scl{id}h"));
        hub.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        hub.exec_ok(&["ip", "addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"]);
        hub.exec_ok(&["ip", "link", "set", "br0", "up"]);

        let mut namespaces = Vec::new();
        let mut hub_ifs = Vec::new();
        for index in 0..nodes {
            let ns = Netns::new(format!("scl{id}n{index}"));
            let node_if = format!("scl{id}n{index}");
            let hub_if = format!("scl{id}h{index}");
            ip(&[
                "link", "add", &node_if, "type", "veth", "peer", "name", &hub_if,
            ]);
            ip(&["link", "set", &node_if, "netns", &ns.name]);
            ip(&["link", "set", &hub_if, "netns", &hub.name]);
            hub.exec_ok(&["ip", "link", "set", &hub_if, "master", "br0"]);
            hub.exec_ok(&["ip", "link", "set", &hub_if, "up"]);
            let addr = format!("{}/24", node_ip(index));
            ns.exec_ok(&["ip", "addr", "add", &addr, "dev", &node_if]);
            ns.exec_ok(&["ip", "link", "set", &node_if, "up"]);
            namespaces.push(ns);
            hub_ifs.push(hub_if);
        }

        // A thread in the hub builds the client: the client's own runtime thread is started
        // there, inherits the namespace, and opens every socket in it.
        let client = hub.enter(client);
        Self {
            hub,
            nodes: namespaces,
            hub_ifs,
            client,
        }
    }

    /// Cuts node `index` off the bridge (its link goes down), or plugs it back in.
    pub fn set_link(&self, index: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        self.hub
            .exec_ok(&["ip", "link", "set", &self.hub_ifs[index], state]);
    }

    /// Starts the live and shadow test servers in the hub and waits until both answer.
    pub fn start_upstreams(&self, dir: &Path) -> Vec<ChildGuard> {
        let mut servers = Vec::new();
        for (port, mode) in [(LIVE_PORT, "live"), (SHADOW_PORT, "shadow")] {
            let mut command = self.hub.command(SPECTER);
            command.args([
                "testserver",
                "--port",
                &port.to_string(),
                "--mode",
                mode,
                "--bind",
                &HUB_IP.to_string(),
            ]);
            let log = dir.join(format!("testserver-{mode}.log"));
            servers.push(ChildGuard::spawn(
                &format!("testserver {mode}"),
                command,
                &log,
            ));
            let url = format!("http://{HUB_IP}:{port}/whoami");
            wait_until(&format!("the {mode} test server"), STARTUP, || {
                self.client
                    .get(&url)
                    .send()
                    .and_then(|r| r.json::<Value>())
                    .ok()
                    .filter(|body| body["mode"] == mode)
            });
        }
        servers
    }
}

/// One Specter cluster node, started in its namespace.
pub struct Node {
    pub index: usize,
    pub name: String,
    pub config: PathBuf,
    log: PathBuf,
    ns_name: String,
    client: Client,
    child: Option<ChildGuard>,
    /// Attach mode: the node's own live service, watched by Specter.
    attach: Option<ChildGuard>,
}

/// How to configure a node.
pub struct NodeSpec<'a> {
    pub index: usize,
    /// Indexes of the nodes it joins through.
    pub seeds: &'a [usize],
    pub secret_file: &'a Path,
    /// Run `specter attach` beside a live service of the node's own instead of a proxy.
    pub attach: bool,
}

impl Node {
    /// Writes the node's config and starts it; does not wait for it to join.
    pub fn start(topology: &Topology, dir: &Path, spec: NodeSpec<'_>) -> Self {
        let index = spec.index;
        let name = format!("node-{index}");
        let ip = node_ip(index);
        let peers: Vec<String> = spec
            .seeds
            .iter()
            .map(|s| format!("\"{}:{GOSSIP_PORT}\"", node_ip(*s)))
            .collect();
        // In attach mode the node's own live server is at {ip}:{LIVE_PORT}, the captured port.
        let (live, capture) = if spec.attach {
            (ip, format!("capture:\n  ports: [{LIVE_PORT}]\n"))
        } else {
            (HUB_IP, String::new())
        };
        let yaml = format!(
            "specter:\n  listen: {ip}:{PROXY_PORT}\n  live_target: http://{live}:{LIVE_PORT}\n  \
             shadow_target: http://{HUB_IP}:{SHADOW_PORT}\n  routing_key: X-User-ID\n\
             {capture}\
             store:\n  path: {store}\n\
             api:\n  listen: {ip}:{API_PORT}\n\
             cluster:\n  node_name: {name}\n  bind_addr: {ip}:{GOSSIP_PORT}\n  peers: [{peers}]\n  \
             secret_file: {secret}\n",
            store = dir.join(format!("{name}.redb")).display(),
            peers = peers.join(", "),
            secret = spec.secret_file.display(),
        );
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).expect("write the node config");
        let mut node = Self {
            index,
            name,
            config,
            log: dir.join(format!("node-{index}.log")),
            ns_name: topology.nodes[index].name.clone(),
            client: topology.client.clone(),
            child: None,
            attach: None,
        };
        if spec.attach {
            node.attach = Some(node.start_live(dir));
        }
        node.launch();
        node
    }

    /// Attach mode: the node's live test server, answering before Specter starts.
    fn start_live(&self, dir: &Path) -> ChildGuard {
        let ip = node_ip(self.index);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns_name, SPECTER, "testserver"]);
        command.args(["--mode", "live", "--bind", &ip.to_string()]);
        command.args(["--port", &LIVE_PORT.to_string()]);
        let log = dir.join(format!("{}-live.log", self.name));
        let server = ChildGuard::spawn(&format!("{} live", self.name), command, &log);
        let url = format!("http://{ip}:{LIVE_PORT}/whoami");
        wait_until(&format!("{}'s live server", self.name), STARTUP, || {
            // Not kept alive: the test's requests must open their connections once capture runs.
            self.client
                .get(&url)
                .header("Connection", "close")
                .send()
                .ok()
                .filter(|r| r.status() == 200)
        });
        server
    }

    fn launch(&mut self) {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns_name, SPECTER]);
        if self.attach.is_some() {
            // The node's veth end (named like its namespace) carries its live service's traffic. No fallback: a node that
            // cannot attach must fail the test, not quietly become a proxy.
            command.args(["attach", "--iface", &self.ns_name, "--no-fallback"]);
        } else {
            command.arg("proxy");
        }
        command.arg("--config").arg(&self.config).env(
            "RUST_LOG",
            "info,memberlist=warn,memberlist_core=warn,memberlist_net=warn",
        );
        self.child = Some(ChildGuard::spawn(&self.name, command, &self.log));
        let health = format!("http://{}/healthz", self.api());
        let started = Instant::now();
        loop {
            let ok = self
                .client
                .get(&health)
                .send()
                .and_then(|r| r.text())
                .is_ok_and(|body| body == "ok\n");
            if ok {
                return;
            }
            let child = self.child.as_mut().expect("just started");
            if let Some(status) = child.try_exit() {
                panic!(
                    "{} exited with {status}; its log:\n{}",
                    self.name,
                    child.log_text()
                );
            }
            assert!(
                started.elapsed() < STARTUP,
                "{} did not answer within {STARTUP:?}; its log:\n{}",
                self.name,
                child.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn api(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(node_ip(self.index)), API_PORT)
    }

    /// Where a client sends a request through this node: its proxy port, or in attach mode its
    /// live service directly.
    pub fn url(&self, path: &str) -> String {
        let port = if self.attach.is_some() {
            LIVE_PORT
        } else {
            PROXY_PORT
        };
        format!("http://{}:{port}{path}", node_ip(self.index))
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        drop(self.child.take());
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        let child = self.child.as_mut().expect("node is running");
        child.terminate();
        let status = child.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            self.name
        );
        self.child = None;
    }

    /// Starts the node again with the same config and store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart needs the node stopped");
        self.launch();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GETs an admin API path and parses the JSON, asserting a 200.
    pub fn api_json(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.api());
        let response = self
            .client
            .get(&url)
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response.text().unwrap_or_default();
        assert_eq!(status, 200, "GET {url} answered {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    /// The names of the live members as this node sees them, sorted.
    pub fn members(&self) -> Vec<String> {
        let body = self.api_json("/api/cluster/members");
        let mut names: Vec<String> = body["members"]
            .as_array()
            .expect("members list")
            .iter()
            .map(|m| m["name"].as_str().expect("member name").to_owned())
            .collect();
        names.sort();
        names
    }

    /// The member this node says owns `key`.
    pub fn owner_of(&self, key: &str) -> String {
        let body = self.api_json(&format!("/api/cluster/owner?key={key}"));
        body["owner"].as_str().expect("an owner").to_owned()
    }

    /// Polls until this node sees exactly `expected` as members; returns how long it took.
    pub fn wait_for_members(&self, expected: &[&str], within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let now = self.members();
            if now == expected {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{} sees members {now:?}, expected {expected:?} within {within:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Writes a cluster secret file.
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write the secret");
    path
}

/// The `exchanges` counter `name` of a stats answer.
pub fn counter(stats: &Value, name: &str) -> u64 {
    stats["exchanges"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats have no exchanges.{name}: {stats:#}"))
}
