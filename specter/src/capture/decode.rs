//! Turns one ring record (a `SegmentHeader` and its payload) into a reassembly segment.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use specter_common::{HEADER_BYTES, SegmentHeader, record_flag};
use thiserror::Error;

use crate::reassembly::{Direction, Segment, TcpFlags};

/// A record that does not hold what the kernel side promises; counted, never fatal.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring record of {0} bytes is shorter than its {HEADER_BYTES}-byte header")]
    Short(usize),
    #[error("ring record says {said} payload bytes follow but {found} do")]
    Length { said: usize, found: usize },
}

/// Decodes a record; `ports` are the live ports, which tell the server side from the client.
pub fn decode(record: &[u8], ports: &[u16]) -> Result<Segment, DecodeError> {
    if record.len() < HEADER_BYTES {
        return Err(DecodeError::Short(record.len()));
    }
    // SAFETY: the record holds at least HEADER_BYTES bytes (checked above) and SegmentHeader is
    // plain data for which every bit pattern is valid; the read does not assume alignment.
    let header: SegmentHeader =
        unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<SegmentHeader>()) };
    let payload = &record[HEADER_BYTES..];
    let captured = header.captured_len as usize;
    if payload.len() < captured {
        return Err(DecodeError::Length {
            said: captured,
            found: payload.len(),
        });
    }

    let ipv6 = header.flags & record_flag::IPV6 != 0;
    let source = SocketAddr::new(address(&header.saddr, ipv6), header.sport);
    let destination = SocketAddr::new(address(&header.daddr, ipv6), header.dport);
    // A segment to a live port is a request; one from a live port a response.
    let (direction, client, server) = if ports.contains(&header.dport) {
        (Direction::ToServer, source, destination)
    } else {
        (Direction::ToClient, destination, source)
    };

    Ok(Segment {
        client,
        server,
        direction,
        seq: header.seq,
        ack: header.ack,
        flags: TcpFlags(header.tcp_flags),
        payload: Bytes::copy_from_slice(&payload[..captured]),
        truncated: header.flags & record_flag::TRUNCATED != 0
            || header.wire_len > header.captured_len,
        wire_len: header.wire_len,
        timestamp: Duration::from_nanos(header.timestamp_ns),
    })
}

fn address(bytes: &[u8; 16], ipv6: bool) -> IpAddr {
    if ipv6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

#[cfg(test)]
mod tests;
