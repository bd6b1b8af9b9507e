//! `cargo xtask demo`: Specter end to end on its own demo setup.
//!
//! Passive mode (the default, as root): a server host and a client host in network namespaces
//! joined by a veth pair. The server runs the test server as the live service and again as the
//! shadow, and `specter attach` on its veth; the client host runs the traffic generator against
//! the live service. Nothing on the live path knows Specter is there.
//!
//! Proxy mode (`--proxy`, no root needed): the same test servers on loopback with Specter as a
//! reverse proxy in front of the live one.
//!
//! Either way it ends with the divergence summary from the admin API.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::hosts::{self, Hosts, Process, in_netns, wait_until};

pub fn run(root: &Path, requests: usize, proxy: bool) -> anyhow::Result<()> {
    if !proxy && !hosts::is_root() {
        bail!(
            "the demo attaches eBPF programs and creates network namespaces, which needs root: \
             run `sudo -E cargo xtask demo`, or `cargo xtask demo --proxy` for the inline mode"
        );
    }
    crate::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--package", "specter"]),
    )?;
    let specter = root.join("target/debug/specter");
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    if proxy {
        run_proxy(&specter, &dir, requests)
    } else {
        run_attach(&specter, &dir, requests)
    }
}

fn run_attach(specter: &Path, dir: &Path, requests: usize) -> anyhow::Result<()> {
    let hosts = Hosts::create("spdemo")?;
    let live_addr = format!("{}:8080", hosts.server_ip);
    let config = dir.join("specter.yaml");
    std::fs::write(
        &config,
        format!(
            "specter:\n  shadow_target: http://127.0.0.1:8081\n  routing_key: X-User-ID\n\
             capture:\n  ports: [8080]\n\
             store:\n  path: {}\napi:\n  listen: 127.0.0.1:9090\n",
            dir.join("specter.redb").display()
        ),
    )?;

    let server = hosts.server.clone();
    let args = |mode: &'static str, port: &'static str, bind: &'static str| {
        ["testserver", "--port", port, "--mode", mode, "--bind", bind]
    };
    let _live = hosts.spawn(
        &server,
        "live",
        specter,
        &args("live", "8080", "0.0.0.0"),
        &dir.join("live.log"),
    )?;
    let _shadow = hosts.spawn(
        &server,
        "shadow",
        specter,
        &args("shadow", "8081", "127.0.0.1"),
        &dir.join("shadow.log"),
    )?;
    let mut attached = hosts.spawn(
        &server,
        "specter",
        specter,
        &[
            "attach",
            "--iface",
            &hosts.server_if,
            "--config",
            config.to_str().unwrap(),
            "--no-fallback",
        ],
        &dir.join("specter.log"),
    )?;
    let api = "127.0.0.1:9090";
    wait_until("specter attach to serve its API", || {
        attached.check_running().is_ok()
            && get_in(&server, &format!("http://{api}/healthz")).is_ok()
    })
    .with_context(|| log_tail(&dir.join("specter.log")))?;
    attached
        .check_running()
        .with_context(|| log_tail(&dir.join("specter.log")))?;

    println!("Demo (passive capture): live service {live_addr} on host {server}");
    println!(
        "  specter attach on {} (TC eBPF), shadow on the server's 127.0.0.1:8081",
        hosts.server_if
    );
    println!(
        "  client host {} runs the traffic generator; logs in {}",
        hosts.client,
        dir.display()
    );

    let output = Command::new("ip")
        .args(["netns", "exec", &hosts.client])
        .arg(specter)
        .args([
            "traffic",
            "--target",
            &live_addr,
            "--requests",
            &requests.to_string(),
        ])
        .args([
            "--connections",
            "24",
            "--users",
            "200",
            "--mix",
            "full",
            "--max-body-bytes",
            "262144",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the traffic generator")?;
    if !output.status.success() {
        bail!("the traffic generator failed; see above");
    }
    let sent: Value = serde_json::from_slice(&output.stdout)?;
    let sent_count = sent["sent"].as_u64().unwrap_or(0);
    println!(
        "Client made {sent_count} exchanges with the live service in {} ms ({} pipelined, {} with \
         Expect: 100-continue)",
        sent["elapsed_ms"], sent["pipelined"], sent["expect_continue"]
    );

    let stats_url = format!("http://{api}/api/stats");
    wait_until("every captured exchange to be mirrored or counted", || {
        get_in(&server, &stats_url).is_ok_and(|stats| settled(&stats, sent_count))
    })?;
    print_summary(&get_in(&server, &stats_url)?, api);
    drop(attached);
    Ok(())
}

fn run_proxy(specter: &Path, dir: &Path, requests: usize) -> anyhow::Result<()> {
    let [live, shadow, proxy, api] = free_ports()?;
    let config = dir.join("specter.yaml");
    std::fs::write(
        &config,
        format!(
            "specter:\n  listen: {proxy}\n  live_target: http://{live}\n  \
             shadow_target: http://{shadow}\n  routing_key: X-User-ID\n\
             store:\n  path: {}\napi:\n  listen: {api}\n",
            dir.join("specter.redb").display()
        ),
    )?;
    let spawn = |name: &'static str, args: &[&str]| {
        Process::spawn(
            name,
            Command::new(specter).args(args),
            &dir.join(format!("{name}.log")),
        )
    };
    let _live = spawn(
        "live",
        &[
            "testserver",
            "--port",
            &live.port().to_string(),
            "--mode",
            "live",
        ],
    )?;
    let _shadow = spawn(
        "shadow",
        &[
            "testserver",
            "--port",
            &shadow.port().to_string(),
            "--mode",
            "shadow",
        ],
    )?;
    let specter_process = spawn("specter", &["proxy", "--config", config.to_str().unwrap()])?;

    wait_until("the live test server", || {
        get(&format!("http://{live}/whoami")).is_ok()
    })?;
    wait_until("the shadow test server", || {
        get(&format!("http://{shadow}/whoami")).is_ok()
    })?;
    wait_until("specter's admin API", || {
        get(&format!("http://{api}/healthz")).is_ok()
    })?;
    println!(
        "Demo (proxy mode): live {live}, shadow {shadow}, specter proxy {proxy}, admin API {api}"
    );
    println!("Logs and config in {}", dir.display());

    let output = Command::new(specter)
        .args([
            "traffic",
            "--target",
            &proxy.to_string(),
            "--requests",
            &requests.to_string(),
        ])
        .args(["--connections", "16", "--users", "200", "--uploads"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the traffic generator")?;
    if !output.status.success() {
        bail!("the traffic generator failed; see above");
    }
    let sent: Value = serde_json::from_slice(&output.stdout)?;
    let sent_count = sent["sent"].as_u64().unwrap_or(0);
    println!(
        "Sent {sent_count} requests through Specter in {} ms",
        sent["elapsed_ms"]
    );

    let stats_url = format!("http://{api}/api/stats");
    wait_until("every exchange to be mirrored or counted", || {
        get(&stats_url).is_ok_and(|stats| settled(&stats, sent_count))
    })?;
    print_summary(&get(&stats_url)?, &api.to_string());
    drop(specter_process);
    Ok(())
}

/// Every exchange the client made has been seen and has an outcome or a reason.
fn settled(stats: &Value, sent: u64) -> bool {
    let e = &stats["exchanges"];
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    let accounted = n("mirrored")
        + n("sampled_out")
        + n("skipped_unsafe")
        + n("truncated")
        + n("incomplete")
        + n("shadow_dropped");
    n("seen") >= sent && accounted >= n("seen")
}

fn print_summary(stats: &Value, api: &str) {
    let e = &stats["exchanges"];
    println!();
    println!("== Specter divergence summary ==");
    println!(
        "seen {}  mirrored {}  matched {}  diverged {}  shadow errors {}  skipped (unsafe) {}  \
         dropped {}",
        e["seen"],
        e["mirrored"],
        e["matched"],
        e["diverged"],
        e["shadow_errors"],
        e["skipped_unsafe"],
        e["shadow_dropped"]
    );
    if let Some(rate) = e["match_rate"].as_f64() {
        println!("match rate {:.2}%", rate * 100.0);
    }
    let latency = &stats["latency"];
    println!(
        "latency p50/p99 ms: live {}/{}  shadow {}/{}",
        latency["live"]["p50_ms"],
        latency["live"]["p99_ms"],
        latency["shadow"]["p50_ms"],
        latency["shadow"]["p99_ms"]
    );
    let capture = &stats["capture"];
    if capture.is_object() {
        println!(
            "capture: {} packets, {} bytes, ring drops {}, gaps {}, incomplete exchanges {}",
            capture["packets"],
            capture["bytes"],
            capture["ring_drops"],
            capture["gaps"],
            capture["exchanges_incomplete"]
        );
    }

    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>11}",
        "route", "mirrored", "matched", "diverged", "match rate"
    );
    for route in stats["routes"].as_array().into_iter().flatten() {
        let rate = route["match_rate"]
            .as_f64()
            .map(|r| format!("{:.1}%", r * 100.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>11}",
            route["route"].as_str().unwrap_or("?"),
            route["mirrored"].as_u64().unwrap_or(0),
            route["matched"].as_u64().unwrap_or(0),
            route["diverged"].as_u64().unwrap_or(0),
            rate
        );
    }

    println!();
    println!("Recent divergences (details: GET http://{api}/api/divergences/ID):");
    for d in stats["recent_divergences"]
        .as_array()
        .into_iter()
        .flatten()
        .take(10)
    {
        let paths: Vec<&str> = d["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  #{:<6} {} {:<24} live {} shadow {}  {}",
            d["id"],
            d["method"].as_str().unwrap_or("?"),
            d["target"].as_str().unwrap_or("?"),
            d["live_status"],
            d["shadow_status"],
            paths.join(", ")
        );
    }
}

fn get(url: &str) -> anyhow::Result<Value> {
    let body = ureq::get(url)
        .config()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .call()?
        .body_mut()
        .read_to_string()?;
    Ok(serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

/// GETs `url` from inside namespace `ns`, where the admin API listens.
fn get_in(ns: &str, url: &str) -> anyhow::Result<Value> {
    let url = url.to_owned();
    in_netns(ns, move || get(&url))?
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    format!(
        "specter's log ends with:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

fn free_ports() -> anyhow::Result<[SocketAddr; 4]> {
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    Ok([addrs[0], addrs[1], addrs[2], addrs[3]])
}
