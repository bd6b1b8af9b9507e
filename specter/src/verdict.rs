//! `specter verdict`: asks a running Specter whether the shadow passes, prints a table per
//! route, and exits 0 (pass), 1 (fail), 2 (not enough evidence yet) or 3 (no verdict could be
//! had), for a CI job or a canary gate.
//!
//! Like the dashboard it is a client of the admin API only (`GET /api/verdict`), so it can ask
//! any node from anywhere, for that node's figures or (`--scope cluster`) the whole cluster's. The rule itself lives in [`crate::profile::Verdict`] and
//! `docs/analysis.md`.

use std::{fmt::Write as _, time::Duration};

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Deserialize;
use thiserror::Error;

use crate::profile::{Decision, RouteVerdict, Verdict};

/// How long the API may take to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The exit code when no verdict could be had at all (the API unreachable, say): distinct from
/// a failing shadow, so a gate can tell "the shadow is bad" from "we could not ask".
pub const EXIT_NO_VERDICT: u8 = 3;

/// The options of `specter verdict`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerdictArgs {
    /// The admin API of a running Specter.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub api: String,
    /// Least share of compared exchanges that must match, per route; its complement is the
    /// most shadow errors allowed. Default 0.999.
    #[arg(long)]
    pub min_match_rate: Option<f64>,
    /// Mirrored exchanges a route needs before it is judged. Default `compare.min_samples`.
    #[arg(long)]
    pub min_samples: Option<u64>,
    /// Most the shadow's p90 latency may exceed the live p90, as a factor. Default
    /// `compare.latency_ratio`.
    #[arg(long)]
    pub max_latency_ratio: Option<f64>,
    /// Judge this node's figures (`local`) or the whole cluster's, merged from every live
    /// member (`cluster`). A cluster verdict needs every member's figures: when one cannot be
    /// read there is no verdict (exit 3).
    #[arg(long, value_enum, default_value_t = Scope::Local)]
    pub scope: Scope,
}

/// Whose figures an API client asks for: the `scope` query parameter of the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// The node asked.
    #[default]
    Local,
    /// Every live member of its cluster, merged.
    Cluster,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cluster => "cluster",
        }
    }
}

/// `GET /api/verdict`: the verdict, and in the cluster scope the members it was read from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Answer {
    #[serde(flatten)]
    pub verdict: Verdict,
    #[serde(default)]
    pub scope: Option<String>,
    /// Each member's part of a cluster verdict; empty for a node's own.
    #[serde(default)]
    pub nodes: Vec<NodePart>,
}

/// One member's part of a cluster-wide answer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NodePart {
    pub name: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Why no verdict could be had.
#[derive(Debug, Error)]
pub enum VerdictError {
    #[error("--api {api:?} is not an http:// URL of the admin API")]
    BadUrl { api: String },
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url} answered a body that is not a verdict: {reason}")]
    Decode { url: String, reason: String },
    #[error(
        "the cluster verdict would leave out the figures of {}; ask again or use --scope local",
        missing.join(", ")
    )]
    MembersMissing { missing: Vec<String> },
}

/// Fetches the verdict, prints it and returns the exit code.
pub async fn run(args: &VerdictArgs) -> u8 {
    match fetch(args).await {
        Ok(answer) => {
            print!("{}", render(&answer));
            answer.verdict.verdict.exit_code()
        }
        Err(error) => {
            eprintln!("specter verdict: {error}");
            EXIT_NO_VERDICT
        }
    }
}

/// `GET /api/verdict` with the criteria and scope given.
pub async fn fetch(args: &VerdictArgs) -> Result<Answer, VerdictError> {
    let base = base_url(&args.api)?;
    let mut query = Vec::new();
    if args.scope != Scope::Local {
        query.push(format!("scope={}", args.scope.as_str()));
    }
    if let Some(rate) = args.min_match_rate {
        query.push(format!("min_match_rate={rate}"));
    }
    if let Some(samples) = args.min_samples {
        query.push(format!("min_samples={samples}"));
    }
    if let Some(ratio) = args.max_latency_ratio {
        query.push(format!("max_latency_ratio={ratio}"));
    }
    let url = if query.is_empty() {
        format!("{base}/api/verdict")
    } else {
        format!("{base}/api/verdict?{}", query.join("&"))
    };

    let unreachable = |reason: String| VerdictError::Unreachable {
        url: url.clone(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| VerdictError::BadUrl {
        api: args.api.clone(),
    })?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let request = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| unreachable(e.to_string()))?;

    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| unreachable(crate::error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(crate::error_chain(&e)))?
            .to_bytes();
        Ok::<_, VerdictError>((status, body))
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .map_err(|_| VerdictError::Timeout {
            url: url.clone(),
            timeout: REQUEST_TIMEOUT,
        })??;
    if status != StatusCode::OK {
        return Err(VerdictError::Status {
            url,
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).chars().take(300).collect(),
        });
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|e| VerdictError::Decode {
        url,
        reason: e.to_string(),
    })?;
    complete(answer)
}

