//! The demo client: drives a deterministic mix of requests at the test server's endpoints.
//!
//! `specter traffic` is what the demo and the capture tests use as "the users": keep-alive
//! connections, a routing key per simulated user, a mix of divergent and identical endpoints.
//! With `--log FILE` it writes one JSON line per exchange it made (what it sent and what it
//! got), so a test can check that Specter rebuilt exactly those exchanges.
//!
//! Two mixes exist. The basic mix is what the demo sends through the proxy: small requests over
//! hyper's client. The full mix is what the passive-capture tests need to prove that every
//! exchange is rebuilt: bodies from 0 bytes to `--max-body-bytes` in both directions, chunked
//! and gzip responses, HEAD, 204 and 304, uploads that wait for `100 Continue`, and pipelined
//! batches. Hyper's client can neither pipeline nor hold a body back until `100 Continue`, so
//! some connections of the full mix use a small HTTP/1.1 client of our own over a plain socket.
//!
//! Everything is a function of the plan and a request's sequence number, so two runs with the
//! same seed send the same bytes, and a test can recompute any request from its `seq`.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::oneshot,
};
use tracing::{Instrument as _, debug, warn};
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, Error)]
pub enum TrafficError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("request {seq} ({method} {target}) to {addr} failed: {cause}")]
    Request {
        addr: SocketAddr,
        seq: usize,
        method: String,
        target: String,
        cause: String,
    },
    #[error("a traffic connection task stopped unexpectedly: {cause}")]
    Task { cause: String },
    #[error("cannot write the exchange log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const DEFAULT_REQUESTS: usize = 1000;
const DEFAULT_CONNECTIONS: usize = 8;
const DEFAULT_USERS: usize = 50;
const DEFAULT_PIPELINE_DEPTH: usize = 3;
const DEFAULT_MAX_BODY_BYTES: usize = 2 * MIB;
const DEFAULT_TIMEOUT_SECS: u64 = 30;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest response head the raw client accepts; the test server's are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 64 * KIB;

/// The most header lines the raw client parses in one response head.
const MAX_HEADERS: usize = 64;

/// The longest chunk-size or trailer line the raw client accepts.
const MAX_LINE_BYTES: usize = 8 * KIB;

/// The largest response body the raw client reads, so a broken server cannot exhaust memory.
const MAX_RESPONSE_BYTES: usize = 64 * MIB;

/// How much the raw client asks the socket for at a time.
const READ_CHUNK: usize = 64 * KIB;

/// Which requests to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// Small JSON requests and optional uploads over hyper, one at a time per connection.
    #[default]
    Basic,
    /// Every shape of exchange passive capture must rebuild: bodies up to `--max-body-bytes`,
    /// chunked, gzip, HEAD, 204/304, `Expect: 100-continue` and pipelining.
    Full,
}

/// The `specter traffic` command line; [`TrafficArgs::plan`] turns it into a [`Plan`].
#[derive(Debug, Clone, clap::Args)]
pub struct TrafficArgs {
    /// Where to send: host:port.
    #[arg(long)]
    pub target: SocketAddr,

    /// The Host header to send (default: the target address).
    #[arg(long)]
    pub host: Option<String>,

    #[arg(long, default_value_t = DEFAULT_REQUESTS)]
    pub requests: usize,

    /// Concurrent keep-alive connections; request `seq` goes on connection `seq % N`.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,

    /// Simulated users; each request carries `X-User-ID: user-N`.
    #[arg(long, default_value_t = DEFAULT_USERS)]
    pub users: usize,

    /// Include POST uploads in the basic mix (the full mix always has them).
    #[arg(long)]
    pub uploads: bool,

    /// Write one JSON line per exchange made to this file, in `seq` order.
    #[arg(long)]
    pub log: Option<PathBuf>,

    /// The request mix.
    #[arg(long, value_enum, default_value_t = Mix::Basic)]
    pub mix: Mix,

    /// Requests a pipelining connection of the full mix writes before reading the responses.
    #[arg(long, default_value_t = DEFAULT_PIPELINE_DEPTH)]
    pub pipeline_depth: usize,

    /// The largest request or response body the full mix asks for.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Seeds the full mix; the same seed sends the same requests.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Seconds any connect, write, read or exchange may take before the request fails.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,
}

