//! HTTP/1.x on one reassembled connection: message framing and request/response pairing.
//!
//! A [`Conversation`] gets the two byte streams of a connection from [`super::tcp`] as
//! [`Chunk`]s (bytes, gaps of known length, the end) and turns them into exchanges. Messages are
//! found by byte position alone; TCP acknowledgement numbers never decide where a message starts.
//!
//! # Framing
//!
//! Each direction has a [`Reader`]: it collects a head (up to 64 KiB and 100 fields, parsed by
//! `httparse`), then reads the body as RFC 9112 frames it: `Transfer-Encoding: chunked` (chunk
//! extensions and trailers are read and dropped; the decoded body is kept), `Content-Length`, or
//! for responses only, the end of the connection. Responses to HEAD, 1xx, 204 and 304 have no
//! body. Interim 1xx responses (`100 Continue`, `103 Early Hints`, ...) are skipped and answer
//! nothing, which is what makes `Expect: 100-continue` uploads pair with their final response.
//! A body over `max_body_bytes` keeps its first bytes, is read to its end and marks the exchange
//! `Truncated`. Header names are stored lower-cased, like the proxy source's.
//!
//! # Pairing
//!
//! Requests wait in a queue (at most [`MAX_PENDING_REQUESTS`]) until their response completes;
//! exchanges leave in request order. Two pairing modes:
//!
//! - **In step**: responses answer queued requests first in, first out. This is exact as long
//!   as no message went missing on either side, pipelined or not.
//! - **Realigning**, after anything that may have lost whole messages (a gap at a message
//!   boundary or one that left a message's end unknown, a parse error, a connection picked up
//!   in the middle): a response that starts at kernel time `t` answers the *latest* queued
//!   request that started at or before `t`, which is exact for a client that waits for each
//!   response before sending its next request. The pairing is trusted, and the conversation
//!   goes back in step, only when
//!   - exactly one queued request qualifies (older ones passed over are emitted `Incomplete`
//!     with no response; a response no request qualifies for is dropped);
//!   - the connection was never seen pipelining;
//!   - every request-side *hole* (lost bytes that may hide whole requests) from before `t`
//!     ended before that request started, and is *settled*: while it lasted, a response
//!     started that answers no known request or answers the request the hole broke off. A
//!     waiting client's lost request is answered while the hole lasts; a pipelining client's
//!     can be answered after its next request started, and would then be taken for that
//!     request's answer. An unsolicited response after an unsettled hole is such a late answer
//!     and marks the connection as pipelining.
//!
//!   Otherwise the exchange is emitted `Incomplete` and the conversation keeps realigning.
//!
//! A response never answers a request that started after it. Pipelining is also seen when a
//! request starts before the previous response has ended.
//!
//! # Gaps
//!
//! A gap damages only the message it falls in; that exchange is emitted `Incomplete` with
//! whatever was captured, and parsing resumes at the next message boundary:
//!
//! - inside a `Content-Length` body, or inside one chunk's data, the gap's length says exactly
//!   where the message goes on, so framing and pairing stay in step;
//! - inside a close-delimited body the body simply runs on to the end of the connection;
//! - anywhere else (a head, a chunk-size line, across chunks, or beyond the end of a body) the
//!   boundary is lost: the reader scans line by line for the next request line
//!   (`METHOD SP target SP HTTP/1.x`, with a known method) or status line (`HTTP/1.x NNN`) and
//!   the conversation realigns. On the response side the lost response is the one the next
//!   queued request was waiting for; the responses after it are realigned.
//!
//! # What stops parsing
//!
//! - A first request on a connection whose start was seen that is not an HTTP/1.x request line:
//!   the HTTP/2 prior-knowledge preface counts as `http2_skipped`, anything else (TLS, another
//!   protocol) as `non_http_skipped`, and the connection is ignored from then on.
//! - A `101 Switching Protocols` response, or a 2xx answer to CONNECT: counted as
//!   `upgrades_skipped`, and nothing more is parsed. The upgrading exchange itself is not
//!   emitted, since a protocol switch has no response to compare and no capture was lost; any
//!   request queued behind it is emitted `Incomplete`. While a CONNECT or `Upgrade` request
//!   waits for its answer, the request reader pauses so it does not parse tunnelled bytes.
//!
//! Limitation: when a connection is picked up in the middle while it has pipelined requests in
//! flight, realignment assumes no pipelining before the first request seen and can pair that
//! request with the response to an earlier one. Pipelining is rare in HTTP/1.1 practice.
//!
//! Limitation: a hole is settled by the first fitting response in it. A pipelining client that
//! waited for one lost request's answer but not for a second one lost in the same hole, with no
//! pipelining seen before, can still have that second answer paired with the next request.
//!
//! Limitation: a hole found only after the response that would settle it (the capture carried
//! no acknowledgement that declared it in time) stays unsettled, so the connection's later
//! realigned exchanges are `Incomplete`. Real TCP acknowledgements declare it in time.
//!
//! Limitation: a resynchronising reader trusts the first start line it finds; a body that
//! contains a literal HTTP message head at a line start after a gap can be taken for one.

use std::{collections::VecDeque, net::SocketAddr, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tracing::debug;

use super::{Ctx, Direction, tcp::Chunk};
use crate::exchange::{Exchange, Headers, Quality, Request, Response, Source, Timing};

/// The largest message head (start line and fields) read; beyond it the message is a parse
/// error and the reader resynchronises.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header fields a head may have.
const MAX_HEADERS: usize = 100;

/// The longest line kept while scanning for a start line or reading a chunk-size line.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// Requests waiting for their response on one connection. Beyond it the oldest is emitted
/// `Incomplete` and the conversation realigns.
pub(crate) const MAX_PENDING_REQUESTS: usize = 64;

/// Segment starts remembered inside one line while resynchronising.
const MAX_LINE_MARKS: usize = 8;

/// Request-side holes remembered for realignment; older ones are merged.
const MAX_HOLES: usize = 16;

/// Methods accepted in a request line found by scanning after a gap. Any token is accepted at a
/// known boundary; scanning is stricter because it starts at an arbitrary byte.
const KNOWN_METHODS: [&[u8]; 18] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"SEARCH",
    b"REPORT",
];

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Why a message could not be framed. Counted as `parse_errors` and logged at DEBUG; the reader
/// then resynchronises.
#[derive(Debug, Error)]
pub(crate) enum FramingError {
    #[error("message head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed message head: {0}")]
    Head(httparse::Error),
    #[error("message head ended early")]
    HeadIncomplete,
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("request Transfer-Encoding does not end in chunked")]
    TransferEncoding,
    #[error("invalid chunk-size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("chunked trailer section over {MAX_HEAD_BYTES} bytes")]
    TrailersTooLarge,
}

impl From<httparse::Error> for FramingError {
    fn from(error: httparse::Error) -> Self {
        match error {
            httparse::Error::TooManyHeaders => FramingError::TooManyHeaders,
            other => FramingError::Head(other),
        }
    }
}

