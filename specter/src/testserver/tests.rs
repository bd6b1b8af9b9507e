use std::{
    io::Read,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use flate2::read::GzDecoder;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use super::*;

/// A test server on an ephemeral port, stopped when dropped.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl Running {
    async fn start(mode: Mode) -> Running {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, mode, async move {
            let _ = stopped.await;
        }));
        Running {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(mut self) -> io::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn client() -> reqwest::Client {
    // A proxy from the environment must not intercept requests to the local server.
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Starts one server per mode.
async fn both() -> (Running, Running) {
    (
        Running::start(Mode::Live).await,
        Running::start(Mode::Shadow).await,
    )
}

async fn get(server: &Running, path: &str) -> reqwest::Response {
    client().get(server.url(path)).send().await.unwrap()
}

async fn get_bytes(server: &Running, path: &str) -> Vec<u8> {
    get(server, path).await.bytes().await.unwrap().to_vec()
}

async fn get_json(server: &Running, path: &str) -> Value {
    serde_json::from_slice(&get_bytes(server, path).await).unwrap()
}

/// Sends a raw request with `Connection: close` and returns everything the server wrote.
async fn raw_get(server: &Running, path: &str) -> String {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8(response).unwrap()
}

/// Splits a raw response into lowercased header lines and the undecoded body.
fn split_response(raw: &str) -> (Vec<String>, &str) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().map(str::to_ascii_lowercase).collect(), body)
}

/// Decodes a chunked body into its chunks.
fn dechunk(mut body: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return chunks;
        }
        chunks.push(rest[..size].to_owned());
        body = rest[size..].strip_prefix("\r\n").unwrap();
    }
}

