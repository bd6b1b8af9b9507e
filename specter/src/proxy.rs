//! The inline capture source: a reverse proxy in front of the live service.
//!
//! Where eBPF cannot run, clients talk to Specter, Specter forwards to the live service and
//! streams the live response back as it arrives. Request and response bodies are copied on the
//! way through, up to `capture.max_body_bytes`; when the response has been delivered the
//! exchange goes to the pipeline. The client never waits for the shadow.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request as HttpRequest, Response as HttpResponse, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::graceful::GracefulShutdown,
};
use thiserror::Error;
use tokio::{net::TcpListener, sync::oneshot};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    config::Target,
    exchange::{self, Exchange, Headers, Quality, Request, Response, Source, Timing},
    pipeline::Pipeline,
    profile::Tally,
};

/// Header fields accepted in a request or a live response. Far above what HTTP servers
/// commonly take (often 100), so the proxy never refuses what the live service would accept.
pub const MAX_HEADERS: usize = 1000;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} for proxy mode: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How the proxy reaches the live service and what it captures.
#[derive(Clone)]
pub struct ProxySettings {
    pub live: Target,
    pub routing_key: Option<String>,
    pub max_body_bytes: usize,
    pub live_timeout: Duration,
    pub connect_timeout: Duration,
}

struct Proxy {
    settings: ProxySettings,
    client: Client<HttpConnector, ProxyBody>,
    pipeline: Pipeline,
}

/// Binds the proxy listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

/// Serves clients until `shutdown` resolves, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    settings: ProxySettings,
    pipeline: Pipeline,
    shutdown: impl Future<Output = ()>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(settings.connect_timeout));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .http1_max_headers(MAX_HEADERS)
        .build(connector);
    let proxy = Arc::new(Proxy {
        settings,
        client,
        pipeline,
    });
    let graceful = GracefulShutdown::new();

    if let Ok(addr) = listener.local_addr() {
        info!(%addr, live = %proxy.settings.live.authority, "Proxy mode listening");
    }
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%error, "Proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);

        let proxy = proxy.clone();
        let service = hyper::service::service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_headers(MAX_HEADERS)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(
            async move {
                if let Err(error) = connection.await {
                    debug!(%error, "Client connection ended with an error");
                }
            }
            .instrument(info_span!("connection", %peer)),
        );
    }

    info!("Proxy stopped accepting; waiting for open requests");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        warn!("Some client connections were still open after 10 s and were closed");
    }
}