/// Which direction a reader parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// Chunks delivered to one reader and not yet consumed.
#[derive(Debug, Default)]
struct Input {
    chunks: VecDeque<Chunk>,
    data_bytes: usize,
}

impl Input {
    fn push(&mut self, chunk: Chunk) {
        if let Chunk::Data { bytes, .. } = &chunk {
            self.data_bytes += bytes.len();
        }
        self.chunks.push_back(chunk);
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.data_bytes = 0;
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    method: String,
    target: String,
    version: u8,
    headers: Headers,
}

#[derive(Debug, Clone)]
pub(crate) struct ResponseHead {
    status: u16,
    headers: Headers,
}

/// A body as captured: decoded, capped, and whether bytes are missing.
#[derive(Debug, Default)]
pub(crate) struct Body {
    data: BytesMut,
    /// Longer than the cap; only the first bytes are kept.
    truncated: bool,
    /// A gap or an early end took bytes from it.
    damaged: bool,
}

impl Body {
    fn push(&mut self, bytes: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.data.len());
        let kept = room.min(bytes.len());
        self.data.extend_from_slice(&bytes[..kept]);
        if kept < bytes.len() {
            self.truncated = true;
        }
    }
}

/// How a head says its body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declared {
    Length(u64),
    Chunked,
    /// Neither: no body for a request, a body up to the connection's end for a response.
    Unframed,
}

/// How the conversation tells a response reader to read the body after a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFraming {
    NoBody,
    /// The connection switches protocols after this head.
    Tunnel,
    FromHeaders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(ChunkState),
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    /// The CRLF after chunk data; `cr` once the CR was read.
    DataEnd {
        cr: bool,
    },
    /// Trailer fields, `bytes` read so far.
    Trailers {
        bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not fed yet: whether the stream starts at a boundary comes with its first chunk.
    New,
    /// At a message boundary, collecting a head.
    Head,
    /// Looking line by line for a start line after a lost boundary.
    Resync,
    /// A response head is parsed; the conversation has to say which request it answers.
    AwaitFraming,
    Body(Framing),
    /// A CONNECT or `Upgrade` request is read; its response decides whether what follows is
    /// still HTTP.
    Paused,
    /// Nothing more is parsed.
    Stopped,
}

/// What a reader reports to the conversation.
#[derive(Debug)]
enum Event {
    Request {
        head: RequestHead,
        start: Duration,
    },
    Response {
        head: ResponseHead,
        start: Duration,
    },
    /// The current message ended where its framing said (possibly with bytes missing inside).
    Done {
        body: Body,
        end: Duration,
    },
    /// The current message broke off and its end is unknown; the reader is resynchronising.
    Lost {
        /// A `Request`/`Response` event was sent for this message.
        head_parsed: bool,
        /// Lost to a gap (bytes may be missing after it), not to a parse error.
        gap: bool,
        start: Duration,
        body: Body,
        end: Duration,
    },
    /// Bytes at a message boundary went missing between these times: an unknown number of
    /// messages may be lost; the reader is resynchronising.
    Desync {
        from: Duration,
        to: Duration,
    },
    /// The connection's first bytes are not HTTP/1.x.
    NotHttp {
        http2: bool,
    },
    Ended,
}

/// What the first line of a connection's first request says about the protocol.
#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    Undecided,
    Http1,
    Http2,
    NotHttp,
}

/// Frames the messages of one direction.
#[derive(Debug)]
struct Reader {
    side: Side,
    state: State,
    /// The connection's first request is still to be judged HTTP/1.x or not.
    first_message: bool,
    head: Vec<u8>,
    /// End-of-head tracking: 1 after a LF, 2 after LF CR.
    newlines: u8,
    /// A partial line: while resynchronising, or a chunk-size line.
    line: Vec<u8>,
    line_too_long: bool,
    line_start: Duration,
    /// Where segments began inside `line` while resynchronising, with their times.
    line_marks: Vec<(usize, Duration)>,
    message_start: Duration,
    /// Time of the last byte consumed.
    last_time: Duration,
    body: Body,
    max_body: usize,
    /// The framing a parsed response head declared, used once the request is known.
    declared: Declared,
    /// Pause after the current request: it asked to switch protocols.
    pause_after: bool,
}

impl Reader {
    fn new(side: Side, max_body: usize) -> Self {
        Self {
            side,
            state: State::New,
            first_message: false,
            head: Vec::new(),
            newlines: 0,
            line: Vec::new(),
            line_too_long: false,
            line_start: Duration::ZERO,
            line_marks: Vec::new(),
            message_start: Duration::ZERO,
            last_time: Duration::ZERO,
            body: Body::default(),
            max_body,
            declared: Declared::Unframed,
            pause_after: false,
        }
    }

    /// Starts the reader: at a boundary if the stream's start was seen, else resynchronising.
    fn begin(&mut self, synced: bool) {
        if self.state != State::New {
            return;
        }
        if synced {
            self.state = State::Head;
            self.first_message = self.side == Side::Request;
        } else {
            self.state = State::Resync;
        }
    }

    fn is_paused(&self) -> bool {
        self.state == State::Paused
    }

    /// Lets a paused request reader go on; at a boundary, or resynchronising when what came
    /// after the pause is uncertain.
    fn resume(&mut self, resync: bool) {
        if self.state == State::Paused {
            self.state = if resync { State::Resync } else { State::Head };
        }
    }

    /// Consumes input until it runs out or the reader has to wait.
    fn read(
        &mut self,
        input: &mut Input,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) {
        loop {
            if !matches!(self.state, State::Head | State::Resync | State::Body(_)) {
                return;
            }
            let Some(chunk) = input.chunks.front_mut() else {
                return;
            };
            match chunk {
                Chunk::Data { bytes, time } => {
                    let time = *time;
                    let used = self.data(bytes, time, stats, events).min(bytes.len());
                    if used > 0 {
                        self.last_time = time;
                    }
                    bytes.advance(used);
                    input.data_bytes -= used;
                    if bytes.is_empty() {
                        input.chunks.pop_front();
                    } else if used == 0
                        && matches!(self.state, State::Head | State::Resync | State::Body(_))
                    {
                        // Every state consumes at least a byte; this only guards against a
                        // framing bug spinning forever on one chunk.
                        debug!(side = ?self.side, "Reader made no progress; dropping a byte");
                        bytes.advance(1);
                        input.data_bytes -= 1;
                    }
                }
                Chunk::Gap { len, time } => {
                    let (len, time) = (*len, *time);
                    input.chunks.pop_front();
                    self.gap(len, time, events);
                }
                Chunk::End { clean, time } => {
                    let (clean, time) = (*clean, *time);
                    input.chunks.pop_front();
                    self.end(clean, time, events);
                }
            }
        }
    }

