//! The node-to-node channel: a node that does not own a routing key ships the mirror job to
//! the node that does.
//!
//! One TCP connection per owner, opened on demand, carries jobs in the order they were
//! captured; the owner handles each connection's jobs in that order and acknowledges each one.
//! Nothing here ever waits on the live path: [`Forwarder::ship`] only puts the job on the
//! owner's bounded queue, and a job that cannot be shipped goes back to the caller or to
//! [`Outcome::not_shipped`] to be handled locally.
//!
//! Authentication, with the forward key derived from the cluster secret:
//! 1. the client sends a magic and a random nonce;
//! 2. the server answers with its magic, its own nonce and an HMAC-SHA256 over both nonces,
//!    which the client checks, so a job is never handed to a stranger;
//! 3. every frame is `u32` length, payload, and an HMAC-SHA256 over both nonces, the frame's
//!    sequence number and the payload, so a frame cannot be forged, altered, reordered or
//!    replayed on another connection. A frame above the cap closes the connection unread.
//!
//! Acknowledgements are one byte per job, in order. A job is counted `forwarded` once
//! acknowledged. A job that was written but never acknowledged (the link failed in between) is
//! counted `forward_unconfirmed` and is not replayed here: the owner may already have replayed
//! it, and the shadow must never see a request twice.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, watch},
    time::timeout,
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::job;
use crate::exchange::Exchange;

/// The first bytes each side sends, naming the protocol and its version.
const CLIENT_MAGIC: &[u8; 8] = b"SPFWDC01";
const SERVER_MAGIC: &[u8; 8] = b"SPFWDS01";
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// The byte the owner sends back for each job it took.
const ACK: u8 = 0x06;

/// Jobs waiting for one owner's connection; beyond it they are handled locally. Each job holds
/// up to two capped bodies, so this bounds memory as much as it bounds count.
pub const LINK_QUEUE: usize = 1024;
/// Jobs written to an owner and not yet acknowledged, at most.
const IN_FLIGHT: usize = 512;
/// How long an owner may take to acknowledge a job before its link is declared dead. An owner
/// acknowledges as soon as the job is queued, so on a LAN this is ample; it is also how long
/// a link that silently went down keeps swallowing jobs, which are then counted unconfirmed.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connection, jobs for that owner are handled locally for this long before
/// connecting is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a frame may take to arrive once its length was read.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections one node accepts at once.
const MAX_CONNECTIONS: usize = 256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("cannot listen on {addr} for node-to-node forwarding (cluster.forward_addr): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    #[error("{addr} does not speak the forward protocol")]
    Protocol { addr: SocketAddr },
    #[error("{addr} failed authentication: its cluster secret differs from ours")]
    Authentication { addr: SocketAddr },
    #[error("frame of {len} bytes from {addr} is above the cap of {cap}")]
    FrameTooLarge {
        addr: SocketAddr,
        len: usize,
        cap: usize,
    },
    #[error("job from {addr} cannot be read: {source}")]
    Job {
        addr: SocketAddr,
        #[source]
        source: job::JobError,
    },
}

/// The key both ends of every connection prove they hold.
#[derive(Clone)]
pub struct ForwardKey([u8; 32]);

impl ForwardKey {
    pub fn new(key: [u8; 32]) -> Self {
        Self(key)
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes keys of any size")
    }
}

impl std::fmt::Debug for ForwardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardKey(..)")
    }
}

/// What became of shipped jobs, reported by the links.
pub trait Outcome: Send + Sync + 'static {
    /// The owner acknowledged one job.
    fn acknowledged(&self);
    /// One job was written to the owner, which never acknowledged it.
    fn unconfirmed(&self);
    /// A queued job could not be shipped; handle it locally.
    fn not_shipped(&self, exchange: Exchange);
}

/// Ships jobs to owners, one link (queue, task, connection) per owner.
pub struct Forwarder {
    key: ForwardKey,
    max_frame: usize,
    outcome: Arc<dyn Outcome>,
    runtime: tokio::runtime::Handle,
    links: Mutex<HashMap<String, Link>>,
}

