//! The statistical profile: counters, latency histograms and per-route figures, the field
//! tables noise learning judges, and the verdict.
//!
//! The pipeline updates the profile for every exchange it sees; the API reads snapshots of it;
//! the store persists snapshots so the figures survive a restart. Every counter is kept per
//! route ([`route`] names them). The field tables ([`fields`]) are part of the snapshot too, so
//! what noise learning found survives a restart, and cluster-wide figures merge them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer as _, V2Serializer},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::{
    compare::noise::{self, Classification, NoiseRule, NoiseSource},
    event::{Difference, Outcome, Severity},
};

mod fields;
mod route;
mod verdict;

pub use fields::{FieldReport, NoiseCounts, SourceCounts};
pub use route::{ID_SEGMENT, RoutePattern, RouteTemplates, is_id_like, route_of};
pub use verdict::{
    Criteria, DEFAULT_MIN_MATCH_RATE, Decision, LATENCY_FLOOR_MS, RouteVerdict, Verdict,
    shadow_slower,
};

use fields::{Budget, RouteAnalysis};

/// Routes beyond this many are counted under [`OTHER_ROUTE`], so memory stays bounded.
pub const MAX_ROUTES: usize = 1000;
/// The route that collects exchanges once [`MAX_ROUTES`] exist.
pub const OTHER_ROUTE: &str = "other";

/// Latencies are recorded in microseconds, from 1 µs to one hour, to 3 significant figures.
const HIST_MAX_MICROS: u64 = 3_600_000_000;

/// Per-route latency histograms keep 2 significant figures: a percentile within 1% is plenty
/// for comparing two services, and it keeps each histogram near 13 KiB, so a thousand routes
/// fit in a few tens of megabytes.
const ROUTE_HIST_SIGFIG: u8 = 2;

/// Live-against-shadow combinations (live status, shadow status) kept per route; past it a new
/// combination is not tabled (the counters still count the exchange).
const MAX_STATUS_PAIRS: usize = 64;

/// Fields tracked over all routes, whatever `compare.max_fields_per_route` allows.
const MAX_FIELDS_TOTAL: usize = 100_000;

/// Latencies each side needs on a route before its latency ratio is judged.
const MIN_LATENCY_SAMPLES: u64 = 20;

/// Fields listed per route in `/api/routes`, of each kind (diverging, noisy).
const TOP_FIELDS: usize = 5;

/// The z of a 95% interval.
const Z_95: f64 = 1.959_964;

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("stored profile snapshot is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("stored latency histogram cannot be read: {0}")]
    Histogram(String),
}

/// Counters over every exchange a capture source handed to the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Exchanges the pipeline received.
    pub seen: u64,
    /// Not mirrored because sampling left them out.
    pub sampled_out: u64,
    /// Not mirrored because their method is not in `replay.methods`.
    pub skipped_unsafe: u64,
    /// Not mirrored because a body exceeded `capture.max_body_bytes`.
    pub truncated: u64,
    /// Not mirrored because part of the exchange was never captured.
    pub incomplete: u64,
    /// Replayed to the shadow: matched + diverged + shadow_errors.
    pub mirrored: u64,
    pub matched: u64,
    pub diverged: u64,
    pub shadow_errors: u64,
    /// Not mirrored because the replay queue was full.
    pub shadow_dropped: u64,
    /// Proxy requests the live service did not answer (the client got a 502).
    pub live_errors: u64,
    /// Events not stored because the store could not keep up or failed.
    pub store_dropped: u64,
    /// Lines not written to `capture.exchange_log` because its writer could not keep up.
    #[serde(default)]
    pub exchange_log_dropped: u64,
    /// Extra replays sent to learn noise (to the secondary, or a second time to the shadow).
    /// They are not mirrored exchanges and count in no other counter.
    #[serde(default)]
    pub noise_replays: u64,
    /// Noise comparisons made: answers that should have been equal, compared to learn noise.
    #[serde(default)]
    pub noise_comparisons: u64,
    /// Cluster: exchanges shipped to the node owning their routing key, which acknowledged
    /// them; that node replays and records them (and counts them as `forward_received`).
    #[serde(default)]
    pub forwarded: u64,
    /// Cluster: exchanges that could not be shipped to their owner (unreachable, its queue
    /// full) and were handled here instead; they count again as mirrored or dropped here.
    #[serde(default)]
    pub forward_errors: u64,
    /// Cluster: exchanges shipped to their owner that it never acknowledged (the link failed
    /// meanwhile). They are not replayed here, so the shadow never sees a request twice; the
    /// owner may or may not have recorded them.
    #[serde(default)]
    pub forward_unconfirmed: u64,
    /// Cluster: exchanges other nodes shipped here because this node owns their routing key.
    /// They are not counted as `seen` here: the node that captured them did.
    #[serde(default)]
    pub forward_received: u64,
}

/// Figures for one route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCounters {
    pub mirrored: u64,
    pub matched: u64,
    pub diverged: u64,
    pub shadow_errors: u64,
}