    fn data(
        &mut self,
        bytes: &[u8],
        time: Duration,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) -> usize {
        match self.state {
            State::Head => self.head_bytes(bytes, time, stats, events),
            State::Resync => self.scan(bytes, time),
            State::Body(_) => self.body_bytes(bytes, time, stats, events),
            _ => 0,
        }
    }

    fn head_bytes(
        &mut self,
        bytes: &[u8],
        time: Duration,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) -> usize {
        // Empty lines before a start line are ignored (RFC 9112, section 2.2).
        let mut from = 0;
        if self.head.is_empty() {
            while from < bytes.len() && matches!(bytes[from], b'\r' | b'\n') {
                from += 1;
            }
            if from == bytes.len() {
                return from;
            }
            self.message_start = time;
            self.newlines = 0;
        }

        let mut end = None;
        for (i, &byte) in bytes[from..].iter().enumerate() {
            if self.ends_head(byte) {
                end = Some(from + i + 1);
                break;
            }
        }
        let upto = end.unwrap_or(bytes.len());
        if self.head.len() + (upto - from) > MAX_HEAD_BYTES {
            self.fail(FramingError::HeadTooLarge, false, time, stats, events);
            return upto;
        }
        self.head.extend_from_slice(&bytes[from..upto]);

        // Judged when the first line completes, and early on its first bytes so that a binary
        // protocol is recognised at once; never on every byte of a long line.
        let judge = self.first_message
            && (bytes[from..upto].contains(&b'\n') || self.head.len() - (upto - from) <= 64);
        if judge {
            match judge_first_line(&self.head) {
                Judgement::Undecided => {}
                Judgement::Http1 => self.first_message = false,
                Judgement::Http2 => {
                    self.state = State::Stopped;
                    events.push(Event::NotHttp { http2: true });
                    return upto;
                }
                Judgement::NotHttp => {
                    self.state = State::Stopped;
                    events.push(Event::NotHttp { http2: false });
                    return upto;
                }
            }
        }

        if end.is_some() {
            self.parse_head(time, stats, events);
        }
        upto
    }

    /// Tracks the blank line that ends a head (CRLF CRLF, or bare LF LF).
    fn ends_head(&mut self, byte: u8) -> bool {
        match (byte, self.newlines) {
            (b'\n', 0) => {
                self.newlines = 1;
                false
            }
            (b'\n', _) => true,
            (b'\r', 1) => {
                self.newlines = 2;
                false
            }
            (b'\r', 0) => false,
            _ => {
                self.newlines = 0;
                false
            }
        }
    }

    fn parse_head(
        &mut self,
        time: Duration,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) {
        let head = std::mem::take(&mut self.head);
        self.newlines = 0;
        let parsed = match self.side {
            Side::Request => {
                parse_request(&head).map(|(head, declared)| (Head::Request(head), declared))
            }
            Side::Response => {
                parse_response(&head).map(|(head, declared)| (Head::Response(head), declared))
            }
        };
        let (parsed, declared) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => return self.fail(error, false, time, stats, events),
        };

