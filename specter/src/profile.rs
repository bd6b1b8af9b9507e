//! The statistical profile: counters, latency histograms and per-route figures.
//!
//! The pipeline updates the profile for every exchange it sees; the API reads snapshots of it;
//! the store persists snapshots so the figures survive a restart.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer as _, V2Serializer},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::event::Outcome;

/// Routes beyond this many are counted under [`OTHER_ROUTE`], so memory stays bounded.
pub const MAX_ROUTES: usize = 1000;
/// The route that collects exchanges once [`MAX_ROUTES`] exist.
pub const OTHER_ROUTE: &str = "other";

/// Latencies are recorded in microseconds, from 1 µs to one hour, to 3 significant figures.
const HIST_MAX_MICROS: u64 = 3_600_000_000;

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
}

struct State {
    counters: Counters,
    routes: BTreeMap<String, RouteCounters>,
    live_latency: Histogram<u64>,
    shadow_latency: Histogram<u64>,
}

/// The profile, shared by the pipeline stages and the API.
pub struct Profile {
    state: Mutex<State>,
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
}

/// The persisted form of the profile.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    counters: Counters,
    routes: BTreeMap<String, RouteCounters>,
    /// HDR V2 serialisation, base64.
    live_latency: String,
    shadow_latency: String,
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
                live_latency: new_histogram(),
                shadow_latency: new_histogram(),
            }),
            started: Instant::now(),
        }
    }

    /// Restores a profile from a snapshot made by [`Profile::snapshot`].
    pub fn restore(bytes: &[u8]) -> Result<Self, ProfileError> {
        let snapshot: Snapshot = serde_json::from_slice(bytes)?;
        let profile = Self::new();
        {
            let mut state = profile.lock();
            state.counters = snapshot.counters;
            state.routes = snapshot.routes;
            state.live_latency = decode_histogram(&snapshot.live_latency)?;
            state.shadow_latency = decode_histogram(&snapshot.shadow_latency)?;
        }
        Ok(profile)
    }

    /// Serialises the profile for the store.
    pub fn snapshot(&self) -> Vec<u8> {
        let state = self.lock();
        let snapshot = Snapshot {
            counters: state.counters,
            routes: state.routes.clone(),
            live_latency: encode_histogram(&state.live_latency),
            shadow_latency: encode_histogram(&state.shadow_latency),
        };
        serde_json::to_vec(&snapshot).expect("profile snapshot serialises")
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts one exchange that did not reach the shadow, or one that entered the pipeline.
    pub fn tally(&self, tally: Tally) {
        let mut state = self.lock();
        let c = &mut state.counters;
        match tally {
            Tally::Seen => c.seen += 1,
            Tally::SampledOut => c.sampled_out += 1,
            Tally::SkippedUnsafe => c.skipped_unsafe += 1,
            Tally::Truncated => c.truncated += 1,
            Tally::Incomplete => c.incomplete += 1,
            Tally::ShadowDropped => c.shadow_dropped += 1,
            Tally::LiveError => c.live_errors += 1,
            Tally::StoreDropped => c.store_dropped += 1,
        }
    }

    /// Records the outcome of one mirrored exchange.
    pub fn record(
        &self,
        route: &str,
        outcome: Outcome,
        live_latency: Duration,
        shadow_latency: Option<Duration>,
    ) {
        let mut state = self.lock();

        state.counters.mirrored += 1;
        match outcome {
            Outcome::Matched => state.counters.matched += 1,
            Outcome::Diverged => state.counters.diverged += 1,
            Outcome::ShadowError => state.counters.shadow_errors += 1,
        }

        let route = if state.routes.contains_key(route) || state.routes.len() < MAX_ROUTES {
            route
        } else {
            OTHER_ROUTE
        };
        let figures = state.routes.entry(route.to_owned()).or_default();
        figures.mirrored += 1;
        match outcome {
            Outcome::Matched => figures.matched += 1,
            Outcome::Diverged => figures.diverged += 1,
            Outcome::ShadowError => figures.shadow_errors += 1,
        }

        state.live_latency.saturating_record(micros(live_latency));
        if let Some(latency) = shadow_latency {
            state.shadow_latency.saturating_record(micros(latency));
        }
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters
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
                .map(|(route, figures)| RouteView {
                    route: route.clone(),
                    counters: *figures,
                    match_rate: rate(figures.matched, figures.diverged),
                })
                .collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still meaningful.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// matched / (matched + diverged), or none before the first comparison.
fn rate(matched: u64, diverged: u64) -> Option<f64> {
    let compared = matched + diverged;
    (compared > 0).then(|| matched as f64 / compared as f64)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_MICROS, 3).expect("histogram bounds are valid")
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, HIST_MAX_MICROS)
}

fn percentiles(hist: &Histogram<u64>) -> Percentiles {
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

fn encode_histogram(hist: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(hist, &mut buf)
        .expect("histogram serialises to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

fn decode_histogram(text: &str) -> Result<Histogram<u64>, ProfileError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ProfileError::Histogram(e.to_string()))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| ProfileError::Histogram(format!("{e:?}")))
}

/// The route an exchange belongs to: the method and the path with id-like segments replaced
/// by `{id}`, so `/users/123` and `/users/456` are one route.
pub fn route_of(method: &str, path: &str) -> String {
    let mut route = String::with_capacity(method.len() + path.len() + 1);
    route.push_str(method);
    route.push(' ');
    if path.is_empty() || path == "/" {
        route.push('/');
        return route;
    }
    for segment in path.split('/').skip(1) {
        route.push('/');
        if is_id_like(segment) {
            route.push_str("{id}");
        } else {
            route.push_str(segment);
        }
    }
    route
}

fn is_id_like(segment: &str) -> bool {
    let numeric = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
    let uuid = segment.len() == 36
        && segment.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    let long_hex = segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit());
    numeric || uuid || long_hex
}

#[cfg(test)]
mod tests;
