//! Proxy mode end to end: the real `specter` binary in front of real test servers.
//!
//! Each test states one promise proxy mode makes to a user (clients get exactly what the live
//! service sent, the shadow never slows them down, unsafe methods stay off the shadow, counters
//! survive a restart, ...) and checks it the way the user would: with HTTP requests on the proxy
//! port and reads of the admin API. The processes and fakes come from `support/harness.rs`.

#[path = "support/harness.rs"]
mod harness;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use reqwest::blocking::Client;
use serde_json::Value;
use tempfile::TempDir;

use harness::{
    FakeShadow, ProxyConfig, Relay, Specter, TestServer, accepts, client, closed_addr, counter,
    free_port, raw_request, run_proxy_to_exit,
};

/// What a client sees of one response, minus the `Date` header, which moves with the clock.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    /// Lower-cased names, sorted, so the comparison does not depend on field order.
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn send(client: &Client, method: &str, url: &str, body: Option<&str>) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method");
    let mut request = client.request(method.clone(), url);
    if let Some(body) = body {
        request = request.body(body.to_owned());
    }
    let response = request
        .send()
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let mut headers: Vec<(String, Vec<u8>)> = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != reqwest::header::DATE)
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    headers.sort();
    let body = response
        .bytes()
        .unwrap_or_else(|e| panic!("{method} {url} body: {e}"))
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn get(client: &Client, url: &str) -> Answer {
    send(client, "GET", url, None)
}

/// Turns off the second shadow replays noise learning sends (see docs/analysis.md), for tests
/// that count every request the shadow receives.
const NO_NOISE_REPLAYS: &str = "compare:\n  noise_sample_rate: 0";

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("create a test directory")
}

/// The entry for `route` in the stats' route list.
fn route<'a>(stats: &'a Value, route: &str) -> &'a Value {
    stats["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["route"] == route))
        .unwrap_or_else(|| panic!("no route {route:?} in stats: {:#}", stats["routes"]))
}

/// Events are only read back through the API, so every test reads them the same way.
fn event(specter: &Specter, id: &Value) -> Value {
    specter.api_json(&format!("/api/divergences/{id}"))
}