        let start = self.message_start;
        match parsed {
            Head::Request(head) => {
                self.pause_after = head.method.eq_ignore_ascii_case("CONNECT")
                    || head.headers.get("upgrade").is_some();
                events.push(Event::Request { head, start });
                let framing = match declared {
                    Declared::Length(len) => Framing::Length(len),
                    Declared::Chunked => Framing::Chunked(ChunkState::Size),
                    Declared::Unframed => Framing::Length(0),
                };
                self.start_body(framing, time, events);
            }
            // Interim responses answer nothing; the final response follows.
            Head::Response(head) if (100..200).contains(&head.status) && head.status != 101 => {
                self.state = State::Head;
            }
            Head::Response(head) => {
                self.declared = declared;
                self.state = State::AwaitFraming;
                events.push(Event::Response { head, start });
            }
        }
    }

    /// Frames the body of the response head just read, now that its request is known.
    fn set_framing(&mut self, framing: ResponseFraming, events: &mut Vec<Event>) {
        if self.state != State::AwaitFraming {
            return;
        }
        let time = self.last_time;
        match framing {
            ResponseFraming::NoBody => self.finish(time, events),
            ResponseFraming::Tunnel => {
                self.finish(time, events);
                self.state = State::Stopped;
            }
            ResponseFraming::FromHeaders => {
                let framing = match self.declared {
                    Declared::Length(len) => Framing::Length(len),
                    Declared::Chunked => Framing::Chunked(ChunkState::Size),
                    Declared::Unframed => Framing::Close,
                };
                self.start_body(framing, time, events);
            }
        }
    }

    fn start_body(&mut self, framing: Framing, time: Duration, events: &mut Vec<Event>) {
        if framing == Framing::Length(0) {
            self.finish(time, events);
        } else {
            self.state = State::Body(framing);
        }
    }

    fn body_bytes(
        &mut self,
        bytes: &[u8],
        time: Duration,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) -> usize {
        let State::Body(framing) = self.state else {
            return 0;
        };
        match framing {
            Framing::Length(remaining) => {
                let take = remaining.min(bytes.len() as u64) as usize;
                self.body.push(&bytes[..take], self.max_body);
                let remaining = remaining - take as u64;
                if remaining == 0 {
                    self.finish(time, events);
                } else {
                    self.state = State::Body(Framing::Length(remaining));
                }
                take
            }
            Framing::Close => {
                self.body.push(bytes, self.max_body);
                bytes.len()
            }
            Framing::Chunked(chunk) => self.chunked_bytes(chunk, bytes, time, stats, events),
        }
    }

    /// Decodes chunked transfer coding: size line (extensions ignored), data, CRLF, and after
    /// the last chunk the trailer section, which is read and dropped.
    fn chunked_bytes(
        &mut self,
        mut chunk: ChunkState,
        bytes: &[u8],
        time: Duration,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) -> usize {
        let mut used = 0;
        while used < bytes.len() {
            let rest = &bytes[used..];
            match chunk {
                ChunkState::Size => {
                    let (line_done, taken) = self.take_line(rest);
                    used += taken;
                    if self.line_too_long {
                        self.fail(FramingError::ChunkSize, true, time, stats, events);
                        return used;
                    }
                    if !line_done {
                        continue;
                    }
                    let size = parse_chunk_size(&self.line);
                    self.line.clear();
                    chunk = match size {
                        Some(0) => ChunkState::Trailers { bytes: 0 },
                        Some(size) => ChunkState::Data(size),
                        None => {
                            self.fail(FramingError::ChunkSize, true, time, stats, events);
                            return used;
                        }
                    };
                }
                ChunkState::Data(remaining) => {
                    let take = remaining.min(rest.len() as u64) as usize;
                    self.body.push(&rest[..take], self.max_body);
                    used += take;
                    chunk = match remaining - take as u64 {
                        0 => ChunkState::DataEnd { cr: false },
                        left => ChunkState::Data(left),
                    };
                }
                ChunkState::DataEnd { cr } => {
                    used += 1;
                    chunk = match rest[0] {
                        b'\r' if !cr => ChunkState::DataEnd { cr: true },
                        b'\n' => ChunkState::Size,
                        _ => {
                            self.fail(FramingError::ChunkEnd, true, time, stats, events);
                            return used;
                        }
                    };
                }
                ChunkState::Trailers { bytes: read } => {
                    let (line_done, taken) = self.take_line(rest);
                    used += taken;
                    let read = read + taken;
                    if self.line_too_long || read > MAX_HEAD_BYTES {
                        self.fail(FramingError::TrailersTooLarge, true, time, stats, events);
                        return used;
                    }
                    if !line_done {
                        chunk = ChunkState::Trailers { bytes: read };
                        continue;
                    }
                    let blank = matches!(self.line.as_slice(), b"\r\n" | b"\n");
                    self.line.clear();
                    if blank {
                        self.finish(time, events);
                        return used;
                    }
                    chunk = ChunkState::Trailers { bytes: read };
                }
            }
        }
        self.state = State::Body(Framing::Chunked(chunk));
        used
    }

    /// Appends bytes up to and including the next LF to `line`. Returns whether the line is
    /// complete and how many bytes were taken.
    fn take_line(&mut self, bytes: &[u8]) -> (bool, usize) {
        let (done, taken) = match bytes.iter().position(|&b| b == b'\n') {
            Some(at) => (true, at + 1),
            None => (false, bytes.len()),
        };
        if self.line_too_long {
            // The rest of an over-long line is skipped up to its end.
        } else if self.line.len() + taken > MAX_LINE_BYTES {
            self.line_too_long = true;
            self.line.clear();
            self.line_marks.clear();
        } else {
            self.line.extend_from_slice(&bytes[..taken]);
        }
        (done, taken)
    }

    /// Scans for the next start line; consumes everything before it.
    ///
    /// A start line is looked for at every line start, and also at the first byte of each
    /// segment: a body that does not end in a newline runs straight into the next message's
    /// start line, which a client or server usually writes in a new segment.
    fn scan(&mut self, bytes: &[u8], time: Duration) -> usize {
        if !self.line.is_empty() && self.line_marks.len() < MAX_LINE_MARKS {
            self.line_marks.push((self.line.len(), time));
        }
        let mut used = 0;
        while used < bytes.len() {
            if self.line.is_empty() && !self.line_too_long {
                self.line_start = time;
            }
            let (line_done, taken) = self.take_line(&bytes[used..]);
            used += taken;
            if !line_done {
                break;
            }
            if !self.line_too_long {
                let starts =
                    std::iter::once((0, self.line_start)).chain(self.line_marks.iter().copied());
                let found = starts
                    .filter(|&(at, _)| at < self.line.len())
                    .find(|&(at, _)| is_start_line(self.side, &self.line[at..]));
                if let Some((at, start)) = found {
                    self.head = self.line.split_off(at);
                    self.line.clear();
                    self.line_marks.clear();
                    self.newlines = 1;
                    self.message_start = start;
                    self.state = State::Head;
                    return used;
                }
            }
            self.line.clear();
            self.line_marks.clear();
            self.line_too_long = false;
        }
        used
    }

    fn gap(&mut self, len: u64, time: Duration, events: &mut Vec<Event>) {
        match self.state {
            State::Head if self.head.is_empty() => self.desync(time, events),
            State::Head => self.lose(false, true, time, events),
            State::Resync => {
                // A line broken by a gap cannot be trusted as a start line.
                self.line.clear();
                self.line_marks.clear();
                self.line_too_long = false;
                events.push(Event::Desync {
                    from: self.last_time,
                    to: time,
                });
            }
            State::Body(Framing::Length(remaining)) => {
                self.body.damaged = true;
                if len < remaining {
                    self.state = State::Body(Framing::Length(remaining - len));
                } else {
                    // The gap reaches past this body: the next message started inside it.
                    self.finish(time, events);
                    if len > remaining {
                        self.desync(time, events);
                    }
                }
            }
            State::Body(Framing::Chunked(ChunkState::Data(remaining))) if len <= remaining => {
                self.body.damaged = true;
                self.state = State::Body(Framing::Chunked(match remaining - len {
                    0 => ChunkState::DataEnd { cr: false },
                    left => ChunkState::Data(left),
                }));
            }
            State::Body(Framing::Chunked(_)) => {
                self.body.damaged = true;
                self.lose(true, true, time, events);
            }
            State::Body(Framing::Close) => self.body.damaged = true,
            State::New | State::AwaitFraming | State::Paused | State::Stopped => {}
        }
        self.last_time = self.last_time.max(time);
    }

    fn end(&mut self, clean: bool, time: Duration, events: &mut Vec<Event>) {
        match self.state {
            State::Head if !self.head.is_empty() => self.lose(false, false, time, events),
            State::Body(Framing::Close) => {
                self.body.damaged |= !clean;
                self.finish(time, events);
            }
            State::Body(_) => {
                self.body.damaged = true;
                self.finish(time, events);
            }
            _ => {}
        }
        self.state = State::Stopped;
        events.push(Event::Ended);
    }

    /// The current message ended where its framing said.
    fn finish(&mut self, end: Duration, events: &mut Vec<Event>) {
        events.push(Event::Done {
            body: std::mem::take(&mut self.body),
            end,
        });
        self.state = if std::mem::take(&mut self.pause_after) {
            State::Paused
        } else {
            State::Head
        };
        self.head.clear();
        self.newlines = 0;
    }

    /// The current message broke off with its end unknown.
    fn lose(&mut self, head_parsed: bool, gap: bool, end: Duration, events: &mut Vec<Event>) {
        events.push(Event::Lost {
            head_parsed,
            gap,
            start: self.message_start,
            body: std::mem::take(&mut self.body),
            end,
        });
        self.start_resync();
    }

    /// A gap at a boundary: whole messages may be gone.
    fn desync(&mut self, time: Duration, events: &mut Vec<Event>) {
        events.push(Event::Desync {
            from: self.last_time,
            to: time,
        });
        self.start_resync();
    }

    fn fail(
        &mut self,
        error: FramingError,
        head_parsed: bool,
        time: Duration,
        stats: &mut super::ReassemblyStats,
        events: &mut Vec<Event>,
    ) {
        stats.parse_errors += 1;
        debug!(side = ?self.side, %error, "Cannot frame a message; resynchronising");
        self.body.damaged = true;
        self.lose(head_parsed, false, time, events);
    }

    fn start_resync(&mut self) {
        self.state = State::Resync;
        self.head.clear();
        self.line.clear();
        self.line_marks.clear();
        self.line_too_long = false;
        self.newlines = 0;
        self.pause_after = false;
        self.first_message = false;
    }
}

enum Head {
    Request(RequestHead),
    Response(ResponseHead),
}

