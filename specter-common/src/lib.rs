//! Record layouts and map names shared by the kernel programs (`specter-ebpf`) and userspace.
//!
//! Everything here is `#[repr(C)]` plain data so both sides read the same bytes.
#![no_std]

/// Per-CPU counters the classifiers keep; the index into the `COUNTERS` map.
pub mod counter {
    /// Packets the classifiers looked at, in either direction.
    pub const PACKETS_SEEN: u32 = 0;
    /// Packets on a live port that were copied to userspace (whole or in part).
    pub const PACKETS_COPIED: u32 = 1;
    /// Payload bytes copied to userspace.
    pub const BYTES_COPIED: u32 = 2;
    /// Records lost because the ring buffer was full.
    pub const RING_DROPS: u32 = 3;
    /// Packets whose payload could not be copied whole.
    pub const TRUNCATED: u32 = 4;
    /// Packets on a live port that belong to Specter's own replays, left alone.
    pub const OWN_TRAFFIC: u32 = 5;
    /// IP fragments on a live port; they cannot be matched to a port and are not copied.
    pub const FRAGMENTS: u32 = 6;
    /// Number of counters; the size of the `COUNTERS` map.
    pub const COUNT: u32 = 7;
}

/// Names of the maps userspace opens in the object.
pub mod maps {
    pub const COUNTERS: &str = "COUNTERS";
    /// Live ports, host byte order, as `u16 -> u8` (the value is unused).
    pub const PORTS: &str = "PORTS";
    /// Local endpoints of Specter's own replay connections, as `Endpoint -> u8`.
    pub const EXCLUDE: &str = "EXCLUDE";
    /// The ring buffer of [`crate::SegmentHeader`] records.
    pub const SEGMENTS: &str = "SEGMENTS";
}

/// Names of the classifier programs in the object.
pub mod programs {
    pub const INGRESS: &str = "specter_ingress";
    pub const EGRESS: &str = "specter_egress";
    pub const ALL: [&str; 2] = [INGRESS, EGRESS];
}

/// Most payload bytes one ring record carries; larger packets are split into several records.
pub const CHUNK_BYTES: usize = 16384;
/// Most records one packet is split into; a payload beyond `CHUNK_BYTES * MAX_CHUNKS` is
/// reported as truncated.
pub const MAX_CHUNKS: usize = 5;
/// Most live ports one attachment watches.
pub const MAX_PORTS: u32 = 64;
/// Most of Specter's own connections excluded at once.
pub const MAX_EXCLUDED: u32 = 8192;

/// `SegmentHeader::flags` bits.
pub mod record_flag {
    /// Bytes `captured_len..wire_len` of this chunk were not copied.
    pub const TRUNCATED: u8 = 1;
    /// The packet arrived on the interface (ingress); otherwise it left it (egress).
    pub const INGRESS: u8 = 2;
    /// The addresses are IPv6; otherwise IPv4 in the first 4 bytes.
    pub const IPV6: u8 = 4;
}

/// TCP header flag bits, as on the wire.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// One ring record's fixed part; `captured_len` payload bytes follow it.
///
/// A packet larger than [`CHUNK_BYTES`] becomes several records, each with the sequence number
/// of its own first byte, so userspace treats each as a segment of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports, sequence and acknowledgement numbers in host byte order.
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes this chunk covers on the wire.
    pub wire_len: u32,
    /// Payload bytes that follow the header.
    pub captured_len: u32,
    pub ifindex: u32,
    pub tcp_flags: u8,
    /// [`record_flag`] bits.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Size of [`SegmentHeader`] in a ring record.
pub const HEADER_BYTES: usize = core::mem::size_of::<SegmentHeader>();

/// A local endpoint of one of Specter's own connections (its replays to the shadow).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data without padding holes that matter; any bit pattern is valid.
    unsafe impl aya::Pod for super::SegmentHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
}
