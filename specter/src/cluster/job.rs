//! The mirror job one node ships to the owner of its routing key: the exchange as captured,
//! the request and the live response it already has, in a compact binary form.
//!
//! [`Exchange`] is not serialisable as it stands (its timing holds a `SystemTime`), and JSON
//! would spell every body byte as a number; this layout writes bodies as they are. Every
//! length is checked against what is left, so a frame that passed authentication but was cut
//! or garbled still decodes to an error, never to a panic.
//!
//! Layout (integers big-endian): version `u8`, source `u8`, quality `u8`, started as seconds
//! `u64` and nanoseconds `u32` since the Unix epoch, live latency in nanoseconds `u64`, the
//! client address and the routing key as optional strings, then the request (method, target,
//! HTTP minor version `u8`, headers, body) and the response (status `u16`, headers, body).
//! A string or body is a `u32` length and its bytes; headers are a `u32` count of name/value
//! pairs; an optional value is a `u8` flag before it.

use std::{
    net::SocketAddr,
    time::{Duration, UNIX_EPOCH},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::exchange::{Exchange, Headers, Quality, Request, Response, Source, Timing};

/// The layout version written first; a receiver refuses any other.
const VERSION: u8 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum JobError {
    #[error("mirror job has layout version {0}, this node reads version {VERSION}")]
    Version(u8),
    #[error("mirror job is cut short reading {0}")]
    Short(&'static str),
    #[error("mirror job has an invalid {0}")]
    Invalid(&'static str),
}

/// Encodes an exchange as a mirror job.
pub fn encode(exchange: &Exchange) -> Bytes {
    let request = &exchange.request;
    let response = &exchange.response;
    let size = 64
        + request.target.len()
        + request.body.len()
        + response.body.len()
        + headers_size(&request.headers)
        + headers_size(&response.headers);
    let mut out = BytesMut::with_capacity(size);

    out.put_u8(VERSION);
    out.put_u8(match exchange.source {
        Source::Proxy => 0,
        Source::Attach => 1,
    });
    out.put_u8(match exchange.quality {
        Quality::Complete => 0,
        Quality::Truncated => 1,
        Quality::Incomplete => 2,
    });
    let started = exchange
        .timing
        .started
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    out.put_u64(started.as_secs());
    out.put_u32(started.subsec_nanos());
    out.put_u64(u64::try_from(exchange.timing.live_latency.as_nanos()).unwrap_or(u64::MAX));
    put_optional(&mut out, exchange.client.map(|a| a.to_string()).as_deref());
    put_optional(&mut out, exchange.routing_key.as_deref());

    put_bytes(&mut out, request.method.as_bytes());
    put_bytes(&mut out, request.target.as_bytes());
    out.put_u8(request.version);
    put_headers(&mut out, &request.headers);
    put_bytes(&mut out, &request.body);

    out.put_u16(response.status);
    put_headers(&mut out, &response.headers);
    put_bytes(&mut out, &response.body);
    out.freeze()
}

/// Decodes a mirror job; bodies are slices of `job`, not copies.
pub fn decode(mut job: Bytes) -> Result<Exchange, JobError> {
    let buf = &mut job;
    let version = get_u8(buf, "version")?;
    if version != VERSION {
        return Err(JobError::Version(version));
    }
    let source = match get_u8(buf, "source")? {
        0 => Source::Proxy,
        1 => Source::Attach,
        _ => return Err(JobError::Invalid("source")),
    };
    let quality = match get_u8(buf, "quality")? {
        0 => Quality::Complete,
        1 => Quality::Truncated,
        2 => Quality::Incomplete,
        _ => return Err(JobError::Invalid("quality")),
    };
    need(buf, 20, "timing")?;
    let secs = buf.get_u64();
    let nanos = buf.get_u32();
    if nanos >= 1_000_000_000 {
        return Err(JobError::Invalid("start time"));
    }
    let started = UNIX_EPOCH
        .checked_add(Duration::new(secs, nanos))
        .ok_or(JobError::Invalid("start time"))?;
    let live_latency = Duration::from_nanos(buf.get_u64());
    let client = match get_optional(buf, "client")? {
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .map_err(|_| JobError::Invalid("client address"))?,
        ),
        None => None,
    };
    let routing_key = get_optional(buf, "routing key")?;

    let method = get_string(buf, "method")?;
    let target = get_string(buf, "target")?;
    let version = get_u8(buf, "HTTP version")?;
    let request_headers = get_headers(buf, "request headers")?;
    let request_body = get_bytes(buf, "request body")?;

    need(buf, 2, "status")?;
    let status = buf.get_u16();
    let response_headers = get_headers(buf, "response headers")?;
    let response_body = get_bytes(buf, "response body")?;
    if buf.has_remaining() {
        return Err(JobError::Invalid("trailing bytes"));
    }

    Ok(Exchange {
        source,
        client,
        request: Request {
            method,
            target,
            version,
            headers: request_headers,
            body: request_body,
        },
        response: Response {
            status,
            headers: response_headers,
            body: response_body,
        },
        timing: Timing {
            started,
            live_latency,
        },
        routing_key,
        quality,
    })
}

fn headers_size(headers: &Headers) -> usize {
    headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum()
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(u32::try_from(bytes.len()).expect("captured fields are far below 4 GiB"));
    out.put_slice(bytes);
}

fn put_optional(out: &mut BytesMut, text: Option<&str>) {
    match text {
        Some(text) => {
            out.put_u8(1);
            put_bytes(out, text.as_bytes());
        }
        None => out.put_u8(0),
    }
}

fn put_headers(out: &mut BytesMut, headers: &Headers) {
    out.put_u32(u32::try_from(headers.len()).expect("header count fits u32"));
    for (name, value) in headers.iter() {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

fn need(buf: &Bytes, len: usize, what: &'static str) -> Result<(), JobError> {
    if buf.remaining() < len {
        return Err(JobError::Short(what));
    }
    Ok(())
}

fn get_u8(buf: &mut Bytes, what: &'static str) -> Result<u8, JobError> {
    need(buf, 1, what)?;
    Ok(buf.get_u8())
}

fn get_bytes(buf: &mut Bytes, what: &'static str) -> Result<Bytes, JobError> {
    need(buf, 4, what)?;
    let len = buf.get_u32() as usize;
    need(buf, len, what)?;
    Ok(buf.split_to(len))
}

fn get_string(buf: &mut Bytes, what: &'static str) -> Result<String, JobError> {
    let bytes = get_bytes(buf, what)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| JobError::Invalid(what))
}

fn get_optional(buf: &mut Bytes, what: &'static str) -> Result<Option<String>, JobError> {
    match get_u8(buf, what)? {
        0 => Ok(None),
        1 => get_string(buf, what).map(Some),
        _ => Err(JobError::Invalid(what)),
    }
}

fn get_headers(buf: &mut Bytes, what: &'static str) -> Result<Headers, JobError> {
    need(buf, 4, what)?;
    let count = buf.get_u32() as usize;
    // Each pair takes at least 8 bytes, so a count beyond that is a lie, not an allocation.
    need(buf, count.saturating_mul(8), what)?;
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        let name = get_string(buf, what)?;
        let value = get_bytes(buf, what)?;
        fields.push((name, value));
    }
    Ok(Headers(fields))
}