/// The differences of an event whose kind and path are the given ones.
fn differences_at<'a>(event: &'a Value, kind: &str, path: &str) -> Vec<&'a Value> {
    event["differences"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|d| d["kind"] == kind && d["path"] == path)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn responses_through_proxy_match_live_and_divergences_are_exact() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let specter = Specter::start(dir.path(), ProxyConfig::new(live.url(), shadow.url()));
    let client = client();

    // Ten kinds of request, twenty of each; every one also goes straight to the live server so
    // the proxy's answer can be held against the original.
    let statuses = [200, 201, 204, 404, 500, 503];
    let (mut gets, mut posts, mut divergent) = (0, 0, 0);
    for i in 0..200usize {
        let (method, path, body) = match i % 10 {
            0 => ("GET", "/profile".to_owned(), None),
            1 | 9 => ("GET", format!("/users/{i}"), None),
            2 => ("GET", format!("/orders/{i}"), None),
            3 => (
                "GET",
                format!("/status/{}", statuses[(i / 10) % statuses.len()]),
                None,
            ),
            4 => ("GET", "/gzip".to_owned(), None),
            5 => ("GET", "/chunked".to_owned(), None),
            6 => ("GET", format!("/echo/body?n={i}"), None),
            7 => ("GET", "/slow?ms=5".to_owned(), None),
            _ => (
                "POST",
                "/echo/body".to_owned(),
                Some(format!("{{\"payload\":{i}}}")),
            ),
        };
        let through = send(&client, method, &specter.url(&path), body.as_deref());
        let direct = send(
            &client,
            method,
            &format!("{}{path}", live.url()),
            body.as_deref(),
        );
        assert_eq!(
            through,
            direct,
            "{method} {path}: the proxy's answer differs from the live service's\nproxy: {}\nlive:  {}",
            String::from_utf8_lossy(&through.body),
            String::from_utf8_lossy(&direct.body),
        );
        match method {
            "GET" => gets += 1,
            _ => posts += 1,
        }
        if path == "/profile" || path.starts_with("/orders/") {
            divergent += 1;
        }
    }

    // The live encodings reach the client untouched, not decoded or re-framed into something
    // else: gzip stays gzip.
    let gzip = get(&client, &specter.url("/gzip"));
    assert_eq!(gzip.header("content-encoding"), Some(&b"gzip"[..]));
    assert_eq!(
        &gzip.body[..2],
        &[0x1f, 0x8b],
        "the gzip body arrives compressed"
    );

    let stats = specter.wait_for_stats("every exchange mirrored or skipped", |s| {
        counter(s, "mirrored") + counter(s, "skipped_unsafe") >= 201
    });
    let (gets, posts, divergent) = (gets + 1, posts, divergent);
    assert_eq!(counter(&stats, "seen"), 201, "{stats:#}");
    assert_eq!(counter(&stats, "mirrored"), gets, "{stats:#}");
    assert_eq!(counter(&stats, "skipped_unsafe"), posts, "{stats:#}");
    assert_eq!(
        counter(&stats, "matched") + counter(&stats, "diverged") + counter(&stats, "shadow_errors"),
        counter(&stats, "mirrored"),
        "{stats:#}"
    );
    assert_eq!(
        counter(&stats, "diverged"),
        divergent,
        "only /profile and /orders diverge"
    );
    assert_eq!(counter(&stats, "shadow_errors"), 0, "{stats:#}");
    for name in [
        "sampled_out",
        "truncated",
        "incomplete",
        "shadow_dropped",
        "live_errors",
    ] {
        assert_eq!(counter(&stats, name), 0, "{name}: {stats:#}");
    }

    let users = route(&stats, "GET /users/{id}");
    assert_eq!(users["mirrored"], 40, "{users:#}");
    assert_eq!(users["matched"], 40, "{users:#}");
    // Gzip against identity and chunked against Content-Length are the same content.
    for same_content in ["GET /gzip", "GET /chunked"] {
        let figures = route(&stats, same_content);
        assert_eq!(figures["matched"], figures["mirrored"], "{figures:#}");
        assert_eq!(figures["diverged"], 0, "{figures:#}");
    }
    assert_eq!(route(&stats, "GET /orders/{id}")["diverged"], 20);
    assert_eq!(route(&stats, "GET /profile")["diverged"], 20);

    // The route filter takes the route exactly as the stats name it.
    let orders = specter.wait_for_divergences("route=GET%20/orders/%7Bid%7D", 20);
    assert_eq!(
        orders.len(),
        20,
        "every /orders request diverged once: {orders:#?}"
    );
    assert!(
        orders.iter().all(|o| o["route"] == "GET /orders/{id}"),
        "{orders:#?}"
    );

    let order = event(&specter, &orders[0]["id"]);
    assert_eq!(order["outcome"], "diverged", "{order:#}");
    assert_eq!(order["method"], "GET");
    assert!(
        order["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("/orders/")),
        "{order:#}"
    );
    // `qty` is 2 on live and 2.0 on shadow: equal numbers, so `/total` is the only difference.
    let differences = order["differences"].as_array().expect("differences");
    assert_eq!(differences.len(), 1, "{order:#}");
    let total = &differences[0];
    assert_eq!(total["kind"], "body");
    assert_eq!(total["path"], "/total");
    assert_eq!(total["op"], "changed");
    assert_eq!(total["live"].as_f64(), Some(19.0), "{total:#}");
    assert_eq!(total["shadow"].as_f64(), Some(19.5), "{total:#}");

    let profiles = specter.wait_for_divergences("route=GET%20/profile", 20);
    let profile = event(&specter, &profiles[0]["id"]);
    let added = differences_at(&profile, "body", "/beta_features");
    assert_eq!(added.len(), 1, "{profile:#}");
    assert_eq!(added[0]["op"], "added");
    assert_eq!(added[0]["shadow"], true);
    assert!(
        added[0].get("live").is_none(),
        "an added field has no live value: {profile:#}"
    );
    assert_eq!(
        profile["differences"].as_array().map(Vec::len),
        Some(1),
        "{profile:#}"
    );
}