/// What a pipeline stage reports to the profile about one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    Seen,
    SampledOut,
    SkippedUnsafe,
    Truncated,
    Incomplete,
    ShadowDropped,
    LiveError,
    StoreDropped,
    LogDropped,
    Forwarded,
    ForwardError,
    ForwardUnconfirmed,
    ForwardReceived,
}

/// How noise is learned, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseLearning {
    /// From `specter.secondary_target`.
    Secondary,
    /// From traffic: double replays to the shadow and repeated live requests.
    Learned,
    /// Neither: every difference counts.
    Off,
}

/// The analysis settings, from the `compare` config section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub noise_rule: NoiseRule,
    pub noise_learning: NoiseLearning,
    /// `compare.latency_ratio`.
    pub latency_ratio: f64,
    pub max_fields_per_route: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            noise_rule: NoiseRule::default(),
            noise_learning: NoiseLearning::Learned,
            latency_ratio: 1.2,
            max_fields_per_route: 200,
        }
    }
}

/// Per-route figures beyond the counters, persisted with them.
#[derive(Debug, Clone)]
struct RouteDetail {
    live_latency: Histogram<u32>,
    shadow_latency: Histogram<u32>,
    /// (live status, shadow status or `None` for a shadow error) to exchanges.
    statuses: BTreeMap<(u16, Option<u16>), u64>,
    noise_replays: u64,
}

impl Default for RouteDetail {
    fn default() -> Self {
        Self {
            live_latency: new_route_histogram(),
            shadow_latency: new_route_histogram(),
            statuses: BTreeMap::new(),
            noise_replays: 0,
        }
    }
}

impl RouteDetail {
    fn merge(&mut self, other: RouteDetail) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.live_latency.add(&other.live_latency);
        let _ = self.shadow_latency.add(&other.shadow_latency);
        for (pair, count) in other.statuses {
            *self.statuses.entry(pair).or_default() += count;
        }
        self.noise_replays += other.noise_replays;
    }
}

struct State {
    counters: Counters,
    routes: BTreeMap<String, RouteCounters>,
    details: HashMap<String, RouteDetail>,
    analysis: HashMap<String, RouteAnalysis>,
    /// Fields tracked over all routes.
    fields_total: usize,
    templates: RouteTemplates,
    settings: Settings,
    live_latency: Histogram<u64>,
    shadow_latency: Histogram<u64>,
}

/// One mirrored exchange, as the pipeline reports it to [`Profile::record_mirrored`].
#[derive(Debug, Clone, Copy)]
pub struct Mirrored<'a> {
    pub route: &'a str,
    pub outcome: Outcome,
    pub live_status: u16,
    /// `None` for a shadow error.
    pub shadow_status: Option<u16>,
    pub live_latency: Duration,
    pub shadow_latency: Option<Duration>,
    /// Every live-against-shadow difference, noise ones included, without the truncation
    /// marker.
    pub differences: &'a [Difference],
    /// The id of the stored event, when one was stored.
    pub event_id: Option<u64>,
}

/// The profile, shared by the pipeline stages and the API.
pub struct Profile {
    state: Mutex<State>,
    /// For [`Profile::snapshot_for_store`].
    fields_saved: Mutex<Option<FieldsSaved>>,
    started: Instant,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// A copy of the profile at one moment, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    pub counters: Counters,
    pub match_rate: Option<f64>,
    pub live_latency: Percentiles,
    pub shadow_latency: Percentiles,
    pub routes: Vec<RouteView>,
}

/// One route in a [`View`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteView {
    pub route: String,
    #[serde(flatten)]
    pub counters: RouteCounters,
    pub match_rate: Option<f64>,
    /// The 95% Wilson interval of the match rate.
    pub match_rate_ci: Option<[f64; 2]>,
    /// Shadow p90 over live p90 on this route.
    pub latency_ratio: Option<f64>,
    /// The shadow is slower than `compare.latency_ratio` allows (see `docs/analysis.md`).
    pub shadow_slower: bool,
}

/// Everything the profile knows about one route, as `GET /api/routes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteReport {
    #[serde(flatten)]
    pub view: RouteView,
    pub latency: RouteLatency,
    pub noise_replays: u64,
    /// Noise comparisons of the route, per source.
    pub noise_samples: NoiseSamples,
    /// Exchanges by live status, then by shadow status (`error` for a shadow error).
    pub status_matrix: BTreeMap<String, BTreeMap<String, u64>>,
    /// The most severe difference on a field that counts (diverging or pending).
    pub worst_severity: Option<Severity>,
    pub fields: FieldTally,
    /// The diverging (and pending) fields, most severe and most frequent first.
    pub top_fields: Vec<FieldReport>,
    /// The noisy fields, listed apart with their rates, noisiest first.
    pub noisy_fields: Vec<FieldReport>,
}

/// Latency percentiles of one route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RouteLatency {
    pub live: Percentiles,
    pub shadow: Percentiles,
}

