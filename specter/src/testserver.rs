//! The deterministic demo and test upstream that `specter testserver` runs.
//!
//! One program plays both sides of a shadow deployment: with [`Mode::Live`] it is the service
//! users talk to, with [`Mode::Shadow`] it is the candidate. The two modes answer most requests
//! with byte-identical bodies and differ only where this table says, so a demo, an end-to-end
//! test or a person with `curl` knows exactly which divergences Specter should report and which
//! differences it must see through. `docs/testserver.md` describes every endpoint in full.
//!
//! | Endpoint | Methods | Shadow compared to live |
//! |---|---|---|
//! | `/profile` | GET | **diverges**: field `/beta_features` added |
//! | `/users/{id}` | GET | identical bytes |
//! | `/orders/{id}` | GET | **diverges**: `/total` 19.5 not 19.0 (`qty` `2.0` vs `2` is equal) |
//! | `/status/{code}` | GET | identical |
//! | `/echo` | any | identical, but echoes request headers, so hop differences show |
//! | `/echo/body` | any | identical (method, path with query, body) |
//! | `/gzip` | GET | equal content: live gzip-encoded, shadow identity with keys reordered |
//! | `/chunked` | GET | equal content: live chunked, shadow with `Content-Length` |
//! | `/slow?ms=N` | GET | identical |
//! | `/noise` | GET | ids and time are noise; **diverges**: `/value` 43 not 42 |
//! | `/big?bytes=N` | GET | identical bytes |
//! | `/upload` | POST, PUT | identical |
//! | `/whoami` | GET | **diverges**: `/mode` is `"shadow"` |
//! | anything else | any | identical 404 (405 for a known path with the wrong method) |
//!
//! No header names the mode on ordinary responses: that would make every response diverge.
//! Hyper adds a `Date` header, which differs by the second; comparisons are expected to ignore it.

use std::{
    collections::VecDeque,
    convert::Infallible,
    fmt,
    future::Future,
    io::{self, Write},
    net::SocketAddr,
    pin::{Pin, pin},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use flate2::{Compression, write::GzEncoder};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, combinators::BoxBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info, warn};
use xxhash_rust::xxh3::Xxh3;

/// Which side of a shadow deployment this server plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Live,
    Shadow,
}

impl Mode {
    /// The name used on the command line and in `/whoami`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Shadow => "shadow",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest `/slow` will sleep, so a typo cannot hold a connection for hours.
const MAX_SLEEP_MS: u64 = 60_000;

/// The largest body `/big` will generate.
const MAX_BIG_BYTES: u64 = 16 * 1024 * 1024;

/// The largest request body `/echo` and `/echo/body` will read; `/upload` hashes as it reads
/// and has no limit.
const MAX_ECHO_BYTES: usize = 16 * 1024 * 1024;

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to back off after a failed accept (for example out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The repeating pattern `/big` bodies are cut from: 63 visible characters and a newline, so a
/// body is easy to read and any offset can be checked.
const BIG_PATTERN: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-\n";

/// The `/chunked` body, in the pieces the live side sends as separate chunks.
const CHUNKED_PARTS: [&str; 4] = [
    r#"{"chunked":true,"#,
    r#""parts":["alpha","beta","gamma"],"#,
    r#""note":"sent in pieces by live, whole by shadow","#,
    r#""count":3}"#,
];

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

type Body = BoxBody<Bytes, Infallible>;

/// Binds a listener for [`serve`]; the error names the address, so an operator sees which
/// port was taken or refused.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot bind test server to {addr}: {error}"),
        )
    })
}

/// Serves HTTP/1.1 on `listener` in `mode` until `shutdown` resolves.
///
/// Each connection gets its own task and keep-alive. Once `shutdown` resolves no new
/// connections are accepted, idle ones are closed, and requests in flight get up to five
/// seconds to finish.
pub async fn serve(
    listener: TcpListener,
    mode: Mode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let local = listener.local_addr().map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("test server listener has no local address: {error}"),
        )
    })?;
    info!(%local, %mode, "Test server listening");

    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%local, %error, "Test server accept failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };

        let service = service_fn(move |request| respond(request, mode));
        let connection = http1::Builder::new()
            .keep_alive(true)
            .max_headers(crate::proxy::MAX_HEADERS)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        let span = tracing::debug_span!("connection", %peer, %mode);
        tokio::spawn(
            async move {
                if let Err(error) = connection.await {
                    debug!(%error, "Connection ended with an error");
                }
            }
            .instrument(span),
        );
    }

    // Close the listening socket first so clients fail fast instead of queueing on a server
    // that will never accept them.
    drop(listener);
    info!(%local, %mode, "Test server shutting down");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(%local, "Test server stopped with requests still in flight");
    }
    Ok(())
}

/// The endpoints, parsed from the request path.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Profile,
    User(String),
    Order(String),
    Status(String),
    Echo,
    EchoBody,
    Gzip,
    Chunked,
    Slow,
    Noise,
    Big,
    Upload,
    Whoami,
    NotFound,
}