#[test]
fn shadow_down_changes_nothing_for_clients() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = closed_addr();
    let specter = Specter::start(
        dir.path(),
        ProxyConfig::new(live.url(), format!("http://{shadow}")),
    );
    let client = client();

    let paths = ["/users/1", "/orders/2", "/profile", "/status/404", "/gzip"];
    for i in 0..20 {
        let path = paths[i % paths.len()];
        let through = get(&client, &specter.url(path));
        let direct = get(&client, &format!("{}{path}", live.url()));
        assert_eq!(
            through, direct,
            "GET {path} through the proxy with the shadow down"
        );
    }

    let stats = specter.wait_for_stats("20 replays failed", |s| counter(s, "mirrored") >= 20);
    assert_eq!(counter(&stats, "seen"), 20, "{stats:#}");
    assert_eq!(counter(&stats, "mirrored"), 20, "{stats:#}");
    assert_eq!(counter(&stats, "shadow_errors"), 20, "{stats:#}");
    assert_eq!(
        counter(&stats, "matched") + counter(&stats, "diverged"),
        0,
        "{stats:#}"
    );
    assert_eq!(counter(&stats, "live_errors"), 0, "{stats:#}");

    let failures = specter.wait_for_divergences("", 20);
    assert!(
        failures.iter().all(|f| f["outcome"] == "shadow_error"),
        "{failures:#?}"
    );
    let failure = event(&specter, &failures[0]["id"]);
    assert_eq!(failure["outcome"], "shadow_error", "{failure:#}");
    let error = failure["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&shadow.to_string()),
        "the error names the shadow address {shadow}: {failure:#}"
    );
    assert!(
        failure["shadow"].is_null(),
        "no shadow response was recorded: {failure:#}"
    );
    let live_status = if failure["target"] == "/status/404" {
        404
    } else {
        200
    };
    assert_eq!(
        failure["live"]["status"], live_status,
        "the live answer is kept: {failure:#}"
    );
}

#[test]
fn slow_shadow_does_not_delay_clients() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow_delay = Duration::from_secs(2);
    let shadow = FakeShadow::start(shadow_delay);
    let config = ProxyConfig::new(live.url(), shadow.url()).section("replay:\n  timeout: 300ms");
    let specter = Specter::start(dir.path(), config);
    let client = client();

    // Waiting for the shadow, even only up to the replay timeout, would take 20 × 300 ms = 6 s.
    let started = Instant::now();
    for i in 0..20 {
        let answer = get(&client, &specter.url(&format!("/users/{i}")));
        assert_eq!(answer.status, 200);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1500),
        "20 requests took {elapsed:?} with a shadow that answers after {shadow_delay:?}"
    );

    let stats = specter.wait_for_stats("20 replays timed out", |s| counter(s, "mirrored") >= 20);
    assert_eq!(counter(&stats, "shadow_errors"), 20, "{stats:#}");
    assert_eq!(counter(&stats, "mirrored"), 20, "{stats:#}");

    let failures = specter.wait_for_divergences("", 20);
    for failure in &failures {
        let error = failure["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("did not answer within 300ms")
                && error.contains(&shadow.addr.to_string()),
            "a timeout names the shadow and the limit: {failure:#}"
        );
    }
}

