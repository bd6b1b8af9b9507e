//! Noise learning: telling a field that differs because the shadow changed from one that differs
//! between any two answers (a fresh id, the current time).
//!
//! Noise is observed by comparing two answers that *should* be the same, from one of three
//! sources ([`NoiseSource`]): live against a secondary copy of the live version, the shadow
//! against itself (a sampled request replayed twice), or live against live (an identical safe
//! request seen twice, remembered in [`LiveNoiseCache`]). The profile counts, per route and per
//! field, how often each source saw the field differ; [`classify`] turns those counts into a
//! classification with the rule `docs/analysis.md` documents.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::exchange::{Request, Response};

/// Where a noise comparison came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSource {
    /// Live against `specter.secondary_target`, a second copy of the live version.
    Secondary,
    /// The shadow against itself: one request replayed twice.
    Shadow,
    /// Live against live: two identical safe requests.
    Live,
}

impl NoiseSource {
    pub const ALL: [NoiseSource; 3] = [Self::Secondary, Self::Shadow, Self::Live];

    pub fn index(self) -> usize {
        match self {
            Self::Secondary => 0,
            Self::Shadow => 1,
            Self::Live => 2,
        }
    }
}

/// What a field's counts say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classification {
    /// The shadow changed it: it differs clearly more often between live and shadow than
    /// between two answers of the same version. Its differences count.
    Divergence,
    /// It differs about as often between two answers of the same version. Its differences are
    /// stored, marked `noise`, and do not count.
    Noise,
    /// Not enough comparisons yet to tell. Its differences count, and the route's verdict is
    /// "insufficient evidence".
    Pending,
}

/// The thresholds of the rule, from the `compare` config section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseRule {
    /// Live-against-shadow comparisons a route needs before its fields are classified.
    pub min_samples: u64,
    /// Noise comparisons a route needs, from one source, before that source is trusted.
    pub min_noise_samples: u64,
    /// Standard errors by which the difference rate must exceed the noise rate.
    pub z: f64,
    /// Least amount by which the difference rate must exceed the noise rate.
    pub margin: f64,
}

impl Default for NoiseRule {
    fn default() -> Self {
        Self {
            min_samples: 100,
            min_noise_samples: 20,
            z: 3.0,
            margin: 0.05,
        }
    }
}

/// The counts behind one field's classification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Live-against-shadow comparisons of the route.
    pub compared: u64,
    /// Of those, how many had this field differ.
    pub differed: u64,
    /// Per [`NoiseSource::index`]: noise comparisons of the route, and how many had this field
    /// differ.
    pub noise: [(u64, u64); 3],
    /// False when no noise source can apply to the route (noise learning off, or an unsafe
    /// method without a secondary): the noise rate is then taken as zero.
    pub noise_expected: bool,
}

/// A classification and the figures it rests on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    pub classification: Classification,
    /// differed / compared; `None` before the first comparison.
    pub rate: Option<f64>,
    /// The highest noise rate among trusted sources, and that source.
    pub noise_rate: Option<f64>,
    pub noise_source: Option<NoiseSource>,
    /// The z statistic of the test, when it was run.
    pub z: Option<f64>,
}

/// Classifies one field.
///
/// 1. Fewer than `min_samples` comparisons on the route: pending.
/// 2. When noise is expected, only sources with at least `min_noise_samples` comparisons are
///    trusted; with none: pending. The noise rate is the highest rate among them, so a field
///    one source sees as noisy is judged against that source.
/// 3. A field never seen differing in a trusted source is a divergence: noise needs positive
///    evidence.
/// 4. Otherwise it is a divergence only when its difference rate exceeds the noise rate by at
///    least `margin` and by at least `z` standard errors (one-sided two-proportion z-test with a
///    pooled variance); else it is noise.
pub fn classify(rule: &NoiseRule, evidence: &Evidence) -> Judgement {
    let rate = (evidence.compared > 0).then(|| evidence.differed as f64 / evidence.compared as f64);
    let mut judgement = Judgement {
        classification: Classification::Pending,
        rate,
        noise_rate: None,
        noise_source: None,
        z: None,
    };

    // The noisiest trusted source; ties go to the one with more comparisons.
    let trusted = NoiseSource::ALL
        .iter()
        .map(|&source| (source, evidence.noise[source.index()]))
        .filter(|(_, (trials, _))| *trials >= rule.min_noise_samples.max(1))
        .max_by(|(_, (ta, da)), (_, (tb, db))| {
            let (ra, rb) = (*da as f64 / *ta as f64, *db as f64 / *tb as f64);
            ra.total_cmp(&rb).then(ta.cmp(tb))
        });
    if let Some((source, (trials, differed))) = trusted {
        judgement.noise_rate = Some(differed as f64 / trials as f64);
        judgement.noise_source = Some(source);
    }

    let Some(rate) = rate else {
        return judgement;
    };
    if evidence.compared < rule.min_samples {
        return judgement;
    }
    let (noise_trials, noise_differed) = match trusted {
        Some((_, counts)) => counts,
        None if evidence.noise_expected => return judgement,
        // No source can apply: every difference between live and shadow counts. A field seen
        // only in noise comparisons (live repeats of an unsafe route never happen, but a
        // route with learning off may still have them) never differed here, so it is noise.
        None => {
            judgement.classification = if evidence.differed > 0 {
                Classification::Divergence
            } else {
                Classification::Noise
            };
            return judgement;
        }
    };
    if noise_differed == 0 {
        judgement.classification = Classification::Divergence;
        return judgement;
    }

    let noise_rate = noise_differed as f64 / noise_trials as f64;
    let z = z_statistic(
        evidence.differed,
        evidence.compared,
        noise_differed,
        noise_trials,
    );
    judgement.z = Some(z);
    judgement.classification = if rate - noise_rate >= rule.margin && z >= rule.z {
        Classification::Divergence
    } else {
        Classification::Noise
    };
    judgement
}

