//! `GET /metrics` end to end: a real `specter proxy` scraped the way Prometheus scrapes it.
//!
//! Each test sends known traffic through the proxy and reads `/metrics` with a strict
//! OpenMetrics parser, so a malformed exposition fails here before it fails in a Prometheus
//! server. The processes come from `support/harness.rs`.

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeMap;

use openmetrics_parser::{HistogramValue, OpenMetricsType, OpenMetricsValue, openmetrics};
use reqwest::blocking::Client;
use tempfile::TempDir;

use harness::{ProxyConfig, SETTLE_DEADLINE, Specter, TestServer, client, closed_addr, wait_until};

/// The results of `specter_exchanges_total` that an exchange handed to the pipeline ends in.
const PIPELINE_RESULTS: [&str; 8] = [
    "matched",
    "diverged",
    "shadow_error",
    "skipped_unsafe",
    "sampled_out",
    "truncated",
    "incomplete",
    "dropped",
];

/// One sample: its labels and its value.
type Sample = (BTreeMap<String, String>, OpenMetricsValue);

/// One parsed scrape: family name to its type and samples.
struct Scrape {
    families: BTreeMap<String, (OpenMetricsType, Vec<Sample>)>,
}

impl Scrape {
    /// GETs `/metrics`, checks the media type and parses the body strictly.
    fn of(specter: &Specter, client: &Client) -> Self {
        let url = format!("http://{}/metrics", specter.api);
        let response = client
            .get(&url)
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(response.status(), 200, "GET {url}");
        let media_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(
            media_type.as_deref(),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let text = response.text().expect("the /metrics body");

        let exposition = openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics ({e}):\n{text}"));
        let families = exposition
            .families
            .into_iter()
            .map(|(name, family)| {
                let samples = family
                    .iter_samples()
                    .map(|sample| {
                        let labels = sample
                            .get_labelset()
                            .expect("a parsed sample has label names")
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        (labels, sample.value.clone())
                    })
                    .collect();
                (name, (family.family_type, samples))
            })
            .collect();
        Self { families }
    }

    fn kind(&self, family: &str) -> OpenMetricsType {
        self.families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family}"))
            .0
    }

    /// The value of the sample of `family` carrying all of `labels`; 0 for a labelled sample
    /// that does not exist yet (a route not seen before).
    fn value(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, samples) = self
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family}"));
        let found = samples.iter().find(|(have, _)| {
            labels
                .iter()
                .all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
        });
        match found.map(|(_, value)| value) {
            Some(OpenMetricsValue::Counter(c)) => c.value.as_f64(),
            Some(OpenMetricsValue::Gauge(n)) => n.as_f64(),
            Some(other) => panic!("{family} {labels:?} is not a number: {other:?}"),
            None if labels.is_empty() => panic!("{family} has no sample"),
            None => 0.0,
        }
    }

    fn result(&self, result: &str) -> f64 {
        self.value("specter_exchanges", &[("result", result)])
    }

    fn route(&self, route: &str, result: &str) -> f64 {
        self.value(
            "specter_route_exchanges",
            &[("route", route), ("result", result)],
        )
    }

    /// Exchanges that reached a final result in the pipeline.
    fn settled(&self) -> f64 {
        PIPELINE_RESULTS.iter().map(|r| self.result(r)).sum()
    }

    fn histogram(&self, family: &str) -> HistogramValue {
        assert_eq!(self.kind(family), OpenMetricsType::Histogram, "{family}");
        match &self.families[family].1[..] {
            [(_, OpenMetricsValue::Histogram(h))] => h.clone(),
            other => panic!("{family} should be one histogram, got {other:?}"),
        }
    }
}

/// Asserts the histogram is well formed and returns its count.
fn checked_count(family: &str, h: &HistogramValue) -> u64 {
    let counts: Vec<f64> = h.buckets.iter().map(|b| b.count.as_f64()).collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "{family}: buckets are not cumulative: {counts:?}"
    );
    let bounds: Vec<f64> = h.buckets.iter().map(|b| b.upper_bound).collect();
    assert!(
        bounds.windows(2).all(|w| w[0] < w[1]),
        "{family}: bounds are not increasing: {bounds:?}"
    );
    let inf = h.buckets.last().expect("an +Inf bucket");
    assert_eq!(inf.upper_bound, f64::INFINITY, "{family}");
    let count = h.count.expect("a _count");
    assert_eq!(
        inf.count.as_f64(),
        count as f64,
        "{family}: +Inf bucket against _count"
    );
    count
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("create a test directory")
}

/// Polls `/metrics` until `done` holds for a scrape, and returns that scrape.
fn wait_for(
    specter: &Specter,
    client: &Client,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    wait_until(what, SETTLE_DEADLINE, || {
        let scrape = Scrape::of(specter, client);
        done(&scrape).then_some(scrape)
    })
}

