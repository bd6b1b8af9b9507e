//! The admin HTTP API: the serve stage.
//!
//! It runs on its own listener (`api.listen`), never on the proxy port, so it cannot hide the
//! live service's own paths. Every field is documented in `docs/api.md`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    cluster::{self, Cluster, NodeStatus},
    event::{Event, EventSummary, Outcome},
    profile::Profile,
    store::Store,
};

/// Divergences listed in `/api/stats`.
const RECENT_IN_STATS: usize = 20;
/// Most divergences one `/api/divergences` call returns.
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("cannot listen on {addr} for the admin API (api.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Produces the `capture` object of `/api/stats` in attach mode.
pub type CaptureView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the API reads from.
#[derive(Clone)]
pub struct ApiState {
    pub node: String,
    /// "proxy" or "attach".
    pub mode: &'static str,
    pub profile: Arc<Profile>,
    pub store: Arc<dyn Store>,
    /// Present in attach mode.
    pub capture: Option<CaptureView>,
    /// Present when the config has a `cluster` section.
    pub cluster: Option<Arc<Cluster>>,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: ApiState, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Admin API listening");
    }
    let state = Arc::new(state);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "Admin API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |request| {
            let state = state.clone();
            async move {
                let mut response = route(&state, request).await;
                // Says which node answered, so a member reading another's figures can tell
                // that it reached the node it meant to (see `cluster::NODE_HEADER`).
                if let Ok(node) = HeaderValue::from_str(&state.node) {
                    response.headers_mut().insert(cluster::NODE_HEADER, node);
                }
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(%error, %peer, "Admin API connection ended with an error");
            }
        });
    }
}

async fn route(state: &ApiState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin API only answers GET",
        );
    }
    let path = request.uri().path().to_owned();
    let query = Query::parse(request.uri().query());

    match path.as_str() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => metrics(state).await,
        "/api/stats" => stats(state, &query).await,
        "/api/divergences" => divergences(state, &query).await,
        "/api/routes" => routes(state, &query).await,
        "/api/verdict" => verdict(state, &query).await,
        "/api/profile" => profile_snapshot(state),
        "/api/cluster/members" => cluster_members(state),
        "/api/cluster/owner" => cluster_owner(state, &query),
        _ => {
            if let Some(id) = path.strip_prefix("/api/divergences/") {
                divergence(state, id, &query).await
            } else if let Some(rest) = path.strip_prefix("/api/routes/") {
                route_detail(state, rest, &query).await
            } else {
                error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}"))
            }
        }
    }
}