#[tokio::test]
async fn profile_shadow_adds_only_beta_features() {
    let (live, shadow) = both().await;
    let live_profile = get_json(&live, "/profile").await;
    let mut shadow_profile = get_json(&shadow, "/profile").await;

    assert_eq!(
        live_profile,
        json!({"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "plan": "pro"})
    );
    let beta = shadow_profile
        .as_object_mut()
        .unwrap()
        .remove("beta_features");
    assert_eq!(beta, Some(Value::Bool(true)));
    assert_eq!(shadow_profile, live_profile);
}

#[tokio::test]
async fn users_are_byte_identical_across_modes() {
    let (live, shadow) = both().await;

    let live_body = get_bytes(&live, "/users/7").await;
    assert_eq!(live_body, get_bytes(&shadow, "/users/7").await);
    assert_eq!(
        live_body,
        br#"{"id":7,"name":"user-7","active":true,"roles":["reader"]}"#
    );

    // Same request, same mode, same bytes.
    assert_eq!(live_body, get_bytes(&live, "/users/7").await);

    assert_eq!(get_json(&live, "/users/ada").await["id"], json!("ada"));
    assert_eq!(get_json(&live, "/users/007").await["id"], json!("007"));
}

#[tokio::test]
async fn orders_differ_in_total_and_spell_quantity_differently() {
    let (live, shadow) = both().await;
    let live_body = String::from_utf8(get_bytes(&live, "/orders/12").await).unwrap();
    let shadow_body = String::from_utf8(get_bytes(&shadow, "/orders/12").await).unwrap();

    let expected = |qty: &str, total: &str| {
        format!(
            r#"{{"order_id":12,"items":[{{"sku":"A-1","qty":{qty},"price":9.5}}],"total":{total},"#
        ) + r#""currency":"EUR"}"#
    };
    assert_eq!(live_body, expected("2", "19.0"));
    assert_eq!(shadow_body, expected("2.0", "19.5"));
}

#[tokio::test]
async fn gzip_decodes_to_the_same_json_in_both_modes() {
    let (live, shadow) = both().await;

    let live_response = get(&live, "/gzip").await;
    assert_eq!(live_response.headers()["content-encoding"], "gzip");
    let compressed = live_response.bytes().await.unwrap();
    let mut plain = Vec::new();
    GzDecoder::new(&compressed[..])
        .read_to_end(&mut plain)
        .unwrap();

    let shadow_response = get(&shadow, "/gzip").await;
    assert!(shadow_response.headers().get("content-encoding").is_none());
    let shadow_body = shadow_response.bytes().await.unwrap();

    // Different bytes (key order), equal content.
    assert_ne!(plain, shadow_body);
    let live_json: Value = serde_json::from_slice(&plain).unwrap();
    let shadow_json: Value = serde_json::from_slice(&shadow_body).unwrap();
    assert_eq!(live_json, shadow_json);
    assert_eq!(
        live_json,
        json!({"compressed": true, "items": [1, 2, 3], "message": "hello"})
    );

    assert_eq!(
        compressed,
        get_bytes(&live, "/gzip").await,
        "gzip bytes are deterministic"
    );
}

#[tokio::test]
async fn chunked_arrives_chunked_from_live_and_whole_from_shadow() {
    let (live, shadow) = both().await;

    let live_raw = raw_get(&live, "/chunked").await;
    let (live_head, live_body) = split_response(&live_raw);
    assert!(
        live_head.contains(&"transfer-encoding: chunked".to_owned()),
        "{live_head:?}"
    );
    assert!(
        !live_head
            .iter()
            .any(|line| line.starts_with("content-length"))
    );
    let chunks = dechunk(live_body);
    assert!(chunks.len() >= 3, "{chunks:?}");

    let shadow_raw = raw_get(&shadow, "/chunked").await;
    let (shadow_head, shadow_body) = split_response(&shadow_raw);
    assert!(shadow_head.contains(&format!("content-length: {}", shadow_body.len())));
    assert!(
        !shadow_head
            .iter()
            .any(|line| line.starts_with("transfer-encoding"))
    );

    assert_eq!(chunks.concat(), shadow_body);
    let document: Value = serde_json::from_str(shadow_body).unwrap();
    assert_eq!(document["count"], 3);
}

#[tokio::test]
async fn status_returns_the_requested_code() {
    let live = Running::start(Mode::Live).await;

    let response = get(&live, "/status/503").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": 503})
    );

    let response = get(&live, "/status/204").await;
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty());

    for bad in ["/status/99", "/status/600", "/status/abc"] {
        assert_eq!(get(&live, bad).await.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn echo_reflects_a_post_body_and_headers() {
    let live = Running::start(Mode::Live).await;
    let echoed: Value = client()
        .post(live.url("/echo?x=1"))
        .header("x-test", "yes")
        .body("hello shadow")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/echo?x=1");
    assert_eq!(echoed["body"], "hello shadow");
    assert_eq!(echoed["body_len"], 12);
    let headers = echoed["headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-test", "yes"])), "{headers:?}");
    assert!(headers.iter().any(|pair| pair[0] == "host"));
}

#[tokio::test]
async fn echo_body_is_identical_across_modes_whatever_the_headers() {
    let (live, shadow) = both().await;
    let send = |server: &Running, marker: &'static str| {
        client()
            .put(server.url("/echo/body?k=v"))
            .header("x-specter-shadow", marker)
            .body("payload")
            .send()
    };

    let live_body = send(&live, "0").await.unwrap().bytes().await.unwrap();
    let shadow_body = send(&shadow, "1").await.unwrap().bytes().await.unwrap();
    assert_eq!(live_body, shadow_body);
    assert_eq!(
        &live_body[..],
        br#"{"method":"PUT","path":"/echo/body?k=v","body":"payload","body_len":7}"#
    );
}

#[tokio::test]
async fn slow_waits_at_least_the_requested_time() {
    let live = Running::start(Mode::Live).await;
    let started = Instant::now();
    let body = get_json(&live, "/slow?ms=50").await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(body, json!({"slept_ms": 50}));

    assert_eq!(get(&live, "/slow").await.status(), 400);
    assert_eq!(get(&live, "/slow?ms=soon").await.status(), 400);
}