#[test]
fn unsafe_methods_are_not_replayed_unless_configured() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let client = client();

    // Default methods: only the GET reaches the shadow.
    // This test counts every request the shadow receives, so noise learning's second replays
    // (compare.noise_sample_rate) are off.
    let shadow = FakeShadow::start(Duration::ZERO);
    let config = ProxyConfig::new(live.url(), shadow.url()).section(NO_NOISE_REPLAYS);
    let specter = Specter::start(dir.path(), config);
    for method in ["POST", "PUT", "DELETE"] {
        let answer = send(
            &client,
            method,
            &specter.url("/echo/body"),
            Some("do not repeat me"),
        );
        assert_eq!(answer.status, 200, "{method} reaches the live service");
    }
    assert_eq!(get(&client, &specter.url("/users/1")).status, 200);
    // An exchange reaches the pipeline just after its client has the answer: wait for all four.
    let stats = specter.wait_for_stats("the GET replayed", |s| {
        counter(s, "seen") == 4 && counter(s, "mirrored") >= 1
    });
    assert_eq!(counter(&stats, "seen"), 4, "{stats:#}");
    assert_eq!(counter(&stats, "skipped_unsafe"), 3, "{stats:#}");
    assert_eq!(counter(&stats, "mirrored"), 1, "{stats:#}");
    let received: Vec<_> = shadow
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.target.clone()))
        .collect();
    assert_eq!(received, [("GET".to_owned(), "/users/1".to_owned())]);
    drop(specter);

    // With POST configured, the POST is replayed: same target and body, the shadow's own Host,
    // the replay mark, and none of the client's hop-by-hop headers.
    let shadow = FakeShadow::start(Duration::ZERO);
    let config =
        ProxyConfig::new(live.url(), shadow.url()).section("replay:\n  methods: [GET, POST]");
    let specter = Specter::start(dir.path(), config);
    let body = r#"{"order":42,"note":"replay me"}"#;
    let request = format!(
        "POST /echo/body?x=1&y=two HTTP/1.1\r\n\
         Host: shop.example\r\n\
         Connection: keep-alive, X-Hop\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         X-Hop: only-for-this-connection\r\n\
         X-Custom: kept\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         \r\n{body}",
        body.len()
    );
    let answer = raw_request(specter.proxy, request.as_bytes());
    assert!(answer.status_line.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(
        send(&client, "PUT", &specter.url("/echo/body"), Some("not this")).status,
        200
    );

    let stats = specter.wait_for_stats("the POST replayed", |s| {
        counter(s, "seen") == 2 && counter(s, "mirrored") >= 1
    });
    assert_eq!(counter(&stats, "mirrored"), 1, "{stats:#}");
    assert_eq!(
        counter(&stats, "skipped_unsafe"),
        1,
        "the PUT is still skipped: {stats:#}"
    );

    let received = shadow.requests();
    assert_eq!(received.len(), 1, "{received:#?}");
    let replay = &received[0];
    assert_eq!(replay.method, "POST");
    assert_eq!(replay.target, "/echo/body?x=1&y=two");
    assert_eq!(replay.body, body.as_bytes());
    assert_eq!(replay.header("x-specter-shadow"), Some("1"), "{replay:#?}");
    assert_eq!(
        replay.header("host"),
        Some(shadow.addr.to_string().as_str()),
        "{replay:#?}"
    );
    assert_eq!(replay.header("x-custom"), Some("kept"), "{replay:#?}");
    assert_eq!(
        replay.header("content-type"),
        Some("application/json"),
        "{replay:#?}"
    );
    assert_eq!(
        replay.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    for hop in ["connection", "keep-alive", "te", "x-hop"] {
        assert_eq!(
            replay.header(hop),
            None,
            "hop-by-hop {hop} was replayed: {replay:#?}"
        );
    }
}

#[test]
fn sampling_keeps_each_routing_key_whole() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    // This test counts every request the shadow receives, so noise learning's second replays
    // (compare.noise_sample_rate) are off.
    let shadow = FakeShadow::start(Duration::ZERO);
    let config = ProxyConfig::new(live.url(), shadow.url())
        .specter_key("routing_key: X-User-ID")
        .section("sampling:\n  rate: 0.5")
        .section(NO_NOISE_REPLAYS);
    let specter = Specter::start(dir.path(), config);
    let client = client();

    let (keys, per_key) = (40, 5);
    for round in 0..per_key {
        for key in 0..keys {
            let response = client
                .get(specter.url(&format!("/users/{key}?round={round}")))
                .header("X-User-ID", format!("user-{key}"))
                .send()
                .expect("request through the proxy");
            assert_eq!(response.status(), 200);
        }
    }

    let total = keys * per_key;
    let stats = specter.wait_for_stats("every exchange mirrored or sampled out", |s| {
        counter(s, "mirrored") + counter(s, "sampled_out") >= total
    });
    assert_eq!(counter(&stats, "seen"), total, "{stats:#}");
    assert_eq!(
        counter(&stats, "mirrored") + counter(&stats, "sampled_out"),
        total,
        "{stats:#}"
    );

    let mut replayed: BTreeMap<String, u64> = BTreeMap::new();
    for request in shadow.requests() {
        let key = request
            .header("x-user-id")
            .expect("the routing key is replayed")
            .to_owned();
        *replayed.entry(key).or_default() += 1;
    }
    assert_eq!(replayed.values().sum::<u64>(), counter(&stats, "mirrored"));
    for (key, count) in &replayed {
        assert_eq!(*count, per_key, "{key} was split by sampling: {replayed:?}");
    }
    let kept = replayed.len() as u64;
    assert!(
        kept > 0 && kept < keys,
        "{kept} of {keys} keys kept at rate 0.5: {replayed:?}"
    );
    assert_eq!(
        counter(&stats, "sampled_out"),
        (keys - kept) * per_key,
        "{stats:#}"
    );
}

