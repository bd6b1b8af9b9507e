//! The demo client: drives a deterministic mix of requests at the test server's endpoints.
//!
//! `specter traffic` is what the demo and the capture tests use as "the users": keep-alive
//! connections, a routing key per simulated user, a mix of divergent and identical endpoints.
//! With `--log FILE` it writes one JSON line per exchange it made (what it sent and what it
//! got), so a test can check that Specter rebuilt exactly those exchanges.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpStream;

#[derive(Debug, Error)]
pub enum TrafficError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("request {target} to {addr} failed: {cause}")]
    Request {
        addr: SocketAddr,
        target: String,
        cause: String,
    },
    #[error("cannot write the exchange log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// Include POST uploads (not replayed unless configured) in the mix.
    pub uploads: bool,
    pub log: Option<PathBuf>,
}

/// One exchange as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientRecord {
    pub method: String,
    pub target: String,
    pub user: String,
    pub request_body_len: usize,
    pub request_body_xxh3: String,
    pub status: u16,
    pub response_body_len: usize,
    pub response_body_xxh3: String,
}

/// What was sent, per endpoint.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub sent: usize,
    pub failed: usize,
    pub by_endpoint: std::collections::BTreeMap<String, usize>,
    pub elapsed_ms: u128,
}

/// The request number `n` of the mix: (method, target, body).
pub fn nth_request(n: usize, uploads: bool) -> (&'static str, String, Bytes) {
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

/// The route name a target is summarised under.
fn endpoint(method: &str, target: &str) -> String {
    let path = target.split('?').next().unwrap_or("");
    let first = path.split('/').nth(1).unwrap_or("");
    format!("{method} /{first}")
}

/// Sends the plan and returns what was sent.
pub async fn run(plan: Plan) -> Result<Summary, TrafficError> {
    let started = Instant::now();
    let records = Arc::new(Mutex::new(Vec::new()));
    let summary = Arc::new(Mutex::new(Summary::default()));

    let connections = plan.connections.clamp(1, plan.requests.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..connections {
        let plan = plan.clone();
        let records = records.clone();
        let summary = summary.clone();
        tasks.spawn(async move {
            let mut sender = connect(plan.addr).await?;
            for n in (conn..plan.requests).step_by(connections) {
                let (method, target, body) = nth_request(n, plan.uploads);
                let user = format!("user-{}", n % plan.users.max(1));
                if sender.ready().await.is_err() {
                    sender = connect(plan.addr).await?;
                }
                let request = http::Request::builder()
                    .method(method)
                    .uri(&target)
                    .header(http::header::HOST, &plan.host)
                    .header("x-user-id", &user)
                    .body(Full::new(body.clone()))
                    .expect("static request parts are valid");
                let outcome = async {
                    let response = sender.send_request(request).await?;
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>((status, body))
                }
                .await;
                let mut summary = summary.lock().expect("summary lock");
                match outcome {
                    Ok((status, response_body)) => {
                        summary.sent += 1;
                        *summary
                            .by_endpoint
                            .entry(endpoint(method, &target))
                            .or_default() += 1;
                        records.lock().expect("records lock").push(ClientRecord {
                            method: method.to_owned(),
                            target,
                            user,
                            request_body_len: body.len(),
                            request_body_xxh3: hash(&body),
                            status,
                            response_body_len: response_body.len(),
                            response_body_xxh3: hash(&response_body),
                        });
                    }
                    Err(error) => {
                        summary.failed += 1;
                        drop(summary);
                        return Err(TrafficError::Request {
                            addr: plan.addr,
                            target,
                            cause: error.to_string(),
                        });
                    }
                }
            }
            Ok::<_, TrafficError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("traffic task panicked")?;
    }

    if let Some(path) = &plan.log {
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
            for record in records.lock().expect("records lock").iter() {
                serde_json::to_writer(&mut file, record)?;
                file.write_all(b"\n")?;
            }
            file.flush()
        };
        write().map_err(|source| TrafficError::Log {
            path: path.clone(),
            source,
        })?;
    }

    let mut summary = summary.lock().expect("summary lock").clone();
    summary.elapsed_ms = started.elapsed().as_millis();
    Ok(summary)
}

async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, TrafficError> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| TrafficError::Connect {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })?
        .map_err(|source| TrafficError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| TrafficError::Connect {
                addr,
                source: std::io::Error::other(e),
            })?;
    tokio::spawn(connection);
    Ok(sender)
}

pub fn hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}
