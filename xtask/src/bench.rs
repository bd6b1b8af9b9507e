//! `cargo xtask bench`: passive capture under load, on the real kernel, in namespaces.
//!
//! Two hosts joined by a veth pair; the live test server on one, wrk on the other. Each step
//! runs wrk twice at the same connection count, side by side: once with nothing attached and
//! once with `specter attach` on the server's veth. It reports the live path's throughput in
//! both runs (the cost of capture on the live path), the exchanges Specter saw against the
//! requests wrk completed, and the ring drops. The highest rate with zero drops and every
//! exchange seen is the capture headroom on this machine. Needs root, wrk and a release build.

use std::{path::Path, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::hosts::{self, Hosts, wait_until};

const LIVE_PORT: u16 = 8080;
const SHADOW_PORT: u16 = 8081;

/// One wrk run's result.
struct Run {
    /// Requests wrk completed.
    requests: u64,
    rate: f64,
}

pub fn run(root: &Path, seconds: u32, steps: &[u32]) -> anyhow::Result<()> {
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed; `apt-get install wrk` (Debian) provides it");
    }
    crate::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "specter",
    ]))?;
    let specter = root.join("target/release/specter");
    let dir = root.join("target/bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    if !hosts::is_root() {
        bail!("the benchmark attaches eBPF programs in network namespaces; run it as root");
    }
    let hosts = Hosts::create("spbench")?;
    let server = hosts.server.clone();
    let _live = hosts.spawn(
        &server,
        "live",
        &specter,
        &[
            "testserver",
            "--port",
            "8080",
            "--mode",
            "live",
            "--bind",
            "0.0.0.0",
        ],
        &dir.join("live.log"),
    )?;
    let _shadow = hosts.spawn(
        &server,
        "shadow",
        &specter,
        &["testserver", "--port", "8081", "--mode", "shadow"],
        &dir.join("shadow.log"),
    )?;
    let live_url = format!("http://{}:{LIVE_PORT}/users/42", hosts.server_ip);
    wait_until("the live test server", || {
        api_get(&server, "http://127.0.0.1:8080/whoami").is_ok()
    })?;

    println!("Passive capture benchmark: {seconds} s per run, GET /users/{{id}} over keep-alive");
    println!(
        "machine: {} cores",
        thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!();
    println!(
        "{:>11} {:>14} {:>14} {:>9} {:>12} {:>12} {:>10}",
        "connections", "req/s without", "req/s with", "ratio", "completed", "seen", "ring drops"
    );

    let mut best_zero_drop: Option<f64> = None;
    for (i, &connections) in steps.iter().enumerate() {
        let without = wrk(&hosts.client, &live_url, connections, seconds)?;

        let config = dir.join(format!("specter-{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "specter:\n  shadow_target: http://127.0.0.1:{SHADOW_PORT}\n\
                 sampling:\n  rate: 0.0\n\
                 capture:\n  ports: [{LIVE_PORT}]\n  ring_bytes: 67108864\n\
                 store:\n  path: {}\napi:\n  listen: 127.0.0.1:9090\n",
                dir.join(format!("specter-{i}.redb")).display()
            ),
        )?;
        let attached = hosts.spawn(
            &server,
            "specter",
            &specter,
            &[
                "attach",
                "--iface",
                &hosts.server_if,
                "--config",
                config.to_str().unwrap(),
            ],
            &dir.join(format!("specter-{i}.log")),
        )?;
        wait_until("specter attach", || {
            api_get(&server, "http://127.0.0.1:9090/healthz").is_ok()
        })?;

        let with = wrk(&hosts.client, &live_url, connections, seconds)?;
        // Let the consumer drain what is still in the ring.
        thread::sleep(Duration::from_secs(2));
        let stats = api_get(&server, "http://127.0.0.1:9090/api/stats")?;
        drop(attached);

        let seen = stats["exchanges"]["seen"].as_u64().unwrap_or(0);
        let drops = stats["capture"]["ring_drops"].as_u64().unwrap_or(0);
        println!(
            "{:>11} {:>14.0} {:>14.0} {:>9.3} {:>12} {:>12} {:>10}",
            connections,
            without.rate,
            with.rate,
            with.rate / without.rate.max(1.0),
            with.requests,
            seen,
            drops
        );
        if drops == 0 && seen >= with.requests {
            best_zero_drop = Some(best_zero_drop.map_or(with.rate, |b: f64| b.max(with.rate)));
        }
    }
    println!();
    match best_zero_drop {
        Some(rate) => println!("highest rate captured with zero ring drops: {rate:.0} req/s"),
        None => println!("no step was captured with zero ring drops"),
    }
    println!("(`seen` may exceed `completed` by the requests wrk left in flight when it stopped)");
    Ok(())
}

fn wrk(client_ns: &str, url: &str, connections: u32, seconds: u32) -> anyhow::Result<Run> {
    let threads = connections.min(2).to_string();
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            "wrk",
            "-t",
            &threads,
            "-c",
            &connections.to_string(),
        ])
        .args(["-d", &format!("{seconds}s"), url])
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // "  123456 requests in 10.00s, ..." and "Requests/sec:  12345.67"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("wrk printed no request count")?;
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|n| n.trim().parse().ok())
        .context("wrk printed no rate")?;
    Ok(Run { requests, rate })
}

/// GETs a JSON document from inside namespace `ns`.
fn api_get(ns: &str, url: &str) -> anyhow::Result<Value> {
    let url = url.to_owned();
    hosts::in_netns(ns, move || -> anyhow::Result<Value> {
        let body = ureq::get(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .call()?
            .body_mut()
            .read_to_string()?;
        Ok(serde_json::from_str(&body).unwrap_or(Value::String(body)))
    })?
}