impl Proxy {
    async fn handle(
        &self,
        request: HttpRequest<Incoming>,
        peer: SocketAddr,
    ) -> HttpResponse<ProxyBody> {
        let started_at = SystemTime::now();
        let started = Instant::now();
        let (parts, body) = request.into_parts();

        let target = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
            .to_owned();
        let request_headers = Headers::from_map(&parts.headers);
        let routing_key = self
            .settings
            .routing_key
            .as_deref()
            .and_then(|name| request_headers.get_str(name))
            .map(str::to_owned);

        // The request body reaches the live service as it arrives; a copy is kept on the side.
        let (request_body, request_copy) = Tee::new(body, self.settings.max_body_bytes);
        let upstream = match self.upstream_request(&parts, &target, peer, request_body) {
            Ok(upstream) => upstream,
            Err(error) => return plain(StatusCode::BAD_REQUEST, &format!("specter: {error}\n")),
        };

        let live = self.settings.live.authority.clone();
        let response =
            match tokio::time::timeout(self.settings.live_timeout, self.client.request(upstream))
                .await
            {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    self.pipeline.profile().tally(Tally::LiveError);
                    let cause = crate::error_chain(&error);
                    debug!(%live, %cause, "Live service request failed");
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        &format!("specter: live service at {live} failed: {cause}\n"),
                    );
                }
                Err(_) => {
                    self.pipeline.profile().tally(Tally::LiveError);
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                            "specter: live service at {live} did not answer within {:?}\n",
                            self.settings.live_timeout
                        ),
                    );
                }
            };

        let (mut response_parts, response_body) = response.into_parts();
        let response_headers = Headers::from_map(&response_parts.headers);
        strip_hop_by_hop(&mut response_parts.headers);
        let (response_body, response_copy) = Tee::new(response_body, self.settings.max_body_bytes);

        // Once the client has the whole response, the exchange is complete and goes on.
        let request = Request {
            method: parts.method.as_str().to_owned(),
            target,
            version: version_minor(parts.version),
            headers: request_headers,
            body: Bytes::new(),
        };
        let status = response_parts.status.as_u16();
        let pipeline = self.pipeline.clone();
        tokio::spawn(async move {
            let (request_body, response_body) = (request_copy.await, response_copy.await);
            let live_latency = started.elapsed();
            let quality = match (&request_body, &response_body) {
                (Ok(req), Ok(resp)) if req.truncated || resp.truncated => Quality::Truncated,
                (Ok(_), Ok(_)) => Quality::Complete,
                _ => Quality::Incomplete,
            };
            let exchange = Exchange {
                source: Source::Proxy,
                client: Some(peer),
                request: Request {
                    body: request_body.map(|c| c.bytes).unwrap_or_default(),
                    ..request
                },
                response: Response {
                    status,
                    headers: response_headers,
                    body: response_body.map(|c| c.bytes).unwrap_or_default(),
                },
                timing: Timing {
                    started: started_at,
                    live_latency,
                },
                routing_key,
                quality,
            };
            pipeline.submit(exchange);
        });

        HttpResponse::from_parts(response_parts, response_body.boxed())
    }

    /// The request for the live service: same method, target and end-to-end headers, plus
    /// `X-Forwarded-For`. The client's Host is kept, so the live service sees what it always saw.
    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        target: &str,
        peer: SocketAddr,
        body: Tee<Incoming>,
    ) -> Result<HttpRequest<ProxyBody>, http::Error> {
        let uri = format!(
            "http://{}{}",
            self.settings.live.authority,
            self.settings.live.place(target)
        );
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        // The client already got its `100 Continue` from this proxy when the body was read.
        headers.remove(header::EXPECT);
        if !headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(&self.settings.live.authority)
        {
            headers.insert(header::HOST, host);
        }
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", value);
        }

        let mut request = HttpRequest::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(body.boxed())?;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// Removes the headers that belong to one connection (RFC 9110, section 7.6.1).
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let tokens = exchange::connection_tokens(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(|v| v.as_bytes()),
    );
    let doomed: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| exchange::is_hop_by_hop(name.as_str(), &tokens))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

fn version_minor(version: http::Version) -> u8 {
    if version == http::Version::HTTP_10 {
        0
    } else {
        1
    }
}

fn plain(status: StatusCode, text: &str) -> HttpResponse<ProxyBody> {
    let mut response = HttpResponse::new(
        Full::new(Bytes::from(text.to_owned()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// What a [`Tee`] kept of a body.
struct Copy {
    bytes: Bytes,
    truncated: bool,
}

/// A body that passes every frame through and keeps a copy of the data, up to a cap. The copy
/// is delivered when the body ends; if it never ends (the peer went away, an error), the
/// receiver sees the sender dropped and the exchange is incomplete.
struct Tee<B> {
    inner: B,
    copy: BytesMut,
    cap: usize,
    truncated: bool,
    done: Option<oneshot::Sender<Copy>>,
}

impl<B: Body> Tee<B> {
    fn new(inner: B, cap: usize) -> (Self, oneshot::Receiver<Copy>) {
        let (tx, rx) = oneshot::channel();
        let mut tee = Self {
            inner,
            copy: BytesMut::new(),
            cap,
            truncated: false,
            done: Some(tx),
        };
        // An empty body (a GET, a 204) may never be polled at all; it is complete already.
        if tee.inner.is_end_stream() {
            tee.finish();
        }
        (tee, rx)
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let bytes = std::mem::take(&mut self.copy).freeze();
            let _ = done.send(Copy {
                bytes,
                truncated: self.truncated,
            });
        }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let room = this.cap.saturating_sub(this.copy.len());
                    if data.len() > room {
                        this.truncated = true;
                    }
                    this.copy.extend_from_slice(&data[..data.len().min(room)]);
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.done = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