impl TrafficArgs {
    pub fn plan(&self) -> Plan {
        Plan {
            addr: self.target,
            host: self.host.clone().unwrap_or_else(|| self.target.to_string()),
            requests: self.requests,
            connections: self.connections,
            users: self.users,
            uploads: self.uploads,
            log: self.log.clone(),
            mix: self.mix,
            pipeline_depth: self.pipeline_depth.max(1),
            max_body_bytes: self.max_body_bytes,
            seed: self.seed,
            timeout: Duration::from_secs(self.timeout_secs.max(1)),
        }
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    /// Host header to send.
    pub host: String,
    pub requests: usize,
    /// Keep-alive connections, each sending its share of the requests in turn.
    pub connections: usize,
    /// Simulated users; each request carries `X-User-ID: user-N`.
    pub users: usize,
    /// Include POST uploads (not replayed unless configured) in the basic mix.
    pub uploads: bool,
    pub log: Option<PathBuf>,
    pub mix: Mix,
    /// Requests per pipelined batch on the full mix's pipelining connections.
    pub pipeline_depth: usize,
    /// The largest body the full mix sends or asks for.
    pub max_body_bytes: usize,
    pub seed: u64,
    /// The bound on every connect, write, read and hyper exchange.
    pub timeout: Duration,
}

impl Plan {
    /// A plan with the command line's defaults, sending to `addr` with `Host: addr`.
    pub fn new(addr: SocketAddr) -> Plan {
        Plan {
            addr,
            host: addr.to_string(),
            requests: DEFAULT_REQUESTS,
            connections: DEFAULT_CONNECTIONS,
            users: DEFAULT_USERS,
            uploads: false,
            log: None,
            mix: Mix::Basic,
            pipeline_depth: DEFAULT_PIPELINE_DEPTH,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            seed: 0,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }

    /// Connections actually opened: at least one, and never more than there are requests.
    fn connection_count(&self) -> usize {
        self.connections.clamp(1, self.requests.max(1))
    }

    /// How `connection` talks to the server.
    fn transport(&self, connection: usize) -> Transport {
        match self.mix {
            Mix::Basic => Transport::Hyper,
            // Most connections stay on hyper, the way real clients mostly look; a few use the
            // raw client so pipelining and waiting for `100 Continue` are always in the mix.
            Mix::Full => match connection % 5 {
                1 => Transport::Raw {
                    depth: self.pipeline_depth.max(1),
                },
                3 => Transport::Raw { depth: 1 },
                _ => Transport::Hyper,
            },
        }
    }

    /// The sequence numbers `connection` sends, in order.
    fn sequence(&self, connection: usize) -> impl Iterator<Item = usize> + use<> {
        (connection..self.requests).step_by(self.connection_count())
    }
}

/// The client a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// hyper's HTTP/1.1 client: one request at a time, never `Expect`.
    Hyper,
    /// Our own client: batches of up to `depth` requests written before any response is read.
    Raw { depth: usize },
}

/// One request of the mix, exactly as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRequest {
    /// Unique per request, from 0; also sent as `X-Request-Seq`.
    pub seq: usize,
    /// The connection that sends it (`seq % connections`).
    pub connection: usize,
    pub method: &'static str,
    pub target: String,
    pub user: String,
    /// Every header sent, in order, names lower-case as written to the socket.
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// Sent with `Expect: 100-continue`; the body waits for the server's `100 Continue`.
    pub expect_continue: bool,
}

/// One exchange as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub seq: usize,
    pub connection: usize,
    /// The client side of the TCP connection, to find it in a capture.
    pub client_addr: SocketAddr,
    pub method: String,
    pub target: String,
    pub user: String,
    /// Every request header sent, in order, as `[name, value]` pairs.
    pub request_headers: Vec<(String, String)>,
    /// The request body actually sent: empty when the server answered before `100 Continue`.
    pub request_body_len: usize,
    pub request_body_xxh3: String,
    /// Written in a batch with other requests before their responses were read.
    pub pipelined: bool,
    pub expect_continue: bool,
    /// Interim (1xx) statuses received before the final response, in order.
    pub interim_statuses: Vec<u16>,
    pub status: u16,
    /// The response body after transfer decoding (chunks joined) and before content decoding
    /// (gzip bytes as received).
    pub response_body_len: usize,
    pub response_body_xxh3: String,
}

