//! Passive capture's userspace core: TCP segments in, HTTP/1.x exchanges out.
//!
//! In attach mode the TC eBPF programs copy the TCP segments of the live service's port into a
//! ring; `capture` decodes them into [`Segment`]s. The [`Reassembler`] puts each connection's two
//! byte streams back in order and reads HTTP/1.x exchanges from them, which then go to the
//! pipeline like the proxy's. It is pure logic: no I/O, no clock of its own (time is the
//! kernel's monotonic timestamp carried by each segment), never a panic on any input.
//!
//! ```text
//! Segment ─▶ Connection (client, server) ─┬─ Stream to server ─┐
//!                                         └─ Stream to client ─┴─▶ Conversation ─▶ Exchange
//!            tcp.rs: order, holes, end           http1.rs: framing, pairing
//! ```
//!
//! - [`tcp`]: one [`tcp::Stream`] per direction turns segments into in-order bytes, gaps of
//!   known length and the end: sequence numbers with wrap-around, bounded out-of-order
//!   buffering, retransmissions and overlaps dropped, truncated captures and holes the peer's
//!   ACK proves will never be filled turned into gaps.
//! - [`http1`]: one [`http1::Conversation`] per connection frames requests and responses and
//!   pairs them; a gap damages only the exchange it falls in (emitted `Incomplete`), and a
//!   response is never given to the wrong request: when the pairing is in doubt, the exchange is
//!   `Incomplete`. Its module docs give the gap and resynchronisation rules.
//!
//! Connections are keyed by (client, server) address pair. A connection starts at its SYN, or
//! mid-stream at its first segment with data (its readers then resynchronise on the next start
//! line). It ends on a FIN from both sides, a RST (what is still open becomes `Incomplete`),
//! idle expiry ([`Reassembler::expire`]), eviction when `max_connections` is reached (the least
//! recently active goes), or [`Reassembler::finish`]. A finished connection lingers as a
//! tombstone until it expires, so late segments do not reopen it; a new SYN with another
//! initial sequence number on the same address pair starts a new connection at once.
//!
//! Memory per connection is bounded by `max_out_of_order_bytes` per direction, the body cap,
//! a 64 KiB head limit and 64 unanswered requests.

mod http1;
mod tcp;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use serde::Serialize;
use tracing::debug;

use self::{http1::Conversation, tcp::Stream};
use crate::exchange::Exchange;

/// Which way a segment travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the live service: request bytes.
    ToServer,
    /// From the live service to the client: response bytes.
    ToClient,
}

impl Direction {
    fn reverse(self) -> Self {
        match self {
            Direction::ToServer => Direction::ToClient,
            Direction::ToClient => Direction::ToServer,
        }
    }
}

/// TCP header flags, with the bit positions of the TCP header's flags byte so a decoder can
/// pass that byte through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }

    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }

    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }

    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
}

/// One TCP segment as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The peer that is not the live service.
    pub client: SocketAddr,
    /// The live service's side (its port is one of `capture.ports`).
    pub server: SocketAddr,
    pub direction: Direction,
    pub seq: u32,
    /// Meaningful only with the ACK flag.
    pub ack: u32,
    pub flags: TcpFlags,
    /// The payload bytes the kernel copied.
    pub payload: Bytes,
    /// The payload's length on the wire. When the kernel copied less (`truncated`), the bytes
    /// `[payload.len(), wire_len)` are a hole. A value below `payload.len()` counts as equal.
    pub wire_len: u32,
    /// The kernel could not copy the whole payload: bytes are missing at its end.
    pub truncated: bool,
    /// Kernel monotonic time of the segment; used for timing and idle expiry.
    pub timestamp: Duration,
}

/// Limits and settings of the reassembler.
#[derive(Debug, Clone)]
pub struct ReassemblyConfig {
    /// Body bytes kept per message; longer bodies are read through and marked `Truncated`.
    pub max_body_bytes: usize,
    /// Captured bytes buffered ahead of a hole, per direction of a connection. Over it the hole
    /// becomes a gap.
    pub max_out_of_order_bytes: usize,
    /// A connection with no segment for this long is closed by [`Reassembler::expire`].
    pub idle_timeout: Duration,
    /// Connections tracked at once; beyond it the least recently active is evicted.
    pub max_connections: usize,
    /// Lower-case name of the header whose value becomes the exchange's routing key.
    pub routing_key: Option<String>,
    /// The wall-clock time of kernel timestamp zero, to turn segment timestamps into
    /// `Timing::started`.
    pub wall_clock_at_zero: SystemTime,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_out_of_order_bytes: 1024 * 1024,
            idle_timeout: Duration::from_secs(120),
            max_connections: 65_536,
            routing_key: None,
            wall_clock_at_zero: SystemTime::UNIX_EPOCH,
        }
    }
}