#[test]
fn counters_and_events_survive_restart() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let mut specter = Specter::start(dir.path(), ProxyConfig::new(live.url(), shadow.url()));
    let client = client();

    for i in 0..10 {
        assert_eq!(
            get(&client, &specter.url(&format!("/users/{i}"))).status,
            200
        );
        assert_eq!(
            get(&client, &specter.url(&format!("/orders/{i}"))).status,
            200
        );
    }
    for _ in 0..5 {
        assert_eq!(
            send(&client, "POST", &specter.url("/echo/body"), Some("x")).status,
            200
        );
    }
    specter.wait_for_stats("traffic settled", |s| {
        counter(s, "mirrored") >= 20 && counter(s, "skipped_unsafe") >= 5
    });
    let divergences = specter.wait_for_divergences("", 10);
    let before = specter.stats();
    let id = divergences[0]["id"].clone();
    let kept_event = event(&specter, &id);
    let fields_path = "/api/routes/GET%20%2Forders%2F%7Bid%7D/fields";
    let fields_before = specter.api_json(fields_path);
    assert!(
        fields_before["compared"].as_u64() >= Some(10),
        "{fields_before:#}"
    );

    specter.stop();
    specter.restart();

    // What noise learning counted is kept too (SIGTERM saves the field tables as they are).
    assert_eq!(
        specter.api_json(fields_path),
        fields_before,
        "field tables after a restart"
    );

    let after = specter.stats();
    assert_eq!(
        after["exchanges"], before["exchanges"],
        "counters after a restart"
    );
    assert_eq!(after["routes"], before["routes"], "routes after a restart");
    assert_eq!(
        after["latency"], before["latency"],
        "latency after a restart"
    );
    assert_eq!(
        event(&specter, &id),
        kept_event,
        "event {id} after a restart"
    );

    // New events continue the numbering instead of overwriting the ones kept.
    assert_eq!(get(&client, &specter.url("/orders/99")).status, 200);
    let divergences = specter.wait_for_divergences("", 11);
    let newest = &divergences[0];
    assert_eq!(newest["target"], "/orders/99", "{divergences:#?}");
    let old_max = divergences[1..]
        .iter()
        .filter_map(|d| d["id"].as_u64())
        .max();
    assert!(newest["id"].as_u64() > old_max, "{divergences:#?}");
    assert_eq!(
        event(&specter, &id),
        kept_event,
        "event {id} after new traffic"
    );
    assert_eq!(
        counter(&specter.stats(), "seen"),
        counter(&before, "seen") + 1
    );
}