/// What was sent, per endpoint.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub sent: usize,
    /// Connections stopped by a failed request. [`run`] returns the failure instead of a
    /// summary, so a summary it returns always says 0.
    pub failed: usize,
    pub by_endpoint: BTreeMap<String, usize>,
    pub pipelined: usize,
    pub expect_continue: usize,
    pub elapsed_ms: u128,
}

/// The request number `seq` of the plan's mix.
pub fn nth_request(plan: &Plan, seq: usize) -> PlannedRequest {
    let connection = seq % plan.connection_count();
    let user = format!("user-{}", seq % plan.users.max(1));
    let (method, target, body, expect_continue) = match plan.mix {
        Mix::Basic => {
            let (method, target, body) = basic_request(seq, plan.uploads);
            (method, target, body, false)
        }
        Mix::Full => {
            let raw = plan.transport(connection) != Transport::Hyper;
            full_request(seq, plan.seed, plan.max_body_bytes, raw)
        }
    };

    // Every header is set here, including Content-Length, so that what is logged is exactly
    // what goes on the wire whichever client sends it.
    let mut headers = vec![
        ("host", plan.host.clone()),
        ("x-user-id", user.clone()),
        ("x-request-seq", seq.to_string()),
    ];
    if matches!(method, "POST" | "PUT") {
        headers.push(("content-type", "application/octet-stream".to_owned()));
        headers.push(("content-length", body.len().to_string()));
    }
    if expect_continue {
        headers.push(("expect", "100-continue".to_owned()));
    }

    PlannedRequest {
        seq,
        connection,
        method,
        target,
        user,
        headers,
        body,
        expect_continue,
    }
}

/// The demo's mix: small requests, one upload in ten when `uploads` is set.
fn basic_request(n: usize, uploads: bool) -> (&'static str, String, Bytes) {
    let id = n * 7 % 1000;
    match n % if uploads { 10 } else { 9 } {
        0 => ("GET", "/profile".into(), Bytes::new()),
        1 => ("GET", format!("/users/{id}"), Bytes::new()),
        2 => ("GET", format!("/orders/{id}"), Bytes::new()),
        3 => ("GET", "/gzip".into(), Bytes::new()),
        4 => ("GET", "/chunked".into(), Bytes::new()),
        5 => (
            "GET",
            format!("/status/{}", [200, 201, 404, 503][n / 10 % 4]),
            Bytes::new(),
        ),
        6 => ("GET", format!("/users/{id}?expand=roles"), Bytes::new()),
        7 => ("GET", "/slow?ms=3".into(), Bytes::new()),
        8 => ("HEAD", format!("/users/{id}"), Bytes::new()),
        _ => ("POST", "/upload".into(), Bytes::from(vec![b'x'; n % 5000])),
    }
}

/// The capture tests' mix: (method, target, body, expect 100-continue).
///
/// `raw` says whether the request goes on a raw-client connection, the only kind that can
/// wait for `100 Continue`.
fn full_request(
    seq: usize,
    seed: u64,
    max_body: usize,
    raw: bool,
) -> (&'static str, String, Bytes, bool) {
    let mut draw = Draw::for_request(seed, seq);
    let id = draw.below(1000);
    let get = |target: String| ("GET", target, Bytes::new(), false);
    match draw.below(100) {
        0..6 => get("/profile".into()),
        6..14 => get(format!("/users/{id}")),
        14..18 => get(format!("/users/{id}?expand=roles")),
        18..24 => get(format!("/orders/{id}")),
        24..30 => get("/gzip".into()),
        30..36 => get("/chunked".into()),
        36..42 => {
            let code = [200, 201, 204, 304, 404, 503][draw.below(6) as usize];
            get(format!("/status/{code}"))
        }
        42..45 => get("/echo".into()),
        45..47 => get("/noise".into()),
        47..49 => get(format!("/slow?ms={}", 1 + draw.below(5))),
        // HEAD answers announce a body (a length, or chunked framing) and carry none.
        49..55 => {
            let target = match draw.below(4) {
                0 => format!("/users/{id}"),
                1 => format!("/big?bytes={}", body_len(&mut draw, max_body)),
                2 => "/chunked".into(),
                _ => "/gzip".into(),
            };
            ("HEAD", target, Bytes::new(), false)
        }
        55..72 => get(format!("/big?bytes={}", body_len(&mut draw, max_body))),
        upload => {
            let method = if upload < 90 { "POST" } else { "PUT" };
            let len = body_len(&mut draw, max_body);
            let body = body_bytes(draw.next(), len);
            // hyper's server sends no `100 Continue` for an empty body, so only a non-empty
            // one may wait for it.
            let expect_continue = raw && len > 0 && draw.below(2) == 0;
            (method, "/upload".into(), body, expect_continue)
        }
    }
}