impl Route {
    fn parse(path: &str) -> Route {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        match segments.as_slice() {
            ["profile"] => Route::Profile,
            ["users", id] if !id.is_empty() => Route::User((*id).to_owned()),
            ["orders", id] if !id.is_empty() => Route::Order((*id).to_owned()),
            ["status", code] => Route::Status((*code).to_owned()),
            ["echo"] => Route::Echo,
            ["echo", "body"] => Route::EchoBody,
            ["gzip"] => Route::Gzip,
            ["chunked"] => Route::Chunked,
            ["slow"] => Route::Slow,
            ["noise"] => Route::Noise,
            ["big"] => Route::Big,
            ["upload"] => Route::Upload,
            ["whoami"] => Route::Whoami,
            _ => Route::NotFound,
        }
    }

    /// The methods a route answers, as the `Allow` header lists them; `None` means any.
    fn allowed(&self) -> Option<&'static str> {
        match self {
            Route::Echo | Route::EchoBody | Route::NotFound => None,
            Route::Upload => Some("POST, PUT"),
            _ => Some("GET, HEAD"),
        }
    }

    fn allows(&self, method: &Method) -> bool {
        match self.allowed() {
            None => true,
            Some(allow) => allow.split(", ").any(|name| name == method.as_str()),
        }
    }
}

async fn respond(request: Request<Incoming>, mode: Mode) -> Result<Response<Body>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = Route::parse(&path);

    let response = if !route.allows(&method) {
        let mut response = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed", "method": method.as_str(), "path": path}),
        );
        if let Some(allow) = route.allowed() {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    } else {
        match route {
            Route::Profile => profile(mode),
            Route::User(id) => user(&id),
            Route::Order(id) => order(&id, mode),
            Route::Status(code) => status(&code),
            Route::Echo => echo(request, true).await,
            Route::EchoBody => echo(request, false).await,
            Route::Gzip => gzip(mode),
            Route::Chunked => chunked(mode),
            Route::Slow => slow(request.uri()).await,
            Route::Noise => noise(mode),
            Route::Big => big(request.uri()),
            Route::Upload => upload(request).await,
            Route::Whoami => json_response(StatusCode::OK, &json!({"mode": mode.as_str()})),
            Route::NotFound => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not found", "path": path}),
            ),
        }
    };

    debug!(%method, %path, status = response.status().as_u16(), "Served");
    Ok(response)
}

fn profile(mode: Mode) -> Response<Body> {
    let mut profile = json!({
        "id": 1,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "plan": "pro",
    });
    if mode == Mode::Shadow {
        profile["beta_features"] = Value::Bool(true);
    }
    json_response(StatusCode::OK, &profile)
}

fn user(id: &str) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({
            "id": id_value(id),
            "name": format!("user-{id}"),
            "active": true,
            "roles": ["reader"],
        }),
    )
}

fn order(id: &str, mode: Mode) -> Response<Body> {
    // Live writes the quantity as an integer and shadow as a float: the same number spelled
    // two ways, which a comparison must treat as equal. The total is a real change.
    let (qty, total) = match mode {
        Mode::Live => (json!(2), json!(19.0)),
        Mode::Shadow => (json!(2.0), json!(19.5)),
    };
    json_response(
        StatusCode::OK,
        &json!({
            "order_id": id_value(id),
            "items": [{"sku": "A-1", "qty": qty, "price": 9.5}],
            "total": total,
            "currency": "EUR",
        }),
    )
}

/// A path id as JSON: a number when it is a plain unsigned integer that reads back the same
/// (so `007` stays the string `"007"`), otherwise a string.
fn id_value(id: &str) -> Value {
    match id.parse::<u64>() {
        Ok(number) if number.to_string() == id => json!(number),
        _ => json!(id),
    }
}

fn status(code: &str) -> Response<Body> {
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .filter(|code| (200..=599).contains(code))
        .and_then(|code| StatusCode::from_u16(code).ok())
    else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "status must be a number from 200 to 599", "requested": code}),
        );
    };

    // These statuses may not carry a body, so they get none rather than one hyper would drop.
    if matches!(status.as_u16(), 204 | 205 | 304) {
        let mut response = Response::new(empty());
        *response.status_mut() = status;
        return response;
    }
    json_response(status, &json!({"status": status.as_u16()}))
}

/// Answers `/echo` (with headers) and `/echo/body` (without).
async fn echo(request: Request<Incoming>, with_headers: bool) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_ECHO_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": "request body too large to echo", "limit": MAX_ECHO_BYTES}),
            );
        }
        Err(error) => return body_read_failed(&*error),
    };

    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut echoed = serde_json::Map::new();
    echoed.insert("method".into(), json!(parts.method.as_str()));
    echoed.insert("path".into(), json!(path));
    if with_headers {
        let headers: Vec<Value> = parts
            .headers
            .iter()
            .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
            .collect();
        echoed.insert("headers".into(), Value::Array(headers));
    }
    echoed.insert("body".into(), json!(String::from_utf8_lossy(&body)));
    echoed.insert("body_len".into(), json!(body.len()));
    json_response(StatusCode::OK, &Value::Object(echoed))
}