#[test]
fn bad_config_names_the_bad_key() {
    let dir = tempdir();
    let cases: [(&str, &str, &[&str]); 3] = [
        (
            "sampling:\n  rat: 0.5\n",
            "an unknown key",
            &["sampling.rat"],
        ),
        (
            "sampling:\n  rate: 2.0\n",
            "a rate out of range",
            &["sampling.rate", "0.0 to 1.0"],
        ),
        (
            "replay:\n  timeout: fast\n",
            "a duration that is not one",
            &["replay.timeout", "fast"],
        ),
    ];
    for (section, what, expected) in cases {
        let (listen, api) = (free_port(), free_port());
        let yaml = format!(
            "specter:\n  listen: 127.0.0.1:{listen}\n  live_target: http://127.0.0.1:1\n  \
             shadow_target: http://127.0.0.1:2\nstore:\n  path: {}\napi:\n  listen: 127.0.0.1:{api}\n\
             {section}",
            dir.path().join("store.redb").display()
        );
        let started = Instant::now();
        let (status, stderr) = run_proxy_to_exit(dir.path(), &yaml, Duration::from_secs(10));
        assert!(
            !status.success(),
            "a config with {what} was accepted:\n{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "rejecting {what} took long"
        );
        for needle in expected {
            assert!(
                stderr.contains(needle),
                "the error for {what} does not say {needle:?}:\n{stderr}"
            );
        }
        for port in [listen, api] {
            assert!(
                !accepts(([127, 0, 0, 1], port).into()),
                "port {port} listens after {what}"
            );
        }
    }
}

#[test]
fn command_line_mistakes_exit_with_the_documented_codes() {
    let run = |args: &[&str]| {
        let output = std::process::Command::new(harness::SPECTER)
            .args(args)
            .output()
            .expect("run specter");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Under `verdict`, 2 means "not enough evidence yet": a typo must not read as that.
    for args in [
        &["verdict", "--scope", "clust"][..],
        &["verdict", "--min-samples", "abc"],
        &["--log-format", "json", "verdict", "--bogus"],
        &["--log-format", "xml", "verdict"],
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(3), "specter {args:?}:\n{stderr}");
        assert!(!stderr.is_empty(), "specter {args:?} says nothing");
    }
    let (code, stderr) = run(&["proxy", "--bogus"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
    assert_eq!(run(&["--help"]).0, Some(0));
}

/// The server the postgres tests use when `SPECTER_TEST_POSTGRES_DSN` is not set: the one
/// `.ci/run` starts.
const DEFAULT_POSTGRES_DSN: &str =
    "host=127.0.0.1 user=postgres password=postgres dbname=specter_test";

/// The test PostgreSQL server's address, and a DSN for the same user and database through
/// `relay_port` on loopback instead.
fn postgres_through(relay_port: u16) -> (std::net::SocketAddr, String) {
    use std::net::ToSocketAddrs as _;
    use tokio_postgres::config::Host;

    let dsn = std::env::var("SPECTER_TEST_POSTGRES_DSN")
        .unwrap_or_else(|_| DEFAULT_POSTGRES_DSN.to_owned());
    let config: tokio_postgres::Config = dsn.parse().expect("SPECTER_TEST_POSTGRES_DSN");
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let server = (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve the test PostgreSQL host {host}"));
    let quoted = |value: &[u8]| {
        let text = String::from_utf8_lossy(value);
        format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
    };
    let mut relayed = format!("host=127.0.0.1 port={relay_port}");
    if let Some(user) = config.get_user() {
        relayed.push_str(&format!(" user={}", quoted(user.as_bytes())));
    }
    if let Some(password) = config.get_password() {
        relayed.push_str(&format!(" password={}", quoted(password)));
    }
    if let Some(dbname) = config.get_dbname() {
        relayed.push_str(&format!(" dbname={}", quoted(dbname.as_bytes())));
    }
    (server, relayed)
}

#[test]
fn stats_keep_answering_while_a_postgres_store_is_down() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let relay_port = free_port();
    let (server, dsn) = postgres_through(relay_port);
    let relay = Relay::start_on(relay_port, server);
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, "a secret for one node").unwrap();
    // A cluster of one, only to give this run's rows a node name of their own.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let config = ProxyConfig::new(live.url(), shadow.url())
        .store(&format!(
            "  backend: postgres\n  postgres_dsn: {}",
            serde_json::Value::from(dsn)
        ))
        .section(&format!(
            "cluster:\n  node_name: stats-outage-{nanos}\n  bind_addr: 127.0.0.1:{}\n  \
             forward_addr: 127.0.0.1:{}\n  secret_file: {}",
            free_port(),
            free_port(),
            secret.display()
        ));
    let specter = Specter::start(dir.path(), config);
    let client = client();

    assert_eq!(get(&client, &specter.url("/orders/1")).status, 200);
    let stats = specter.wait_for_stats("the divergence stored", |s| {
        s["recent_divergences"]
            .as_array()
            .is_some_and(|list| list.len() == 1)
    });
    assert!(stats["recent_divergences_error"].is_null(), "{stats:#}");

    // PostgreSQL goes away: clients still get their answers, and /api/stats still shows the
    // counters, saying why the recent divergences are missing.
    relay.cut();
    let through = get(&client, &specter.url("/orders/2"));
    assert_eq!(through, get(&client, &format!("{}/orders/2", live.url())));
    let stats = specter.wait_for_stats("the stats during the outage", |s| {
        counter(s, "mirrored") == 2 && s["recent_divergences_error"].is_string()
    });
    assert_eq!(counter(&stats, "seen"), 2, "{stats:#}");
    assert_eq!(stats["recent_divergences"], serde_json::json!([]));
    let error = stats["recent_divergences_error"].as_str().unwrap();
    assert!(error.contains("store read failed"), "{error}");

    // The list itself cannot be had: that is a 503 that says why.
    let url = format!("http://{}/api/divergences", specter.api);
    let response = client.get(&url).send().unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.text().unwrap().contains("store read failed"));
}

