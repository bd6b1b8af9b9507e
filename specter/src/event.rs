//! `Event`: the record of one mirrored exchange, as the store keeps it and the API serves it.
//!
//! The pipeline makes one event per mirrored exchange: matched, diverged, or a shadow error.
//! Compare fills in the differences; the store keeps events; the API serves them as JSON.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// How a mirrored exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Matched,
    Diverged,
    ShadowError,
}

/// Which part of the response a difference is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    Status,
    Header,
    Body,
}

/// What the shadow did to the live value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffOp {
    /// Present on the shadow only.
    Added,
    /// Present on the live side only.
    Removed,
    /// Present on both sides with different values of the same JSON type.
    Changed,
    /// Present on both sides with values of different JSON types (a string where the live side
    /// had a number, HTML where it had JSON).
    TypeChanged,
    /// The bodies could not be compared at all: one did not decode, or was too large once
    /// decoded. Never taken for a match.
    NotComparable,
}

/// How much a difference matters, most severe last so that `Ord` ranks them.
///
/// A changed status class (2xx to 5xx) comes first, then schema breaks (a field or header
/// missing, a value whose type changed, a body that could not be compared), then changed
/// values, then additions, which a client that ignores unknown fields never notices.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Addition,
    #[default]
    Value,
    Schema,
    Status,
}

/// One difference between the live and the shadow response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub kind: DiffKind,
    /// For `body`, a JSON Pointer ("" is the whole body); for `header`, the lower-cased name;
    /// for `status`, "".
    pub path: String,
    pub op: DiffOp,
    /// The live value; absent when the shadow added it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<serde_json::Value>,
    /// The shadow value; absent when the shadow removed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<serde_json::Value>,
    /// How much it matters; see [`Severity`].
    #[serde(default)]
    pub severity: Severity,
    /// True when, as this exchange was judged, the field was classified as noise: it differs
    /// as often between two answers of the same version as it does between live and shadow.
    /// An exchange whose differences are all noise counts as matched.
    #[serde(default)]
    pub noise: bool,
}

/// A body as stored: text when it is UTF-8, base64 otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBody {
    pub text: String,
    /// True when `text` is base64 of the raw bytes.
    pub base64: bool,
    /// Size of the body in bytes.
    pub size: usize,
}

impl StoredBody {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self {
                text: text.to_owned(),
                base64: false,
                size: bytes.len(),
            },
            Err(_) => Self {
                text: base64::engine::general_purpose::STANDARD.encode(bytes),
                base64: true,
                size: bytes.len(),
            },
        }
    }
}

/// One side's response as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    /// Header fields in order, values as (lossy) text.
    pub headers: Vec<(String, String)>,
    pub body: StoredBody,
    pub latency_ms: f64,
}

impl StoredResponse {
    pub fn from_response(
        response: &crate::exchange::Response,
        latency: std::time::Duration,
    ) -> Self {
        Self {
            status: response.status,
            headers: response
                .headers
                .iter()
                .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            body: StoredBody::from_bytes(&response.body),
            latency_ms: latency.as_secs_f64() * 1000.0,
        }
    }
}

/// The full record of one mirrored exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique within one node's store; assigned when recorded.
    pub id: u64,
    /// Unix time of the request's start, in milliseconds.
    pub time_ms: u64,
    pub node: String,
    pub outcome: Outcome,
    pub method: String,
    /// Path with query, as the client sent it.
    pub target: String,
    pub route: String,
    #[serde(default)]
    pub routing_key: Option<String>,
    pub live: StoredResponse,
    /// Absent when the shadow failed before answering.
    #[serde(default)]
    pub shadow: Option<StoredResponse>,
    #[serde(default)]
    pub differences: Vec<Difference>,
    /// Why the shadow failed, for `shadow_error` events.
    #[serde(default)]
    pub error: Option<String>,
}

/// The short form of an event, for lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSummary {
    pub id: u64,
    pub time_ms: u64,
    pub outcome: Outcome,
    pub method: String,
    pub target: String,
    pub route: String,
    pub live_status: u16,
    pub shadow_status: Option<u16>,
    /// Differences that count: those not classified as noise.
    pub differences: usize,
    /// Differences on fields classified as noise, stored but not counted.
    #[serde(default)]
    pub noise_differences: usize,
    /// The most severe difference that counts; none for a match or a shadow error.
    #[serde(default)]
    pub severity: Option<Severity>,
    /// The first few difference paths that count, most severe first, as `kind:path`.
    pub paths: Vec<String>,
    pub error: Option<String>,
    /// The node that recorded it, in cluster-wide lists (`scope=cluster`); event ids are per
    /// node, so a divergence there is named by node and id together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Event {
    pub fn summary(&self) -> EventSummary {
        let mut counted: Vec<&Difference> = self.differences.iter().filter(|d| !d.noise).collect();
        // Stable, so differences of one severity keep the order compare found them in.
        counted.sort_by_key(|d| std::cmp::Reverse(d.severity));
        EventSummary {
            id: self.id,
            time_ms: self.time_ms,
            outcome: self.outcome,
            method: self.method.clone(),
            target: self.target.clone(),
            route: self.route.clone(),
            live_status: self.live.status,
            shadow_status: self.shadow.as_ref().map(|s| s.status),
            differences: counted.len(),
            noise_differences: self.differences.len() - counted.len(),
            severity: counted.first().map(|d| d.severity),
            paths: counted
                .iter()
                .take(5)
                .map(|d| format!("{}:{}", kind_name(d.kind), d.path))
                .collect(),
            error: self.error.clone(),
            node: None,
        }
    }
}

fn kind_name(kind: DiffKind) -> &'static str {
    match kind {
        DiffKind::Status => "status",
        DiffKind::Header => "header",
        DiffKind::Body => "body",
    }
}
