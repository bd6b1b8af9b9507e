//! The dashboard's side of the admin API: what it reads, and the thread that reads it.
//!
//! The TUI is a client of the admin API only (see `crate::api`); it never opens the store or
//! shares memory with a running Specter, so it can watch a node on another host. A [`Poller`]
//! thread fetches `/api/stats` and `/api/divergences` about once a second and, on request, one
//! divergence or one route's field classification; every answer comes back to the drawing loop
//! as a [`Reply`]. The wire types here read the API's JSON leniently (missing fields take their
//! defaults) so a dashboard can watch a node one version older or newer than itself.

use std::{
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request as HttpRequest, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::{Deserialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::terminal;
use crate::{
    cluster::FETCH_TIMEOUT,
    event::{Event, EventSummary},
    verdict::{NodePart, Scope},
};

/// How long connecting to the admin API, or one call to it in the node's own scope, may take
/// before it counts as a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call in the cluster scope may take. The node asked then reads every other
/// member's admin API (for `/api/stats`, profiles and recent divergences at the same time),
/// each read allowed `FETCH_TIMEOUT`: one hung member holds its answer back that long. Waiting
/// longer than the node lets its answer, which names the missing member, arrive instead of a
/// timeout here.
const CLUSTER_REQUEST_TIMEOUT: Duration = FETCH_TIMEOUT.saturating_add(REQUEST_TIMEOUT);
/// How long the drawing loop has to leave after a signal before the process leaves without it.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);
/// How many divergences the list pane asks for; the route filter narrows them locally.
const DIVERGENCE_LIMIT: usize = 200;

/// A failed API call. The drawing loop shows the message in a banner, so each one says what was
/// asked of whom.
#[derive(Debug, Clone, Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("GET {url} answered a body the dashboard cannot read: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    /// True when the node has no such endpoint: it predates it. A node that has the route
    /// endpoints answers a route it does not know with 404 "no route ...", which is not that.
    pub fn is_missing_endpoint(&self) -> bool {
        matches!(self, Self::Status { status: 404, message, .. } if !message.starts_with("no route"))
    }
}

/// The admin API's address as the user gave it, normalised to `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase(String);

impl ApiBase {
    /// Accepts `http://host:port`, `host:port`, with or without a trailing slash or path
    /// prefix. Only plain HTTP: the admin API does not speak TLS.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{text:?} is not an http:// URL; the admin API speaks plain HTTP"
            ));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{text:?} names no host"));
        }
        if uri.query().is_some() {
            return Err(format!(
                "{text:?} has a query; give the API's base URL only"
            ));
        }
        Ok(Self(with_scheme.trim_end_matches('/').to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.0)
    }
}

impl std::fmt::Display for ApiBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `GET /api/stats`, as far as the dashboard reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub node: String,
    pub mode: String,
    pub uptime_s: u64,
    pub exchanges: Exchanges,
    pub latency: Latency,
    pub routes: Vec<RouteStats>,
    /// Absent (null) in proxy mode.
    pub capture: Option<CaptureStats>,
    /// `local` or `cluster`; absent from nodes that predate the cluster scope.
    pub scope: Option<String>,
    /// The members a cluster-wide answer was read from, and whether each answered.
    pub nodes: Vec<NodePart>,
}

/// The `exchanges` counters of `/api/stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Exchanges {
    pub seen: u64,
    pub sampled_out: u64,
    pub skipped_unsafe: u64,
    pub truncated: u64,
    pub incomplete: u64,
    pub mirrored: u64,
    pub matched: u64,
    pub diverged: u64,
    pub shadow_errors: u64,
    pub shadow_dropped: u64,
    pub live_errors: u64,
    pub store_dropped: u64,
    /// matched / (matched + diverged), as a fraction; absent before the first comparison.
    pub match_rate: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub live: Percentiles,
    pub shadow: Percentiles,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// One entry of `routes` in `/api/stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RouteStats {
    pub route: String,
    pub mirrored: u64,
    pub matched: u64,
    pub diverged: u64,
    pub shadow_errors: u64,
    pub match_rate: Option<f64>,
    /// Shadow p90 over live p90 on this route. Older nodes do not serve it; the dashboard then
    /// shows "–" and sorts by volume instead.
    pub latency_ratio: Option<f64>,
    /// The shadow is slower on this route than the node's `compare.latency_ratio` allows.
    pub shadow_slower: bool,
}