fn gzip(mode: Mode) -> Response<Body> {
    match mode {
        Mode::Live => {
            let document = json!({"compressed": true, "items": [1, 2, 3], "message": "hello"});
            let plain = serde_json::to_vec(&document).expect("a JSON value always serializes");

            // GzEncoder writes a zero modification time and no file name, so the bytes are
            // the same on every request.
            let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
            encoder
                .write_all(&plain)
                .expect("writing to a Vec cannot fail");
            let compressed = encoder.finish().expect("writing to a Vec cannot fail");

            let mut response = bytes_response(StatusCode::OK, JSON, compressed);
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            response
        }
        Mode::Shadow => json_response(
            StatusCode::OK,
            &json!({"message": "hello", "items": [1, 2, 3], "compressed": true}),
        ),
    }
}

fn chunked(mode: Mode) -> Response<Body> {
    match mode {
        Mode::Live => {
            let chunks = CHUNKED_PARTS
                .iter()
                .map(|part| Bytes::from_static(part.as_bytes()));
            let mut response = Response::new(Chunks(chunks.collect()).boxed());
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
            response
        }
        Mode::Shadow => bytes_response(StatusCode::OK, JSON, CHUNKED_PARTS.concat().into_bytes()),
    }
}

async fn slow(uri: &Uri) -> Response<Body> {
    let ms = match number_param(uri, "ms") {
        Ok(ms) => ms.min(MAX_SLEEP_MS),
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &error),
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    json_response(StatusCode::OK, &json!({"slept_ms": ms}))
}

fn noise(mode: Mode) -> Response<Body> {
    let request_id = random_id();
    let value = match mode {
        Mode::Live => 42,
        Mode::Shadow => 43,
    };
    let mut response = json_response(
        StatusCode::OK,
        &json!({
            "request_id": request_id,
            "generated_at": rfc3339(SystemTime::now()),
            "value": value,
        }),
    );
    let header_value = HeaderValue::from_str(&request_id).expect("hex and dashes are valid");
    response.headers_mut().insert("x-request-id", header_value);
    response
}

fn big(uri: &Uri) -> Response<Body> {
    let len = match number_param(uri, "bytes") {
        Ok(len) => len.min(MAX_BIG_BYTES) as usize,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &error),
    };
    let body: Vec<u8> = BIG_PATTERN.iter().copied().cycle().take(len).collect();
    bytes_response(StatusCode::OK, TEXT, body)
}

async fn upload(request: Request<Incoming>) -> Response<Body> {
    // Hash frame by frame so an upload of any size costs no more memory than one frame.
    let mut body = request.into_body();
    let mut hasher = Box::new(Xxh3::new());
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => return body_read_failed(&error),
        };
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            hasher.update(&data);
        }
    }

    json_response(
        StatusCode::OK,
        &json!({"received": received, "xxh3": format!("{:016x}", hasher.digest())}),
    )
}

/// Reads a required unsigned integer query parameter, or the 400 body explaining why not.
fn number_param(uri: &Uri, name: &str) -> Result<u64, Value> {
    let raw = uri
        .query()
        .unwrap_or("")
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find_map(|(key, value)| (key == name).then_some(value));
    raw.and_then(|value| value.parse().ok()).ok_or_else(|| {
        json!({
            "error": format!("query parameter `{name}` must be an unsigned integer"),
            "requested": raw,
        })
    })
}

fn body_read_failed(error: &(dyn std::error::Error + 'static)) -> Response<Body> {
    debug!(%error, "Reading request body failed");
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": format!("reading request body failed: {error}")}),
    )
}

/// A random id shaped like a UUID (8-4-4-4-12 hex digits).
fn random_id() -> String {
    let hex = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Formats a time as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:30:00.250Z`.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_date(i64::try_from(secs / 86_400).unwrap_or(i64::MAX));
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since_epoch.subsec_micros()
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Counting from 1 March makes the leap day the last day of the counted year, so each
/// 400-year cycle (146 097 days) splits into years and months with plain arithmetic.
fn civil_date(days: i64) -> (i64, u32, u32) {
    // 719 468 days separate 0000-03-01 from 1970-01-01.
    let shifted = days + 719_468;
    let cycle = shifted.div_euclid(146_097);
    let day_of_cycle = shifted.rem_euclid(146_097);
    let year_of_cycle =
        (day_of_cycle - day_of_cycle / 1460 + day_of_cycle / 36_524 - day_of_cycle / 146_096) / 365;
    let day_of_year =
        day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100);

    // Months counted from March have lengths that follow 153 days per 5 months.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_cycle + cycle * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("a JSON value always serializes");
    bytes_response(status, JSON, body)
}

fn bytes_response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

/// A body of several data frames whose total length is not announced, so hyper sends it with
/// `Transfer-Encoding: chunked`, one chunk per frame.
struct Chunks(VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests;
