//! The shadow client: replays a captured request to the shadow service and reads its answer.
//!
//! The replayed request keeps the method, path, query, end-to-end headers and body of the
//! original. It is placed under the shadow target's path prefix, carries the shadow's Host
//! (unless `replay.preserve_host`), and is marked with `X-Specter-Shadow: 1`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use thiserror::Error;

use crate::{
    config::Target,
    exchange::{self, Headers, Request, Response},
};

/// The header every replayed request carries, so the shadow (and Specter's own capture) can
/// tell replays from real traffic.
pub const SHADOW_MARK: &str = "x-specter-shadow";

/// Why a replay produced no comparable response. Always about the shadow side.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("shadow request could not be built for {target}: {reason}")]
    Build { target: String, reason: String },
    #[error("shadow at {authority} failed: {cause}")]
    Http { authority: String, cause: String },
    #[error("shadow at {authority} did not answer within {timeout:?}")]
    Timeout {
        authority: String,
        timeout: Duration,
    },
    #[error("shadow at {authority} sent a body over capture.max_body_bytes ({limit} bytes)")]
    BodyTooLarge { authority: String, limit: usize },
}

/// The shadow's answer and how long it took, from sending to the body's last byte.
#[derive(Debug, Clone)]
pub struct ShadowResponse {
    pub response: Response,
    pub latency: Duration,
}

/// Replays requests to one shadow target.
#[derive(Clone)]
pub struct ShadowClient {
    client: Client<HttpConnector, Full<Bytes>>,
    target: Target,
    preserve_host: bool,
    timeout: Duration,
    max_body_bytes: usize,
}

impl ShadowClient {
    pub fn new(
        target: Target,
        preserve_host: bool,
        timeout: Duration,
        max_body_bytes: usize,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            client,
            target,
            preserve_host,
            timeout,
            max_body_bytes,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sends `request` to the shadow and reads the whole response.
    pub async fn replay(&self, request: &Request) -> Result<ShadowResponse, ReplayError> {
        let outgoing = self.build(request)?;
        let authority = &self.target.authority;

        let started = Instant::now();
        let exchange = async {
            let response = self
                .client
                .request(outgoing)
                .await
                .map_err(|e| ReplayError::Http {
                    authority: authority.clone(),
                    cause: error_chain(&e),
                })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.max_body_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        ReplayError::BodyTooLarge {
                            authority: authority.clone(),
                            limit: self.max_body_bytes,
                        }
                    } else {
                        ReplayError::Http {
                            authority: authority.clone(),
                            cause: format!("reading body: {e}"),
                        }
                    }
                })?;
            Ok::<_, ReplayError>(Response {
                status: parts.status.as_u16(),
                headers: Headers::from_map(&parts.headers),
                body: body.to_bytes(),
            })
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ReplayError::Timeout {
                authority: authority.clone(),
                timeout: self.timeout,
            })??;

        Ok(ShadowResponse {
            response,
            latency: started.elapsed(),
        })
    }

    fn build(&self, request: &Request) -> Result<http::Request<Full<Bytes>>, ReplayError> {
        let build_error = |reason: String| ReplayError::Build {
            target: request.target.clone(),
            reason,
        };

        let uri = format!(
            "http://{}{}",
            self.target.authority,
            self.target.place(&request.target)
        );
        let mut builder = http::Request::builder()
            .method(request.method.as_bytes())
            .uri(uri)
            .version(http::Version::HTTP_11);

        // End-to-end headers only: hop-by-hop ones describe the client's connection, and the
        // body is sent whole, so framing and `Expect` are recomputed for this request.
        let tokens =
            exchange::connection_tokens(request.headers.get_all("connection").map(|v| &v[..]));
        for (name, value) in request.headers.iter() {
            let skip = exchange::is_hop_by_hop(name, &tokens)
                || name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("expect")
                || name.eq_ignore_ascii_case(SHADOW_MARK)
                || (name.eq_ignore_ascii_case("host") && !self.preserve_host);
            if !skip {
                builder = builder.header(name, value.as_ref());
            }
        }
        if !self.preserve_host || request.headers.get("host").is_none() {
            builder = builder.header(http::header::HOST, &self.target.authority);
        }
        if !request.body.is_empty() || request.headers.get("content-length").is_some() {
            builder = builder.header(http::header::CONTENT_LENGTH, request.body.len());
        }
        builder = builder.header(SHADOW_MARK, "1");

        builder
            .body(Full::new(request.body.clone()))
            .map_err(|e| build_error(e.to_string()))
    }
}

/// An error and its causes on one line, so the recorded shadow error says what happened.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
