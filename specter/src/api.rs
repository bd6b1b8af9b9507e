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
            async move { Ok::<_, Infallible>(route(&state, request).await) }
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
        "/api/stats" => stats(state).await,
        "/api/divergences" => divergences(state, &query).await,
        "/api/routes" => routes(state),
        "/api/verdict" => verdict(state, &query),
        _ => {
            if let Some(id) = path.strip_prefix("/api/divergences/") {
                divergence(state, id).await
            } else if let Some(rest) = path.strip_prefix("/api/routes/") {
                route_detail(state, rest)
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
    match crate::metrics::encode(&sources, &[]) {
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

async fn stats(state: &ApiState) -> Response<Full<Bytes>> {
    let view = state.profile.view();
    let recent = match recent(state, RECENT_IN_STATS, None).await {
        Ok(recent) => recent,
        Err(response) => return response,
    };
    let c = view.counters;
    let body = json!({
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
            "match_rate": view.match_rate,
            "noise_replays": c.noise_replays,
            "noise_comparisons": c.noise_comparisons,
        },
        "latency": {
            "live": view.live_latency,
            "shadow": view.shadow_latency,
        },
        "routes": view.routes,
        "analysis": analysis_summary(state),
        "recent_divergences": recent,
        "capture": state.capture.as_ref().map(|view| view()),
    });
    json_response(StatusCode::OK, &body)
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
    match recent(state, limit, query.get("route").map(str::to_owned)).await {
        Ok(list) => json_response(StatusCode::OK, &json!({ "divergences": list })),
        Err(response) => response,
    }
}

async fn divergence(state: &ApiState, id: &str) -> Response<Full<Bytes>> {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("divergence id {id:?} is not a number"),
        );
    };
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
fn analysis_summary(state: &ApiState) -> serde_json::Value {
    let settings = state.profile.settings();
    let reports = state.profile.route_reports();
    let sum = |field: fn(&crate::profile::FieldTally) -> u64| -> u64 {
        reports.iter().map(|r| field(&r.fields)).sum()
    };
    json!({
        "noise_learning": settings.noise_learning,
        "routes": reports.len(),
        "divergent_fields": sum(|f| f.divergence),
        "noise_fields": sum(|f| f.noise),
        "pending_fields": sum(|f| f.pending),
        "shadow_slower_routes": reports.iter().filter(|r| r.view.shadow_slower).count(),
    })
}

/// `GET /api/routes`: every route with all its figures.
fn routes(state: &ApiState) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        &json!({ "routes": state.profile.route_reports() }),
    )
}

/// `GET /api/routes/{route}` and `GET /api/routes/{route}/fields`, the route percent-encoded
/// as one path segment (`GET%20%2Fusers%2F%7Bid%7D`).
fn route_detail(state: &ApiState, rest: &str) -> Response<Full<Bytes>> {
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
    if fields {
        match state.profile.route_fields(&route) {
            Some(report) => json_response(StatusCode::OK, &report),
            None => not_found(),
        }
    } else {
        match state.profile.route_report(&route) {
            Some(report) => json_response(StatusCode::OK, &report),
            None => not_found(),
        }
    }
}

/// `GET /api/verdict`: the verdict with the criteria in the query, defaults from the config.
fn verdict(state: &ApiState, query: &Query) -> Response<Full<Bytes>> {
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
    json_response(StatusCode::OK, &state.profile.verdict(&criteria))
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
async fn recent(
    state: &ApiState,
    limit: usize,
    route: Option<String>,
) -> Result<Vec<EventSummary>, Response<Full<Bytes>>> {
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || store.recent(limit, route.as_deref(), true));
    match read.await {
        Ok(Ok(events)) => Ok(events
            .iter()
            .filter(|e| e.outcome != Outcome::Matched)
            .map(Event::summary)
            .collect()),
        Ok(Err(e)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("store read failed: {e}"),
        )),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("store read failed: {e}"),
        )),
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
