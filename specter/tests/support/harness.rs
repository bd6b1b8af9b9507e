//! The harness the integration tests share: real `specter` processes on real sockets.
//!
//! A test starts the binary Cargo built (`specter testserver` for the live and shadow sides,
//! `specter proxy` in front of them), talks to it over TCP and reads the admin API, exactly as a
//! user would. Every process is owned by a guard that kills it on drop, so a failing test never
//! leaves a process behind; every port is picked free and a bind conflict is retried with new
//! ports, so tests run in parallel; every wait polls with a deadline instead of sleeping.
//!
//! Fakes that must misbehave on purpose (a shadow that is slow, or that records what it got)
//! are small std-only HTTP/1.1 servers on threads of the test process: [`FakeShadow`].

// Each test file includes this module and uses only part of it; `expect` would warn in the
// files that happen to use everything.
#![allow(
    dead_code,
    reason = "shared by test files that each use a different subset"
)]

use std::{
    fs::OpenOptions,
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use reqwest::blocking::Client;
use serde_json::Value;

/// The binary under test.
pub const SPECTER: &str = env!("CARGO_BIN_EXE_specter");

/// How long a process may take to start listening. Generous: tests share two cores.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a condition polled through the API may take to become true.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Attempts at starting a process whose port was taken between picking and binding.
const BIND_ATTEMPTS: usize = 5;

/// Distinguishes the log and store files of several processes in one test directory.
static INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// A port that was free a moment ago. Callers retry with another when the bind then fails.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("ephemeral port address")
        .port()
}

/// An address nothing listens on, for a service that is down.
pub fn closed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// True when something accepts TCP connections at `addr`.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Polls `probe` until it returns a value, panicking with `what` after `deadline`.
pub fn wait_until<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// An HTTP client for tests: no system proxy, no automatic decompression (the feature is not
/// compiled in), a timeout so a hung server fails the test instead of hanging it.
pub fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("build the HTTP client")
}

/// A child process that is killed when the guard drops, so no process outlives its test.
pub struct ChildGuard {
    child: Child,
    name: String,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `command` with stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Self {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_owned(),
            log: log.to_owned(),
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, the signal a service manager stops Specter with.
    pub fn terminate(&self) {
        if self.exit.is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid; the child is not reaped yet (no exit status
        // was collected), so the pid cannot have been reused by another process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            sent,
            0,
            "cannot send SIGTERM to {}: {}",
            self.name,
            io::Error::last_os_error()
        );
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("poll child status");
        }
        self.exit
    }

    /// Waits for the process to exit, panicking (with its log) after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                started.elapsed() < deadline,
                "{} did not exit within {deadline:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- log of {} ---\n{}--- end of log ---",
                self.name,
                self.log_text()
            );
        }
    }
}