fn parse_request(head: &[u8]) -> Result<(RequestHead, Declared), FramingError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    if request.parse(head)?.is_partial() {
        return Err(FramingError::HeadIncomplete);
    }
    let headers = collect_headers(request.headers);
    let declared = declared_framing(&headers, Side::Request)?;
    let head = RequestHead {
        method: request.method.unwrap_or_default().to_owned(),
        target: request.path.unwrap_or_default().to_owned(),
        version: request.version.unwrap_or(1),
        headers,
    };
    Ok((head, declared))
}

fn parse_response(head: &[u8]) -> Result<(ResponseHead, Declared), FramingError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    // Servers are held to a looser standard than clients: these two quirks are common.
    let status = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response(&mut response, head)?;
    if status.is_partial() {
        return Err(FramingError::HeadIncomplete);
    }
    let headers = collect_headers(response.headers);
    let declared = declared_framing(&headers, Side::Response)?;
    Ok((
        ResponseHead {
            status: response.code.unwrap_or(0),
            headers,
        },
        declared,
    ))
}

fn collect_headers(fields: &[httparse::Header<'_>]) -> Headers {
    Headers(
        fields
            .iter()
            .map(|field| {
                (
                    field.name.to_ascii_lowercase(),
                    Bytes::copy_from_slice(field.value),
                )
            })
            .collect(),
    )
}

/// The body framing a head declares (RFC 9112, section 6.3): a final `chunked` transfer coding
/// wins over `Content-Length`; repeated equal lengths are one length.
fn declared_framing(headers: &Headers, side: Side) -> Result<Declared, FramingError> {
    let codings: Vec<String> = headers
        .get_all("transfer-encoding")
        .filter_map(|value| std::str::from_utf8(value).ok())
        .flat_map(|value| value.split(','))
        .map(|coding| coding.trim().to_ascii_lowercase())
        .filter(|coding| !coding.is_empty())
        .collect();
    if let Some(last) = codings.last() {
        return match (last.as_str(), side) {
            ("chunked", _) => Ok(Declared::Chunked),
            (_, Side::Response) => Ok(Declared::Unframed),
            (_, Side::Request) => Err(FramingError::TransferEncoding),
        };
    }

    let mut length = None;
    for value in headers.get_all("content-length") {
        let value = std::str::from_utf8(value).map_err(|_| FramingError::ContentLength)?;
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FramingError::ContentLength);
            }
            let parsed: u64 = part.parse().map_err(|_| FramingError::ContentLength)?;
            if length.is_some_and(|known| known != parsed) {
                return Err(FramingError::ContentLength);
            }
            length = Some(parsed);
        }
    }
    Ok(length.map_or(Declared::Unframed, Declared::Length))
}

/// The size on a chunk-size line: hex digits, then optional `;` extensions.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = match line.iter().position(|&b| b == b';') {
        Some(at) => &line[..at],
        None => line,
    };
    let size = size.trim_ascii();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in size {
        let digit = (byte as char).to_digit(16)?;
        value = value.checked_mul(16)?.checked_add(u64::from(digit))?;
    }
    Some(value)
}

fn judge_first_line(head: &[u8]) -> Judgement {
    let seen = head.len().min(HTTP2_PREFACE.len());
    if head[..seen] == HTTP2_PREFACE[..seen] {
        return if seen == HTTP2_PREFACE.len() {
            Judgement::Http2
        } else {
            Judgement::Undecided
        };
    }
    match head.iter().position(|&b| b == b'\n') {
        Some(end) if is_request_line(&head[..end], false) => Judgement::Http1,
        Some(_) => Judgement::NotHttp,
        // Only the line's start is checked while it is partial, so a long line costs little.
        None if plausible_request_start(&head[..head.len().min(64)]) => Judgement::Undecided,
        None => Judgement::NotHttp,
    }
}

fn is_start_line(side: Side, line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    match side {
        Side::Request => is_request_line(line, true),
        Side::Response => is_status_line(line),
    }
}

/// `METHOD SP target SP HTTP/1.x`, without the line end.
fn is_request_line(line: &[u8], known_method: bool) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let method_ok = if known_method {
        KNOWN_METHODS.contains(&method)
    } else {
        !method.is_empty() && method.len() <= 32 && method.iter().all(|&b| is_tchar(b))
    };
    method_ok
        && !target.is_empty()
        && target.iter().all(|&b| is_target_byte(b))
        && matches!(version, b"HTTP/1.0" | b"HTTP/1.1")
}

/// Whether a partial first line can still become a request line.
fn plausible_request_start(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.len() > 32 || !method.iter().all(|&b| is_tchar(b)) {
        return false;
    }
    let Some(target) = parts.next() else {
        return true;
    };
    if method.is_empty() || !target.iter().all(|&b| is_target_byte(b)) {
        return false;
    }
    match parts.next() {
        None => true,
        Some(version) => {
            !target.is_empty()
                && (b"HTTP/1.0".starts_with(version) || b"HTTP/1.1".starts_with(version))
        }
    }
}

/// `HTTP/1.x SP 3DIGIT [SP reason]`, without the line end.
fn is_status_line(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(rest) = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))
    else {
        return false;
    };
    rest.len() >= 3
        && rest[..3].iter().all(u8::is_ascii_digit)
        && (rest.len() == 3 || rest[3] == b' ')
}

fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_target_byte(byte: u8) -> bool {
    byte > b' ' && byte != 0x7f
}

/// What is known of one request's response.
#[derive(Debug)]
enum Answer {
    /// No response assigned yet.
    Waiting,
    /// Its head is read; the body is coming.
    Receiving(ResponseHead),
    Done {
        head: ResponseHead,
        body: Body,
        end: Duration,
    },
    /// Never captured whole.
    Lost {
        head: Option<ResponseHead>,
        body: Body,
        end: Duration,
    },
}

/// A request waiting for its response, or for its own end.
#[derive(Debug)]
struct Entry {
    id: u64,
    start: Duration,
    /// None when the head itself was lost.
    request: Option<RequestHead>,
    body: Body,
    request_done: bool,
    request_damaged: bool,
    response: Answer,
    /// The pairing with its response is not certain.
    doubt: bool,
}

impl Entry {
    fn ready(&self) -> bool {
        self.request_done && matches!(self.response, Answer::Done { .. } | Answer::Lost { .. })
    }

    /// Gives up on whatever is still open.
    fn abandon(&mut self, time: Duration) {
        if !self.request_done {
            self.request_done = true;
            self.request_damaged = true;
        }
        match std::mem::replace(&mut self.response, Answer::Waiting) {
            Answer::Waiting => {
                self.response = Answer::Lost {
                    head: None,
                    body: Body::default(),
                    end: time,
                };
            }
            Answer::Receiving(head) => {
                self.response = Answer::Lost {
                    head: Some(head),
                    body: Body::default(),
                    end: time,
                };
            }
            finished => self.response = finished,
        }
    }