#[tokio::test]
async fn upload_reports_length_and_xxh3() {
    let (live, shadow) = both().await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&payload));
    let expected = json!({"received": 200_000, "xxh3": hash});

    for server in [&live, &shadow] {
        let response = client()
            .post(server.url("/upload"))
            .body(payload.clone())
            .send()
            .await;
        assert_eq!(response.unwrap().json::<Value>().await.unwrap(), expected);
    }

    let empty = client().put(live.url("/upload")).send().await.unwrap();
    assert_eq!(empty.json::<Value>().await.unwrap()["received"], 0);
}

#[tokio::test]
async fn noise_changes_every_time_and_value_diverges() {
    let (live, shadow) = both().await;

    let first = get(&live, "/noise").await;
    let header_id = first.headers()["x-request-id"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    let second = get_json(&live, "/noise").await;
    let from_shadow = get_json(&shadow, "/noise").await;

    assert_eq!(first["request_id"], header_id.as_str());
    assert_ne!(first["request_id"], second["request_id"]);
    assert_eq!(header_id.len(), 36);
    let generated_at = first["generated_at"].as_str().unwrap();
    assert!(
        generated_at.ends_with('Z') && generated_at.contains('T'),
        "{generated_at}"
    );
    assert_eq!(first["value"], 42);
    assert_eq!(from_shadow["value"], 43);
}

#[tokio::test]
async fn big_returns_exactly_the_requested_bytes() {
    let (live, shadow) = both().await;
    let body = get_bytes(&live, "/big?bytes=100000").await;
    assert_eq!(body.len(), 100_000);
    assert_eq!(&body[..64], BIG_PATTERN);
    assert_eq!(body, get_bytes(&shadow, "/big?bytes=100000").await);
    assert!(get_bytes(&live, "/big?bytes=0").await.is_empty());
}

#[tokio::test]
async fn whoami_names_the_mode_and_unknown_paths_are_404() {
    let (live, shadow) = both().await;
    assert_eq!(get_json(&live, "/whoami").await, json!({"mode": "live"}));
    assert_eq!(
        get_json(&shadow, "/whoami").await,
        json!({"mode": "shadow"})
    );

    let missing = get(&live, "/nope").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap(),
        json!({"error": "not found", "path": "/nope"})
    );

    let wrong_method = client().delete(live.url("/profile")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD");
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let live = Running::start(Mode::Live).await;
    let mut stream = TcpStream::connect(live.addr).await.unwrap();
    let request = "GET /whoami HTTP/1.1\r\nHost: test\r\n\r\n".repeat(2)
        + "GET /whoami HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 3);
}

#[tokio::test]
async fn serve_returns_when_shutdown_resolves() {
    let live = Running::start(Mode::Live).await;
    let addr = live.addr;
    assert_eq!(get(&live, "/whoami").await.status(), 200);
    live.stop().await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let error = bind(addr).await.unwrap_err();
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}

#[test]
fn civil_date_handles_epoch_leap_days_and_century_rules() {
    assert_eq!(civil_date(0), (1970, 1, 1));
    assert_eq!(civil_date(11_016), (2000, 2, 29));
    assert_eq!(civil_date(19_723), (2024, 1, 1));
    assert_eq!(civil_date(-1), (1969, 12, 31));
    assert_eq!(
        rfc3339(SystemTime::UNIX_EPOCH + Duration::from_micros(86_400_250_017 + 3_723_000_000)),
        "1970-01-02T01:02:03.250017Z"
    );
}

#[test]
fn routes_parse_ids_and_reject_extra_segments() {
    assert_eq!(Route::parse("/users/7"), Route::User("7".into()));
    assert_eq!(Route::parse("/users/"), Route::NotFound);
    assert_eq!(Route::parse("/users/7/extra"), Route::NotFound);
    assert_eq!(Route::parse("/echo/body"), Route::EchoBody);
}