/// Starts a process that listens on ports it is given, retrying with new ports when one was
/// taken between picking it and binding it. `ready` polls the started process; `Err` from
/// `start` means the process exited, with its log.
fn start_with_retry<T>(
    name: &str,
    mut start: impl FnMut() -> T,
    guard: impl Fn(&mut T) -> &mut ChildGuard,
    ready: impl Fn(&T) -> bool,
) -> T {
    for _ in 0..BIND_ATTEMPTS {
        let mut started = start();
        let since = Instant::now();
        loop {
            if ready(&started) {
                return started;
            }
            let child = guard(&mut started);
            if let Some(status) = child.try_exit() {
                let log = child.log_text();
                assert!(
                    log.contains("cannot listen on"),
                    "{name} exited with {status} before it was ready; its log:\n{log}"
                );
                break;
            }
            assert!(
                since.elapsed() < STARTUP_DEADLINE,
                "{name} was not ready within {STARTUP_DEADLINE:?}; its log:\n{}",
                child.log_text()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }
    panic!("{name} could not bind free ports in {BIND_ATTEMPTS} attempts");
}

/// `specter testserver`, the demo upstream, in live or shadow mode.
pub struct TestServer {
    pub addr: SocketAddr,
    pub mode: &'static str,
    child: ChildGuard,
}

impl TestServer {
    pub fn live(dir: &Path) -> Self {
        Self::start(dir, "live")
    }

    pub fn shadow(dir: &Path) -> Self {
        Self::start(dir, "shadow")
    }

    fn start(dir: &Path, mode: &'static str) -> Self {
        let name = format!("testserver --mode {mode}");
        let client = client();
        start_with_retry(
            &name,
            || {
                let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
                let mut command = Command::new(SPECTER);
                command.args([
                    "testserver",
                    "--port",
                    &addr.port().to_string(),
                    "--mode",
                    mode,
                ]);
                let log = dir.join(format!("testserver-{mode}-{n}.log"));
                TestServer {
                    addr,
                    mode,
                    child: ChildGuard::spawn(&name, command, &log),
                }
            },
            |server| &mut server.child,
            |server| {
                // `/whoami` names the mode, so a stranger on the port is not taken for ours.
                let url = format!("http://{}/whoami", server.addr);
                client
                    .get(url)
                    .send()
                    .and_then(|r| r.json::<Value>())
                    .is_ok_and(|body| body["mode"] == server.mode)
            },
        )
    }

    /// The URL to put in a config's `live_target` or `shadow_target`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A proxy-mode config; the harness fills in the listen addresses and the store path.
#[derive(Clone)]
pub struct ProxyConfig {
    live: String,
    shadow: String,
    specter_keys: Vec<String>,
    sections: Vec<String>,
    /// The `store:` section's body in place of the test directory's redb file.
    store: Option<String>,
}

impl ProxyConfig {
    pub fn new(live: impl Into<String>, shadow: impl Into<String>) -> Self {
        Self {
            live: live.into(),
            shadow: shadow.into(),
            specter_keys: Vec::new(),
            sections: Vec::new(),
            store: None,
        }
    }

    /// The `store:` section's body, as indented YAML lines, instead of a redb file in the test
    /// directory.
    pub fn store(mut self, yaml: &str) -> Self {
        self.store = Some(yaml.trim_end().to_owned());
        self
    }

    /// One more `key: value` line in the `specter:` section.
    pub fn specter_key(mut self, line: &str) -> Self {
        self.specter_keys.push(line.to_owned());
        self
    }

    /// One more top-level section, as YAML text (`"replay:\n  timeout: 300ms"`).
    pub fn section(mut self, yaml: &str) -> Self {
        self.sections.push(yaml.trim_end().to_owned());
        self
    }

    fn render(&self, listen: SocketAddr, api: SocketAddr, store: &Path) -> String {
        let mut yaml = format!(
            "specter:\n  listen: {listen}\n  live_target: {}\n  shadow_target: {}\n",
            self.live, self.shadow
        );
        for line in &self.specter_keys {
            yaml.push_str(&format!("  {line}\n"));
        }
        match &self.store {
            Some(body) => yaml.push_str(&format!("store:\n{body}\n")),
            None => yaml.push_str(&format!("store:\n  path: {}\n", store.display())),
        }
        yaml.push_str(&format!("api:\n  listen: {api}\n"));
        for section in &self.sections {
            yaml.push_str(section);
            yaml.push('\n');
        }
        yaml
    }
}

/// A `specter proxy` process with its config file and store in a test directory.
pub struct Specter {
    /// Where clients send requests.
    pub proxy: SocketAddr,
    /// The admin API.
    pub api: SocketAddr,
    pub config_path: PathBuf,
    store_path: PathBuf,
    log: PathBuf,
    config: ProxyConfig,
    client: Client,
    child: Option<ChildGuard>,
}

impl Specter {
    /// Writes the config, starts the proxy and waits until both of its ports answer.
    pub fn start(dir: &Path, config: ProxyConfig) -> Self {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let mut specter = Specter {
            proxy: SocketAddr::from(([127, 0, 0, 1], 0)),
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            config_path: dir.join(format!("specter-{n}.yaml")),
            store_path: dir.join(format!("specter-{n}.redb")),
            log: dir.join(format!("specter-{n}.log")),
            config,
            client: client(),
            child: None,
        };
        specter.launch(true);
        specter
    }

    /// Starts the stopped process again with the same config file and store. The ports are
    /// kept when they are still free.
    pub fn restart(&mut self) {
        assert!(
            self.child.as_mut().is_none_or(|c| c.try_exit().is_some()),
            "restart needs the previous process stopped"
        );
        self.launch(false);
    }

    fn launch(&mut self, new_ports: bool) {
        let mut fresh = new_ports;
        let config = self.config.clone();
        let (config_path, store_path, log) = (
            self.config_path.clone(),
            self.store_path.clone(),
            self.log.clone(),
        );
        let client = self.client.clone();
        let (proxy, api, child) = start_with_retry(
            "specter proxy",
            || {
                let (proxy, api) = if fresh {
                    (
                        SocketAddr::from(([127, 0, 0, 1], free_port())),
                        SocketAddr::from(([127, 0, 0, 1], free_port())),
                    )
                } else {
                    (self.proxy, self.api)
                };
                // A retry after a bind conflict always takes new ports.
                fresh = true;
                std::fs::write(&config_path, config.render(proxy, api, &store_path))
                    .expect("write the config file");
                let mut command = Command::new(SPECTER);
                command.arg("proxy").arg("--config").arg(&config_path);
                (
                    proxy,
                    api,
                    ChildGuard::spawn("specter proxy", command, &log),
                )
            },
            |(_, _, child)| child,
            |(proxy, api, _)| {
                let healthy = client
                    .get(format!("http://{api}/healthz"))
                    .send()
                    .and_then(|r| r.text())
                    .is_ok_and(|body| body == "ok\n");
                healthy && accepts(*proxy)
            },
        );
        self.proxy = proxy;
        self.api = api;
        self.child = Some(child);
    }

    fn child(&mut self) -> &mut ChildGuard {
        self.child.as_mut().expect("specter was started")
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&mut self) {
        self.child().terminate();
    }

    /// Waits for the process to exit after [`Specter::terminate`].
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        self.child().wait_exit(deadline)
    }

    /// Stops the process the way a service manager does and asserts it exited cleanly.
    pub fn stop(&mut self) {
        self.terminate();
        let status = self.wait_exit(Duration::from_secs(15));
        assert!(
            status.success(),
            "specter exited with {status} on SIGTERM:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A URL on the proxy port.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.proxy)
    }

    /// GETs an admin API path and parses the JSON body, asserting a 200.
    pub fn api_json(&self, path_and_query: &str) -> Value {
        let url = format!("http://{}{path_and_query}", self.api);
        let response = self
            .client
            .get(&url)
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response
            .text()
            .unwrap_or_else(|e| panic!("GET {url} body: {e}"));
        assert_eq!(status, 200, "GET {url} answered {status}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {url} is not JSON ({e}): {body}"))
    }

    pub fn stats(&self) -> Value {
        self.api_json("/api/stats")
    }

    /// Polls `/api/stats` until `done` holds, and returns those stats.
    pub fn wait_for_stats(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            assert!(
                started.elapsed() < SETTLE_DEADLINE,
                "timed out after {SETTLE_DEADLINE:?} waiting for {what}; last stats:\n{stats:#}"
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Polls `/api/divergences` (with `query`, e.g. `route=...`) until it lists `count` events.
    pub fn wait_for_divergences(&self, query: &str, count: usize) -> Vec<Value> {
        let path = format!("/api/divergences?limit=1000&{query}");
        wait_until(
            &format!("{count} divergences from {path}"),
            SETTLE_DEADLINE,
            || {
                let list = self.api_json(&path)["divergences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                (list.len() >= count).then_some(list)
            },
        )
    }
}

/// The `exchanges` counter named `name` in a stats document.
pub fn counter(stats: &Value, name: &str) -> u64 {
    stats["exchanges"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats have no exchanges.{name}: {stats:#}"))
}

/// One request a [`FakeShadow`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A shadow stand-in that records every request and answers `200 ok` after `delay`.
pub struct FakeShadow {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
}

impl FakeShadow {
    pub fn start(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake shadow");
        let addr = listener.local_addr().expect("fake shadow address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (requests, stop) = (requests.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let requests = requests.clone();
                    thread::spawn(move || serve_recorded(stream, delay, &requests));
                }
            });
        }
        Self {
            addr,
            requests,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the fake received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("fake shadow lock").clone()
    }
}

impl Drop for FakeShadow {
    fn drop(&mut self) {
        // The accept loop only looks at the flag when a connection arrives, so make one.
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Serves one keep-alive connection of the fake shadow until the peer closes it.
fn serve_recorded(stream: TcpStream, delay: Duration, requests: &Mutex<Vec<Recorded>>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Ok(Some(request)) = read_request(&mut reader) else {
            return;
        };
        requests.lock().expect("fake shadow lock").push(request);
        thread::sleep(delay);
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

/// Reads one request with a `Content-Length` body (all the replay client sends); `None` when the
/// peer closed the connection between requests.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Recorded>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let headers = read_headers(reader)?;
    let length = header_value(&headers, "content-length").map_or(Ok(0), parse_length)?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Recorded {
        method,
        target,
        headers,
        body,
    }))
}

fn read_headers(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in head",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok(headers);
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn parse_length(text: &str) -> io::Result<usize> {
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    /// The status line without its line end, e.g. `HTTP/1.1 400 Bad Request`.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
}

/// Writes `bytes` as they are on a new connection to `addr` and reads one response, for
/// requests no well-behaved client library would send.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut reader = BufReader::new(stream);
    read_response(&mut reader).unwrap_or_else(|e| {
        panic!(
            "no HTTP response from {addr} to {:?}: {e}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// Reads one response framed by `Content-Length`, chunked coding, or the end of the connection.
fn read_response(reader: &mut impl BufRead) -> io::Result<RawResponse> {
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a response",
        ));
    }
    let status_line = status_line.trim_end().to_owned();
    let headers = read_headers(reader)?;

    let chunked = header_value(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = header_value(&headers, "content-length") {
        body.resize(parse_length(length)?, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(RawResponse {
        status_line,
        headers,
        body,
    })
}

/// Runs `specter proxy --config` on `yaml` and returns its exit status and stderr once it has
/// exited, panicking if it is still running after `deadline`.
pub fn run_proxy_to_exit(dir: &Path, yaml: &str, deadline: Duration) -> (ExitStatus, String) {
    let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
    let config_path = dir.join(format!("specter-{n}.yaml"));
    std::fs::write(&config_path, yaml).expect("write the config file");
    let mut command = Command::new(SPECTER);
    command.arg("proxy").arg("--config").arg(&config_path);
    let mut child = ChildGuard::spawn(
        "specter proxy",
        command,
        &dir.join(format!("specter-{n}.log")),
    );
    let status = child.wait_exit(deadline);
    (status, child.log_text())
}

/// What a short-lived `specter` command printed, and how it exited.
#[derive(Debug)]
pub struct CliRun {
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `specter <args>` to completion (a client command such as `verdict`), panicking if it is
/// still running after `deadline`.
pub fn run_cli(args: &[&str], deadline: Duration) -> CliRun {
    let mut child = Command::new(SPECTER)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start specter {args:?}: {e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().expect("poll child status").is_some() {
            break;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("specter {args:?} did not exit within {deadline:?}");
        }
        thread::sleep(POLL_INTERVAL);
    }
    let output = child.wait_with_output().expect("collect specter output");
    CliRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A TCP relay to `target` on a loopback port, that can be cut to play an outage of the
/// server behind it: connections through it are closed and new ones refused.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// A relay on loopback port `port`.
    pub fn start_on(port: u16, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        listener.set_nonblocking(true).expect("non-blocking relay");
        let cut = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (stop, streams) = (cut.clone(), open.clone());
        thread::spawn(move || {
            // The listener is dropped when cut, so connecting is refused from then on.
            while !stop.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut kept = streams.lock().unwrap();
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                kept.extend([client, server]);
            }
        });
        Self { addr, cut, open }
    }

    /// Closes every connection through the relay and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}