/// A body length skewed to small sizes, with the edges (0 and `max`) and some large bodies.
fn body_len(draw: &mut Draw, max: usize) -> usize {
    let len = match draw.below(100) {
        0..10 => 0,
        10..55 => draw.between(1, KIB),
        55..80 => draw.between(KIB + 1, 64 * KIB - 1),
        80..94 => draw.between(64 * KIB, MIB - 1),
        94..98 => draw.between(MIB, 2 * MIB),
        _ => max,
    };
    len.min(max)
}

/// `len` bytes that never repeat with a short period, so segments reassembled in the wrong
/// order or at the wrong offset change the hash.
fn body_bytes(state: u64, len: usize) -> Bytes {
    let mut draw = Draw(state | 1);
    let mut body = Vec::with_capacity(len + 8);
    while body.len() < len {
        body.extend_from_slice(&draw.next().to_le_bytes());
    }
    body.truncate(len);
    Bytes::from(body)
}

/// A xorshift64 stream, started from the seed and a request's sequence number.
struct Draw(u64);

impl Draw {
    fn for_request(seed: u64, seq: usize) -> Draw {
        // xorshift never leaves zero, so the state is made odd.
        Draw(xxh3_64_with_seed(&(seq as u64).to_le_bytes(), seed) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// A number from `low` to `high`, both included.
    fn between(&mut self, low: usize, high: usize) -> usize {
        low + self.below((high - low + 1) as u64) as usize
    }
}

/// The route name a target is summarised under.
fn endpoint(method: &str, target: &str) -> String {
    let path = target.split('?').next().unwrap_or("");
    let first = path.split('/').nth(1).unwrap_or("");
    format!("{method} /{first}")
}

/// Sends the plan and returns what was sent.
///
/// Connections run concurrently; one that fails stops at its failed request while the others
/// finish. The log, if asked for, holds every exchange that completed; each failure is logged
/// at WARN and one of them is returned as the error.
pub async fn run(plan: Plan) -> Result<Summary, TrafficError> {
    let started = Instant::now();
    let plan = Arc::new(plan);

    let mut tasks = tokio::task::JoinSet::new();
    for connection in 0..plan.connection_count().min(plan.requests) {
        let plan = plan.clone();
        let transport = plan.transport(connection);
        let span = tracing::debug_span!("traffic_connection", connection, ?transport);
        let task = async move {
            let mut records = Vec::new();
            let outcome = match transport {
                Transport::Hyper => drive_hyper(&plan, connection, &mut records).await,
                Transport::Raw { depth } => drive_raw(&plan, connection, depth, &mut records).await,
            };
            (records, outcome)
        };
        tasks.spawn(task.instrument(span));
    }

    let mut records = Vec::with_capacity(plan.requests);
    let mut failed = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let error = match joined {
            Ok((done, Ok(()))) => {
                records.extend(done);
                continue;
            }
            Ok((done, Err(error))) => {
                records.extend(done);
                error
            }
            Err(join_error) => TrafficError::Task {
                cause: join_error.to_string(),
            },
        };
        warn!(%error, "Traffic connection stopped");
        failed += 1;
        first_error.get_or_insert(error);
    }
    records.sort_by_key(|record| record.seq);

    if let Some(path) = &plan.log {
        write_log(path, &records).map_err(|source| TrafficError::Log {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(error) = first_error {
        return Err(error);
    }

    let mut summary = Summary {
        failed,
        elapsed_ms: started.elapsed().as_millis(),
        ..Summary::default()
    };
    for record in &records {
        summary.sent += 1;
        summary.pipelined += usize::from(record.pipelined);
        summary.expect_continue += usize::from(record.expect_continue);
        *summary
            .by_endpoint
            .entry(endpoint(&record.method, &record.target))
            .or_default() += 1;
    }
    Ok(summary)
}

fn write_log(path: &Path, records: &[ClientRecord]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for record in records {
        serde_json::to_writer(&mut file, record)?;
        file.write_all(b"\n")?;
    }
    file.flush()
}

/// The error for `request`, naming it and the cause.
fn failure(plan: &Plan, request: &PlannedRequest, cause: impl Into<String>) -> TrafficError {
    TrafficError::Request {
        addr: plan.addr,
        seq: request.seq,
        method: request.method.to_owned(),
        target: request.target.clone(),
        cause: cause.into(),
    }
}

/// What a client got back for one request.
struct Answer<'a> {
    request: &'a PlannedRequest,
    client_addr: SocketAddr,
    pipelined: bool,
    /// The request body that went out (all of it, or nothing after a refused `Expect`).
    sent_body: &'a [u8],
    interim_statuses: Vec<u16>,
    status: u16,
    body: &'a [u8],
}

impl Answer<'_> {
    fn record(self) -> ClientRecord {
        let request = self.request;
        debug!(seq = request.seq, status = self.status, "Exchange done");
        ClientRecord {
            seq: request.seq,
            connection: request.connection,
            client_addr: self.client_addr,
            method: request.method.to_owned(),
            target: request.target.clone(),
            user: request.user.clone(),
            request_headers: request
                .headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.clone()))
                .collect(),
            request_body_len: self.sent_body.len(),
            request_body_xxh3: hash(self.sent_body),
            pipelined: self.pipelined,
            expect_continue: request.expect_continue,
            interim_statuses: self.interim_statuses,
            status: self.status,
            response_body_len: self.body.len(),
            response_body_xxh3: hash(self.body),
        }
    }
}

