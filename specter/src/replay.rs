//! The shadow client: replays a captured request to the shadow service and reads its answer.
//!
//! The replayed request keeps the method, path, query, end-to-end headers and body of the
//! original. It is placed under the shadow target's path prefix, carries the shadow's Host
//! (unless `replay.preserve_host`), and is marked with `X-Specter-Shadow: 1`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream, UdpSocket},
};

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

/// Told the local address of each connection the shadow client opens (`true`) and closes
/// (`false`), before the first packet leaves. Passive capture uses it to leave Specter's own
/// replays out when the shadow shares the live service's interface and port.
pub type LocalEndpointHook = Arc<dyn Fn(SocketAddr, bool) + Send + Sync>;

/// Replays requests to one shadow target.
#[derive(Clone)]
pub struct ShadowClient {
    client: Client<ShadowConnector, Full<Bytes>>,
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
        hook: Option<LocalEndpointHook>,
    ) -> Self {
        let connector = ShadowConnector {
            hook,
            connect_timeout: timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http1_max_headers(crate::proxy::MAX_HEADERS)
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
                    cause: crate::error_chain(&e),
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

/// Opens TCP connections to the shadow, reporting each local endpoint to the hook before the
/// connection's first packet.
#[derive(Clone)]
pub struct ShadowConnector {
    hook: Option<LocalEndpointHook>,
    connect_timeout: Duration,
}

impl tower_service::Service<http::Uri> for ShadowConnector {
    type Response = TokioIo<ShadowStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other("shadow URL has no host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let mut last_error = io::Error::other(format!("{host} resolved to no address"));
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match this.connect(addr).await {
                    Ok(stream) => return Ok(TokioIo::new(stream)),
                    Err(error) => last_error = error,
                }
            }
            Err(last_error)
        })
    }
}

impl ShadowConnector {
    async fn connect(&self, addr: SocketAddr) -> io::Result<ShadowStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_nodelay(true)?;

        // Binding first fixes the local endpoint, so it is known before the SYN leaves.
        let local = match &self.hook {
            Some(hook) => {
                socket.bind(SocketAddr::new(source_address(addr).await?, 0))?;
                let local = socket.local_addr()?;
                hook(local, true);
                Some((local, hook.clone()))
            }
            None => None,
        };

        let connected = tokio::time::timeout(self.connect_timeout, socket.connect(addr)).await;
        let stream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                if let Some((local, hook)) = &local {
                    hook(*local, false);
                }
                return Err(error);
            }
            Err(_) => {
                if let Some((local, hook)) = &local {
                    hook(*local, false);
                }
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
        };
        Ok(ShadowStream { stream, local })
    }
}

/// The source address the kernel would pick to reach `destination`.
async fn source_address(destination: SocketAddr) -> io::Result<IpAddr> {
    let unspecified: SocketAddr = if destination.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = UdpSocket::bind(unspecified).await?;
    probe.connect(destination).await?;
    Ok(probe.local_addr()?.ip())
}

/// A connection to the shadow; tells the hook when it closes.
pub struct ShadowStream {
    stream: TcpStream,
    local: Option<(SocketAddr, LocalEndpointHook)>,
}

impl Drop for ShadowStream {
    fn drop(&mut self) {
        if let Some((local, hook)) = &self.local {
            hook(*local, false);
        }
    }
}

impl Connection for ShadowStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for ShadowStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ShadowStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
