//! One direction of a TCP connection, put back in byte order.
//!
//! A [`Stream`] takes the segments the kernel copied for one direction (client to server, or
//! server to client) and hands the HTTP layer a sequence of [`Chunk`]s in stream order: bytes,
//! holes of known length ([`Chunk::Gap`]), and the end of the stream. It never looks inside the
//! bytes.
//!
//! Sequence numbers are 32-bit and wrap; the stream keeps a 64-bit *offset* (bytes delivered or
//! skipped since the stream's start) and maps each segment's sequence number onto it with serial
//! arithmetic relative to the next expected number, so wrap-around at 2^32 needs no special case.
//!
//! What it does with each segment:
//!
//! - **In order**: delivered at once, followed by whatever buffered segments it makes contiguous.
//! - **Ahead** of the next expected byte: buffered, up to `max_out_of_order_bytes`. Over the
//!   bound, the stream gives up on the oldest hole: it delivers a gap up to the first buffered
//!   byte and moves on.
//! - **Already seen** (a retransmission, or a segment overlapping bytes delivered or buffered):
//!   the new copy of those bytes is dropped; the first copy wins.
//! - **Truncated** by the kernel (captured shorter than on the wire): the missing tail is a hole
//!   of known length, delivered as a gap when its turn comes.
//! - **Acknowledged by the peer** beyond what this stream has: the peer received bytes the
//!   capture never saw, so the hole up to the acknowledged number will never be filled and is
//!   delivered as a gap at once instead of waiting for the bound.
//! - **FIN**: the stream ends cleanly once every byte before it has been delivered.
//!
//! A stream whose SYN was seen starts at a message boundary (`synced`); one picked up in the
//! middle starts at the first segment seen, and the HTTP layer resynchronises.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use tracing::debug;

use super::ReassemblyStats;

/// How far ahead of the next expected byte a segment may start and still be taken as part of
/// this stream. Anything further is a stray (an old segment from before a wrap, a reused port)
/// and is dropped; the peer's acknowledgements bring a stream that truly lost that much back in
/// range.
const MAX_AHEAD: i64 = 1 << 30;

/// What a stream delivers to the HTTP layer, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Bytes, with the kernel time of the segment that carried them.
    Data { bytes: Bytes, time: Duration },
    /// `len` bytes that were on the wire but were never captured.
    Gap { len: u64, time: Duration },
    /// No more bytes will come. `clean` is true for a FIN reached in order, false when the
    /// connection was reset, expired, evicted or shut down.
    End { clean: bool, time: Duration },
}

/// A buffered piece of the stream that arrived ahead of the next expected byte.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    /// Bytes a truncated segment declared but did not carry.
    Hole(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(bytes) => bytes.len() as u64,
            Piece::Hole(len) => *len,
        }
    }

    /// The part of this piece (which starts at `start`) covering `[from, to)`.
    fn slice(&self, start: u64, from: u64, to: u64) -> Piece {
        match self {
            Piece::Data(bytes) => {
                Piece::Data(bytes.slice((from - start) as usize..(to - start) as usize))
            }
            Piece::Hole(_) => Piece::Hole(to - from),
        }
    }
}

#[derive(Debug)]
struct Buffered {
    piece: Piece,
    time: Duration,
}

/// Where the stream's first byte came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// No segment seen yet.
    Unknown,
    /// From a SYN (or the acknowledgement of one): the first byte starts a message.
    Syn { isn: Option<u32> },
    /// From the first segment seen, in the middle of the connection.
    MidStream,
}

/// One direction of a connection.
#[derive(Debug)]
pub(crate) struct Stream {
    start: Start,
    /// The sequence number of the next byte to deliver.
    next_seq: u32,
    /// Bytes delivered or skipped as gaps so far; the stream offset of `next_seq`.
    offset: u64,
    /// Pieces ahead of `offset`, by stream offset; they never overlap each other.
    pending: BTreeMap<u64, Buffered>,
    /// Captured bytes held in `pending` (holes cost nothing).
    pending_bytes: usize,
    /// Stream offset of the FIN, once seen.
    fin_at: Option<u64>,
    ended: bool,
    /// Kernel time of the latest segment or acknowledgement seen.
    last_time: Duration,
}

impl Stream {
    pub(crate) fn new() -> Self {
        Self {
            start: Start::Unknown,
            next_seq: 0,
            offset: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            fin_at: None,
            ended: false,
            last_time: Duration::ZERO,
        }
    }

    pub(crate) fn is_started(&self) -> bool {
        self.start != Start::Unknown
    }

    /// True when the stream's first byte is known to start a message.
    pub(crate) fn synced(&self) -> bool {
        matches!(self.start, Start::Syn { .. })
    }

