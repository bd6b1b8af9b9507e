//! The verdict: does the shadow pass, per route and overall, for a CI job or a canary gate.
//!
//! A route passes when it has enough evidence and its match rate, shadow error rate and
//! latency are within the criteria; it fails when it has enough evidence and one of them is
//! not; otherwise the evidence is insufficient. Overall the worst route decides: any failure
//! fails, then any route without enough evidence (or no route at all) is insufficient.

use serde::{Deserialize, Serialize};

/// What the shadow must achieve. `GET /api/verdict` and `specter verdict` take each as an
/// option; the defaults come from the `compare` config section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Criteria {
    /// Least match rate, matched / (matched + diverged), and the complement is the most
    /// shadow errors allowed, as a share of mirrored exchanges.
    pub min_match_rate: f64,
    /// Mirrored exchanges a route needs before it is judged.
    pub min_samples: u64,
    /// Most the shadow's p90 latency may exceed the live p90, as a factor.
    pub max_latency_ratio: f64,
}

/// The least match rate asked for when none is given.
pub const DEFAULT_MIN_MATCH_RATE: f64 = 0.999;

/// The outcome of the verdict, for a route or overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Pass,
    InsufficientEvidence,
    Fail,
}

impl Decision {
    /// The exit code of `specter verdict`: 0 pass, 1 fail, 2 not enough evidence yet.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Pass => 0,
            Self::Fail => 1,
            Self::InsufficientEvidence => 2,
        }
    }
}

/// The verdict on one route, with the figures it rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteVerdict {
    pub route: String,
    pub verdict: Decision,
    /// Why it is not a pass, one sentence each; empty for a pass.
    pub reasons: Vec<String>,
    pub mirrored: u64,
    pub matched: u64,
    pub diverged: u64,
    pub shadow_errors: u64,
    pub match_rate: Option<f64>,
    /// The 95% Wilson interval of the match rate.
    pub match_rate_ci: Option<[f64; 2]>,
    /// shadow_errors / mirrored.
    pub error_rate: Option<f64>,
    pub latency_ratio: Option<f64>,
    /// Fields with differences that noise learning has not classified yet.
    pub pending_fields: u64,
}

/// The verdict overall and per route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub verdict: Decision,
    pub criteria: Criteria,
    pub routes: Vec<RouteVerdict>,
}

/// The figures of one route the verdict needs, as the profile has them.
pub(super) struct RouteFigures<'a> {
    pub route: &'a str,
    pub mirrored: u64,
    pub matched: u64,
    pub diverged: u64,
    pub shadow_errors: u64,
    pub match_rate_ci: Option<[f64; 2]>,
    pub pending_fields: u64,
    /// Shadow and live p90 in milliseconds, when both sides have enough latencies.
    pub p90_ms: Option<(f64, f64)>,
}

/// Below this difference the shadow is never called slower, whatever the ratio: at a few
/// hundred microseconds a ratio measures scheduling jitter, not the shadow.
pub const LATENCY_FLOOR_MS: f64 = 1.0;

/// True when the shadow's p90 exceeds the live p90 by more than `ratio` and by more than
/// [`LATENCY_FLOOR_MS`].
pub fn shadow_slower(shadow_p90_ms: f64, live_p90_ms: f64, ratio: f64) -> bool {
    shadow_p90_ms - live_p90_ms > LATENCY_FLOOR_MS && shadow_p90_ms > live_p90_ms * ratio
}

pub(super) fn judge_route(figures: &RouteFigures<'_>, criteria: &Criteria) -> RouteVerdict {
    let compared = figures.matched + figures.diverged;
    let match_rate = (compared > 0).then(|| figures.matched as f64 / compared as f64);
    let error_rate =
        (figures.mirrored > 0).then(|| figures.shadow_errors as f64 / figures.mirrored as f64);
    let latency_ratio = figures
        .p90_ms
        .and_then(|(shadow, live)| (live > 0.0).then(|| shadow / live));

    let mut failures = Vec::new();
    let mut missing = Vec::new();
    if figures.mirrored < criteria.min_samples {
        missing.push(format!(
            "{} of the {} mirrored exchanges needed",
            figures.mirrored, criteria.min_samples
        ));
    } else {
        // Shadow errors and latency do not depend on noise learning, so they can fail a route
        // whose fields are still being classified.
        let allowed_errors = 1.0 - criteria.min_match_rate;
        if let Some(error_rate) = error_rate.filter(|&r| r > allowed_errors + f64::EPSILON) {
            failures.push(format!(
                "shadow errors on {:.2}% of exchanges, above the {:.2}% allowed",
                error_rate * 100.0,
                allowed_errors * 100.0
            ));
        }
        if let Some((shadow, live)) = figures.p90_ms
            && shadow_slower(shadow, live, criteria.max_latency_ratio)
        {
            failures.push(format!(
                "shadow p90 {shadow:.1} ms is {:.2}x the live p90 {live:.1} ms, above {:.2}x",
                shadow / live.max(f64::MIN_POSITIVE),
                criteria.max_latency_ratio
            ));
        }

        if figures.pending_fields > 0 {
            missing.push(format!(
                "{} field(s) with differences are not yet classified as noise or divergence",
                figures.pending_fields
            ));
        } else if let Some(rate) = match_rate.filter(|&r| r < criteria.min_match_rate) {
            failures.push(format!(
                "match rate {rate:.4} is below {}",
                criteria.min_match_rate
            ));
        }
    }

    let (verdict, reasons) = if !failures.is_empty() {
        (Decision::Fail, failures)
    } else if !missing.is_empty() {
        (Decision::InsufficientEvidence, missing)
    } else {
        (Decision::Pass, Vec::new())
    };
    RouteVerdict {
        route: figures.route.to_owned(),
        verdict,
        reasons,
        mirrored: figures.mirrored,
        matched: figures.matched,
        diverged: figures.diverged,
        shadow_errors: figures.shadow_errors,
        match_rate,
        match_rate_ci: figures.match_rate_ci,
        error_rate,
        latency_ratio,
        pending_fields: figures.pending_fields,
    }
}

/// The overall decision from the routes': any failure fails; then any route without enough
/// evidence, or no route at all, is insufficient.
pub(super) fn overall(routes: &[RouteVerdict]) -> Decision {
    if routes.is_empty() {
        return Decision::InsufficientEvidence;
    }
    routes
        .iter()
        .map(|r| r.verdict)
        .max()
        .unwrap_or(Decision::InsufficientEvidence)
}
