//! Specter mirrors live HTTP traffic to a shadow (candidate) service and reports every
//! divergence between the two.
//!
//! The flow, from capture source to report:
//!
//! ```text
//! proxy / attach ──▶ Exchange ──▶ pipeline: sample ─▶ replay ─▶ compare ─▶ record ─▶ serve
//! ```
//!
//! Capture sources ([`proxy`], [`capture`]) know nothing of shadows or stores; the stages after
//! [`exchange::Exchange`] know nothing of packets or proxies.

pub mod api;
pub mod capture;
pub mod cluster;
pub mod compare;
pub mod config;
pub mod event;
pub mod exchange;
pub mod metrics;
pub mod pipeline;
pub mod profile;
pub mod proxy;
pub mod reassembly;
pub mod replay;
pub mod store;
pub mod testserver;
pub mod traffic;
pub mod tui;
pub mod verdict;

/// An error and its causes on one line, each cause after a `: `. A cause whose text the line
/// already holds is left out: many errors here say their cause in their own text too.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