    fn lose_response(&mut self, time: Duration) {
        if matches!(self.response, Answer::Waiting) {
            self.response = Answer::Lost {
                head: None,
                body: Body::default(),
                end: time,
            };
        }
    }
}

/// Request bytes lost where a message boundary was lost too: whole requests may be in it.
#[derive(Debug, Clone, Copy)]
struct Hole {
    /// Time of the last request byte before the hole.
    from: Duration,
    /// Time the hole ended: the first byte after it, or when it was given up on.
    to: Duration,
    /// The request the hole broke off, when it broke one off.
    owner: Option<u64>,
    /// The answer to the last request lost in it was seen (see `Conversation::note_answer`).
    settled: bool,
}

impl Hole {
    fn contains(&self, time: Duration) -> bool {
        self.from < time && time <= self.to
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pairing {
    InStep,
    Realigning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Http,
    /// Switched protocols (101, CONNECT): no longer parsed.
    Tunnel,
    /// Not HTTP/1.x: never parsed.
    Ignored,
}

/// Which request the response reader's current message answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    None,
    Entry(u64),
    /// A response with no request to answer; read and dropped.
    Unsolicited,
}

enum Assign {
    Entry(usize),
    Unsolicited,
    /// The request may not have been read yet.
    Wait,
}

/// The HTTP state of one connection: both readers and the requests awaiting responses.
#[derive(Debug)]
pub(crate) struct Conversation {
    client: SocketAddr,
    requests: Reader,
    responses: Reader,
    request_input: Input,
    response_input: Input,
    entries: VecDeque<Entry>,
    next_id: u64,
    pairing: Pairing,
    /// A request was seen starting before the previous response ended.
    pipelined: bool,
    /// Request-side holes that may have swallowed whole requests.
    holes: VecDeque<Hole>,
    mode: Mode,
    /// A response head whose request is not known yet.
    awaiting: Option<(ResponseHead, Duration)>,
    target: Target,
    /// The CONNECT or `Upgrade` request the request reader paused after.
    upgrade: Option<u64>,
    request_ended: bool,
    last_response_end: Option<Duration>,
}

impl Conversation {
    pub(crate) fn new(client: SocketAddr, max_body: usize) -> Self {
        Self {
            client,
            requests: Reader::new(Side::Request, max_body),
            responses: Reader::new(Side::Response, max_body),
            request_input: Input::default(),
            response_input: Input::default(),
            entries: VecDeque::new(),
            next_id: 0,
            pairing: Pairing::InStep,
            pipelined: false,
            holes: VecDeque::new(),
            mode: Mode::Http,
            awaiting: None,
            target: Target::None,
            upgrade: None,
            request_ended: false,
            last_response_end: None,
        }
    }

    /// True once the connection is no longer parsed (switched protocols, or not HTTP/1.x).
    pub(crate) fn is_passive(&self) -> bool {
        self.mode != Mode::Http
    }

    /// Hands chunks of one direction to its reader. `synced` says whether that direction's
    /// stream started at its SYN (at a message boundary).
    pub(crate) fn feed(&mut self, direction: Direction, synced: bool, chunks: &mut Vec<Chunk>) {
        if chunks.is_empty() {
            return;
        }
        if self.mode != Mode::Http {
            chunks.clear();
            return;
        }
        let (reader, input) = match direction {
            Direction::ToServer => (&mut self.requests, &mut self.request_input),
            Direction::ToClient => (&mut self.responses, &mut self.response_input),
        };
        if reader.state == State::New {
            reader.begin(synced);
            // Without the start of a stream, earlier messages are unknown: realign.
            if !synced {
                self.pairing = Pairing::Realigning;
            }
        }
        for chunk in chunks.drain(..) {
            input.push(chunk);
        }
    }

    /// Parses what both directions have delivered and emits finished exchanges.
    /// `request_backlog` says whether request bytes wait behind a hole in the TCP stream.
    pub(crate) fn pump(&mut self, request_backlog: bool, ctx: &mut Ctx<'_>) {
        self.run(request_backlog, false, ctx);
    }

    /// Ends the conversation: everything still open is emitted `Incomplete`.
    pub(crate) fn close(&mut self, ctx: &mut Ctx<'_>) {
        self.run(false, true, ctx);
        if self.mode == Mode::Http {
            let time = self.requests.last_time.max(self.responses.last_time);
            for entry in &mut self.entries {
                entry.abandon(time);
            }
            while let Some(entry) = self.entries.pop_front() {
                self.emit(entry, ctx);
            }
        }
        self.entries.clear();
        self.request_input.clear();
        self.response_input.clear();
        self.awaiting = None;
    }

    fn run(&mut self, request_backlog: bool, force: bool, ctx: &mut Ctx<'_>) {
        let mut events = Vec::new();
        loop {
            if self.mode != Mode::Http {
                self.request_input.clear();
                self.response_input.clear();
                return;
            }
            let mut progress = false;

            self.requests
                .read(&mut self.request_input, ctx.stats, &mut events);
            progress |= !events.is_empty();
            for event in events.drain(..) {
                self.on_request(event, ctx);
            }
            if self.mode != Mode::Http {
                continue;
            }

            // A response head waiting for its request: bounded by the response bytes it holds
            // up, so a request that never shows cannot stall the connection forever.
            let stalled = self.response_input.data_bytes > ctx.config.max_out_of_order_bytes;
            if self.awaiting.is_some() {
                progress |= self.try_assign(request_backlog, force || stalled, ctx);
            }

            self.responses
                .read(&mut self.response_input, ctx.stats, &mut events);
            progress |= !events.is_empty();
            for event in events.drain(..) {
                self.on_response(event, request_backlog, force, ctx);
            }

            // A paused request reader holding too much: stop waiting for the switch decision.
            if self.requests.is_paused()
                && (force || self.request_input.data_bytes > ctx.config.max_out_of_order_bytes)
                && !self.request_input.chunks.is_empty()
            {
                self.upgrade = None;
                self.requests.resume(true);
                self.pairing = Pairing::Realigning;
                progress = true;
            }

            self.emit_ready(ctx);
            if !progress {
                return;
            }
        }
    }