/// The one-sided two-proportion z statistic of `x1/n1` above `x0/n0`, with a pooled variance.
/// Zero when both proportions are 0 or both are 1 (no variance, no difference).
pub fn z_statistic(x1: u64, n1: u64, x0: u64, n0: u64) -> f64 {
    if n1 == 0 || n0 == 0 {
        return 0.0;
    }
    let (n1, n0) = (n1 as f64, n0 as f64);
    let (p1, p0) = (x1 as f64 / n1, x0 as f64 / n0);
    let pooled = (x1 + x0) as f64 / (n1 + n0);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n0);
    if variance <= 0.0 {
        return 0.0;
    }
    (p1 - p0) / variance.sqrt()
}

/// The Wilson score interval of `successes / trials` at `z` standard errors (1.96 for 95%);
/// `None` without trials. Unlike the normal approximation it stays within [0, 1] and behaves
/// at rates of 0 and 1, where match rates live.
pub fn wilson_interval(successes: u64, trials: u64, z: f64) -> Option<(f64, f64)> {
    if trials == 0 {
        return None;
    }
    let n = trials as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    // At a rate of exactly 0 or 1 the bound on that side is the rate itself; rounding would
    // otherwise leave it a hair inside.
    let low = if successes == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let high = if successes == trials {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    Some((low, high))
}

/// Methods that are safe to send twice and whose answers to identical requests should be
/// identical (RFC 9110, section 9.2.1).
pub fn is_safe_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

/// Request headers that change which answer a service gives: two requests that differ in one
/// of them are not "identical" for live-noise learning, even with the same method, target and
/// body. Credentials above all: two users' `/me` differ, and that is not noise.
///
/// Limitation: a service that varies its answer on another request header (one it names in
/// `Vary`) can make that header's effect look like live noise; see docs/analysis.md.
const KEY_HEADERS: [&str; 5] = [
    "authorization",
    "cookie",
    "accept",
    "accept-language",
    "accept-encoding",
];

/// Entries larger than this share of the cache are not kept, so one big answer cannot evict
/// everything else.
const MAX_ENTRY_SHARE: usize = 8;

/// The last live response of each distinct safe request, so a repeat can be compared with it.
/// Bounded by the bytes it holds; the least recently used entry goes first.
#[derive(Debug)]
pub struct LiveNoiseCache {
    capacity_bytes: usize,
    used_bytes: usize,
    entries: HashMap<u64, CachedResponse>,
    /// Use stamp to key, oldest first.
    order: BTreeMap<u64, u64>,
    next_stamp: u64,
}

#[derive(Debug)]
struct CachedResponse {
    response: Response,
    size: usize,
    stamp: u64,
}

impl LiveNoiseCache {
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            used_bytes: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// The key of a request for the cache; `None` for a method that is not safe.
    pub fn key(request: &Request) -> Option<u64> {
        if !is_safe_method(&request.method) {
            return None;
        }
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(request.method.as_bytes());
        hasher.update(b" ");
        hasher.update(request.target.as_bytes());
        for name in KEY_HEADERS {
            for value in request.headers.get_all(name) {
                hasher.update(b"\n");
                hasher.update(name.as_bytes());
                hasher.update(b":");
                hasher.update(value);
            }
        }
        hasher.update(b"\n\n");
        hasher.update(&request.body);
        Some(hasher.digest())
    }

    /// Remembers `response` as the latest answer to `key` and returns the one it replaces.
    pub fn swap(&mut self, key: u64, response: &Response) -> Option<Response> {
        let previous = self.remove(key);

        let size = response_size(response);
        if size <= self.capacity_bytes / MAX_ENTRY_SHARE {
            while self.used_bytes + size > self.capacity_bytes {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                if let Some(entry) = self.entries.remove(&oldest) {
                    self.used_bytes -= entry.size;
                }
            }
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            self.order.insert(stamp, key);
            self.used_bytes += size;
            self.entries.insert(
                key,
                CachedResponse {
                    // A copy, so the entry holds exactly the bytes it is charged for rather
                    // than a view that keeps a larger buffer alive.
                    response: Response {
                        status: response.status,
                        headers: response.headers.clone(),
                        body: bytes::Bytes::copy_from_slice(&response.body),
                    },
                    size,
                    stamp,
                },
            );
        }
        previous
    }

    fn remove(&mut self, key: u64) -> Option<Response> {
        let entry = self.entries.remove(&key)?;
        self.order.remove(&entry.stamp);
        self.used_bytes -= entry.size;
        Some(entry.response)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
}

/// Bytes an entry holds, with a fixed allowance for the bookkeeping around it.
fn response_size(response: &Response) -> usize {
    let headers: usize = response
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + 32)
        .sum();
    response.body.len() + headers + 128
}

#[cfg(test)]
mod tests;