/// Noise comparisons per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NoiseSamples {
    pub secondary: u64,
    pub shadow: u64,
    pub live: u64,
}

/// How many fields of a route are in each class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FieldTally {
    pub divergence: u64,
    pub noise: u64,
    pub pending: u64,
    /// Differences on fields past `compare.max_fields_per_route`; they always count.
    pub untracked_differences: u64,
}

/// How the analysis stands over every route, for `/api/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AnalysisSummary {
    pub noise_learning: NoiseLearning,
    pub routes: usize,
    pub divergent_fields: u64,
    pub noise_fields: u64,
    pub pending_fields: u64,
    pub shadow_slower_routes: usize,
}

/// The fields of one route, as `GET /api/routes/{route}/fields` shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteFields {
    pub route: String,
    pub compared: u64,
    pub noise_samples: NoiseSamples,
    pub noise_learning: NoiseLearning,
    pub fields: Vec<FieldReport>,
}

/// The live and shadow latency histograms folded onto fixed bounds, for the Prometheus
/// exposition (see [`Profile::latency_buckets`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyBuckets {
    pub live: Buckets,
    pub shadow: Buckets,
}

/// One latency histogram folded onto fixed bounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    /// For each bound, in order, how many latencies were at or below it (cumulative).
    pub cumulative: Vec<u64>,
    /// Every latency recorded, including those above the last bound.
    pub count: u64,
    /// The sum of the latencies in seconds, approximated as mean × count: the HDR histogram
    /// keeps values to 3 significant figures, not their exact sum.
    pub sum_seconds: f64,
}

/// How long the store's snapshots may reuse one serialisation of the field tables (see
/// [`Profile::snapshot_for_store`]).
const FIELDS_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// The persisted form of the profile. `F` is the field tables: read as tables, written as the
/// JSON text of a serialisation that may be reused.
#[derive(Serialize, Deserialize)]
struct Snapshot<F> {
    counters: Counters,
    routes: BTreeMap<String, RouteCounters>,
    /// HDR V2 serialisation, base64.
    live_latency: String,
    shadow_latency: String,
    #[serde(default)]
    route_details: BTreeMap<String, DetailSnapshot>,
    /// The field tables, by route; absent from snapshots older than them.
    #[serde(default)]
    fields: F,
}

/// The field tables as read from a snapshot.
type FieldTables = BTreeMap<String, fields::TableSnapshot>;

/// The last serialisation of the field tables, and when it was made.
struct FieldsSaved {
    at: Instant,
    json: Box<RawValue>,
}

/// The persisted form of a [`RouteDetail`].
#[derive(Serialize, Deserialize)]
struct DetailSnapshot {
    live_latency: String,
    shadow_latency: String,
    /// (live status, shadow status, exchanges).
    statuses: Vec<(u16, Option<u16>, u64)>,
    noise_replays: u64,
}

impl Default for Profile {
    fn default() -> Self {
        Self::new()
    }
}