#[test]
fn metrics_move_with_the_traffic_through_the_proxy() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let config = ProxyConfig::new(live.url(), shadow.url());
    let specter = Specter::start(dir.path(), config);
    let client = client();

    let before = Scrape::of(&specter, &client);
    let families = [
        ("specter_up", OpenMetricsType::Gauge),
        ("specter_uptime_seconds", OpenMetricsType::Gauge),
        ("specter", OpenMetricsType::Info),
        ("specter_exchanges_seen", OpenMetricsType::Counter),
        ("specter_exchanges", OpenMetricsType::Counter),
        ("specter_live_latency_seconds", OpenMetricsType::Histogram),
        ("specter_shadow_latency_seconds", OpenMetricsType::Histogram),
        ("specter_store_dropped", OpenMetricsType::Counter),
    ];
    for (name, kind) in families {
        assert_eq!(before.kind(name), kind, "type of {name}");
    }
    assert!(
        !before
            .families
            .keys()
            .any(|n| n.starts_with("specter_capture")),
        "proxy mode exports no capture figures"
    );
    assert_eq!(before.value("specter_up", &[]), 1.0);
    let info = &before.families["specter"].1[0].0;
    let node = specter.stats()["node"]
        .as_str()
        .expect("stats name the node")
        .to_owned();
    assert_eq!(info["node"], node.as_str());
    assert_eq!(info["mode"], "proxy");

    // 6 divergent GETs, 10 matching GETs on one route, 4 POSTs the shadow never sees.
    let (divergent, matching, posts) = (6, 10, 4);
    let paths = (0..divergent)
        .map(|_| "/profile".to_owned())
        .chain((0..matching).map(|i| format!("/users/{i}")));
    for path in paths {
        let response = client
            .get(specter.url(&path))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(response.status(), 200, "GET {path}");
    }
    for i in 0..posts {
        let response = client
            .post(specter.url("/echo/body"))
            .body(format!("{{\"n\":{i}}}"))
            .send()
            .unwrap_or_else(|e| panic!("POST /echo/body: {e}"));
        assert_eq!(response.status(), 200, "POST /echo/body");
    }
    let sent = divergent + matching + posts;
    let (divergent, matching, posts, sent) = (
        f64::from(divergent),
        f64::from(matching),
        f64::from(posts),
        f64::from(sent),
    );

    let after = wait_for(&specter, &client, "every exchange settled", |s| {
        s.settled() - before.settled() >= sent
    });

    let delta = |result: &str| after.result(result) - before.result(result);
    assert_eq!(after.settled() - before.settled(), sent);
    assert_eq!(
        after.value("specter_exchanges_seen", &[]) - before.value("specter_exchanges_seen", &[]),
        sent
    );
    assert_eq!(delta("diverged"), divergent);
    assert_eq!(delta("matched"), matching);
    assert_eq!(delta("skipped_unsafe"), posts);
    for result in [
        "shadow_error",
        "sampled_out",
        "truncated",
        "incomplete",
        "dropped",
        "live_error",
    ] {
        assert_eq!(delta(result), 0.0, "result={result}");
    }

    assert_eq!(
        after.kind("specter_route_exchanges"),
        OpenMetricsType::Counter
    );
    assert_eq!(after.route("GET /profile", "diverged"), divergent);
    assert_eq!(after.route("GET /profile", "matched"), 0.0);
    assert_eq!(after.route("GET /users/{id}", "matched"), matching);
    assert_eq!(after.route("GET /users/{id}", "diverged"), 0.0);

    // Every mirrored exchange has a live latency and, as the shadow always answered, a shadow
    // latency.
    let mirrored = (divergent + matching) as u64;
    let live_count = checked_count(
        "specter_live_latency_seconds",
        &after.histogram("specter_live_latency_seconds"),
    );
    let shadow_count = checked_count(
        "specter_shadow_latency_seconds",
        &after.histogram("specter_shadow_latency_seconds"),
    );
    let live_before = before
        .histogram("specter_live_latency_seconds")
        .count
        .unwrap_or(0);
    let shadow_before = before
        .histogram("specter_shadow_latency_seconds")
        .count
        .unwrap_or(0);
    assert_eq!(live_count - live_before, mirrored);
    assert_eq!(shadow_count - shadow_before, mirrored);

    // The figures agree with the JSON API's.
    let stats = specter.stats();
    assert_eq!(
        stats["exchanges"]["diverged"].as_f64(),
        Some(after.result("diverged"))
    );
    assert_eq!(stats["latency"]["live"]["count"].as_u64(), Some(live_count));
}

#[test]
fn failures_on_either_side_have_their_own_result() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    // A shadow that is down: every mirrored exchange is a shadow error with no shadow latency.
    let specter = Specter::start(
        dir.path(),
        ProxyConfig::new(live.url(), format!("http://{}", closed_addr())),
    );
    let client = client();
    for _ in 0..5 {
        let response = client
            .get(specter.url("/users/1"))
            .send()
            .expect("GET /users/1");
        assert_eq!(response.status(), 200);
    }

    let scrape = wait_for(&specter, &client, "5 shadow errors", |s| {
        s.result("shadow_error") >= 5.0
    });

    assert_eq!(scrape.result("shadow_error"), 5.0);
    assert_eq!(scrape.route("GET /users/{id}", "shadow_error"), 5.0);
    let live_count = checked_count(
        "specter_live_latency_seconds",
        &scrape.histogram("specter_live_latency_seconds"),
    );
    let shadow_count = checked_count(
        "specter_shadow_latency_seconds",
        &scrape.histogram("specter_shadow_latency_seconds"),
    );
    assert_eq!(live_count, 5);
    assert_eq!(shadow_count, 0);

    // A live service that is down: the client gets a 502 and the exchange never reaches the
    // pipeline, so only live_error moves.
    let dir = tempdir();
    let specter = Specter::start(
        dir.path(),
        ProxyConfig::new(format!("http://{}", closed_addr()), live.url()),
    );
    for _ in 0..3 {
        let response = client
            .get(specter.url("/users/1"))
            .send()
            .expect("GET /users/1");
        assert_eq!(response.status(), 502);
    }

    let scrape = Scrape::of(&specter, &client);

    assert_eq!(scrape.result("live_error"), 3.0);
    assert_eq!(scrape.value("specter_exchanges_seen", &[]), 0.0);
    assert_eq!(scrape.settled(), 0.0);
}
