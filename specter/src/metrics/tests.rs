use std::{collections::BTreeMap, time::Duration};

use openmetrics_parser::{
    HistogramValue, MetricNumber, OpenMetricsType, OpenMetricsValue, openmetrics,
};
use serde_json::json;

use super::*;
use crate::{
    compare::noise::NoiseSource,
    event::Outcome,
    profile::{MAX_ROUTES, Tally},
};

/// One sample of a parsed exposition: its labels and value.
type Sample = (BTreeMap<String, String>, OpenMetricsValue);

/// A metric family as a strict OpenMetrics parser read it.
struct Family {
    kind: OpenMetricsType,
    samples: Vec<Sample>,
}

/// Parses `text` as Prometheus would, failing the test on any violation of the format.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let exposition = openmetrics::parse_openmetrics(text)
        .unwrap_or_else(|e| panic!("the exposition is not valid OpenMetrics ({e}):\n{text}"));
    exposition
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
            let parsed = Family {
                kind: family.family_type,
                samples,
            };
            (name, parsed)
        })
        .collect()
}

fn scrape(profile: &Profile, capture: Option<Value>, extra: &[ExtraGauge]) -> String {
    scrape_with_store(profile, capture, StoreHealth::connected(), extra)
}

fn scrape_with_store(
    profile: &Profile,
    capture: Option<Value>,
    store: StoreHealth,
    extra: &[ExtraGauge],
) -> String {
    let sources = Sources {
        node: "node-a",
        mode: if capture.is_some() { "attach" } else { "proxy" },
        profile,
        capture,
        store,
    };
    encode(&sources, extra).expect("the exposition encodes")
}

fn number(value: &OpenMetricsValue) -> f64 {
    match value {
        OpenMetricsValue::Counter(counter) => counter.value.as_f64(),
        OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
        other => panic!("{other:?} is not a single number"),
    }
}

/// The value of the sample of `family` whose labels include all of `labels`.
fn value(families: &BTreeMap<String, Family>, family: &str, labels: &[(&str, &str)]) -> f64 {
    let found = families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}"));
    let sample = found
        .samples
        .iter()
        .find(|(have, _)| {
            labels
                .iter()
                .all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("{family} has no sample with {labels:?}"));
    number(&sample.1)
}

fn histogram<'a>(families: &'a BTreeMap<String, Family>, name: &str) -> &'a HistogramValue {
    let family = &families[name];
    assert_eq!(family.kind, OpenMetricsType::Histogram, "{name}");
    match &family.samples[..] {
        [(_, OpenMetricsValue::Histogram(h))] => h,
        other => panic!("{name} should be one unlabelled histogram, got {other:?}"),
    }
}

fn record(profile: &Profile, route: &str, outcome: Outcome, live_ms: u64) {
    profile.record(
        route,
        outcome,
        Duration::from_millis(live_ms),
        Some(Duration::from_millis(live_ms)),
    );
}

#[test]
fn an_idle_proxy_exports_every_family_with_its_type() {
    let profile = Profile::new();
    let text = scrape(&profile, None, &[]);

    assert!(text.ends_with("# EOF\n"), "no EOF marker:\n{text}");
    let families = parse(&text);
    let expected = [
        ("specter_up", OpenMetricsType::Gauge),
        ("specter_uptime_seconds", OpenMetricsType::Gauge),
        ("specter", OpenMetricsType::Info),
        ("specter_exchanges_seen", OpenMetricsType::Counter),
        ("specter_exchanges", OpenMetricsType::Counter),
        ("specter_live_latency_seconds", OpenMetricsType::Histogram),
        ("specter_shadow_latency_seconds", OpenMetricsType::Histogram),
        ("specter_store_dropped", OpenMetricsType::Counter),
        ("specter_store_up", OpenMetricsType::Gauge),
        ("specter_store_buffered_events", OpenMetricsType::Gauge),
        ("specter_store_backend_dropped", OpenMetricsType::Counter),
        ("specter_exchange_log_dropped", OpenMetricsType::Counter),
    ];
    for (name, kind) in expected {
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in:\n{text}"));
        assert_eq!(family.kind, kind, "type of {name}");
    }
    assert!(
        !families
            .keys()
            .any(|name| name.starts_with("specter_capture")),
        "proxy mode has no capture figures:\n{text}"
    );

    assert_eq!(value(&families, "specter_up", &[]), 1.0);
    let info = &families["specter"].samples[0].0;
    assert_eq!(info["node"], "node-a");
    assert_eq!(info["mode"], "proxy");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert!(text.contains("\nspecter_info{"), "{text}");
    assert!(text.contains("\nspecter_exchanges_total{result=\"matched\"} 0\n"));

    // No route has been seen, so there is no route family yet.
    assert!(!families.contains_key("specter_route_exchanges"));
}

