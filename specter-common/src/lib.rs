//! Record layouts and map indices shared by the kernel programs (`specter-ebpf`) and userspace.
//!
//! Everything here is `#[repr(C)]` plain data so both sides read the same bytes.
#![no_std]

/// Per-CPU counters the classifiers keep; the index into the `COUNTERS` map.
pub mod counter {
    /// Packets the classifiers looked at, on either direction.
    pub const PACKETS_SEEN: u32 = 0;
    /// Packets on a live port that were copied to userspace.
    pub const PACKETS_COPIED: u32 = 1;
    /// Payload bytes copied to userspace.
    pub const BYTES_COPIED: u32 = 2;
    /// Records lost because the ring buffer was full.
    pub const RING_DROPS: u32 = 3;
    /// Packets whose payload could not be copied whole.
    pub const TRUNCATED: u32 = 4;
    /// Number of counters; the size of the `COUNTERS` map.
    pub const COUNT: u32 = 5;
}

/// Names of the maps userspace opens in the object.
pub mod maps {
    pub const COUNTERS: &str = "COUNTERS";
}

/// Names of the classifier programs in the object.
pub mod programs {
    pub const INGRESS: &str = "specter_ingress";
    pub const EGRESS: &str = "specter_egress";
    pub const ALL: [&str; 2] = [INGRESS, EGRESS];
}
