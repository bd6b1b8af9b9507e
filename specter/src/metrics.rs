//! The Prometheus exposition: `GET /metrics` on the admin listener, part of the serve stage.
//!
//! Nothing here sits on the hot path. Every figure already lives in the [`Profile`] (counters,
//! per-route counters, HDR latency histograms) or in the attach-mode capture object, and a scrape
//! reads a copy of them and encodes it with `prometheus-client` in the OpenMetrics text format
//! ([`CONTENT_TYPE`]). `docs/grafana-dashboard.json` is a dashboard built on these metrics.
//!
//! Choices a reader should know about:
//!
//! - **Latency buckets are derived, not recorded.** The profile keeps HDR histograms, so each
//!   scrape folds them onto [`LATENCY_BOUNDS`]. A bucket counts a latency when the latency's HDR
//!   bucket (3 significant figures) is at or below the bound, and `_sum` is the HDR mean times
//!   the count, not an exact sum: both are off by at most 0.1%.
//! - **Route labels are bounded twice.** The profile already folds routes past
//!   [`MAX_ROUTES`](crate::profile::MAX_ROUTES) into `other`; this module exports only the
//!   [`MAX_EXPORTED_ROUTES`] most mirrored routes and folds the rest (and the profile's own
//!   `other`) into `route="other"`, so one scrape holds at most 3 × 201 route series.
//!   Limitation: the top list is chosen anew at each scrape. A route that leaves it stops its
//!   series and `other` jumps by its counts; a route that enters it takes its counts out of
//!   `other`, which `rate()` reads as a counter reset of `other`. Once traffic settles the top
//!   list rarely changes.
//! - **Store health has two sources.** The pipeline counts events it could not hand to the
//!   store (`specter_store_dropped_total`); the store itself reports whether its backend is
//!   reachable, what waits in its buffer and what it lost after accepting it
//!   ([`Store::health`](crate::store::Store::health)).
//! - **Units live in the names** (`_seconds`, `_bytes`), as Prometheus conventions ask. No
//!   `# UNIT` metadata is written: Prometheus does not use it, and some OpenMetrics parsers
//!   reject it on histograms.
//!
//! Figures that live outside the profile, such as the number of cluster members, join a scrape
//! as [`ExtraGauge`]s passed to [`encode`].

use std::{collections::HashMap, fmt};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, exemplar::Exemplar, gauge::ConstGauge},
    registry::Registry,
};
use serde_json::Value;
use thiserror::Error;

use crate::{
    profile::{Buckets, Counters, LatencyBuckets, OTHER_ROUTE, Profile, RouteCounters},
    store::StoreHealth,
};

/// The media type of the exposition `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency histogram buckets, in seconds (`+Inf` is added).
pub const LATENCY_BOUNDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Routes exported with their own `route` label; the rest are summed under `route="other"`.
pub const MAX_EXPORTED_ROUTES: usize = 200;