#[test]
fn exchange_counters_follow_the_profile() {
    let profile = Profile::new();
    for _ in 0..12 {
        profile.tally(Tally::Seen);
    }
    record(&profile, "GET /users/{id}", Outcome::Matched, 3);
    record(&profile, "GET /users/{id}", Outcome::Matched, 3);
    record(&profile, "GET /profile", Outcome::Diverged, 3);
    profile.record(
        "GET /profile",
        Outcome::ShadowError,
        Duration::from_millis(2),
        None,
    );
    for tally in [
        Tally::SkippedUnsafe,
        Tally::SampledOut,
        Tally::SampledOut,
        Tally::Truncated,
        Tally::Incomplete,
        Tally::ShadowDropped,
        Tally::ShadowDropped,
        Tally::ShadowDropped,
        Tally::LiveError,
        Tally::StoreDropped,
        Tally::LogDropped,
    ] {
        profile.tally(tally);
    }

    let families = parse(&scrape(&profile, None, &[]));

    let result = |r: &str| value(&families, "specter_exchanges", &[("result", r)]);
    let expected = [
        ("matched", 2.0),
        ("diverged", 1.0),
        ("shadow_error", 1.0),
        ("skipped_unsafe", 1.0),
        ("sampled_out", 2.0),
        ("truncated", 1.0),
        ("incomplete", 1.0),
        ("dropped", 3.0),
        ("live_error", 1.0),
    ];
    for (name, count) in expected {
        assert_eq!(result(name), count, "result={name}");
    }
    assert_eq!(families["specter_exchanges"].samples.len(), expected.len());
    assert_eq!(value(&families, "specter_exchanges_seen", &[]), 12.0);
    assert_eq!(value(&families, "specter_store_dropped", &[]), 1.0);
    assert_eq!(value(&families, "specter_exchange_log_dropped", &[]), 1.0);

    assert_eq!(
        families["specter_route_exchanges"].kind,
        OpenMetricsType::Counter
    );
    let route = |route: &str, r: &str| {
        value(
            &families,
            "specter_route_exchanges",
            &[("route", route), ("result", r)],
        )
    };
    assert_eq!(route("GET /users/{id}", "matched"), 2.0);
    assert_eq!(route("GET /users/{id}", "diverged"), 0.0);
    assert_eq!(route("GET /profile", "diverged"), 1.0);
    assert_eq!(route("GET /profile", "shadow_error"), 1.0);
}

#[test]
fn noise_and_forwarding_counters_follow_the_profile() {
    let profile = Profile::new();
    // A second replay to the shadow that answered with no difference, one to the secondary
    // that failed, and a live repeat (no extra replay, one comparison).
    profile.record_noise("GET /noise", NoiseSource::Shadow, Some(&[]));
    profile.record_noise("GET /noise", NoiseSource::Secondary, None);
    profile.record_noise("GET /noise", NoiseSource::Live, Some(&[]));
    let tallies = [
        (Tally::Forwarded, 5),
        (Tally::ForwardError, 2),
        (Tally::ForwardUnconfirmed, 1),
        (Tally::ForwardReceived, 7),
    ];
    for (tally, times) in tallies {
        for _ in 0..times {
            profile.tally(tally);
        }
    }

    let text = scrape(&profile, None, &[]);
    let families = parse(&text);
    let expected = [
        ("specter_noise_replays", 2.0),
        ("specter_noise_comparisons", 2.0),
        ("specter_cluster_forwarded", 5.0),
        ("specter_cluster_forward_errors", 2.0),
        ("specter_cluster_forward_unconfirmed", 1.0),
        ("specter_cluster_forward_received", 7.0),
    ];
    for (name, count) in expected {
        assert_eq!(
            families[name].kind,
            OpenMetricsType::Counter,
            "type of {name}"
        );
        assert_eq!(value(&families, name, &[]), count, "{name} in:\n{text}");
    }
    // Forwarding is not a result of its own: the mirrored results stay where they were.
    assert_eq!(value(&families, "specter_exchanges_seen", &[]), 0.0);
}