/// Counters of what the reassembler saw and did; all totals except `connections_open`.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReassemblyStats {
    pub segments: u64,
    /// Segments that arrived ahead of a hole and were buffered.
    pub out_of_order: u64,
    /// Segments carrying bytes already delivered or buffered.
    pub retransmits: u64,
    /// Holes in a byte stream given up on (never captured).
    pub gaps: u64,
    /// Messages that could not be framed (bad head, header limits, bad chunking).
    pub parse_errors: u64,
    /// Connections tracked now.
    pub connections_open: u64,
    pub connections_total: u64,
    /// Exchanges emitted, of any quality.
    pub exchanges: u64,
    /// Exchanges emitted `Incomplete`.
    pub exchanges_incomplete: u64,
    /// Connections that switched protocols (101, CONNECT) and were no longer parsed.
    pub upgrades_skipped: u64,
    /// Connections whose first bytes were not HTTP.
    pub non_http_skipped: u64,
    /// Connections that opened with the HTTP/2 prior-knowledge preface.
    pub http2_skipped: u64,
    /// Open connections dropped to stay within `max_connections`.
    pub evicted: u64,
}

/// What a reader needs from the reassembler while it works on one connection.
pub(crate) struct Ctx<'a> {
    pub(crate) config: &'a ReassemblyConfig,
    pub(crate) stats: &'a mut ReassemblyStats,
    pub(crate) out: &'a mut Vec<Exchange>,
}

type Key = (SocketAddr, SocketAddr);

/// Turns captured TCP segments into HTTP/1.x exchanges, for every connection at once.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblyConfig,
    connections: HashMap<Key, Connection>,
    /// Connections by last activity (a tick that grows with every segment), oldest first.
    recency: BTreeMap<u64, Key>,
    tick: u64,
    stats: ReassemblyStats,
}

impl Reassembler {
    pub fn new(config: ReassemblyConfig) -> Self {
        Self {
            config,
            connections: HashMap::new(),
            recency: BTreeMap::new(),
            tick: 0,
            stats: ReassemblyStats::default(),
        }
    }

    /// Feeds one segment; completed exchanges are pushed to `out`.
    pub fn push(&mut self, segment: Segment, out: &mut Vec<Exchange>) {
        self.stats.segments += 1;
        let key = (segment.client, segment.server);

        // A SYN on an address pair in use may be a new connection reusing it.
        if segment.flags.syn()
            && self
                .connections
                .get(&key)
                .is_some_and(|connection| connection.starts_anew(&segment))
        {
            self.remove(&key, out);
        }

        if !self.connections.contains_key(&key) {
            if !opens_connection(&segment) {
                return;
            }
            self.make_room(out);
            let connection = Connection::new(segment.client, self.config.max_body_bytes);
            self.connections.insert(key, connection);
            self.stats.connections_total += 1;
            self.stats.connections_open += 1;
        }

        self.tick += 1;
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        self.recency.remove(&connection.tick);
        connection.tick = self.tick;
        self.recency.insert(self.tick, key);

        let was_open = !connection.closed;
        let mut ctx = Ctx {
            config: &self.config,
            stats: &mut self.stats,
            out,
        };
        connection.segment(segment, &mut ctx);
        if was_open && connection.closed {
            self.stats.connections_open -= 1;
        }
    }

    /// Closes connections idle since before `now - idle_timeout`: their unfinished exchanges
    /// are emitted `Incomplete`. Call it periodically with the latest kernel timestamp.
    pub fn expire(&mut self, now: Duration, out: &mut Vec<Exchange>) {
        let cutoff = now.saturating_sub(self.config.idle_timeout);
        let idle: Vec<Key> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.last_seen < cutoff)
            .map(|(key, _)| *key)
            .collect();
        for key in idle {
            self.remove(&key, out);
        }
    }

    /// Ends every connection (shutdown): unfinished exchanges are emitted `Incomplete`.
    pub fn finish(&mut self, out: &mut Vec<Exchange>) {
        let keys: Vec<Key> = self.recency.values().copied().collect();
        for key in keys {
            self.remove(&key, out);
        }
    }

    pub fn stats(&self) -> ReassemblyStats {
        self.stats
    }

    /// Evicts the least recently active connections until there is room for one more.
    fn make_room(&mut self, out: &mut Vec<Exchange>) {
        while self.connections.len() >= self.config.max_connections.max(1) {
            let Some((_, key)) = self.recency.pop_first() else {
                return;
            };
            if self
                .connections
                .get(&key)
                .is_some_and(|connection| !connection.closed)
            {
                self.stats.evicted += 1;
                debug!(client = %key.0, server = %key.1, "Evicted the least recently active connection");
            }
            self.remove(&key, out);
        }
    }

    fn remove(&mut self, key: &Key, out: &mut Vec<Exchange>) {
        let Some(mut connection) = self.connections.remove(key) else {
            return;
        };
        self.recency.remove(&connection.tick);
        if !connection.closed {
            let time = connection.last_seen;
            let mut ctx = Ctx {
                config: &self.config,
                stats: &mut self.stats,
                out,
            };
            connection.close(time, &mut ctx);
            self.stats.connections_open -= 1;
        }
    }
}