impl RouteStats {
    /// diverged / (matched + diverged): the complement of the match rate, over the same
    /// comparisons. `None` before the route's first comparison.
    pub fn divergence_rate(&self) -> Option<f64> {
        let compared = self.matched + self.diverged;
        (compared > 0).then(|| self.diverged as f64 / compared as f64)
    }
}

/// The `capture` object of `/api/stats` in attach mode.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CaptureStats {
    pub packets: u64,
    pub bytes: u64,
    pub ring_drops: u64,
    pub truncated: u64,
    pub out_of_order: u64,
    pub retransmits: u64,
    pub gaps: u64,
    pub parse_errors: u64,
    pub connections_open: u64,
    pub exchanges_incomplete: u64,
    pub upgrades_skipped: u64,
}

#[derive(Deserialize)]
struct DivergenceList {
    divergences: Vec<EventSummary>,
}

/// `GET /api/routes/{route}/fields`: the fields of a route and how each is classified (noise
/// or a real divergence). The shape is still settling, so it is read leniently: a `fields`
/// array of objects with `kind`, `path`, `classification`, `severity`, `rate` and `noise_rate`
/// where present; every other scalar member is kept as `name=value` and shown as it comes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldsReport {
    /// The report's own scalar members (`compared`, `noise_learning`, ...) as `name=value`.
    pub summary: Vec<String>,
    pub fields: Vec<FieldRow>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldRow {
    /// The path, prefixed for headers (`header x-request-id`) and named for the status.
    pub field: String,
    pub class: String,
    pub severity: String,
    /// How often it differed between live and shadow, as a fraction.
    pub rate: Option<f64>,
    /// How often it differed between two answers of the same version, as a fraction.
    pub noise_rate: Option<f64>,
    /// The remaining scalar members as `name=value`, in the order the node sent them.
    pub details: Vec<String>,
}

impl FieldsReport {
    pub fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        let Some(fields) = value.get("fields").and_then(|f| f.as_array()) else {
            return Err("no `fields` array".to_owned());
        };
        let summary = value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(name, _)| !matches!(name.as_str(), "fields" | "route"))
            .filter_map(|(name, value)| Some(format!("{name}={}", scalar(value)?)))
            .collect();
        let fields = fields.iter().map(FieldRow::from_json).collect();
        Ok(Self { summary, fields })
    }
}

impl FieldRow {
    fn from_json(field: &serde_json::Value) -> Self {
        let mut row = Self::default();
        let Some(members) = field.as_object() else {
            row.field = field.to_string();
            return row;
        };
        let mut kind = None;
        let mut path = String::new();
        for (name, value) in members {
            match name.as_str() {
                "kind" => kind = value.as_str().map(str::to_owned),
                "path" => path = scalar(value).unwrap_or_default(),
                "classification" | "class" => row.class = scalar(value).unwrap_or_default(),
                "severity" => row.severity = scalar(value).unwrap_or_default(),
                "rate" => row.rate = value.as_f64(),
                "noise_rate" => row.noise_rate = value.as_f64(),
                _ => {
                    if let Some(text) = scalar(value) {
                        row.details.push(format!("{name}={text}"));
                    }
                }
            }
        }
        row.field = match kind.as_deref() {
            Some("header") => format!("header {path}"),
            Some("status") => "status".to_owned(),
            _ => path,
        };
        row
    }
}