#[test]
fn latency_histograms_are_cumulative_and_count_every_exchange() {
    let profile = Profile::new();
    // Live latencies of 0.5 ms, 3 ms, 30 ms, 2 s and 20 s (past the last bound); the shadow
    // answers only the first three.
    for (ms, shadow) in [
        (0.5, true),
        (3.0, true),
        (30.0, true),
        (2_000.0, false),
        (20_000.0, false),
    ] {
        let live = Duration::from_secs_f64(ms / 1000.0);
        profile.record("GET /", Outcome::Matched, live, shadow.then_some(live / 2));
    }

    let families = parse(&scrape(&profile, None, &[]));
    let live = histogram(&families, "specter_live_latency_seconds");
    let shadow = histogram(&families, "specter_shadow_latency_seconds");

    assert_eq!(live.count, Some(5));
    assert_eq!(shadow.count, Some(3));
    for h in [live, shadow] {
        let counts: Vec<f64> = h.buckets.iter().map(|b| b.count.as_f64()).collect();
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "buckets are not cumulative: {counts:?}"
        );
        let inf = h.buckets.last().expect("an +Inf bucket");
        assert_eq!(inf.upper_bound, f64::INFINITY);
        assert_eq!(inf.count.as_f64(), h.count.expect("a count") as f64);
        assert_eq!(h.buckets.len(), LATENCY_BOUNDS.len() + 1);
    }

    let at = |h: &HistogramValue, bound: f64| {
        h.buckets
            .iter()
            .find(|b| b.upper_bound == bound)
            .map(|b| b.count.as_f64())
            .unwrap_or_else(|| panic!("no bucket le={bound}"))
    };
    assert_eq!(at(live, 0.001), 1.0);
    assert_eq!(at(live, 0.0025), 1.0);
    assert_eq!(at(live, 0.005), 2.0);
    assert_eq!(at(live, 0.05), 3.0);
    assert_eq!(at(live, 2.5), 4.0);
    assert_eq!(at(live, 10.0), 4.0);
    assert_eq!(at(shadow, 0.001), 1.0);
    assert_eq!(at(shadow, 0.025), 3.0);

    // The sum is mean × count from the HDR histogram: close, not exact.
    let sum = live.sum.map(|s| s.as_f64()).expect("a sum");
    let exact = 0.0005 + 0.003 + 0.030 + 2.0 + 20.0;
    assert!(
        (sum - exact).abs() / exact < 0.001,
        "sum {sum} is not within 0.1% of {exact}"
    );
}

#[test]
fn route_labels_stay_bounded_with_500_routes() {
    let profile = Profile::new();
    // Routes are mirrored between 1 and 11 times, so the top list has ties to break.
    for i in 0..500_u64 {
        for _ in 0..=i % 7 + i / 100 {
            record(
                &profile,
                &format!("GET /r{i:03}"),
                if i % 2 == 0 {
                    Outcome::Matched
                } else {
                    Outcome::Diverged
                },
                1,
            );
        }
    }

    let families = parse(&scrape(&profile, None, &[]));
    let samples = &families["specter_route_exchanges"].samples;

    let routes: std::collections::BTreeSet<&str> = samples
        .iter()
        .map(|(labels, _)| labels["route"].as_str())
        .collect();
    assert_eq!(routes.len(), MAX_EXPORTED_ROUTES + 1, "{routes:?}");
    assert!(routes.contains(OTHER_ROUTE));
    assert_eq!(samples.len(), 3 * (MAX_EXPORTED_ROUTES + 1));

    // Folding loses no exchange: the route series add up to the profile's totals.
    let sum = |result: &str| -> f64 {
        samples
            .iter()
            .filter(|(labels, _)| labels["result"] == result)
            .map(|(_, v)| number(v))
            .sum()
    };
    let counters = profile.counters();
    assert_eq!(sum("matched"), counters.matched as f64);
    assert_eq!(sum("diverged"), counters.diverged as f64);

    // The routes kept are the most mirrored: none folded into other was mirrored more often
    // than any kept.
    let view = profile.view();
    let mirrored = |route: &str| {
        view.routes
            .iter()
            .find(|r| r.route == route)
            .map(|r| r.counters.mirrored)
            .expect("an exported route is in the profile")
    };
    let least_kept = routes
        .iter()
        .filter(|r| **r != OTHER_ROUTE)
        .map(|r| mirrored(r))
        .min()
        .expect("routes were kept");
    let most_folded = view
        .routes
        .iter()
        .filter(|r| !routes.contains(r.route.as_str()))
        .map(|r| r.counters.mirrored)
        .max()
        .expect("routes were folded");
    assert!(most_folded <= least_kept);
}