impl Profile {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                counters: Counters::default(),
                routes: BTreeMap::new(),
                details: HashMap::new(),
                analysis: HashMap::new(),
                fields_total: 0,
                templates: RouteTemplates::new(Vec::new(), 100),
                settings: Settings::default(),
                live_latency: new_histogram(),
                shadow_latency: new_histogram(),
            }),
            fields_saved: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// Restores a profile from a snapshot made by [`Profile::snapshot`].
    pub fn restore(bytes: &[u8]) -> Result<Self, ProfileError> {
        let snapshot: Snapshot<FieldTables> = serde_json::from_slice(bytes)?;
        let profile = Self::new();
        {
            let mut state = profile.lock();
            state.counters = snapshot.counters;
            state.routes = snapshot.routes;
            state.live_latency = decode_histogram(&snapshot.live_latency)?;
            state.shadow_latency = decode_histogram(&snapshot.shadow_latency)?;
            for (route, detail) in snapshot.route_details {
                let restored = RouteDetail {
                    live_latency: decode_histogram(&detail.live_latency)?,
                    shadow_latency: decode_histogram(&detail.shadow_latency)?,
                    statuses: detail
                        .statuses
                        .into_iter()
                        .map(|(live, shadow, count)| ((live, shadow), count))
                        .collect(),
                    noise_replays: detail.noise_replays,
                };
                state.details.insert(route, restored);
            }
            for (route, table) in snapshot.fields {
                state.analysis.insert(route, RouteAnalysis::restore(table));
            }
            state.fields_total = state
                .analysis
                .values()
                .map(RouteAnalysis::field_count)
                .sum();
        }
        Ok(profile)
    }

    /// Applies the analysis settings and the route patterns of the config. Called once when
    /// the pipeline starts, before the first exchange; routes named by a restored snapshot
    /// keep their names.
    pub fn configure(&self, settings: Settings, templates: RouteTemplates) {
        let mut state = self.lock();
        // A snapshot built under a higher field cap is brought under this one.
        let mut trimmed = 0;
        for table in state.analysis.values_mut() {
            trimmed += table.trim(settings.max_fields_per_route);
        }
        if trimmed > 0 {
            state.fields_total -= trimmed;
            tracing::info!(
                fields = trimmed,
                max_fields_per_route = settings.max_fields_per_route,
                "restored field tables were over compare.max_fields_per_route; \
                 the fields that differed least were let go"
            );
        }
        state.settings = settings;
        state.templates = templates;
    }

    pub fn settings(&self) -> Settings {
        self.lock().settings
    }

    /// The route of an exchange: a configured pattern, or the learned template. When this
    /// path turns a segment position into a variable, the routes named with a literal there
    /// are merged into the template.
    pub fn route(&self, method: &str, path: &str) -> String {
        let mut state = self.lock();
        let routed = state.templates.route(method, path);
        if routed.saturated {
            state.rename_routes();
        }
        routed.route
    }

    /// Adds another node's snapshot (made by [`Profile::snapshot`]) to this profile, for
    /// cluster-wide figures: counters and per-route figures summed, latency histograms merged
    /// bucket by bucket, so the percentiles are those of all the nodes' latencies together,
    /// and field tables added field by field, so each field is judged on all the evidence.
    pub fn merge_snapshot(&self, bytes: &[u8]) -> Result<(), ProfileError> {
        let other = Self::restore(bytes)?;
        let other = other
            .state
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        let mut state = self.lock();
        state.counters = sum_fields(&state.counters, &other.counters);
        for (route, figures) in other.routes {
            let mine = state.routes.entry(route).or_default();
            *mine = sum_fields(mine, &figures);
        }
        for (route, detail) in other.details {
            state.details.entry(route).or_default().merge(detail);
        }
        // Field counts add up like the other counters. The example event ids stay those of
        // this profile: another node's ids name events in its own store.
        for (route, mut table) in other.analysis {
            table.forget_examples();
            state.analysis.entry(route).or_default().merge(table);
        }
        state.fields_total = state
            .analysis
            .values()
            .map(RouteAnalysis::field_count)
            .sum();
        // Every profile's histograms have the same bounds, so adding cannot fail.
        let _ = state.live_latency.add(&other.live_latency);
        let _ = state.shadow_latency.add(&other.shadow_latency);
        Ok(())
    }

    /// Serialises the whole profile as it is now: for another member's cluster-wide figures,
    /// and for the last save before shutdown.
    pub fn snapshot(&self) -> Vec<u8> {
        let state = self.lock();
        let fields = serialise_tables(&state);
        let bytes = Self::encode(&state, &fields);
        drop(state);
        *self.fields_saved_lock() = Some(FieldsSaved {
            at: Instant::now(),
            json: fields,
        });
        bytes
    }

    /// Serialises the profile for a store commit. Counters, route figures and histograms are
    /// those of now, so they match the events committed with them; the field tables may be
    /// those of up to [`FIELDS_SAVE_INTERVAL`] ago, because at their cap (about 100 000 fields)
    /// serialising them costs some 60 times the rest (see `specter/benches/snapshot.rs`).
    ///
    /// Limitation: a crash loses up to that much field learning; a clean stop saves it all.
    pub fn snapshot_for_store(&self) -> Vec<u8> {
        let state = self.lock();
        let mut saved = self.fields_saved_lock();
        if saved
            .as_ref()
            .is_none_or(|saved| saved.at.elapsed() >= FIELDS_SAVE_INTERVAL)
        {
            *saved = Some(FieldsSaved {
                at: Instant::now(),
                json: serialise_tables(&state),
            });
        }
        let fields = &saved.as_ref().expect("just filled").json;
        Self::encode(&state, fields)
    }

    fn fields_saved_lock(&self) -> std::sync::MutexGuard<'_, Option<FieldsSaved>> {
        self.fields_saved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn encode(state: &State, fields: &RawValue) -> Vec<u8> {
        let snapshot = Snapshot {
            counters: state.counters,
            routes: state.routes.clone(),
            live_latency: encode_histogram(&state.live_latency),
            shadow_latency: encode_histogram(&state.shadow_latency),
            route_details: state
                .details
                .iter()
                .map(|(route, detail)| {
                    let snapshot = DetailSnapshot {
                        live_latency: encode_histogram(&detail.live_latency),
                        shadow_latency: encode_histogram(&detail.shadow_latency),
                        statuses: detail
                            .statuses
                            .iter()
                            .map(|(&(live, shadow), &count)| (live, shadow, count))
                            .collect(),
                        noise_replays: detail.noise_replays,
                    };
                    (route.clone(), snapshot)
                })
                .collect(),
            fields,
        };
        serde_json::to_vec(&snapshot).expect("profile snapshot serialises")
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts one exchange that did not reach the shadow, or one that entered the pipeline.
    pub fn tally(&self, tally: Tally) {
        self.tally_n(tally, 1);
    }

    /// Counts `n` exchanges at once.
    pub fn tally_n(&self, tally: Tally, n: u64) {
        let mut state = self.lock();
        let c = &mut state.counters;
        let counter = match tally {
            Tally::Seen => &mut c.seen,
            Tally::SampledOut => &mut c.sampled_out,
            Tally::SkippedUnsafe => &mut c.skipped_unsafe,
            Tally::Truncated => &mut c.truncated,
            Tally::Incomplete => &mut c.incomplete,
            Tally::ShadowDropped => &mut c.shadow_dropped,
            Tally::LiveError => &mut c.live_errors,
            Tally::StoreDropped => &mut c.store_dropped,
            Tally::LogDropped => &mut c.exchange_log_dropped,
            Tally::Forwarded => &mut c.forwarded,
            Tally::ForwardError => &mut c.forward_errors,
            Tally::ForwardUnconfirmed => &mut c.forward_unconfirmed,
            Tally::ForwardReceived => &mut c.forward_received,
        };
        *counter += n;
    }

    /// Records the outcome of one mirrored exchange, without statuses or differences.
    pub fn record(
        &self,
        route: &str,
        outcome: Outcome,
        live_latency: Duration,
        shadow_latency: Option<Duration>,
    ) {
        self.lock().record(
            route,
            outcome,
            None,
            live_latency,
            shadow_latency.map(|latency| (None, latency)),
        );
    }

    /// Classifies the field of each live-against-shadow difference from the evidence so far,
    /// marks those on noise fields, and says whether the exchange matched: it did when every
    /// difference is noise. Changes no counter; [`Profile::record_mirrored`] does.
    pub fn judge(&self, route: &str, differences: &mut [Difference]) -> Outcome {
        let state = self.lock();
        let route = state.resolve(route);
        let expected = state.noise_expected(&route);
        let rule = state.settings.noise_rule;
        let analysis = state.analysis.get(&route);

        let mut diverged = false;
        for difference in differences.iter_mut() {
            let classification = match analysis {
                Some(analysis) => analysis.judge(difference, &rule, expected).classification,
                None => {
                    noise::classify(
                        &rule,
                        &noise::Evidence {
                            noise_expected: expected,
                            ..noise::Evidence::default()
                        },
                    )
                    .classification
                }
            };
            difference.noise = classification == Classification::Noise;
            diverged |= !difference.noise;
        }
        if diverged {
            Outcome::Diverged
        } else {
            Outcome::Matched
        }
    }

    /// Records one mirrored exchange: its outcome, statuses, latencies, and (when the shadow
    /// answered) the fields that differed.
    pub fn record_mirrored(&self, mirrored: &Mirrored<'_>) {
        let mut state = self.lock();
        let route = state.record(
            mirrored.route,
            mirrored.outcome,
            Some(mirrored.live_status),
            mirrored.live_latency,
            mirrored
                .shadow_latency
                .map(|latency| (mirrored.shadow_status, latency)),
        );
        if mirrored.outcome == Outcome::ShadowError {
            return;
        }

        let State {
            analysis,
            fields_total,
            settings,
            ..
        } = &mut *state;
        let mut budget = Budget {
            per_route: settings.max_fields_per_route,
            total: fields_total,
            max_total: MAX_FIELDS_TOTAL,
        };
        let counted_in = mirrored
            .event_id
            .filter(|_| mirrored.outcome == Outcome::Diverged);
        analysis.entry(route).or_default().record_compared(
            mirrored.differences,
            counted_in,
            &mut budget,
        );
    }

    /// Records one noise comparison on `route` from `source`: the differences between two
    /// answers that should have been equal. `None` when the extra replay it needed failed.
    pub fn record_noise(
        &self,
        route: &str,
        source: NoiseSource,
        differences: Option<&[Difference]>,
    ) {
        let mut state = self.lock();
        let route = state.resolve(route);
        let replayed = source != NoiseSource::Live;
        if replayed {
            state.counters.noise_replays += 1;
            state
                .details
                .entry(route.clone())
                .or_default()
                .noise_replays += 1;
        }
        let Some(differences) = differences else {
            return;
        };
        state.counters.noise_comparisons += 1;

        let State {
            analysis,
            fields_total,
            settings,
            ..
        } = &mut *state;
        let mut budget = Budget {
            per_route: settings.max_fields_per_route,
            total: fields_total,
            max_total: MAX_FIELDS_TOTAL,
        };
        analysis
            .entry(route)
            .or_default()
            .record_noise(source, differences, &mut budget);
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// Folds both latency histograms onto `bounds` (seconds, ascending), computed from the HDR
    /// histograms at call time so recording an exchange costs nothing more.
    ///
    /// A latency counts as at or below a bound when its HDR bucket is; the HDR histogram holds
    /// 3 significant figures, so a latency within 0.1% of a bound may fall on either side.
    pub fn latency_buckets(&self, bounds: &[f64]) -> LatencyBuckets {
        let state = self.lock();
        LatencyBuckets {
            live: fold(&state.live_latency, bounds),
            shadow: fold(&state.shadow_latency, bounds),
        }
    }

    pub fn view(&self) -> View {
        let state = self.lock();
        let c = state.counters;
        View {
            counters: c,
            match_rate: rate(c.matched, c.diverged),
            live_latency: percentiles(&state.live_latency),
            shadow_latency: percentiles(&state.shadow_latency),
            routes: state
                .routes
                .iter()
                .map(|(route, figures)| state.route_view(route, figures))
                .collect(),
        }
    }

    /// Every route with all its figures.
    pub fn route_reports(&self) -> Vec<RouteReport> {
        let state = self.lock();
        state
            .routes
            .iter()
            .map(|(route, figures)| state.route_report(route, figures))
            .collect()
    }

    /// One route with all its figures; `None` for a route never seen.
    pub fn route_report(&self, route: &str) -> Option<RouteReport> {
        let state = self.lock();
        let figures = state.routes.get(route)?;
        Some(state.route_report(route, figures))
    }

    /// The fields of one route with their classification; `None` for a route never seen.
    pub fn route_fields(&self, route: &str) -> Option<RouteFields> {
        let state = self.lock();
        if !state.routes.contains_key(route) && !state.analysis.contains_key(route) {
            return None;
        }
        let analysis = state.analysis.get(route).cloned().unwrap_or_default();
        Some(RouteFields {
            route: route.to_owned(),
            compared: analysis.compared,
            noise_samples: noise_samples(&analysis),
            noise_learning: state.settings.noise_learning,
            fields: analysis.reports(&state.settings.noise_rule, state.noise_expected(route)),
        })
    }

    /// How the analysis stands over every route: counts only, so it is cheap enough for every
    /// `/api/stats`.
    pub fn analysis_summary(&self) -> AnalysisSummary {
        let state = self.lock();
        let mut summary = AnalysisSummary {
            noise_learning: state.settings.noise_learning,
            routes: state.routes.len(),
            divergent_fields: 0,
            noise_fields: 0,
            pending_fields: 0,
            shadow_slower_routes: 0,
        };
        for (route, figures) in &state.routes {
            let tally = state.field_tally(route);
            summary.divergent_fields += tally.divergence;
            summary.noise_fields += tally.noise;
            summary.pending_fields += tally.pending;
            if state.route_view(route, figures).shadow_slower {
                summary.shadow_slower_routes += 1;
            }
        }
        summary
    }

    /// The criteria the verdict uses when a caller gives none.
    pub fn default_criteria(&self) -> Criteria {
        let settings = self.settings();
        Criteria {
            min_match_rate: DEFAULT_MIN_MATCH_RATE,
            min_samples: settings.noise_rule.min_samples,
            max_latency_ratio: settings.latency_ratio,
        }
    }

    /// The verdict on every route and overall.
    pub fn verdict(&self, criteria: &Criteria) -> Verdict {
        let state = self.lock();
        let routes: Vec<RouteVerdict> = state
            .routes
            .iter()
            .map(|(route, figures)| {
                let detail = state.details.get(route);
                let p90_ms = detail.and_then(|d| {
                    let enough = |h: &Histogram<u32>| h.len() >= MIN_LATENCY_SAMPLES;
                    (enough(&d.shadow_latency) && enough(&d.live_latency)).then(|| {
                        (
                            percentiles(&d.shadow_latency).p90_ms,
                            percentiles(&d.live_latency).p90_ms,
                        )
                    })
                });
                verdict::judge_route(
                    &verdict::RouteFigures {
                        route,
                        mirrored: figures.mirrored,
                        matched: figures.matched,
                        diverged: figures.diverged,
                        shadow_errors: figures.shadow_errors,
                        match_rate_ci: match_rate_ci(figures),
                        pending_fields: state.field_tally(route).pending,
                        p90_ms,
                    },
                    criteria,
                )
            })
            .collect();
        Verdict {
            verdict: verdict::overall(&routes),
            criteria: *criteria,
            routes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still meaningful.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// The name a route is counted under: renamed if its segments became variables since,
    /// and folded into [`OTHER_ROUTE`] once [`MAX_ROUTES`] exist.
    fn resolve(&self, route: &str) -> String {
        let route = self.templates.canonical(route);
        if self.routes.contains_key(&route) || self.routes.len() < MAX_ROUTES {
            route
        } else {
            OTHER_ROUTE.to_owned()
        }
    }

    /// Counts one mirrored exchange; returns the route it was counted under.
    fn record(
        &mut self,
        route: &str,
        outcome: Outcome,
        live_status: Option<u16>,
        live_latency: Duration,
        shadow: Option<(Option<u16>, Duration)>,
    ) -> String {
        let route = self.resolve(route);

        self.counters.mirrored += 1;
        match outcome {
            Outcome::Matched => self.counters.matched += 1,
            Outcome::Diverged => self.counters.diverged += 1,
            Outcome::ShadowError => self.counters.shadow_errors += 1,
        }

        let figures = self.routes.entry(route.clone()).or_default();
        figures.mirrored += 1;
        match outcome {
            Outcome::Matched => figures.matched += 1,
            Outcome::Diverged => figures.diverged += 1,
            Outcome::ShadowError => figures.shadow_errors += 1,
        }

        self.live_latency.saturating_record(micros(live_latency));
        if let Some((_, latency)) = shadow {
            self.shadow_latency.saturating_record(micros(latency));
        }

        let detail = self.details.entry(route.clone()).or_default();
        detail.live_latency.saturating_record(micros(live_latency));
        if let Some((_, latency)) = shadow {
            detail.shadow_latency.saturating_record(micros(latency));
        }
        if let Some(live_status) = live_status {
            let shadow_status = shadow.and_then(|(status, _)| status);
            let pair = (live_status, shadow_status);
            if detail.statuses.len() < MAX_STATUS_PAIRS || detail.statuses.contains_key(&pair) {
                *detail.statuses.entry(pair).or_default() += 1;
            }
        }
        route
    }

    /// After a segment position became a variable: every route named with a literal there
    /// takes the template's name, merging with the route already under that name.
    fn rename_routes(&mut self) {
        let renames: Vec<(String, String)> = self
            .routes
            .keys()
            .chain(self.analysis.keys())
            .chain(self.details.keys())
            .filter_map(|route| {
                let canonical = self.templates.canonical(route);
                (canonical != *route).then(|| (route.clone(), canonical))
            })
            .collect();
        for (from, to) in renames {
            if let Some(counters) = self.routes.remove(&from) {
                let into = self.routes.entry(to.clone()).or_default();
                into.mirrored += counters.mirrored;
                into.matched += counters.matched;
                into.diverged += counters.diverged;
                into.shadow_errors += counters.shadow_errors;
            }
            if let Some(detail) = self.details.remove(&from) {
                self.details.entry(to.clone()).or_default().merge(detail);
            }
            if let Some(analysis) = self.analysis.remove(&from) {
                self.analysis.entry(to).or_default().merge(analysis);
            }
        }
        self.fields_total = self.analysis.values().map(RouteAnalysis::field_count).sum();
    }

    /// True when some noise source can apply to the route, so its fields wait for noise
    /// evidence before they are classified: with a secondary, any route; when learning from
    /// traffic, routes of safe methods (only they are replayed twice or compared on repeat).
    fn noise_expected(&self, route: &str) -> bool {
        match self.settings.noise_learning {
            NoiseLearning::Off => false,
            NoiseLearning::Secondary => true,
            NoiseLearning::Learned => route
                .split_once(' ')
                .is_some_and(|(method, _)| noise::is_safe_method(method)),
        }
    }

    fn route_view(&self, route: &str, figures: &RouteCounters) -> RouteView {
        let detail = self.details.get(route);
        let (latency_ratio, shadow_slower) = detail
            .map(|d| latency_comparison(d, self.settings.latency_ratio))
            .unwrap_or((None, false));
        RouteView {
            route: route.to_owned(),
            counters: *figures,
            match_rate: rate(figures.matched, figures.diverged),
            match_rate_ci: match_rate_ci(figures),
            latency_ratio,
            shadow_slower,
        }
    }

    fn route_report(&self, route: &str, figures: &RouteCounters) -> RouteReport {
        let detail = self.details.get(route).cloned().unwrap_or_default();
        let analysis = self.analysis.get(route);
        let reports = analysis
            .map(|a| a.reports(&self.settings.noise_rule, self.noise_expected(route)))
            .unwrap_or_default();

        let mut status_matrix: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (&(live, shadow), &count) in &detail.statuses {
            let shadow = shadow.map_or_else(|| "error".to_owned(), |s| s.to_string());
            *status_matrix
                .entry(live.to_string())
                .or_default()
                .entry(shadow)
                .or_default() += count;
        }

        let counted = |r: &&FieldReport| r.classification != Classification::Noise;
        RouteReport {
            view: self.route_view(route, figures),
            latency: RouteLatency {
                live: percentiles(&detail.live_latency),
                shadow: percentiles(&detail.shadow_latency),
            },
            noise_replays: detail.noise_replays,
            noise_samples: analysis.map(noise_samples).unwrap_or_default(),
            status_matrix,
            worst_severity: reports
                .iter()
                .filter(counted)
                .filter_map(|r| r.severity)
                .max(),
            fields: FieldTally::of(
                reports.iter().map(|r| r.classification),
                analysis.map_or(0, |a| a.untracked),
            ),
            top_fields: reports
                .iter()
                .filter(counted)
                .take(TOP_FIELDS)
                .cloned()
                .collect(),
            noisy_fields: reports
                .iter()
                .filter(|r| r.classification == Classification::Noise)
                .take(TOP_FIELDS)
                .cloned()
                .collect(),
        }
    }

    fn field_tally(&self, route: &str) -> FieldTally {
        let Some(analysis) = self.analysis.get(route) else {
            return FieldTally::default();
        };
        FieldTally::of(
            analysis.classifications(&self.settings.noise_rule, self.noise_expected(route)),
            analysis.untracked,
        )
    }
}

impl FieldTally {
    fn of(classifications: impl IntoIterator<Item = Classification>, untracked: u64) -> Self {
        let mut tally = FieldTally {
            untracked_differences: untracked,
            ..FieldTally::default()
        };
        for classification in classifications {
            match classification {
                Classification::Divergence => tally.divergence += 1,
                Classification::Noise => tally.noise += 1,
                Classification::Pending => tally.pending += 1,
            }
        }
        tally
    }
}

fn noise_samples(analysis: &RouteAnalysis) -> NoiseSamples {
    let at = |source: NoiseSource| analysis.noise_trials[source.index()];
    NoiseSamples {
        secondary: at(NoiseSource::Secondary),
        shadow: at(NoiseSource::Shadow),
        live: at(NoiseSource::Live),
    }
}

/// Shadow p90 over live p90, and whether that makes the shadow slower than `allowed`: only
/// with [`MIN_LATENCY_SAMPLES`] on each side, and beyond [`LATENCY_FLOOR_MS`].
fn latency_comparison(detail: &RouteDetail, allowed: f64) -> (Option<f64>, bool) {
    let (live, shadow) = (
        percentiles(&detail.live_latency),
        percentiles(&detail.shadow_latency),
    );
    if live.count == 0 || shadow.count == 0 || live.p90_ms <= 0.0 {
        return (None, false);
    }
    let ratio = shadow.p90_ms / live.p90_ms;
    let enough = live.count >= MIN_LATENCY_SAMPLES && shadow.count >= MIN_LATENCY_SAMPLES;
    (
        Some(ratio),
        enough && shadow_slower(shadow.p90_ms, live.p90_ms, allowed),
    )
}

/// The 95% Wilson interval of a route's match rate.
fn match_rate_ci(figures: &RouteCounters) -> Option<[f64; 2]> {
    noise::wilson_interval(figures.matched, figures.matched + figures.diverged, Z_95)
        .map(|(low, high)| [low, high])
}

/// Adds two counter structs field by field. Every field is a count, so going through the
/// serialised form sums each one, including counters added later, without listing them here.
fn sum_fields<T: Serialize + serde::de::DeserializeOwned>(a: &T, b: &T) -> T {
    let (Ok(serde_json::Value::Object(mut sum)), Ok(serde_json::Value::Object(other))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        unreachable!("counter structs serialise to objects");
    };
    for (name, value) in other {
        let add = value.as_u64().unwrap_or(0);
        let entry = sum.entry(name).or_insert(serde_json::Value::from(0u64));
        *entry = serde_json::Value::from(entry.as_u64().unwrap_or(0).saturating_add(add));
    }
    serde_json::from_value(serde_json::Value::Object(sum)).expect("summed counters deserialise")
}

/// matched / (matched + diverged), or none before the first comparison.
fn rate(matched: u64, diverged: u64) -> Option<f64> {
    let compared = matched + diverged;
    (compared > 0).then(|| matched as f64 / compared as f64)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_MICROS, 3).expect("histogram bounds are valid")
}

fn new_route_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, HIST_MAX_MICROS, ROUTE_HIST_SIGFIG)
        .expect("histogram bounds are valid")
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, HIST_MAX_MICROS)
}