/// Counters of the attach-mode capture object: (key in the object, metric name, help).
const CAPTURE_COUNTERS: [(&str, &str, &str); 15] = [
    (
        "packets",
        "specter_capture_packets",
        "Packets the kernel copied to the capture ring.",
    ),
    (
        "bytes",
        "specter_capture_bytes",
        "Bytes the kernel copied to the capture ring.",
    ),
    (
        "ring_drops",
        "specter_capture_ring_drops",
        "Packets lost because the capture ring was full.",
    ),
    (
        "truncated",
        "specter_capture_truncated",
        "Packets copied only in part because they exceeded the ring's record size.",
    ),
    (
        "out_of_order",
        "specter_capture_out_of_order",
        "TCP segments that arrived ahead of a missing one and were held back.",
    ),
    (
        "retransmits",
        "specter_capture_retransmits",
        "TCP segments that repeated data already seen.",
    ),
    (
        "gaps",
        "specter_capture_gaps",
        "Holes in a TCP stream that were never filled.",
    ),
    (
        "parse_errors",
        "specter_capture_parse_errors",
        "Captured streams that were not valid HTTP/1.x.",
    ),
    (
        "exchanges_incomplete",
        "specter_capture_exchanges_incomplete",
        "Exchanges reassembly could not complete (a gap, or a connection that ended early).",
    ),
    (
        "upgrades_skipped",
        "specter_capture_upgrades_skipped",
        "Connections left alone after an HTTP upgrade such as WebSocket.",
    ),
    (
        "non_http_skipped",
        "specter_capture_non_http_skipped",
        "Connections left alone because they did not start with HTTP.",
    ),
    (
        "http2_skipped",
        "specter_capture_http2_skipped",
        "Connections left alone because they spoke HTTP/2.",
    ),
    (
        "own_traffic_skipped",
        "specter_capture_own_traffic_skipped",
        "Packets of Specter's own replays to the shadow, left out on purpose.",
    ),
    (
        "fragments_skipped",
        "specter_capture_fragments_skipped",
        "IP fragments, which capture does not reassemble.",
    ),
    (
        "decode_errors",
        "specter_capture_decode_errors",
        "Ring records user space could not decode.",
    ),
];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics exposition: {0}")]
    Encode(#[from] fmt::Error),
}

/// What one scrape reads.
pub struct Sources<'a> {
    pub node: &'a str,
    /// "proxy" or "attach".
    pub mode: &'a str,
    pub profile: &'a Profile,
    /// The attach-mode capture object of `/api/stats`; `None` in proxy mode.
    pub capture: Option<Value>,
    pub store: StoreHealth,
}

/// A gauge another part of Specter adds to a scrape: the way in for figures that live outside
/// the profile, such as cluster health.
///
/// Gauges with the same `name` form one family and must differ in their labels. The name is
/// written as given, so it must be a valid metric name that no built-in family uses; start it
/// with `specter_`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraGauge {
    pub name: String,
    pub help: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Encodes every metric in the OpenMetrics text format, `# EOF` included.
pub fn encode(sources: &Sources<'_>, extra: &[ExtraGauge]) -> Result<String, MetricsError> {
    // One lock for the counters and routes, one for the histograms: each family is consistent
    // in itself, and a scrape never holds the profile while it formats text.
    let view = sources.profile.view();
    let scrape = Scrape {
        node: sources.node.to_owned(),
        mode: sources.mode.to_owned(),
        uptime_seconds: sources.profile.uptime().as_secs_f64(),
        counters: view.counters,
        routes: exported_routes(
            view.routes.into_iter().map(|r| (r.route, r.counters)),
            MAX_EXPORTED_ROUTES,
        ),
        latency: sources.profile.latency_buckets(&LATENCY_BOUNDS),
        capture: sources.capture.clone(),
        store: sources.store.clone(),
        extra: extra.to_vec(),
    };

    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The routes to export: the `cap` most mirrored ones sorted by name, then `other` holding the
/// rest and the profile's own `other`, if there is anything to hold.
fn exported_routes(
    routes: impl IntoIterator<Item = (String, RouteCounters)>,
    cap: usize,
) -> Vec<(String, RouteCounters)> {
    let mut other: Option<RouteCounters> = None;
    let mut named = Vec::new();
    for (route, counters) in routes {
        if route == OTHER_ROUTE {
            add(other.get_or_insert_default(), &counters);
        } else {
            named.push((route, counters));
        }
    }

    // Most mirrored first; the name breaks ties so two scrapes of equal figures agree.
    named.sort_by(|(a_route, a), (b_route, b)| {
        b.mirrored
            .cmp(&a.mirrored)
            .then_with(|| a_route.cmp(b_route))
    });
    if named.len() > cap {
        for (_, counters) in named.drain(cap..) {
            add(other.get_or_insert_default(), &counters);
        }
    }

    named.sort_by(|(a, _), (b, _)| a.cmp(b));
    if let Some(other) = other {
        named.push((OTHER_ROUTE.to_owned(), other));
    }
    named
}

fn add(sum: &mut RouteCounters, counters: &RouteCounters) {
    sum.mirrored += counters.mirrored;
    sum.matched += counters.matched;
    sum.diverged += counters.diverged;
    sum.shadow_errors += counters.shadow_errors;
}

/// A copy of every figure one scrape exports, encoded by `prometheus-client` as a collector.
#[derive(Debug)]
struct Scrape {
    node: String,
    mode: String,
    uptime_seconds: f64,
    counters: Counters,
    routes: Vec<(String, RouteCounters)>,
    latency: LatencyBuckets,
    capture: Option<Value>,
    store: StoreHealth,
    extra: Vec<ExtraGauge>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.process(&mut encoder)?;
        self.exchanges(&mut encoder)?;
        self.noise_and_cluster(&mut encoder)?;
        self.routes(&mut encoder)?;
        histogram(
            &mut encoder,
            "specter_live_latency_seconds",
            "How long the live service took to answer, over mirrored exchanges.",
            &self.latency.live,
        )?;
        histogram(
            &mut encoder,
            "specter_shadow_latency_seconds",
            "How long the shadow service took to answer, over replays it answered.",
            &self.latency.shadow,
        )?;
        self.store(&mut encoder)?;
        counter(
            &mut encoder,
            "specter_exchange_log_dropped",
            "Lines not written to capture.exchange_log because its writer could not keep up.",
            self.counters.exchange_log_dropped,
        )?;
        self.capture(&mut encoder)?;
        self.extra(&mut encoder)
    }
}