#[test]
fn malformed_request_gets_400_and_proxy_survives() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let specter = Specter::start(dir.path(), ProxyConfig::new(live.url(), shadow.url()));
    let client = client();

    let malformed: [&[u8]; 3] = [
        b"GARBAGE\r\n\r\n",
        b"GET /users/1 2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /users/1 HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
    ];
    for bytes in malformed {
        let answer = raw_request(specter.proxy, bytes);
        assert!(
            answer.status_line.starts_with("HTTP/1.1 400"),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(bytes)
        );
    }

    let through = get(&client, &specter.url("/users/1"));
    assert_eq!(through, get(&client, &format!("{}/users/1", live.url())));
    let stats =
        specter.wait_for_stats("the good request mirrored", |s| counter(s, "mirrored") >= 1);
    assert_eq!(
        counter(&stats, "seen"),
        1,
        "malformed requests are not exchanges: {stats:#}"
    );
    assert_eq!(counter(&stats, "matched"), 1, "{stats:#}");

    // A request with 300 header fields, three times what many servers take, goes through and
    // is mirrored like any other.
    let mut wide = b"GET /users/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for n in 0..300 {
        wide.extend_from_slice(format!("X-Extra-{n}: {n}\r\n").as_bytes());
    }
    wide.extend_from_slice(b"\r\n");
    let answer = raw_request(specter.proxy, &wide);
    assert!(answer.status_line.starts_with("HTTP/1.1 200"), "{answer:?}");
    let stats =
        specter.wait_for_stats("the wide request mirrored", |s| counter(s, "mirrored") >= 2);
    assert_eq!(counter(&stats, "matched"), 2, "{stats:#}");

    // With the live service down the client gets a 502 that says which service failed.
    let down = closed_addr();
    let specter = Specter::start(
        dir.path(),
        ProxyConfig::new(format!("http://{down}"), shadow.url()),
    );
    let answer = get(&client, &specter.url("/users/1"));
    assert_eq!(answer.status, 502);
    let content_type = String::from_utf8_lossy(answer.header("content-type").unwrap_or_default());
    assert!(content_type.starts_with("text/plain"), "{answer:?}");
    let text = String::from_utf8_lossy(&answer.body);
    assert!(
        text.contains(&down.to_string()),
        "the 502 names the live address {down}: {text}"
    );
    let stats = specter.stats();
    assert_eq!(counter(&stats, "live_errors"), 1, "{stats:#}");
    assert_eq!(
        counter(&stats, "mirrored"),
        0,
        "a failed live request is not replayed: {stats:#}"
    );
}