/// The answer, if it holds the figures of every member it names: a cluster verdict with a
/// member left out could pass a shadow that fails there.
fn complete(answer: Answer) -> Result<Answer, VerdictError> {
    let missing: Vec<String> = answer
        .nodes
        .iter()
        .filter(|node| !node.ok)
        .map(|node| match &node.error {
            Some(error) => format!("{} ({error})", node.name),
            None => node.name.clone(),
        })
        .collect();
    if missing.is_empty() {
        Ok(answer)
    } else {
        Err(VerdictError::MembersMissing { missing })
    }
}

/// `http://host:port` without a trailing slash; a bare `host:port` gets the scheme.
fn base_url(api: &str) -> Result<String, VerdictError> {
    let api = api.trim();
    let with_scheme = if api.contains("://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let uri: Uri = with_scheme.parse().map_err(|_| VerdictError::BadUrl {
        api: api.to_owned(),
    })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(VerdictError::BadUrl {
            api: api.to_owned(),
        });
    }
    Ok(with_scheme.trim_end_matches('/').to_owned())
}

/// The verdict as a table, one line per route, then the reasons and the overall decision.
pub fn render(answer: &Answer) -> String {
    let verdict = &answer.verdict;
    let c = &verdict.criteria;
    let mut out = String::new();
    if answer.scope.as_deref() == Some("cluster") {
        let names: Vec<&str> = answer.nodes.iter().map(|n| n.name.as_str()).collect();
        let _ = writeln!(
            out,
            "scope: cluster of {} ({})",
            names.len(),
            names.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "criteria: match rate >= {}, samples >= {}, shadow p90 <= {}x live p90",
        c.min_match_rate, c.min_samples, c.max_latency_ratio
    );

    let width = verdict
        .routes
        .iter()
        .map(|r| r.route.chars().count())
        .chain([5])
        .max()
        .unwrap_or(5);
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>8}  {:>8}  {:>6}  {:>8}  {:>17}  {:>7}  VERDICT",
        "ROUTE", "MIRRORED", "MATCHED", "DIVERGED", "ERRORS", "MATCH", "95% CI", "LATENCY",
    );
    for route in &verdict.routes {
        let _ = writeln!(out, "{}", row(route, width));
    }
    for route in verdict.routes.iter().filter(|r| !r.reasons.is_empty()) {
        for reason in &route.reasons {
            let _ = writeln!(out, "  {}: {reason}", route.route);
        }
    }
    let _ = writeln!(out, "verdict: {}", decision_name(verdict.verdict));
    out
}

fn row(route: &RouteVerdict, width: usize) -> String {
    let rate = route
        .match_rate
        .map_or_else(|| "-".to_owned(), |r| format!("{r:.4}"));
    let ci = route.match_rate_ci.map_or_else(
        || "-".to_owned(),
        |[low, high]| format!("[{low:.4}, {high:.4}]"),
    );
    let latency = route
        .latency_ratio
        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
    format!(
        "{:<width$}  {:>8}  {:>8}  {:>8}  {:>6}  {:>8}  {:>17}  {:>7}  {}",
        route.route,
        route.mirrored,
        route.matched,
        route.diverged,
        route.shadow_errors,
        rate,
        ci,
        latency,
        decision_name(route.verdict)
    )
}

fn decision_name(decision: Decision) -> &'static str {
    match decision {
        Decision::Pass => "pass",
        Decision::Fail => "fail",
        Decision::InsufficientEvidence => "insufficient evidence",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answer(nodes: serde_json::Value) -> Answer {
        serde_json::from_value(json!({
            "verdict": "pass",
            "criteria": {"min_match_rate": 0.999, "min_samples": 10, "max_latency_ratio": 1.5},
            "routes": [],
            "scope": "cluster",
            "nodes": nodes,
        }))
        .expect("a verdict answer")
    }

    #[test]
    fn a_cluster_verdict_names_its_members() {
        let answer = complete(answer(json!([
            {"name": "node-a", "api": "10.0.0.1:9090", "ok": true},
            {"name": "node-b", "api": "10.0.0.2:9090", "ok": true}
        ])))
        .expect("every member answered");
        let text = render(&answer);
        assert!(
            text.starts_with("scope: cluster of 2 (node-a, node-b)\n"),
            "{text}"
        );
        assert!(text.ends_with("verdict: pass\n"), "{text}");
    }

    #[test]
    fn a_member_left_out_means_no_cluster_verdict() {
        let error = complete(answer(json!([
            {"name": "node-a", "api": "10.0.0.1:9090", "ok": true},
            {"name": "node-b", "api": null, "ok": false, "error": "no answer within 2s"}
        ])))
        .expect_err("node-b's figures are missing");
        assert_eq!(
            error.to_string(),
            "the cluster verdict would leave out the figures of node-b (no answer within 2s); \
             ask again or use --scope local"
        );
    }
}