impl Scrape {
    fn process(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let metric = encoder.encode_descriptor(
            "specter_up",
            "1 while Specter runs and answers scrapes.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1_i64).encode(metric)?;

        let metric = encoder.encode_descriptor(
            "specter_uptime_seconds",
            "Time since this Specter process started.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.uptime_seconds).encode(metric)?;

        // An info family named `specter` is written as the sample `specter_info{...} 1`.
        let mut metric = encoder.encode_descriptor(
            "specter",
            "The node name, capture mode and version of this Specter process.",
            None,
            MetricType::Info,
        )?;
        metric.encode_info(&[
            ("node", self.node.as_str()),
            ("mode", self.mode.as_str()),
            ("version", env!("CARGO_PKG_VERSION")),
        ])
    }

    fn exchanges(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        counter(
            encoder,
            "specter_exchanges_seen",
            "Exchanges a capture source handed to the pipeline.",
            c.seen,
        )?;

        // Every exchange seen ends in exactly one of these; live_error counts proxy requests
        // the live service did not answer, which never reach the pipeline.
        let results = [
            ("matched", c.matched),
            ("diverged", c.diverged),
            ("shadow_error", c.shadow_errors),
            ("skipped_unsafe", c.skipped_unsafe),
            ("sampled_out", c.sampled_out),
            ("truncated", c.truncated),
            ("incomplete", c.incomplete),
            ("dropped", c.shadow_dropped),
            ("live_error", c.live_errors),
        ];
        let mut metric = encoder.encode_descriptor(
            "specter_exchanges",
            "Exchanges by what became of them.",
            None,
            MetricType::Counter,
        )?;
        for (result, value) in results {
            ConstCounter::new(value).encode(metric.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }

    /// Work beside the mirrored exchanges: the extra replays that learn noise, and the jobs a
    /// cluster node ships to (or takes from) the owner of their routing key. A single node
    /// exports the cluster counters as zero.
    fn noise_and_cluster(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        let figures = [
            (
                "specter_noise_replays",
                "Extra replays sent to learn noise (to the secondary, or a second time to the \
                 shadow); not counted as mirrored exchanges.",
                c.noise_replays,
            ),
            (
                "specter_noise_comparisons",
                "Comparisons of answers that should have been equal, made to learn noise.",
                c.noise_comparisons,
            ),
            (
                "specter_cluster_forwarded",
                "Exchanges shipped to the node owning their routing key, which acknowledged them.",
                c.forwarded,
            ),
            (
                "specter_cluster_forward_errors",
                "Exchanges that could not be shipped to their owner and were handled here instead.",
                c.forward_errors,
            ),
            (
                "specter_cluster_forward_unconfirmed",
                "Exchanges shipped to their owner that it never acknowledged; not replayed here.",
                c.forward_unconfirmed,
            ),
            (
                "specter_cluster_forward_received",
                "Exchanges other nodes shipped here because this node owns their routing key.",
                c.forward_received,
            ),
        ];
        for (name, help, value) in figures {
            counter(encoder, name, help, value)?;
        }
        Ok(())
    }

    fn routes(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        // Before the first mirrored exchange the family is left out rather than written empty:
        // an empty family is valid, but some parsers take the next family's metadata for its.
        if self.routes.is_empty() {
            return Ok(());
        }

        let mut metric = encoder.encode_descriptor(
            "specter_route_exchanges",
            "Mirrored exchanges by route and comparison result.",
            None,
            MetricType::Counter,
        )?;
        for (route, counters) in &self.routes {
            let results = [
                ("matched", counters.matched),
                ("diverged", counters.diverged),
                ("shadow_error", counters.shadow_errors),
            ];
            for (result, value) in results {
                let labels = [("route", route.as_str()), ("result", result)];
                ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn store(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        counter(
            encoder,
            "specter_store_dropped",
            "Events the pipeline could not hand to the store because it could not keep up or \
             failed.",
            self.counters.store_dropped,
        )?;

        let metric = encoder.encode_descriptor(
            "specter_store_up",
            "1 while the last attempt to reach the store backend succeeded.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(self.store.connected)).encode(metric)?;

        let metric = encoder.encode_descriptor(
            "specter_store_buffered_events",
            "Events the store accepted and has not written to its backend yet.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.store.buffered).encode(metric)?;

        counter(
            encoder,
            "specter_store_backend_dropped",
            "Events the store accepted and then lost (buffer full, or refused by the backend), \
             since it was opened.",
            self.store.dropped,
        )
    }

    /// The attach-mode capture figures; nothing in proxy mode. A key the capture object lacks
    /// is left out rather than reported as zero.
    fn capture(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(capture) = &self.capture else {
            return Ok(());
        };

        for (key, name, help) in CAPTURE_COUNTERS {
            let Some(value) = capture.get(key).and_then(Value::as_u64) else {
                continue;
            };
            counter(encoder, name, help, value)?;
        }

        if let Some(open) = capture.get("connections_open").and_then(Value::as_u64) {
            let metric = encoder.encode_descriptor(
                "specter_capture_connections_open",
                "TCP connections reassembly is following now.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(open).encode(metric)?;
        }
        Ok(())
    }

    fn extra(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        // Group by name in first-seen order: a family must be written in one piece.
        let mut order: Vec<&str> = Vec::new();
        let mut families: HashMap<&str, Vec<&ExtraGauge>> = HashMap::new();
        for gauge in &self.extra {
            let family = families.entry(gauge.name.as_str()).or_default();
            if family.is_empty() {
                order.push(&gauge.name);
            }
            family.push(gauge);
        }

        for name in order {
            let gauges = &families[name];
            let help = &gauges[0].help;
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for gauge in gauges {
                ConstGauge::new(gauge.value).encode(metric.encode_family(&gauge.labels)?)?;
            }
        }
        Ok(())
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// Writes one latency histogram; `prometheus-client` wants each bucket's own count and adds
/// them up itself.
fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    buckets: &Buckets,
) -> fmt::Result {
    let mut below = 0;
    let mut own: Vec<(f64, u64)> = LATENCY_BOUNDS
        .iter()
        .zip(&buckets.cumulative)
        .map(|(&bound, &cumulative)| {
            let count = cumulative.saturating_sub(below);
            below = below.max(cumulative);
            (bound, count)
        })
        .collect();
    own.push((f64::INFINITY, buckets.count.saturating_sub(below)));

    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(
        buckets.sum_seconds,
        buckets.count,
        &own,
        None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
    )
}

#[cfg(test)]
mod tests;