struct Link {
    addr: SocketAddr,
    queue: mpsc::Sender<Exchange>,
}

impl Forwarder {
    /// Must be called inside the runtime the links are to run on.
    pub fn new(key: ForwardKey, max_frame: usize, outcome: Arc<dyn Outcome>) -> Self {
        Self {
            key,
            max_frame,
            outcome,
            runtime: tokio::runtime::Handle::current(),
            links: Mutex::new(HashMap::new()),
        }
    }

    /// Queues `exchange` for `owner` at `addr`. Never blocks; gives the exchange back when the
    /// owner's queue is full.
    pub fn ship(&self, owner: &str, addr: SocketAddr, exchange: Exchange) -> Option<Exchange> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let stale = links
            .get(owner)
            .is_none_or(|link| link.addr != addr || link.queue.is_closed());
        if stale {
            let (queue, jobs) = mpsc::channel(LINK_QUEUE);
            let task = run_link(
                addr,
                self.key.clone(),
                self.max_frame,
                jobs,
                self.outcome.clone(),
            );
            self.runtime
                .spawn(task.instrument(info_span!("forward", owner = %owner, %addr)));
            links.insert(owner.to_owned(), Link { addr, queue });
        }
        let link = links.get(owner).expect("link was just ensured");
        match link.queue.try_send(exchange) {
            Ok(()) => None,
            Err(
                mpsc::error::TrySendError::Full(exchange)
                | mpsc::error::TrySendError::Closed(exchange),
            ) => Some(exchange),
        }
    }

    /// Closes the links of owners that are no longer members; their queued jobs are handled
    /// locally.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|name, _| keep(name));
    }
}

/// How a connection ended.
enum LinkEnd {
    /// The forwarder let go of the link; stop.
    Closed,
    /// The connection failed; connect again later.
    Failed,
}

/// One owner's link: connects on demand, ships jobs in order, and hands jobs back for local
/// handling while the owner cannot be reached.
async fn run_link(
    addr: SocketAddr,
    key: ForwardKey,
    max_frame: usize,
    mut jobs: mpsc::Receiver<Exchange>,
    outcome: Arc<dyn Outcome>,
) {
    let mut retry_at = Instant::now();
    let mut reported = false;
    while let Some(first) = jobs.recv().await {
        if Instant::now() < retry_at {
            outcome.not_shipped(first);
            continue;
        }
        match connect(addr, &key).await {
            Ok(connection) => {
                if reported {
                    info!("Forward link to the owner restored");
                    reported = false;
                }
                match ship_over(connection, first, &mut jobs, max_frame, outcome.as_ref()).await {
                    LinkEnd::Closed => return,
                    LinkEnd::Failed => retry_at = Instant::now() + RETRY_AFTER,
                }
            }
            Err(error) => {
                // One line per outage, not one per retry.
                if !reported {
                    warn!(%error, "Cannot forward to the owner; its jobs are handled locally");
                    reported = true;
                }
                outcome.not_shipped(first);
                retry_at = Instant::now() + RETRY_AFTER;
            }
        }
    }
}

/// An authenticated connection, client side.
struct Connection {
    stream: TcpStream,
    addr: SocketAddr,
    /// Client nonce then server nonce: what every frame's MAC starts with.
    session: [u8; 2 * NONCE_LEN],
    key: ForwardKey,
}

async fn connect(addr: SocketAddr, key: &ForwardKey) -> Result<Connection, ForwardError> {
    let handshake = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;
        let _ = stream.set_nodelay(true);
        let client_nonce: [u8; NONCE_LEN] = rand::random();
        let mut hello = Vec::with_capacity(CLIENT_MAGIC.len() + NONCE_LEN);
        hello.extend_from_slice(CLIENT_MAGIC);
        hello.extend_from_slice(&client_nonce);
        stream
            .write_all(&hello)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;

        let mut answer = [0u8; 8 + NONCE_LEN + MAC_LEN];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;
        if &answer[..8] != SERVER_MAGIC {
            return Err(ForwardError::Protocol { addr });
        }
        let mut session = [0u8; 2 * NONCE_LEN];
        session[..NONCE_LEN].copy_from_slice(&client_nonce);
        session[NONCE_LEN..].copy_from_slice(&answer[8..8 + NONCE_LEN]);
        server_proof(key, &session)
            .verify_slice(&answer[8 + NONCE_LEN..])
            .map_err(|_| ForwardError::Authentication { addr })?;
        Ok(Connection {
            stream,
            addr,
            session,
            key: key.clone(),
        })
    };
    timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| ForwardError::Timeout { addr })?
}