/// A JSON scalar as text (strings without quotes); `None` for null, arrays and objects, which
/// a one-line view cannot show usefully.
fn scalar(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Some(value.to_string()),
        serde_json::Value::Null | serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            None
        }
    }
}

/// One divergence: its id, and in a cluster-wide list the node that recorded it (ids are per
/// node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DivergenceRef {
    pub id: u64,
    pub node: Option<String>,
}

impl DivergenceRef {
    pub fn of(summary: &EventSummary) -> Self {
        Self {
            id: summary.id,
            node: summary.node.clone(),
        }
    }

    /// Whether `summary` is this divergence.
    pub fn names(&self, summary: &EventSummary) -> bool {
        summary.id == self.id && summary.node == self.node
    }

    /// `#42`, or `node-1 #42` in a cluster-wide list.
    pub fn label(&self) -> String {
        match &self.node {
            Some(node) => format!("{node} #{}", self.id),
            None => format!("#{}", self.id),
        }
    }

    /// The admin API path of the full event; a node's event is read through the node asked.
    fn path(&self) -> String {
        match &self.node {
            Some(node) => format!(
                "/api/divergences/{}?node={}",
                self.id,
                form_urlencoded::byte_serialize(node.as_bytes()).collect::<String>()
            ),
            None => format!("/api/divergences/{}", self.id),
        }
    }
}

/// What the drawing loop asks the poller for, beyond the periodic refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The full event behind one divergence.
    Divergence(DivergenceRef),
    /// The field classification of one route.
    Fields(String),
}

/// One answer from the poller.
#[derive(Debug)]
pub enum Reply {
    Stats(Result<Box<Stats>, ClientError>),
    Divergences(Result<Vec<EventSummary>, ClientError>),
    Divergence(DivergenceRef, Result<Box<Event>, ClientError>),
    Fields(String, Result<FieldsReport, ClientError>),
    /// SIGTERM, SIGHUP or SIGINT arrived: leave as on `q`, so the terminal is restored. (In
    /// raw mode Ctrl+C is a key, not SIGINT; the signal comes from `kill`.)
    Signal,
}

/// The polling thread, seen from the drawing loop. Dropping it stops the thread after the
/// call in flight (if any) ends.
pub struct Poller {
    requests: UnboundedSender<Request>,
    replies: mpsc::Receiver<Reply>,
}

impl Poller {
    /// Starts the thread; the first refresh happens at once, the next every `interval`.
    pub fn spawn(base: ApiBase, scope: Scope, interval: Duration) -> std::io::Result<Self> {
        let (request_tx, request_rx) = unbounded_channel();
        let (reply_tx, reply_rx) = mpsc::channel();

        // A runtime of its own on a thread of its own: `run` may be called from inside another
        // runtime (the binary's), where blocking on a nested one would panic.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        thread::Builder::new()
            .name("specter-tui-poller".to_owned())
            .spawn(move || {
                let api = Api::new(base, request_timeout(scope));
                runtime.block_on(poll_loop(&api, scope, interval, request_rx, &reply_tx));
            })?;

        Ok(Self {
            requests: request_tx,
            replies: reply_rx,
        })
    }

    pub fn send(&self, request: Request) {
        // The thread only stops when this side is dropped, so a send cannot fail before then.
        let _ = self.requests.send(request);
    }

    /// The next answer that has arrived, without waiting.
    pub fn try_recv(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }
}