/// Whether a segment for an unknown address pair is worth a connection: a SYN, or bytes.
fn opens_connection(segment: &Segment) -> bool {
    let flags = segment.flags;
    flags.syn() || (!flags.rst() && (!segment.payload.is_empty() || segment.wire_len > 0))
}

/// One TCP connection: its two streams and its HTTP conversation.
#[derive(Debug)]
struct Connection {
    to_server: Stream,
    to_client: Stream,
    conversation: Conversation,
    last_seen: Duration,
    tick: u64,
    /// Ended (FIN both ways, RST); kept as a tombstone until it expires.
    closed: bool,
    /// FINs seen while the conversation is passive and the streams are not followed.
    fins: [bool; 2],
}

impl Connection {
    fn new(client: SocketAddr, max_body_bytes: usize) -> Self {
        Self {
            to_server: Stream::new(),
            to_client: Stream::new(),
            conversation: Conversation::new(client, max_body_bytes),
            last_seen: Duration::ZERO,
            tick: 0,
            closed: false,
            fins: [false; 2],
        }
    }

    fn stream(&self, direction: Direction) -> &Stream {
        match direction {
            Direction::ToServer => &self.to_server,
            Direction::ToClient => &self.to_client,
        }
    }

    fn stream_mut(&mut self, direction: Direction) -> &mut Stream {
        match direction {
            Direction::ToServer => &mut self.to_server,
            Direction::ToClient => &mut self.to_client,
        }
    }

    /// Whether a SYN belongs to a new connection rather than to this one: this one has ended,
    /// or its stream in that direction started elsewhere. A SYN retransmission carries the
    /// same initial sequence number and is not new.
    fn starts_anew(&self, segment: &Segment) -> bool {
        let stream = self.stream(segment.direction);
        match stream.isn() {
            Some(isn) => isn != segment.seq,
            None => self.closed || stream.is_started(),
        }
    }

    fn segment(&mut self, segment: Segment, ctx: &mut Ctx<'_>) {
        let time = segment.timestamp;
        self.last_seen = self.last_seen.max(time);
        if self.closed {
            return;
        }
        let flags = segment.flags;
        let direction = segment.direction;

        // Nothing is parsed any more: only watch for the end.
        if self.conversation.is_passive() {
            self.fins[direction as usize] |= flags.fin();
            if flags.rst() || self.fins == [true, true] {
                self.close(time, ctx);
            }
            return;
        }

        // The ACK says what the peer received: holes below it will never be filled.
        let mut chunks = Vec::new();
        if flags.ack() {
            let other = direction.reverse();
            self.stream_mut(other)
                .acked(segment.ack, time, ctx.stats, &mut chunks);
            self.feed(other, &mut chunks);
        }

        let mut seq = segment.seq;
        if flags.syn() {
            if !self.stream_mut(direction).syn(segment.seq) {
                ctx.stats.retransmits += 1;
            }
            seq = seq.wrapping_add(1);
            // A SYN-ACK acknowledges the client's SYN: the request stream starts there even if
            // the capture missed the SYN.
            if flags.ack() && direction == Direction::ToClient {
                self.to_server.start_at(segment.ack);
            }
        }

        let max_out_of_order = ctx.config.max_out_of_order_bytes;
        self.stream_mut(direction).segment(
            seq,
            segment.payload,
            segment.wire_len,
            flags.fin(),
            time,
            max_out_of_order,
            ctx.stats,
            &mut chunks,
        );
        self.feed(direction, &mut chunks);

        if flags.rst() {
            self.close(time, ctx);
            return;
        }
        self.conversation.pump(self.to_server.has_backlog(), ctx);
        if self.to_server.ended() && self.to_client.ended() {
            self.close(time, ctx);
        }
    }

    fn feed(&mut self, direction: Direction, chunks: &mut Vec<tcp::Chunk>) {
        let synced = self.stream(direction).synced();
        self.conversation.feed(direction, synced, chunks);
    }

    /// Ends the connection: holes become gaps, unfinished exchanges are emitted `Incomplete`.
    fn close(&mut self, time: Duration, ctx: &mut Ctx<'_>) {
        let mut chunks = Vec::new();
        for direction in [Direction::ToServer, Direction::ToClient] {
            self.stream_mut(direction)
                .flush(time, ctx.stats, &mut chunks);
            self.feed(direction, &mut chunks);
        }
        self.conversation.close(ctx);
        self.closed = true;
    }
}

#[cfg(test)]
mod tests;