/// The Prometheus exposition; see [`crate::metrics`].
async fn metrics(state: &ApiState) -> Response<Full<Bytes>> {
    // A store backend may take a lock or a connection to report its health; keep that off the
    // async workers, as the other store reads are.
    let store = state.store.clone();
    let health = match tokio::task::spawn_blocking(move || store.health()).await {
        Ok(health) => health,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("store health read failed: {e}"),
            );
        }
    };
    let sources = crate::metrics::Sources {
        node: &state.node,
        mode: state.mode,
        profile: &state.profile,
        capture: state.capture.as_ref().map(|view| view()),
        store: health,
    };
    let extra: Vec<crate::metrics::ExtraGauge> = state
        .cluster
        .iter()
        .map(|cluster| crate::metrics::ExtraGauge {
            name: "specter_cluster_members".to_owned(),
            help: "Live members of the cluster as this node sees them, itself included.".to_owned(),
            labels: Vec::new(),
            value: cluster.members().len() as f64,
        })
        .collect();
    match crate::metrics::encode(&sources, &extra) {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn stats(state: &ApiState, query: &Query) -> Response<Full<Bytes>> {
    let cluster_scope = match scope(query) {
        Ok(cluster_scope) => cluster_scope,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    // The members' profiles and divergence lists are read at the same time, so a member that
    // does not answer costs one read timeout, not two.
    let (mut scoped, recent) = tokio::join!(
        Scoped::of(state, cluster_scope),
        scoped_recent(state, cluster_scope, RECENT_IN_STATS, None)
    );
    // The totals stand whatever the lists: a member whose recent divergences are missing from
    // the list says so in its `error`, and a store this node cannot read leaves its counters
    // (kept in memory) to be shown all the same.
    let recent_error = recent.local_error.filter(|_| recent.nodes.is_none());
    scoped.note_missing_parts(recent.nodes, "recent divergences");
    let recent = recent.list;
    let profile = scoped.profile(state);
    let view = profile.view();
    let c = view.counters;
    let mut body = json!({
        "node": state.node,
        "mode": state.mode,
        "uptime_s": state.profile.uptime().as_secs(),
        "exchanges": {
            "seen": c.seen,
            "sampled_out": c.sampled_out,
            "skipped_unsafe": c.skipped_unsafe,
            "truncated": c.truncated,
            "incomplete": c.incomplete,
            "mirrored": c.mirrored,
            "matched": c.matched,
            "diverged": c.diverged,
            "shadow_errors": c.shadow_errors,
            "shadow_dropped": c.shadow_dropped,
            "live_errors": c.live_errors,
            "store_dropped": c.store_dropped,
            "exchange_log_dropped": c.exchange_log_dropped,
            "match_rate": view.match_rate,
            "noise_replays": c.noise_replays,
            "noise_comparisons": c.noise_comparisons,
            "forwarded": c.forwarded,
            "forward_errors": c.forward_errors,
            "forward_unconfirmed": c.forward_unconfirmed,
            "forward_received": c.forward_received,
        },
        "latency": {
            "live": view.live_latency,
            "shadow": view.shadow_latency,
        },
        "routes": view.routes,
        "analysis": analysis_summary(profile),
        "recent_divergences": recent,
        "recent_divergences_error": recent_error,
        // Capture figures are each node's own; the cluster view does not sum them.
        "capture": match scoped.nodes {
            None => state.capture.as_ref().map(|view| view()),
            Some(_) => None,
        },
    });
    scoped.annotate(&mut body);
    json_response(StatusCode::OK, &body)
}

/// Which figures a request asks for: this node's (`scope=local`, the default) or the whole
/// cluster's (`scope=cluster`), merged from every live member's admin API.
///
/// Limitation: a member that does not answer within the read timeout is left out of the totals
/// (listed in `nodes` with `ok: false`).
struct Scoped {
    /// The merged profile, for the cluster scope.
    merged: Option<Profile>,
    /// Each member's part, for the cluster scope.
    nodes: Option<Vec<NodeStatus>>,
}

impl Scoped {
    /// The scope `query` asks for; a `400` when it names none.
    async fn read(state: &ApiState, query: &Query) -> Result<Self, Response<Full<Bytes>>> {
        let cluster_scope = scope(query).map_err(|e| error(StatusCode::BAD_REQUEST, &e))?;
        Ok(Self::of(state, cluster_scope).await)
    }

    async fn of(state: &ApiState, cluster_scope: bool) -> Self {
        if !cluster_scope {
            return Self {
                merged: None,
                nodes: None,
            };
        }
        match &state.cluster {
            Some(cluster) => {
                let (merged, nodes) = cluster.merged_profile().await;
                Self {
                    merged: Some(merged),
                    nodes: Some(nodes),
                }
            }
            None => Self {
                merged: None,
                nodes: Some(vec![single_node(state)]),
            },
        }
    }

    /// Notes in each member's `error` that `part` of the answer is missing from it, for the
    /// members `parts` (their statuses for reading that part) says it could not be read.
    fn note_missing_parts(&mut self, parts: Option<Vec<NodeStatus>>, part: &str) {
        let (Some(nodes), Some(parts)) = (&mut self.nodes, parts) else {
            return;
        };
        for missing in parts.into_iter().filter(|p| !p.ok) {
            let cause = missing.error.unwrap_or_default();
            // A member whose figures are missing already says why; the same cause once more
            // for its list would add nothing.
            if let Some(node) = nodes.iter_mut().find(|n| n.name == missing.name && n.ok) {
                let note = format!("{part} missing ({cause})");
                node.error = Some(match node.error.take() {
                    Some(earlier) => format!("{earlier}; {note}"),
                    None => note,
                });
            }
        }
    }

    fn profile<'a>(&'a self, state: &'a ApiState) -> &'a Profile {
        self.merged.as_ref().unwrap_or(&state.profile)
    }

    /// Adds `scope` and, for the cluster, `nodes` to an answer object.
    fn annotate(&self, body: &mut serde_json::Value) {
        let Some(fields) = body.as_object_mut() else {
            return;
        };
        match &self.nodes {
            Some(nodes) => {
                fields.insert("scope".into(), json!("cluster"));
                fields.insert("nodes".into(), json!(nodes));
            }
            None => {
                fields.insert("scope".into(), json!("local"));
            }
        }
    }
}

/// Whether `scope` asks for the whole cluster (`cluster`) or this node (`local`, the default).
/// The error names the value given.
fn scope(query: &Query) -> Result<bool, String> {
    match query.get("scope") {
        None | Some("local") => Ok(false),
        Some("cluster") => Ok(true),
        Some(other) => Err(format!(
            "scope={other:?} is not valid; expected local or cluster"
        )),
    }
}

/// A single node's entry in a cluster-scope answer: without a cluster, it is a cluster of one.
fn single_node(state: &ApiState) -> NodeStatus {
    NodeStatus {
        name: state.node.clone(),
        api: None,
        ok: true,
        error: None,
    }
}

/// The newest divergences in scope, as [`scoped_recent`] reads them.
struct Recent {
    list: serde_json::Value,
    /// Why this node's own list could not be read; the list then holds the others' only.
    local_error: Option<String>,
    /// In the cluster scope, each member's part of the list.
    nodes: Option<Vec<NodeStatus>>,
}

/// The newest divergences in scope: this node's, or every live member's merged (each tagged
/// with its `node`).
async fn scoped_recent(
    state: &ApiState,
    cluster_scope: bool,
    limit: usize,
    route: Option<String>,
) -> Recent {
    let local = recent(state, limit, route.clone()).await;
    let local_error = local.as_ref().err().cloned();
    let local = local.unwrap_or_default();
    let Some(cluster) = state.cluster.as_ref().filter(|_| cluster_scope) else {
        return Recent {
            list: json!(local),
            local_error,
            nodes: None,
        };
    };

    let mut path = format!("/api/divergences?limit={limit}");
    if let Some(route) = &route {
        path.push_str("&route=");
        path.extend(form_urlencoded::byte_serialize(route.as_bytes()));
    }
    let local = local.iter().map(|s| json!(s)).collect();
    let (list, mut nodes) = cluster.merged_divergences(local, &path, limit).await;
    if let (Some(error), Some(this)) = (&local_error, nodes.first_mut()) {
        this.ok = false;
        this.error = Some(format!("divergences: {error}"));
    }
    Recent {
        list: json!(list),
        local_error,
        nodes: Some(nodes),
    }
}

/// `GET /api/profile`: this node's profile snapshot (counters, routes, HDR histograms), which
/// another node merges into cluster-wide figures.
fn profile_snapshot(state: &ApiState) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(state.profile.snapshot())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /api/cluster/members`: the live members as this node sees them.
fn cluster_members(state: &ApiState) -> Response<Full<Bytes>> {
    match &state.cluster {
        Some(cluster) => json_response(
            StatusCode::OK,
            &json!({
                "node": cluster.local_name(),
                "cluster": true,
                "vnodes": cluster.vnodes(),
                "members": &cluster.members()[..],
            }),
        ),
        None => json_response(
            StatusCode::OK,
            &json!({
                "node": state.node,
                "cluster": false,
                "members": [{ "name": state.node }],
            }),
        ),
    }
}

/// `GET /api/cluster/owner?key=K`: the member that owns routing key `K` now.
fn cluster_owner(state: &ApiState, query: &Query) -> Response<Full<Bytes>> {
    let Some(key) = query.get("key") else {
        return error(StatusCode::BAD_REQUEST, "key=... is required");
    };
    let owner = match &state.cluster {
        Some(cluster) => cluster.owner_of(key),
        None => Some(state.node.clone()),
    };
    json_response(StatusCode::OK, &json!({ "key": key, "owner": owner }))
}

async fn divergences(state: &ApiState, query: &Query) -> Response<Full<Bytes>> {
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n.min(MAX_LIMIT),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("limit={text:?} is not valid; expected a whole number from 1"),
                );
            }
        },
    };
    // The list is the whole answer: the members' parts are those of their lists, and their
    // profiles are not read.
    let cluster_scope = match scope(query) {
        Ok(cluster_scope) => cluster_scope,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let route = query.get("route").map(str::to_owned);
    let recent = scoped_recent(state, cluster_scope, limit, route).await;
    match (recent.local_error, recent.nodes) {
        (Some(e), None) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        (_, nodes) => {
            let scoped = Scoped {
                merged: None,
                nodes: nodes.or_else(|| cluster_scope.then(|| vec![single_node(state)])),
            };
            let mut body = json!({ "divergences": recent.list });
            scoped.annotate(&mut body);
            json_response(StatusCode::OK, &body)
        }
    }
}

/// `GET /api/divergences/{id}`: one event of this node's, or with `node=NAME` (as cluster-wide
/// lists tag their entries) the event of that member, read from its admin API.
async fn divergence(state: &ApiState, id: &str, query: &Query) -> Response<Full<Bytes>> {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("divergence id {id:?} is not a number"),
        );
    };
    if let Some(node) = query.get("node").filter(|node| *node != state.node) {
        let Some(cluster) = &state.cluster else {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "node={node:?}: this node ({}) is not in a cluster",
                    state.node
                ),
            );
        };
        return match cluster.ask(node, &format!("/api/divergences/{id}")).await {
            // The member's own answer, a 404 for an id it no longer holds included.
            Some(Ok((status, body))) => {
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Some(Err(reason)) => error(
                StatusCode::BAD_GATEWAY,
                &format!("divergence {id} of node {node:?}: {reason}"),
            ),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("node={node:?} is not a live member of the cluster"),
            ),
        };
    }
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.get(id)).await {
        Ok(Ok(Some(event))) => json_response(StatusCode::OK, &event),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            &format!("no divergence with id {id}"),
        ),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("store read failed: {e}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("store read failed: {e}"),
        ),
    }
}

/// The `analysis` object of `/api/stats`: how noise is learned and how the fields of every
/// route are classified so far.
fn analysis_summary(profile: &Profile) -> serde_json::Value {
    json!(profile.analysis_summary())
}

/// `GET /api/routes`: every route with all its figures. In the cluster scope the counters,
/// statuses, latencies and field tables are those of every member added up.
async fn routes(state: &ApiState, query: &Query) -> Response<Full<Bytes>> {
    let scoped = match Scoped::read(state, query).await {
        Ok(scoped) => scoped,
        Err(response) => return response,
    };
    let mut body = json!({ "routes": scoped.profile(state).route_reports() });
    scoped.annotate(&mut body);
    json_response(StatusCode::OK, &body)
}

/// `GET /api/routes/{route}` and `GET /api/routes/{route}/fields`, the route percent-encoded
/// as one path segment (`GET%20%2Fusers%2F%7Bid%7D`).
async fn route_detail(state: &ApiState, rest: &str, query: &Query) -> Response<Full<Bytes>> {
    let (encoded, fields) = match rest.strip_suffix("/fields") {
        Some(encoded) => (encoded, true),
        None => (rest, false),
    };
    let Some(route) = percent_decode(encoded) else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("route {encoded:?} is not valid percent-encoded UTF-8"),
        );
    };
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            &format!("no route {route:?}; GET /api/routes lists them"),
        )
    };
    let scoped = match Scoped::read(state, query).await {
        Ok(scoped) => scoped,
        Err(response) => return response,
    };
    let profile = scoped.profile(state);
    let mut body = if fields {
        match profile.route_fields(&route) {
            Some(report) => json!(report),
            None => return not_found(),
        }
    } else {
        match profile.route_report(&route) {
            Some(report) => json!(report),
            None => return not_found(),
        }
    };
    scoped.annotate(&mut body);
    json_response(StatusCode::OK, &body)
}

/// `GET /api/verdict`: the verdict with the criteria in the query, defaults from the config.
async fn verdict(state: &ApiState, query: &Query) -> Response<Full<Bytes>> {
    let scoped = match Scoped::read(state, query).await {
        Ok(scoped) => scoped,
        Err(response) => return response,
    };
    let mut criteria = state.profile.default_criteria();
    if let Some(text) = query.get("min_match_rate") {
        match text.parse::<f64>() {
            Ok(rate) if (0.0..=1.0).contains(&rate) => criteria.min_match_rate = rate,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("min_match_rate={text:?} is not valid; expected 0.0 to 1.0"),
                );
            }
        }
    }
    if let Some(text) = query.get("min_samples") {
        match text.parse::<u64>() {
            Ok(n) if n > 0 => criteria.min_samples = n,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("min_samples={text:?} is not valid; expected a whole number from 1"),
                );
            }
        }
    }
    if let Some(text) = query.get("max_latency_ratio") {
        match text.parse::<f64>() {
            Ok(ratio) if ratio.is_finite() && ratio > 0.0 => criteria.max_latency_ratio = ratio,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("max_latency_ratio={text:?} is not valid; expected a number above 0"),
                );
            }
        }
    }
    let mut body = json!(scoped.profile(state).verdict(&criteria));
    scoped.annotate(&mut body);
    json_response(StatusCode::OK, &body)
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            decoded.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// The newest divergent events (diverged or shadow error), as summaries.
/// This node's newest divergences, or why the store could not give them.
async fn recent(
    state: &ApiState,
    limit: usize,
    route: Option<String>,
) -> Result<Vec<EventSummary>, String> {
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || store.recent(limit, route.as_deref(), true));
    match read.await {
        Ok(Ok(events)) => Ok(events
            .iter()
            .filter(|e| e.outcome != Outcome::Matched)
            .map(Event::summary)
            .collect()),
        Ok(Err(e)) => Err(format!("store read failed: {e}")),
        Err(e) => Err(format!("store read failed: {e}")),
    }
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(body) {
        Ok(bytes) => {
            let mut response = Response::new(Full::new(Bytes::from(bytes)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode JSON: {e}\n"),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