#[test]
fn the_profiles_own_other_route_joins_the_exported_other() {
    let mut routes: Vec<(String, RouteCounters)> = (0..5)
        .map(|i| {
            let counters = RouteCounters {
                mirrored: 10 - i,
                matched: 10 - i,
                ..RouteCounters::default()
            };
            (format!("GET /r{i}"), counters)
        })
        .collect();
    routes.push((
        OTHER_ROUTE.to_owned(),
        RouteCounters {
            mirrored: 100,
            diverged: 100,
            ..RouteCounters::default()
        },
    ));

    let exported = exported_routes(routes, 3);

    let names: Vec<&str> = exported.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(names, ["GET /r0", "GET /r1", "GET /r2", OTHER_ROUTE]);
    let other = exported.last().expect("other is exported").1;
    assert_eq!(other.mirrored, 100 + 7 + 6);
    assert_eq!(other.diverged, 100);
    assert_eq!(other.matched, 7 + 6);
}

#[test]
fn the_profile_cap_and_the_export_cap_together_bound_the_labels() {
    let profile = Profile::new();
    for i in 0..MAX_ROUTES + 50 {
        record(&profile, &format!("GET /r{i}"), Outcome::Matched, 1);
    }

    let families = parse(&scrape(&profile, None, &[]));
    let samples = &families["specter_route_exchanges"].samples;

    assert_eq!(samples.len(), 3 * (MAX_EXPORTED_ROUTES + 1));
    let other = value(
        &families,
        "specter_route_exchanges",
        &[("route", OTHER_ROUTE), ("result", "matched")],
    );
    assert_eq!(other as usize, MAX_ROUTES + 50 - MAX_EXPORTED_ROUTES);
}

#[test]
fn route_labels_with_quotes_and_backslashes_are_escaped() {
    let profile = Profile::new();
    let route = "GET /a\"b\\c";
    record(&profile, route, Outcome::Diverged, 1);

    let families = parse(&scrape(&profile, None, &[]));

    assert_eq!(
        value(
            &families,
            "specter_route_exchanges",
            &[("route", route), ("result", "diverged")]
        ),
        1.0
    );
}

#[test]
fn attach_mode_exports_the_capture_figures() {
    let capture = json!({
        "iface": "eth0",
        "attach_mode": "tc",
        "packets": 1000,
        "bytes": 123_456,
        "ring_drops": 3,
        "truncated": 4,
        "out_of_order": 5,
        "retransmits": 6,
        "gaps": 7,
        "parse_errors": 8,
        "connections_open": 9,
        "exchanges_incomplete": 10,
        "upgrades_skipped": 11,
        "non_http_skipped": 12,
        "http2_skipped": 13,
        "own_traffic_skipped": 14,
        "fragments_skipped": 15,
        "decode_errors": 16,
    });
    let profile = Profile::new();
    let text = scrape(&profile, Some(capture), &[]);
    let families = parse(&text);

    let counters = [
        ("specter_capture_packets", 1000.0),
        ("specter_capture_bytes", 123_456.0),
        ("specter_capture_ring_drops", 3.0),
        ("specter_capture_truncated", 4.0),
        ("specter_capture_out_of_order", 5.0),
        ("specter_capture_retransmits", 6.0),
        ("specter_capture_gaps", 7.0),
        ("specter_capture_parse_errors", 8.0),
        ("specter_capture_exchanges_incomplete", 10.0),
        ("specter_capture_upgrades_skipped", 11.0),
        ("specter_capture_non_http_skipped", 12.0),
        ("specter_capture_http2_skipped", 13.0),
        ("specter_capture_own_traffic_skipped", 14.0),
        ("specter_capture_fragments_skipped", 15.0),
        ("specter_capture_decode_errors", 16.0),
    ];
    for (name, expected) in counters {
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in:\n{text}"));
        assert_eq!(family.kind, OpenMetricsType::Counter, "{name}");
        assert_eq!(value(&families, name, &[]), expected, "{name}");
    }
    assert!(
        text.contains("\nspecter_capture_bytes_total 123456\n"),
        "{text}"
    );
    assert!(
        text.contains("\nspecter_capture_ring_drops_total 3\n"),
        "{text}"
    );

    let open = &families["specter_capture_connections_open"];
    assert_eq!(open.kind, OpenMetricsType::Gauge);
    assert_eq!(
        value(&families, "specter_capture_connections_open", &[]),
        9.0
    );
    assert_eq!(families["specter"].samples[0].0["mode"], "attach");
}