    fn on_request(&mut self, event: Event, ctx: &mut Ctx<'_>) {
        match event {
            Event::Request { head, start } => {
                let pipelined = match self.entries.back() {
                    Some(Entry {
                        response: Answer::Done { end, .. },
                        ..
                    }) => *end > start,
                    Some(_) => false,
                    None => self.last_response_end.is_some_and(|end| end > start),
                };
                self.pipelined |= pipelined;
                self.push_entry(Some(head), start, ctx);
            }
            Event::Done { body, .. } => {
                if let Some(entry) = self.entries.back_mut().filter(|entry| !entry.request_done) {
                    entry.request_damaged |= body.damaged;
                    entry.body = body;
                    entry.request_done = true;
                    if self.requests.is_paused() {
                        self.upgrade = Some(entry.id);
                    }
                }
            }
            Event::Lost {
                head_parsed,
                gap,
                start,
                body,
                end,
            } => {
                let id = match self
                    .entries
                    .back_mut()
                    .filter(|entry| head_parsed && !entry.request_done)
                {
                    Some(entry) => {
                        entry.body = body;
                        entry.request_done = true;
                        entry.request_damaged = true;
                        entry.id
                    }
                    None => {
                        // A request was on its way: its response will come and must not be
                        // given to another request.
                        let entry = self.push_entry(None, start, ctx);
                        entry.request_done = true;
                        entry.request_damaged = true;
                        entry.id
                    }
                };
                // Bytes skipped after a parse error belong to the bad message; after a gap,
                // whole requests may have gone with it.
                self.pairing = Pairing::Realigning;
                if gap {
                    self.record_hole(start, end, Some(id));
                }
            }
            Event::Desync { from, to } => {
                self.pairing = Pairing::Realigning;
                self.record_hole(from, to, None);
            }
            Event::NotHttp { http2 } => {
                if http2 {
                    ctx.stats.http2_skipped += 1;
                } else {
                    ctx.stats.non_http_skipped += 1;
                }
                debug!(client = %self.client, http2, "Connection is not HTTP/1.x; ignoring it");
                self.mode = Mode::Ignored;
                self.entries.clear();
            }
            Event::Response { .. } => {}
            Event::Ended => self.request_ended = true,
        }
    }

    fn push_entry(
        &mut self,
        request: Option<RequestHead>,
        start: Duration,
        ctx: &mut Ctx<'_>,
    ) -> &mut Entry {
        // Too many unanswered requests: the oldest is given up, which breaks FIFO order. So many
        // requests in flight is pipelining, or a response stream the capture lost.
        while self.entries.len() >= MAX_PENDING_REQUESTS {
            if let Some(mut oldest) = self.entries.pop_front() {
                oldest.abandon(start);
                self.emit(oldest, ctx);
            }
            self.pairing = Pairing::Realigning;
            self.pipelined = true;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back(Entry {
            id,
            start,
            request,
            body: Body::default(),
            request_done: false,
            request_damaged: false,
            response: Answer::Waiting,
            doubt: false,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last]
    }

    /// Remembers a request-side hole that may have swallowed whole requests.
    fn record_hole(&mut self, from: Duration, to: Duration, owner: Option<u64>) {
        // A hole found only after the response that would settle it (no acknowledgement
        // declared it in time) stays unsettled: which hole an earlier response answered cannot
        // be told afterwards.
        self.holes.push_back(Hole {
            from,
            to: to.max(from),
            owner,
            settled: false,
        });
        if self.holes.len() > MAX_HOLES
            && let (Some(first), Some(second)) = (self.holes.pop_front(), self.holes.pop_front())
        {
            self.holes.push_front(Hole {
                from: first.from.min(second.from),
                to: first.to.max(second.to),
                owner: None,
                settled: first.settled && second.settled,
            });
        }
    }

    /// A response started at `start`, answering entry `id` or (`None`) no known request.
    ///
    /// A client that waits for each response gets the answer to a request lost in a hole
    /// before it sends anything else, so that answer starts inside the hole: either unsolicited
    /// or given to the request the hole broke off. Seeing it settles the hole. An unsolicited
    /// response that starts after an unsettled hole ended is the late answer to a request lost
    /// in it: the client did not wait, and the connection counts as pipelined. A response
    /// given to a request from before the hole settles nothing.
    fn note_answer(&mut self, start: Duration, id: Option<u64>) {
        if let Some(id) = id {
            if let Some(hole) = self.holes.iter_mut().find(|hole| hole.owner == Some(id)) {
                hole.settled = true;
            }
            return;
        }
        if let Some(hole) = self
            .holes
            .iter_mut()
            .find(|hole| !hole.settled && hole.contains(start))
        {
            hole.settled = true;
        } else if self
            .holes
            .iter()
            .any(|hole| !hole.settled && hole.to < start)
        {
            self.pipelined = true;
        }
    }

    fn on_response(&mut self, event: Event, request_backlog: bool, force: bool, ctx: &mut Ctx<'_>) {
        match event {
            Event::Response { head, start } => {
                self.awaiting = Some((head, start));
                self.try_assign(request_backlog, force, ctx);
            }
            Event::Done { body, end } => {
                let target = std::mem::replace(&mut self.target, Target::None);
                let Target::Entry(id) = target else {
                    return;
                };
                let Some(index) = self.entries.iter().position(|entry| entry.id == id) else {
                    return;
                };
                let entry = &mut self.entries[index];
                let Answer::Receiving(head) =
                    std::mem::replace(&mut entry.response, Answer::Waiting)
                else {
                    return;
                };
                let connect = entry
                    .request
                    .as_ref()
                    .is_some_and(|request| request.method.eq_ignore_ascii_case("CONNECT"));
                let switched = head.status == 101 || (connect && (200..300).contains(&head.status));
                entry.response = Answer::Done { head, body, end };
                self.last_response_end = Some(end);
                if self
                    .entries
                    .get(index + 1)
                    .is_some_and(|next| next.start < end)
                {
                    self.pipelined = true;
                }

                if switched {
                    self.tunnel(id, ctx);
                } else if self.upgrade == Some(id) {
                    self.upgrade = None;
                    self.requests.resume(false);
                }
            }
            Event::Lost {
                head_parsed,
                body,
                end,
                ..
            } => {
                let target = std::mem::replace(&mut self.target, Target::None);
                match target {
                    Target::Unsolicited => {}
                    Target::Entry(id) if head_parsed => {
                        if let Some(entry) = self.entries.iter_mut().find(|entry| entry.id == id)
                            && let Answer::Receiving(head) =
                                std::mem::replace(&mut entry.response, Answer::Waiting)
                        {
                            entry.response = Answer::Lost {
                                head: Some(head),
                                body,
                                end,
                            };
                        }
                        if self.upgrade == Some(id) {
                            self.upgrade = None;
                            self.requests.resume(true);
                        }
                    }
                    _ => self.lose_next_response(end),
                }
                self.pairing = Pairing::Realigning;
            }
            Event::Desync { to, .. } => {
                self.lose_next_response(to);
                self.pairing = Pairing::Realigning;
            }
            Event::Ended => {
                let time = self.responses.last_time;
                for entry in &mut self.entries {
                    entry.lose_response(time);
                }
            }
            Event::Request { .. } | Event::NotHttp { .. } => {}
        }
    }

    /// Bytes of a response went missing at a boundary: in step, that response was the one the
    /// next waiting request expects (provided that request had started by then).
    fn lose_next_response(&mut self, time: Duration) {
        if self.pairing != Pairing::InStep {
            return;
        }
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|entry| matches!(entry.response, Answer::Waiting))
            && entry.start <= time
        {
            entry.lose_response(time);
        }
    }

    /// Finds the request of the response head in `awaiting` and frames its body. Returns false
    /// when it has to wait.
    fn try_assign(&mut self, request_backlog: bool, force: bool, ctx: &mut Ctx<'_>) -> bool {
        let Some((_, start)) = &self.awaiting else {
            return false;
        };
        let assign = self.assign(*start, request_backlog, force);
        if matches!(assign, Assign::Wait) {
            return false;
        }
        let Some((head, start)) = self.awaiting.take() else {
            return false;
        };

        let framing = match assign {
            Assign::Entry(index) => {
                let entry = &mut self.entries[index];
                let method = entry
                    .request
                    .as_ref()
                    .map(|request| request.method.as_str());
                let framing = response_framing(method, head.status);
                self.target = Target::Entry(entry.id);
                entry.response = Answer::Receiving(head);
                let id = entry.id;
                self.note_answer(start, Some(id));
                framing
            }
            _ => {
                self.target = Target::Unsolicited;
                self.note_answer(start, None);
                response_framing(None, head.status)
            }
        };

        let mut events = Vec::new();
        self.responses.set_framing(framing, &mut events);
        for event in events {
            self.on_response(event, request_backlog, force, ctx);
        }
        true
    }

    fn assign(&mut self, response_start: Duration, request_backlog: bool, force: bool) -> Assign {
        let settled = force || self.request_ended;
        match self.pairing {
            Pairing::InStep => {
                match self
                    .entries
                    .iter()
                    .position(|entry| matches!(entry.response, Answer::Waiting))
                {
                    // A response cannot answer a request that started after it.
                    Some(index) if self.entries[index].start > response_start => {
                        Assign::Unsolicited
                    }
                    Some(index) => Assign::Entry(index),
                    None if settled => Assign::Unsolicited,
                    None => Assign::Wait,
                }
            }
            Pairing::Realigning => {
                if request_backlog && !settled {
                    return Assign::Wait;
                }
                let candidates: Vec<usize> = self
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, entry)| {
                        matches!(entry.response, Answer::Waiting) && entry.start <= response_start
                    })
                    .map(|(index, _)| index)
                    .collect();
                let Some((&pick, passed_over)) = candidates.split_last() else {
                    return Assign::Unsolicited;
                };
                let request_start = self.entries[pick].start;
                // A request-side hole before this response may hide requests. One that ends
                // after `request_start` may hide the request answered here; one not settled
                // (see `note_answer`) may still owe a response, which this one could be.
                let doubt = !passed_over.is_empty()
                    || self.pipelined
                    || self.holes.iter().any(|hole| {
                        hole.from < response_start && (!hole.settled || hole.to > request_start)
                    });
                // Later requests start after this one: settled holes before it no longer count.
                self.holes
                    .retain(|hole| !hole.settled || hole.to > request_start);
                for &index in passed_over {
                    self.entries[index].lose_response(response_start);
                }
                self.entries[pick].doubt |= doubt;
                if !doubt {
                    self.pairing = Pairing::InStep;
                }
                Assign::Entry(pick)
            }
        }
    }