/// Sends `connection`'s requests one at a time over hyper's client, reconnecting when the
/// server has closed the connection between requests.
async fn drive_hyper(
    plan: &Plan,
    connection: usize,
    records: &mut Vec<ClientRecord>,
) -> Result<(), TrafficError> {
    let mut link: Option<(http1::SendRequest<Full<Bytes>>, SocketAddr)> = None;
    for seq in plan.sequence(connection) {
        let request = nth_request(plan, seq);

        let reusable = match &mut link {
            Some((sender, _)) => matches!(
                tokio::time::timeout(plan.timeout, sender.ready()).await,
                Ok(Ok(()))
            ),
            None => false,
        };
        if !reusable {
            link = Some(connect_hyper(plan.addr).await?);
        }
        let (sender, client_addr) = link.as_mut().expect("a connection was just opened");

        let mut builder = http::Request::builder()
            .method(request.method)
            .uri(&request.target);
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let http_request = builder
            .body(Full::new(request.body.clone()))
            .map_err(|error| failure(plan, &request, error.to_string()))?;

        let exchange = async {
            let response = sender.send_request(http_request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (status, body) = match tokio::time::timeout(plan.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => return Err(failure(plan, &request, error.to_string())),
            Err(_) => {
                let cause = format!("no complete response within {:?}", plan.timeout);
                return Err(failure(plan, &request, cause));
            }
        };

        let answer = Answer {
            request: &request,
            client_addr: *client_addr,
            pipelined: false,
            sent_body: &request.body,
            interim_statuses: Vec::new(),
            status,
            body: &body,
        };
        records.push(answer.record());
    }
    Ok(())
}

async fn connect_tcp(addr: SocketAddr) -> Result<(TcpStream, SocketAddr), TrafficError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| TrafficError::Connect {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })?
        .map_err(|source| TrafficError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .map_err(|source| TrafficError::Connect { addr, source })?;
    Ok((stream, local))
}

async fn connect_hyper(
    addr: SocketAddr,
) -> Result<(http1::SendRequest<Full<Bytes>>, SocketAddr), TrafficError> {
    let (stream, local) = connect_tcp(addr).await?;
    let (sender, connection) =
        http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| TrafficError::Connect {
                addr,
                source: std::io::Error::other(e),
            })?;
    tokio::spawn(connection);
    Ok((sender, local))
}