#[test]
fn a_capture_figure_that_is_missing_is_left_out() {
    let profile = Profile::new();
    let families = parse(&scrape(&profile, Some(json!({ "packets": 2 })), &[]));

    assert_eq!(value(&families, "specter_capture_packets", &[]), 2.0);
    assert!(!families.contains_key("specter_capture_ring_drops"));
    assert!(!families.contains_key("specter_capture_connections_open"));
}

#[test]
fn extra_gauges_of_one_name_form_one_family() {
    let gauge = |peer: &str, value: f64| ExtraGauge {
        name: "specter_cluster_peer_up".to_owned(),
        help: "1 while the peer answers.".to_owned(),
        labels: vec![("peer".to_owned(), peer.to_owned())],
        value,
    };
    let extra = [
        gauge("node-b", 1.0),
        ExtraGauge {
            name: "specter_cluster_size".to_owned(),
            help: "Nodes in the cluster.".to_owned(),
            labels: Vec::new(),
            value: 3.0,
        },
        gauge("node-c", 0.0),
    ];

    let families = parse(&scrape(&Profile::new(), None, &extra));

    let peers = &families["specter_cluster_peer_up"];
    assert_eq!(peers.kind, OpenMetricsType::Gauge);
    assert_eq!(peers.samples.len(), 2);
    assert_eq!(
        value(&families, "specter_cluster_peer_up", &[("peer", "node-b")]),
        1.0
    );
    assert_eq!(
        value(&families, "specter_cluster_peer_up", &[("peer", "node-c")]),
        0.0
    );
    assert_eq!(value(&families, "specter_cluster_size", &[]), 3.0);
}

#[test]
fn uptime_is_a_number_of_seconds() {
    let families = parse(&scrape(&Profile::new(), None, &[]));

    assert_eq!(
        families["specter_uptime_seconds"].kind,
        OpenMetricsType::Gauge
    );
    let uptime = value(&families, "specter_uptime_seconds", &[]);
    assert!((0.0..60.0).contains(&uptime), "{uptime}");
    assert!(matches!(
        families["specter_up"].samples[0].1,
        OpenMetricsValue::Gauge(MetricNumber::Int(1) | MetricNumber::Float(1.0))
    ));
}

#[test]
fn store_health_is_exported_beside_the_pipelines_store_drops() {
    let profile = Profile::new();
    profile.tally(Tally::StoreDropped);
    profile.tally(Tally::StoreDropped);
    let unreachable = StoreHealth {
        connected: false,
        buffered: 42,
        dropped: 7,
        last_error: Some("connection refused".to_owned()),
    };

    let families = parse(&scrape_with_store(&profile, None, unreachable, &[]));

    assert_eq!(value(&families, "specter_store_up", &[]), 0.0);
    assert_eq!(value(&families, "specter_store_buffered_events", &[]), 42.0);
    assert_eq!(value(&families, "specter_store_backend_dropped", &[]), 7.0);
    assert_eq!(value(&families, "specter_store_dropped", &[]), 2.0);

    let healthy = parse(&scrape(&profile, None, &[]));
    assert_eq!(value(&healthy, "specter_store_up", &[]), 1.0);
}