/// The server's proof that it holds the key, bound to both nonces.
fn server_proof(key: &ForwardKey, session: &[u8]) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(b"specter forward server proof");
    mac.update(session);
    mac
}

/// The MAC of one frame.
fn frame_mac(key: &ForwardKey, session: &[u8], seq: u64, payload: &[u8]) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(session);
    mac.update(&seq.to_be_bytes());
    mac.update(payload);
    mac
}

/// Builds the frame for job number `seq`.
fn frame(key: &ForwardKey, session: &[u8], seq: u64, payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).expect("frames are capped far below 4 GiB");
    let mut out = BytesMut::with_capacity(4 + payload.len() + MAC_LEN);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(
        &frame_mac(key, session, seq, payload)
            .finalize()
            .into_bytes(),
    );
    out.freeze()
}

/// Ships jobs over one connection until it fails or the link is closed.
async fn ship_over(
    connection: Connection,
    first: Exchange,
    jobs: &mut mpsc::Receiver<Exchange>,
    max_frame: usize,
    outcome: &dyn Outcome,
) -> LinkEnd {
    let Connection {
        stream,
        addr,
        session,
        key,
    } = connection;
    let (mut reader, mut writer) = stream.into_split();
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    let mut seq = 0u64;
    let mut next = Some(first);
    let mut acks = [0u8; 256];
    let mut closing = false;

    let failed = |in_flight: &mut VecDeque<Instant>, why: &str| {
        if in_flight.is_empty() {
            debug!(%addr, why, "Forward connection ended");
        } else {
            warn!(
                %addr,
                why,
                unconfirmed = in_flight.len(),
                "Forward connection failed with jobs unacknowledged; they are counted as \
                 forward_unconfirmed and not replayed here"
            );
        }
        for _ in in_flight.drain(..) {
            outcome.unconfirmed();
        }
        LinkEnd::Failed
    };

    loop {
        if let Some(exchange) = next.take() {
            let payload = job::encode(&exchange);
            if payload.len() > max_frame {
                debug!(
                    len = payload.len(),
                    max_frame, "Job above the frame cap; handled locally"
                );
                outcome.not_shipped(exchange);
                continue;
            }
            let bytes = frame(&key, &session, seq, &payload);
            match timeout(ACK_TIMEOUT, writer.write_all(&bytes)).await {
                Ok(Ok(())) => {
                    seq += 1;
                    in_flight.push_back(Instant::now());
                }
                // The frame was not written whole, so the owner cannot have taken it.
                _ => {
                    outcome.not_shipped(exchange);
                    abort(writer.as_ref());
                    return failed(&mut in_flight, "write failed");
                }
            }
        }

        if closing && in_flight.is_empty() {
            return LinkEnd::Closed;
        }
        let deadline = in_flight
            .front()
            .map(|sent| tokio::time::Instant::from_std(*sent + ACK_TIMEOUT));
        tokio::select! {
            biased;
            read = reader.read(&mut acks) => match read {
                Ok(0) | Err(_) => return failed(&mut in_flight, "closed by the owner"),
                Ok(n) => {
                    if acks[..n].iter().any(|&b| b != ACK) || n > in_flight.len() {
                        abort(writer.as_ref());
                        return failed(&mut in_flight, "unexpected acknowledgement");
                    }
                    for _ in 0..n {
                        in_flight.pop_front();
                        outcome.acknowledged();
                    }
                }
            },
            () = sleep_until(deadline) => {
                abort(writer.as_ref());
                return failed(&mut in_flight, "acknowledgement timed out");
            }
            job = jobs.recv(), if !closing && in_flight.len() < IN_FLIGHT => match job {
                Some(exchange) => next = Some(exchange),
                None => closing = true,
            },
        }
        if closing && in_flight.is_empty() {
            return LinkEnd::Closed;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Drops whatever the kernel still holds for the owner: after a timeout those bytes must never
/// arrive late, when the jobs were already counted as unconfirmed.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Where the owner side hands each job it takes.
pub type Deliver = Arc<dyn Fn(Exchange) + Send + Sync>;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ForwardError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ForwardError::Bind { addr, source })
}

/// Accepts connections from other nodes and hands each authenticated job to `deliver`, until
/// `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    key: ForwardKey,
    max_frame: usize,
    deliver: Deliver,
    mut stop: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Forward channel listening");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "Forward channel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "Too many forward connections; refusing one");
            continue;
        };
        let (key, deliver) = (key.clone(), deliver.clone());
        tokio::spawn(
            async move {
                let _slot = slot;
                if let Err(error) = take_jobs(stream, peer, &key, max_frame, &deliver).await {
                    match error {
                        ForwardError::Authentication { .. }
                        | ForwardError::Protocol { .. }
                        | ForwardError::FrameTooLarge { .. }
                        | ForwardError::Job { .. } => warn!(%error, "Forward connection refused"),
                        _ => debug!(%error, "Forward connection ended"),
                    }
                }
            }
            .instrument(info_span!("forward_in", %peer)),
        );
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Serves one connection: handshake, then jobs until the peer goes away.
async fn take_jobs(
    mut stream: TcpStream,
    addr: SocketAddr,
    key: &ForwardKey,
    max_frame: usize,
    deliver: &Deliver,
) -> Result<(), ForwardError> {
    let io = |source| ForwardError::Io { addr, source };
    let _ = stream.set_nodelay(true);

    let mut hello = [0u8; 8 + NONCE_LEN];
    timeout(CONNECT_TIMEOUT * 5, stream.read_exact(&mut hello))
        .await
        .map_err(|_| ForwardError::Timeout { addr })?
        .map_err(io)?;
    if &hello[..8] != CLIENT_MAGIC {
        return Err(ForwardError::Protocol { addr });
    }
    let server_nonce: [u8; NONCE_LEN] = rand::random();
    let mut session = [0u8; 2 * NONCE_LEN];
    session[..NONCE_LEN].copy_from_slice(&hello[8..]);
    session[NONCE_LEN..].copy_from_slice(&server_nonce);
    let mut answer = Vec::with_capacity(8 + NONCE_LEN + MAC_LEN);
    answer.extend_from_slice(SERVER_MAGIC);
    answer.extend_from_slice(&server_nonce);
    answer.extend_from_slice(&server_proof(key, &session).finalize().into_bytes());
    stream.write_all(&answer).await.map_err(io)?;

    let mut seq = 0u64;
    loop {
        let len = match stream.read_u32().await {
            Ok(len) => len as usize,
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(io(error)),
        };
        if len > max_frame {
            return Err(ForwardError::FrameTooLarge {
                addr,
                len,
                cap: max_frame,
            });
        }
        let mut body = BytesMut::zeroed(len + MAC_LEN);
        timeout(FRAME_TIMEOUT, stream.read_exact(&mut body))
            .await
            .map_err(|_| ForwardError::Timeout { addr })?
            .map_err(io)?;
        let body = body.freeze();
        let (payload, mac) = (body.slice(..len), &body[len..]);
        frame_mac(key, &session, seq, &payload)
            .verify_slice(mac)
            .map_err(|_| ForwardError::Authentication { addr })?;
        seq += 1;

        let exchange = job::decode(payload).map_err(|source| ForwardError::Job { addr, source })?;
        deliver(exchange);
        stream.write_all(&[ACK]).await.map_err(io)?;
    }
}

#[cfg(test)]
mod tests;