/// Sends `connection`'s requests over the raw client in batches of up to `depth`.
async fn drive_raw(
    plan: &Plan,
    connection: usize,
    depth: usize,
    records: &mut Vec<ClientRecord>,
) -> Result<(), TrafficError> {
    let mut pending = plan.sequence(connection).map(|seq| nth_request(plan, seq));
    let mut link: Option<RawConnection> = None;
    loop {
        // A batch ends at the depth or at an upload waiting for `100 Continue`: a client
        // holding a body back writes nothing after it until the server has answered.
        let mut batch = Vec::with_capacity(depth);
        while batch.len() < depth {
            let Some(request) = pending.next() else { break };
            let holds_body_back = request.expect_continue;
            batch.push(request);
            if holds_body_back {
                break;
            }
        }
        if batch.is_empty() {
            return Ok(());
        }

        if link.is_none() {
            link = Some(RawConnection::open(plan.addr).await?);
        }
        let raw = link.as_mut().expect("a connection was just opened");
        let (responses, error) = raw.exchange(&batch, plan.timeout).await;

        let pipelined = batch.len() > 1;
        let mut reusable = true;
        for (request, response) in batch.iter().zip(&responses) {
            reusable &= response.keep_alive;
            let sent_body: &[u8] = if response.body_sent {
                &request.body
            } else {
                &[]
            };
            let answer = Answer {
                request,
                client_addr: raw.local,
                pipelined,
                sent_body,
                interim_statuses: response.interim_statuses.clone(),
                status: response.status,
                body: &response.body,
            };
            records.push(answer.record());
        }
        if let Some(cause) = error {
            let unanswered = &batch[responses.len().min(batch.len() - 1)];
            return Err(failure(plan, unanswered, cause));
        }
        if !reusable {
            link = None;
        }
    }
}

/// A keep-alive connection of the raw client, with the bytes read but not yet parsed.
struct RawConnection {
    stream: TcpStream,
    buffer: BytesMut,
    local: SocketAddr,
}

/// One response as the raw client read it.
#[derive(Debug)]
struct RawResponse {
    interim_statuses: Vec<u16>,
    status: u16,
    body: Bytes,
    /// False when a final response came before `100 Continue`: the body was never sent.
    body_sent: bool,
    /// Whether the connection may carry another request after this one.
    keep_alive: bool,
}

/// The head of a response: status line and headers.
struct Head {
    status: u16,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }

    /// Whether a header's comma-separated list holds `token`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name).any(|value| {
            value
                .split(|&b| b == b',')
                .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    fn keep_alive(&self) -> bool {
        if self.minor_version == 0 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

impl Framing {
    fn of(method: &str, head: &Head) -> Result<Framing, String> {
        if method == "HEAD" || matches!(head.status, 100..=199 | 204 | 304) {
            return Ok(Framing::Empty);
        }

        // Transfer-Encoding overrides Content-Length; a body whose last coding is not chunked
        // runs to the end of the connection.
        let mut codings = head
            .values("transfer-encoding")
            .flat_map(|value| value.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|coding| !coding.is_empty())
            .peekable();
        if codings.peek().is_some() {
            let chunked = codings
                .last()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            return Ok(if chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            });
        }

        let mut length = None;
        for value in head.values("content-length") {
            for item in value.split(|&b| b == b',') {
                let parsed = std::str::from_utf8(item.trim_ascii())
                    .ok()
                    .and_then(|text| text.parse::<usize>().ok())
                    .ok_or_else(|| {
                        format!(
                            "invalid Content-Length {:?}",
                            String::from_utf8_lossy(value)
                        )
                    })?;
                if length.is_some_and(|known| known != parsed) {
                    return Err("conflicting Content-Length values".to_owned());
                }
                length = Some(parsed);
            }
        }
        match length {
            Some(len) if len > MAX_RESPONSE_BYTES => Err(format!(
                "response body of {len} bytes exceeds the {MAX_RESPONSE_BYTES}-byte limit"
            )),
            Some(len) => Ok(Framing::Length(len)),
            None => Ok(Framing::UntilClose),
        }
    }
}

impl RawConnection {
    async fn open(addr: SocketAddr) -> Result<RawConnection, TrafficError> {
        let (stream, local) = connect_tcp(addr).await?;
        Ok(RawConnection {
            stream,
            buffer: BytesMut::with_capacity(READ_CHUNK),
            local,
        })
    }