async fn poll_loop(
    api: &Api,
    scope: Scope,
    interval: Duration,
    mut requests: UnboundedReceiver<Request>,
    replies: &mpsc::Sender<Reply>,
) {
    tokio::spawn(watch_signals(replies.clone()));

    let mut next_refresh = Instant::now();
    loop {
        let asked = tokio::select! {
            request = requests.recv() => match request {
                Some(request) => Some(request),
                // The drawing loop is gone: the dashboard was closed.
                None => return,
            },
            () = tokio::time::sleep_until(next_refresh.into()) => None,
        };
        let reply = match asked {
            Some(Request::Divergence(divergence)) => {
                let event = api.get(&divergence.path()).await;
                Reply::Divergence(divergence, event.map(Box::new))
            }
            Some(Request::Fields(route)) => {
                let path = format!(
                    "/api/routes/{}/fields?scope={}",
                    encode_segment(&route),
                    scope.as_str()
                );
                let report = api.get_value(&path).await.and_then(|value| {
                    FieldsReport::from_json(&value).map_err(|reason| ClientError::Decode {
                        url: api.base.url(&path),
                        reason,
                    })
                });
                Reply::Fields(route, report)
            }
            None => {
                next_refresh = Instant::now() + interval;
                let path = format!("/api/stats?scope={}", scope.as_str());
                let stats = api.get(&path).await.map(Box::new);
                if replies.send(Reply::Stats(stats)).is_err() {
                    return;
                }
                let path = format!(
                    "/api/divergences?limit={DIVERGENCE_LIMIT}&scope={}",
                    scope.as_str()
                );
                let list = api.get::<DivergenceList>(&path).await;
                Reply::Divergences(list.map(|l| l.divergences))
            }
        };
        if replies.send(reply).is_err() {
            return;
        }
    }
}

/// How long one API call may take in `scope`.
pub fn request_timeout(scope: Scope) -> Duration {
    match scope {
        Scope::Local => REQUEST_TIMEOUT,
        Scope::Cluster => CLUSTER_REQUEST_TIMEOUT,
    }
}

/// Turns the signals that would otherwise kill the process (and leave the terminal in raw
/// mode) into a [`Reply::Signal`]. A signal that cannot be watched keeps its default action.
///
/// The drawing loop leaves within one pass of that reply. Should it not within
/// [`SIGNAL_GRACE`], stuck on a terminal that stopped answering, the process ends anyway, with
/// the exit status a shell gives a process killed by the signal.
async fn watch_signals(replies: mpsc::Sender<Reply>) {
    use tokio::signal::unix::{SignalKind, signal};

    async fn next(watch: &mut Option<tokio::signal::unix::Signal>) {
        match watch {
            Some(watch) => {
                watch.recv().await;
            }
            None => std::future::pending().await,
        }
    }

    let mut term = signal(SignalKind::terminate()).ok();
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let signal = tokio::select! {
        () = next(&mut term) => libc::SIGTERM,
        () = next(&mut hangup) => libc::SIGHUP,
        () = next(&mut interrupt) => libc::SIGINT,
    };
    let _ = replies.send(Reply::Signal);

    tokio::time::sleep(SIGNAL_GRACE).await;
    terminal::exit_now(128 + signal);
}

/// GETs JSON from the admin API.
struct Api {
    base: ApiBase,
    http: Client<HttpConnector, Empty<Bytes>>,
    /// How long one call may take, connecting included.
    timeout: Duration,
}

impl Api {
    fn new(base: ApiBase, timeout: Duration) -> Self {
        // Connecting involves the node asked alone, whatever the scope.
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            base,
            http,
            timeout,
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.base.url(path);
        let body = self.fetch(&url).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    async fn get_value(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.get(path).await
    }

    /// The body of a 200 answer; any other status is an error carrying the API's message.
    async fn fetch(&self, url: &str) -> Result<Bytes, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| unreachable(format!("bad URL: {e}")))?;
        let request = HttpRequest::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| unreachable(e.to_string()))?;

        let call = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| unreachable(crate::error_chain(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(crate::error_chain(&e)))?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.to_owned(),
                timeout: self.timeout,
            })??;

        if status != StatusCode::OK {
            return Err(ClientError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
                message: api_message(&body),
            });
        }
        Ok(body)
    }
}

/// The `error` member the API puts in every failure, or the start of the body.
fn api_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.as_str())
    {
        Some(message) => message.to_owned(),
        None => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

/// Percent-encodes one path segment: route names hold spaces, slashes and braces.
pub fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
