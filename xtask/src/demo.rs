//! `cargo xtask demo`: Specter end to end on its own demo setup.
//!
//! Starts the test server twice (live and shadow), Specter in proxy mode in front of the live
//! one, sends a traffic mix through it and prints the divergence summary from the admin API.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A child process that is stopped with SIGTERM (then killed) when dropped.
struct Process {
    name: &'static str,
    child: Child,
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

pub fn run(root: &Path, requests: usize) -> anyhow::Result<()> {
    crate::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--package", "specter"]),
    )?;
    let specter = root.join("target/debug/specter");
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

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

    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
    };
    let spawn = |name: &'static str, args: &[&str]| -> anyhow::Result<Process> {
        let child = Command::new(&specter)
            .args(args)
            .stdout(log(name)?)
            .stderr(log(name)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Process { name, child })
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
    let specter_process = spawn(
        "specter",
        &["proxy", "--config", &config.display().to_string()],
    )?;

    wait_until("the live test server", || {
        get(&format!("http://{live}/whoami")).is_ok()
    })?;
    wait_until("the shadow test server", || {
        get(&format!("http://{shadow}/whoami")).is_ok()
    })?;
    wait_until("specter's admin API", || {
        get(&format!("http://{api}/healthz")).is_ok()
    })?;
    println!("Demo: live {live}, shadow {shadow}, specter proxy {proxy}, admin API {api}");
    println!("Logs and config in {}", dir.display());

    let output = Command::new(&specter)
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

    // Replays finish shortly after the last client response.
    let stats_url = format!("http://{api}/api/stats");
    wait_until("every exchange to be mirrored or counted", || {
        let Ok(stats) = get(&stats_url) else {
            return false;
        };
        let e = &stats["exchanges"];
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        let accounted = n("mirrored")
            + n("sampled_out")
            + n("skipped_unsafe")
            + n("truncated")
            + n("incomplete")
            + n("shadow_dropped");
        n("seen") >= sent_count && accounted >= n("seen")
    })?;

    print_summary(&get(&stats_url)?, &api);
    drop(specter_process);
    Ok(())
}

fn print_summary(stats: &Value, api: &SocketAddr) {
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
    println!("Recent divergences (details: curl http://{api}/api/divergences/ID):");
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

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after 60 s waiting for {what}")
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