    /// Writes `batch` back to back, then reads the responses in order.
    ///
    /// Writing and reading run at the same time: a server answering the first request of a
    /// large batch can fill the socket before it reads the rest, and a client that only
    /// reads after writing everything would then wait forever. An upload with
    /// `expect_continue` must be the last of its batch; its body goes out once the reader has
    /// seen `100 Continue`.
    ///
    /// Returns the responses read and, if the batch stopped early, why; the failed request is
    /// the first without a response.
    async fn exchange(
        &mut self,
        batch: &[PlannedRequest],
        timeout: Duration,
    ) -> (Vec<RawResponse>, Option<String>) {
        let (mut reader, mut writer) = self.stream.split();
        let buffer = &mut self.buffer;
        let (go_ahead, go_ahead_seen) = oneshot::channel::<bool>();
        let mut responses = Vec::with_capacity(batch.len());

        let write = async {
            let mut wire = Vec::new();
            for request in batch {
                encode_head(request, &mut wire);
                if !request.expect_continue {
                    wire.extend_from_slice(&request.body);
                }
            }
            write_all(&mut writer, &wire, timeout).await?;

            if let Some(upload) = batch.last().filter(|request| request.expect_continue) {
                // The reader drops or answers `false` when a final response came instead.
                if go_ahead_seen.await == Ok(true) {
                    write_all(&mut writer, &upload.body, timeout).await?;
                }
            }
            Ok::<_, String>(())
        };

        let answered = &mut responses;
        let read = async move {
            let mut go_ahead = Some(go_ahead);
            for (index, request) in batch.iter().enumerate() {
                let response =
                    read_response(&mut reader, buffer, request, &mut go_ahead, timeout).await?;
                let keep_alive = response.keep_alive;
                answered.push(response);
                if !keep_alive && index + 1 < batch.len() {
                    return Err("the server closed the connection with pipelined requests \
                                unanswered"
                        .to_owned());
                }
            }
            Ok::<_, String>(())
        };

        let outcome = tokio::try_join!(write, read);
        (responses, outcome.err())
    }
}

