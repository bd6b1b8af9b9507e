//! `Exchange`: one HTTP request and the live response to it, the one type every capture source
//! produces and the pipeline consumes.
//!
//! Capture sources (the inline proxy, passive attach) build exchanges; nothing downstream of
//! this type knows which source made one, beyond the `source` field it reports.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Which capture source produced an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Proxy,
    Attach,
}

/// How much of an exchange was captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Request and response were captured whole.
    Complete,
    /// A body was longer than `capture.max_body_bytes`; only its start was kept.
    Truncated,
    /// Part of the exchange was never seen (a lost segment, a client that went away).
    Incomplete,
}

/// Header fields in the order they arrived, repeated names kept as separate entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers(pub Vec<(String, Bytes)>);

impl Headers {
    /// Copies the fields of an `http::HeaderMap`, which keeps order within each name.
    pub fn from_map(map: &http::HeaderMap) -> Self {
        Self(
            map.iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        Bytes::copy_from_slice(value.as_bytes()),
                    )
                })
                .collect(),
        )
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name` as text, if it is valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Bytes> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The captured request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// HTTP minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Headers,
    /// The body with transfer coding removed, up to the capture cap.
    pub body: Bytes,
}

impl Request {
    /// The target's path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// A captured response, from the live service or replayed from the shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    /// The body with transfer coding removed (content coding such as gzip is kept).
    pub body: Bytes,
}

/// When the exchange happened and how long the live service took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// When the request started.
    pub started: SystemTime,
    /// From the request's start to the live response's last byte.
    pub live_latency: Duration,
}

/// One request and the live response to it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub source: Source,
    pub client: Option<SocketAddr>,
    pub request: Request,
    pub response: Response,
    pub timing: Timing,
    /// The value of the routing-key header, when the config names one and the request has it.
    pub routing_key: Option<String>,
    pub quality: Quality,
}

/// Headers that describe one connection rather than the message (RFC 9110, section 7.6.1).
/// They are never forwarded to the live service nor replayed to the shadow.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// True when `name` is hop-by-hop, either always or because `Connection` lists it.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || name.eq_ignore_ascii_case("upgrade")
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// The header names a `Connection` field lists, lower-cased.
pub fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}
