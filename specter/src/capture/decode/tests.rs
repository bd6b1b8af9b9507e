use specter_common::tcp_flag;

use super::*;

fn record(header: SegmentHeader, payload: &[u8]) -> Vec<u8> {
    // SAFETY: SegmentHeader is plain repr(C) data; viewing it as bytes is sound.
    let head = unsafe {
        std::slice::from_raw_parts((&header as *const SegmentHeader).cast::<u8>(), HEADER_BYTES)
    };
    let mut bytes = head.to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

fn header(sport: u16, dport: u16, captured: u32, wire: u32) -> SegmentHeader {
    let mut saddr = [0u8; 16];
    saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
    let mut daddr = [0u8; 16];
    daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
    SegmentHeader {
        timestamp_ns: 1_500_000_000,
        saddr,
        daddr,
        sport,
        dport,
        seq: 1000,
        ack: 2000,
        wire_len: wire,
        captured_len: captured,
        ifindex: 3,
        tcp_flags: tcp_flag::ACK | tcp_flag::PSH,
        flags: record_flag::INGRESS,
        _pad: [0; 6],
    }
}

#[test]
fn request_segment_has_the_client_as_source() {
    let segment = decode(&record(header(40000, 8080, 3, 3), b"GET"), &[8080]).unwrap();
    assert_eq!(segment.direction, Direction::ToServer);
    assert_eq!(segment.client, "10.0.0.1:40000".parse().unwrap());
    assert_eq!(segment.server, "10.0.0.2:8080".parse().unwrap());
    assert_eq!(&segment.payload[..], b"GET");
    assert_eq!((segment.seq, segment.ack), (1000, 2000));
    assert_eq!(segment.timestamp, Duration::from_millis(1500));
    assert!(!segment.truncated);
}

#[test]
fn response_segment_has_the_client_as_destination() {
    let segment = decode(&record(header(8080, 40000, 4, 4), b"HTTP"), &[8080]).unwrap();
    assert_eq!(segment.direction, Direction::ToClient);
    assert_eq!(segment.client, "10.0.0.2:40000".parse().unwrap());
    assert_eq!(segment.server, "10.0.0.1:8080".parse().unwrap());
}

#[test]
fn ipv6_addresses_are_read_whole() {
    let mut h = header(40000, 8080, 0, 0);
    h.flags |= record_flag::IPV6;
    h.saddr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
    h.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
    let segment = decode(&record(h, b""), &[8080]).unwrap();
    assert_eq!(segment.client, "[fd00::1]:40000".parse().unwrap());
}

#[test]
fn a_short_copy_is_marked_truncated() {
    let segment = decode(&record(header(40000, 8080, 2, 9000), b"GE"), &[8080]).unwrap();
    assert!(segment.truncated);
    assert_eq!(segment.wire_len, 9000);
}

#[test]
fn malformed_records_are_errors_not_panics() {
    assert_eq!(decode(&[0u8; 10], &[80]), Err(DecodeError::Short(10)));
    let bytes = record(header(1, 80, 50, 50), b"only ten b");
    assert_eq!(
        decode(&bytes, &[80]),
        Err(DecodeError::Length {
            said: 50,
            found: 10
        })
    );
}