    /// The initial sequence number, when the SYN was seen.
    pub(crate) fn isn(&self) -> Option<u32> {
        match self.start {
            Start::Syn { isn } => isn,
            _ => None,
        }
    }

    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// True when captured bytes wait behind a hole.
    pub(crate) fn has_backlog(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes a SYN's sequence number as the stream's start. Returns false for a SYN this stream
    /// already started from (a retransmission).
    pub(crate) fn syn(&mut self, isn: u32) -> bool {
        match self.start {
            Start::Syn { isn: Some(known) } if known == isn => false,
            Start::Unknown => {
                self.start = Start::Syn { isn: Some(isn) };
                self.next_seq = isn.wrapping_add(1);
                true
            }
            // A SYN on a stream already started is a new connection; the caller replaces the
            // whole connection before it gets here.
            _ => false,
        }
    }

    /// Starts the stream at `seq`, a message boundary learnt from the peer's SYN-ACK (which
    /// acknowledges this side's SYN even when the capture missed that SYN).
    pub(crate) fn start_at(&mut self, seq: u32) {
        if self.start == Start::Unknown {
            self.start = Start::Syn { isn: None };
            self.next_seq = seq;
        }
    }

    /// Takes one segment's payload. `payload` is what the kernel copied; `wire_len` is the
    /// payload's length on the wire, so `[payload.len(), wire_len)` is a hole.
    #[expect(
        clippy::too_many_arguments,
        reason = "one segment's fields, kept apart for clarity"
    )]
    pub(crate) fn segment(
        &mut self,
        seq: u32,
        payload: Bytes,
        wire_len: u32,
        fin: bool,
        time: Duration,
        max_out_of_order: usize,
        stats: &mut ReassemblyStats,
        out: &mut Vec<Chunk>,
    ) {
        let captured = payload.len() as u64;
        let wire = u64::from(wire_len).max(captured);
        self.last_time = self.last_time.max(time);
        if self.ended {
            if wire > 0 {
                stats.retransmits += 1;
            }
            return;
        }
        if self.start == Start::Unknown {
            if wire == 0 && !fin {
                return;
            }
            self.start = Start::MidStream;
            self.next_seq = seq;
        }

        // Serial arithmetic: the distance from the next expected byte, negative for old bytes.
        let rel = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        if rel > MAX_AHEAD {
            debug!(
                seq,
                next = self.next_seq,
                "Dropped a segment far outside the stream's window"
            );
            return;
        }
        let at = self.offset as i64 + rel;
        let end = at + wire as i64;

        if fin && self.fin_at.is_none() && end >= self.offset as i64 {
            self.fin_at = Some(end as u64);
        }

        if wire > 0 {
            if end <= self.offset as i64 {
                stats.retransmits += 1;
            } else {
                if at > self.offset as i64 {
                    stats.out_of_order += 1;
                }
                if self.take(at, payload, wire, time) {
                    stats.retransmits += 1;
                }
            }
        }

        self.deliver(stats, out);
        while self.pending_bytes > max_out_of_order {
            self.skip_to_first_pending(stats, out);
            self.deliver(stats, out);
        }
    }

    /// The peer acknowledged every byte before `ack`: holes below it will never be filled.
    pub(crate) fn acked(
        &mut self,
        ack: u32,
        time: Duration,
        stats: &mut ReassemblyStats,
        out: &mut Vec<Chunk>,
    ) {
        if !self.is_started() || self.ended {
            return;
        }
        self.last_time = self.last_time.max(time);
        let rel = i64::from(ack.wrapping_sub(self.next_seq) as i32);
        if rel <= 0 {
            return;
        }
        // The FIN takes a sequence number but carries no byte.
        let mut target = self.offset + rel as u64;
        if let Some(fin) = self.fin_at {
            target = target.min(fin);
        }

        while self.offset < target {
            match self.pending.first_key_value() {
                Some((&at, _)) if at == self.offset => self.deliver_first(stats, out),
                Some((&at, buffered)) => {
                    let hole_end = at.min(target);
                    let hole_time = if at == hole_end { buffered.time } else { time };
                    self.gap(hole_end - self.offset, hole_time, stats, out);
                }
                None => self.gap(target - self.offset, time, stats, out),
            }
        }
        self.deliver(stats, out);
    }

    /// Ends the stream now (reset, expiry, shutdown): every buffered piece is delivered with
    /// gaps over the holes between them, then the end.
    pub(crate) fn flush(
        &mut self,
        time: Duration,
        stats: &mut ReassemblyStats,
        out: &mut Vec<Chunk>,
    ) {
        if self.ended {
            return;
        }
        self.last_time = self.last_time.max(time);
        while !self.pending.is_empty() {
            self.skip_to_first_pending(stats, out);
            self.deliver(stats, out);
        }
        if self.ended {
            return;
        }
        // The FIN was seen but bytes before it were not: the stream still ended cleanly.
        if let Some(fin) = self.fin_at
            && fin > self.offset
        {
            self.gap(fin - self.offset, time, stats, out);
            self.deliver(stats, out);
            return;
        }
        self.ended = true;
        out.push(Chunk::End { clean: false, time });
    }

    /// Buffers a segment's captured bytes and its missing tail, trimmed to what lies beyond the
    /// delivered bytes. Returns true when some part was a duplicate.
    fn take(&mut self, at: i64, payload: Bytes, wire: u64, time: Duration) -> bool {
        let offset = self.offset as i64;
        let data_end = at + payload.len() as i64;
        let mut duplicate = false;

        if data_end > offset && !payload.is_empty() {
            let skip = (offset - at).max(0) as usize;
            duplicate |= skip > 0;
            duplicate |= self.insert(
                (at + skip as i64) as u64,
                Piece::Data(payload.slice(skip..)),
                time,
            );
        }
        let end = at + wire as i64;
        let hole_from = data_end.max(offset);
        if end > hole_from {
            duplicate |= self.insert(
                hole_from as u64,
                Piece::Hole((end - hole_from) as u64),
                time,
            );
        }
        duplicate
    }

    /// Buffers `piece` at stream offset `start` (not before the delivered bytes), keeping only
    /// the parts not already buffered. Returns true when some part was a duplicate.
    fn insert(&mut self, start: u64, piece: Piece, time: Duration) -> bool {
        let end = start + piece.len();
        let mut duplicate = false;
        let mut cursor = start;

        // A buffered piece starting before this one may reach into it.
        if let Some((&at, before)) = self.pending.range(..start).next_back() {
            let before_end = at + before.piece.len();
            if before_end > cursor {
                duplicate = true;
                cursor = before_end.min(end);
            }
        }

        let overlapping: Vec<(u64, u64)> = self
            .pending
            .range(cursor..end)
            .map(|(&at, buffered)| (at, at + buffered.piece.len()))
            .collect();
        let mut fresh = Vec::new();
        for (at, at_end) in overlapping {
            duplicate = true;
            if at > cursor {
                fresh.push((cursor, at));
            }
            cursor = cursor.max(at_end);
        }
        if cursor < end {
            fresh.push((cursor, end));
        }

        for (from, to) in fresh {
            let part = piece.slice(start, from, to);
            if let Piece::Data(bytes) = &part {
                self.pending_bytes += bytes.len();
            }
            self.pending.insert(from, Buffered { piece: part, time });
        }
        duplicate
    }

    /// Delivers every buffered piece that is now contiguous, then the end if the FIN is reached.
    fn deliver(&mut self, stats: &mut ReassemblyStats, out: &mut Vec<Chunk>) {
        while self
            .pending
            .first_key_value()
            .is_some_and(|(&at, _)| at == self.offset)
        {
            self.deliver_first(stats, out);
        }
        if let Some(fin) = self.fin_at
            && fin <= self.offset
            && !self.ended
        {
            // Bytes buffered beyond the FIN cannot belong to this stream.
            if !self.pending.is_empty() {
                debug!(
                    bytes = self.pending_bytes,
                    "Dropped bytes buffered beyond the FIN"
                );
                stats.retransmits += 1;
                self.pending.clear();
                self.pending_bytes = 0;
            }
            self.ended = true;
            out.push(Chunk::End {
                clean: true,
                time: self.last_time,
            });
        }
    }

    fn deliver_first(&mut self, stats: &mut ReassemblyStats, out: &mut Vec<Chunk>) {
        let Some((_, buffered)) = self.pending.pop_first() else {
            return;
        };
        let len = buffered.piece.len();
        match buffered.piece {
            Piece::Data(bytes) => {
                self.pending_bytes -= bytes.len();
                out.push(Chunk::Data {
                    bytes,
                    time: buffered.time,
                });
            }
            Piece::Hole(len) => {
                stats.gaps += 1;
                out.push(Chunk::Gap {
                    len,
                    time: buffered.time,
                });
            }
        }
        self.advance(len);
    }

    /// Gives up on the hole before the first buffered piece.
    fn skip_to_first_pending(&mut self, stats: &mut ReassemblyStats, out: &mut Vec<Chunk>) {
        if let Some((&at, buffered)) = self.pending.first_key_value()
            && at > self.offset
        {
            let time = buffered.time;
            self.gap(at - self.offset, time, stats, out);
        }
    }

    fn gap(&mut self, len: u64, time: Duration, stats: &mut ReassemblyStats, out: &mut Vec<Chunk>) {
        stats.gaps += 1;
        out.push(Chunk::Gap { len, time });
        self.advance(len);
    }

    fn advance(&mut self, len: u64) {
        self.offset += len;
        // Sequence numbers are modulo 2^32, so the truncation is the arithmetic.
        self.next_seq = self.next_seq.wrapping_add(len as u32);
    }
}

#[cfg(test)]
mod tests;