    /// The connection switched protocols after the response to entry `id`.
    fn tunnel(&mut self, id: u64, ctx: &mut Ctx<'_>) {
        ctx.stats.upgrades_skipped += 1;
        debug!(client = %self.client, "Connection switched protocols; no longer parsed");
        self.entries.retain(|entry| entry.id != id);
        let time = self.responses.last_time;
        while let Some(mut entry) = self.entries.pop_front() {
            entry.abandon(time);
            self.emit(entry, ctx);
        }
        self.mode = Mode::Tunnel;
        self.requests.state = State::Stopped;
        self.responses.state = State::Stopped;
        self.request_input.clear();
        self.response_input.clear();
    }

    fn emit_ready(&mut self, ctx: &mut Ctx<'_>) {
        while self.entries.front().is_some_and(Entry::ready) {
            if let Some(entry) = self.entries.pop_front() {
                self.emit(entry, ctx);
            }
        }
    }

    fn emit(&self, entry: Entry, ctx: &mut Ctx<'_>) {
        let request_known = entry.request.is_some();
        let request = match entry.request {
            Some(head) => Request {
                method: head.method,
                target: head.target,
                version: head.version,
                headers: head.headers,
                body: entry.body.data.freeze(),
            },
            None => Request {
                method: String::new(),
                target: String::new(),
                version: 1,
                headers: Headers::default(),
                body: entry.body.data.freeze(),
            },
        };

        let (response, end, response_whole, response_truncated) = match entry.response {
            Answer::Done { head, body, end } => {
                let whole = !body.damaged;
                let truncated = body.truncated;
                (
                    Response {
                        status: head.status,
                        headers: head.headers,
                        body: body.data.freeze(),
                    },
                    end,
                    whole,
                    truncated,
                )
            }
            Answer::Lost { head, body, end } => {
                let (status, headers) = head.map(|h| (h.status, h.headers)).unwrap_or_default();
                (
                    Response {
                        status,
                        headers,
                        body: body.data.freeze(),
                    },
                    end,
                    false,
                    false,
                )
            }
            Answer::Receiving(head) => (
                Response {
                    status: head.status,
                    headers: head.headers,
                    body: Bytes::new(),
                },
                entry.start,
                false,
                false,
            ),
            Answer::Waiting => (
                Response {
                    status: 0,
                    headers: Headers::default(),
                    body: Bytes::new(),
                },
                entry.start,
                false,
                false,
            ),
        };

        let quality = if entry.doubt
            || !request_known
            || entry.request_damaged
            || !entry.request_done
            || !response_whole
        {
            Quality::Incomplete
        } else if entry.body.truncated || response_truncated {
            Quality::Truncated
        } else {
            Quality::Complete
        };

        let routing_key = ctx
            .config
            .routing_key
            .as_deref()
            .and_then(|name| request.headers.get_str(name))
            .map(str::to_owned);
        let started = ctx
            .config
            .wall_clock_at_zero
            .checked_add(entry.start)
            .unwrap_or(ctx.config.wall_clock_at_zero);

        ctx.stats.exchanges += 1;
        if quality == Quality::Incomplete {
            ctx.stats.exchanges_incomplete += 1;
        }
        ctx.out.push(Exchange {
            source: Source::Attach,
            client: Some(self.client),
            request,
            response,
            timing: Timing {
                started,
                live_latency: end.saturating_sub(entry.start),
            },
            routing_key,
            quality,
        });
    }
}

/// How the body of a response with `status` to a `method` request is framed.
fn response_framing(method: Option<&str>, status: u16) -> ResponseFraming {
    let method_is = |name: &str| method.is_some_and(|m| m.eq_ignore_ascii_case(name));
    if status == 101 || (method_is("CONNECT") && (200..300).contains(&status)) {
        ResponseFraming::Tunnel
    } else if method_is("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        ResponseFraming::NoBody
    } else {
        ResponseFraming::FromHeaders
    }
}

#[cfg(test)]
mod tests;