fn percentiles<T: hdrhistogram::Counter>(hist: &Histogram<T>) -> Percentiles {
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    if hist.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: hist.len(),
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
    }
}

fn fold(hist: &Histogram<u64>, bounds: &[f64]) -> Buckets {
    let count = hist.len();
    let cumulative = bounds
        .iter()
        .map(|&seconds| {
            // Latencies are recorded in whole microseconds from 1 µs, so a bound below that
            // holds nothing, and one past the histogram's range holds everything.
            let bound = (seconds * 1e6).floor();
            if bound < 1.0 {
                0
            } else if bound >= HIST_MAX_MICROS as f64 {
                count
            } else {
                hist.count_between(0, bound as u64)
            }
        })
        .collect();
    Buckets {
        cumulative,
        count,
        sum_seconds: hist.mean() * count as f64 / 1e6,
    }
}

/// The field tables as JSON text, for a snapshot.
fn serialise_tables(state: &State) -> Box<RawValue> {
    let tables: FieldTables = state
        .analysis
        .iter()
        .map(|(route, table)| (route.clone(), table.snapshot()))
        .collect();
    serde_json::value::to_raw_value(&tables).expect("field tables serialise")
}

fn encode_histogram<T: hdrhistogram::Counter>(hist: &Histogram<T>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(hist, &mut buf)
        .expect("histogram serialises to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

fn decode_histogram<T: hdrhistogram::Counter>(text: &str) -> Result<Histogram<T>, ProfileError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ProfileError::Histogram(e.to_string()))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| ProfileError::Histogram(format!("{e:?}")))
}

#[cfg(test)]
mod tests;