/// Appends the request line and headers of `request`.
fn encode_head(request: &PlannedRequest, wire: &mut Vec<u8>) {
    wire.extend_from_slice(request.method.as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(request.target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &request.headers {
        wire.extend_from_slice(name.as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
}

async fn write_all(
    writer: &mut tokio::net::tcp::WriteHalf<'_>,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("write failed: {error}")),
        Err(_) => Err(format!(
            "could not write {} bytes within {timeout:?}",
            bytes.len()
        )),
    }
}

/// Reads the response to `request`, skipping interim responses.
///
/// On `100 Continue` for an upload holding its body back, tells the writer to send it; on a
/// final response first, tells it not to.
async fn read_response(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buffer: &mut BytesMut,
    request: &PlannedRequest,
    go_ahead: &mut Option<oneshot::Sender<bool>>,
    timeout: Duration,
) -> Result<RawResponse, String> {
    let mut interim_statuses = Vec::new();
    let mut body_sent = !request.expect_continue;
    loop {
        let head = read_head(reader, buffer, timeout).await?;
        match head.status {
            101 => return Err("unexpected 101 Switching Protocols".to_owned()),
            100..=199 => {
                interim_statuses.push(head.status);
                if head.status == 100 && !body_sent {
                    if let Some(go_ahead) = go_ahead.take() {
                        let _ = go_ahead.send(true);
                    }
                    body_sent = true;
                }
                continue;
            }
            _ => {}
        }

        if !body_sent && let Some(go_ahead) = go_ahead.take() {
            let _ = go_ahead.send(false);
        }
        let framing = Framing::of(request.method, &head)?;
        let body = read_body(reader, buffer, framing, timeout).await?;
        // After a refused `Expect` the server may still be waiting for a body that will never
        // come, so the connection is not reused.
        let keep_alive = head.keep_alive() && body_sent && framing != Framing::UntilClose;
        return Ok(RawResponse {
            interim_statuses,
            status: head.status,
            body,
            body_sent,
            keep_alive,
        });
    }
}

/// Reads more bytes into `buffer`; `Ok(0)` at the end of the connection.
async fn read_more(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buffer: &mut BytesMut,
    timeout: Duration,
) -> Result<usize, String> {
    buffer.reserve(READ_CHUNK);
    match tokio::time::timeout(timeout, reader.read_buf(buffer)).await {
        Ok(Ok(read)) => Ok(read),
        Ok(Err(error)) => Err(format!("read failed: {error}")),
        Err(_) => Err(format!("no data from the server within {timeout:?}")),
    }
}

async fn read_head(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buffer: &mut BytesMut,
    timeout: Duration,
) -> Result<Head, String> {
    loop {
        if !buffer.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(buffer) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = Head {
                        status: response.code.unwrap_or_default(),
                        minor_version: response.version.unwrap_or(1),
                        headers: response
                            .headers
                            .iter()
                            .map(|header| (header.name.to_owned(), header.value.to_vec()))
                            .collect(),
                    };
                    buffer.advance(len);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {}
                Err(error) => return Err(format!("malformed response head: {error}")),
            }
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(format!("response head longer than {MAX_HEAD_BYTES} bytes"));
        }
        if read_more(reader, buffer, timeout).await? == 0 {
            return Err(if buffer.is_empty() {
                "the server closed the connection without responding".to_owned()
            } else {
                "the server closed the connection inside a response head".to_owned()
            });
        }
    }
}

/// Reads until `buffer` holds at least `len` bytes.
async fn fill(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buffer: &mut BytesMut,
    len: usize,
    timeout: Duration,
) -> Result<(), String> {
    while buffer.len() < len {
        if read_more(reader, buffer, timeout).await? == 0 {
            return Err(format!(
                "the server closed the connection {} bytes short of the response body",
                len - buffer.len()
            ));
        }
    }
    Ok(())
}

/// Reads one line (chunk size or trailer), without its line ending.
async fn read_line(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buffer: &mut BytesMut,
    timeout: Duration,
) -> Result<Bytes, String> {
    loop {
        if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let mut line = buffer.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            return Ok(line.freeze());
        }
        if buffer.len() > MAX_LINE_BYTES {
            return Err(format!("chunk line longer than {MAX_LINE_BYTES} bytes"));
        }
        if read_more(reader, buffer, timeout).await? == 0 {
            return Err("the server closed the connection inside a chunked body".to_owned());
        }
    }
}

/// Reads a response body and removes its transfer framing (chunks are joined, content
/// encodings such as gzip are left as they are).
async fn read_body(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buffer: &mut BytesMut,
    framing: Framing,
    timeout: Duration,
) -> Result<Bytes, String> {
    match framing {
        Framing::Empty => Ok(Bytes::new()),
        Framing::Length(len) => {
            buffer.reserve(len.saturating_sub(buffer.len()));
            fill(reader, buffer, len, timeout).await?;
            Ok(buffer.split_to(len).freeze())
        }
        Framing::UntilClose => {
            while read_more(reader, buffer, timeout).await? > 0 {
                if buffer.len() > MAX_RESPONSE_BYTES {
                    return Err(format!(
                        "response body exceeds the {MAX_RESPONSE_BYTES}-byte limit"
                    ));
                }
            }
            Ok(buffer.split().freeze())
        }
        Framing::Chunked => {
            let mut body = BytesMut::new();
            loop {
                let line = read_line(reader, buffer, timeout).await?;
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size.trim_ascii())
                    .ok()
                    .and_then(|hex| usize::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| {
                        format!(
                            "invalid chunk size line {:?}",
                            String::from_utf8_lossy(&line)
                        )
                    })?;
                if size == 0 {
                    // Trailer fields, if any, end with an empty line.
                    while !read_line(reader, buffer, timeout).await?.is_empty() {}
                    return Ok(body.freeze());
                }
                if body.len() + size > MAX_RESPONSE_BYTES {
                    return Err(format!(
                        "response body exceeds the {MAX_RESPONSE_BYTES}-byte limit"
                    ));
                }

                fill(reader, buffer, size + 2, timeout).await?;
                body.extend_from_slice(&buffer[..size]);
                if &buffer[size..size + 2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".to_owned());
                }
                buffer.advance(size + 2);
            }
        }
    }
}

pub fn hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

#[cfg(test)]
mod tests;