#[test]
fn graceful_shutdown_drains_replays() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    // This test counts every request the shadow receives, so noise learning's second replays
    // (compare.noise_sample_rate) are off.
    let shadow = FakeShadow::start(Duration::from_millis(500));
    let config = ProxyConfig::new(live.url(), shadow.url())
        .specter_key("drain_timeout: 5s")
        .section(NO_NOISE_REPLAYS);
    let mut specter = Specter::start(dir.path(), config);
    let client = client();

    for i in 0..10 {
        assert_eq!(
            get(&client, &specter.url(&format!("/users/{i}"))).status,
            200
        );
    }
    let stopping = Instant::now();
    specter.terminate();
    let status = specter.wait_exit(Duration::from_secs(8));
    assert!(
        status.success(),
        "specter exited with {status}:\n{}",
        specter.log_text()
    );
    // The last replay was answered 500 ms after it was sent, which was just before SIGTERM: a
    // quicker exit would mean the process did not wait for it.
    let stop_took = stopping.elapsed();
    assert!(
        stop_took >= Duration::from_millis(400),
        "exited after {stop_took:?}, before the shadow answered"
    );
    assert!(
        stop_took < Duration::from_secs(5),
        "stopping took {stop_took:?}, past the drain deadline"
    );
    assert_eq!(
        shadow.requests().len(),
        10,
        "every replay reached the shadow"
    );

    specter.restart();
    let stats = specter.stats();
    assert_eq!(counter(&stats, "seen"), 10, "{stats:#}");
    assert_eq!(
        counter(&stats, "mirrored"),
        10,
        "replays in flight at SIGTERM: {stats:#}"
    );
    assert_eq!(
        counter(&stats, "shadow_errors"),
        0,
        "no replay was cut off: {stats:#}"
    );
    assert_eq!(counter(&stats, "shadow_dropped"), 0, "{stats:#}");
    assert_eq!(
        counter(&stats, "matched") + counter(&stats, "diverged"),
        10,
        "{stats:#}"
    );
}

#[test]
fn bodies_over_the_cap_are_proxied_whole_but_not_compared() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    // This test counts every request the shadow receives, so noise learning's second replays
    // (compare.noise_sample_rate) are off.
    let shadow = FakeShadow::start(Duration::ZERO);
    let config = ProxyConfig::new(live.url(), shadow.url())
        .section("capture:\n  max_body_bytes: 1024")
        .section(NO_NOISE_REPLAYS);
    let specter = Specter::start(dir.path(), config);
    let client = client();

    let big = get(&client, &specter.url("/big?bytes=5000"));
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), 5000, "the client gets the whole body");
    assert_eq!(get(&client, &specter.url("/big?bytes=100")).status, 200);

    let stats = specter.wait_for_stats("both exchanges", |s| {
        counter(s, "truncated") + counter(s, "mirrored") >= 2
    });
    assert_eq!(counter(&stats, "truncated"), 1, "{stats:#}");
    assert_eq!(counter(&stats, "mirrored"), 1, "{stats:#}");
    let replayed: Vec<String> = shadow.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        replayed,
        ["/big?bytes=100"],
        "a truncated exchange is never replayed"
    );
}

#[test]
fn divergence_only_stores_just_the_divergent_exchanges() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let config =
        ProxyConfig::new(live.url(), shadow.url()).section("sampling:\n  divergence_only: true");
    let specter = Specter::start(dir.path(), config);
    let client = client();

    for path in ["/users/1", "/users/2", "/profile", "/users/3"] {
        assert_eq!(get(&client, &specter.url(path)).status, 200);
    }
    let stats = specter.wait_for_stats("four comparisons", |s| counter(s, "mirrored") >= 4);
    assert_eq!(
        (counter(&stats, "matched"), counter(&stats, "diverged")),
        (3, 1)
    );

    let divergent = specter.wait_for_divergences("limit=100", 1);
    assert_eq!(divergent.len(), 1);
    let id = divergent[0]["id"].as_u64().unwrap();
    // Matched exchanges were never written: the ids around the divergence do not exist.
    for other in (1..=6).filter(|n| *n != id) {
        let url = format!("http://{}/api/divergences/{other}", specter.api);
        let response = client.get(url).send().unwrap();
        assert_eq!(response.status().as_u16(), 404, "event {other} was stored");
    }
}
