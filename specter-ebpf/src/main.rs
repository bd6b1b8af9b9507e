//! Specter's TC classifiers: copy the TCP segments of the live ports into a ring buffer.
//!
//! They only copy and count. Every program returns `TC_ACT_UNSPEC`, so the packet continues
//! exactly as if no program were attached and any other TC program on the interface still
//! runs; nothing is dropped, redirected or modified. All decisions beyond "is this a segment of
//! a live port, and not Specter's own" are made in userspace.
//!
//! A record is a `SegmentHeader` then the payload. Payloads larger than `CHUNK_BYTES` (GRO and
//! TSO super-packets) are split into several records, each carrying the sequence number of
//! its first byte; what does not fit in `MAX_CHUNKS` records is reported as a truncated tail.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use specter_common::{
    CHUNK_BYTES, Endpoint, HEADER_BYTES, MAX_CHUNKS, MAX_EXCLUDED, MAX_PORTS, SegmentHeader,
    counter, record_flag, tcp_flag,
};

/// Default ring size; userspace sets the real one from `capture.ring_bytes` at load time.
const DEFAULT_RING_BYTES: u32 = 16 * 1024 * 1024;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);

#[map(name = "EXCLUDE")]
static EXCLUDE: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_EXCLUDED, 0);

#[map(name = "SEGMENTS")]
static SEGMENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Per-CPU scratch space where a record is assembled before it is copied to the ring.
#[repr(C)]
pub struct Scratch {
    header: SegmentHeader,
    payload: [u8; CHUNK_BYTES],
}

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[classifier]
pub fn specter_ingress(ctx: TcContext) -> i32 {
    let _ = observe(&ctx, record_flag::INGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn specter_egress(ctx: TcContext) -> i32 {
    let _ = observe(&ctx, 0);
    TC_ACT_UNSPEC
}

/// Where the TCP segment sits in the packet, and its addresses.
struct Located {
    saddr: [u8; 16],
    daddr: [u8; 16],
    ipv6: bool,
    /// Offset of the TCP header.
    l4: usize,
    /// End of the IP packet (excludes link-layer padding).
    end: usize,
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: u8) -> Result<(), ()> {
    bump(counter::PACKETS_SEEN, 1);
    let located = locate(ctx)?;

    let tcp: [u8; 20] = ctx.load(located.l4).map_err(|_| ())?;
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    // SAFETY: map lookups with keys on the stack; the values are not dereferenced.
    let live = unsafe { PORTS.get(&dport).is_some() || PORTS.get(&sport).is_some() };
    if !live {
        return Ok(());
    }

    // Specter's own replays to a shadow on the same interface and port are not traffic to copy.
    let source = Endpoint {
        addr: located.saddr,
        port: sport,
        _pad: [0; 2],
    };
    let destination = Endpoint {
        addr: located.daddr,
        port: dport,
        _pad: [0; 2],
    };
    // SAFETY: as above.
    let own = unsafe { EXCLUDE.get(&source).is_some() || EXCLUDE.get(&destination).is_some() };
    if own {
        bump(counter::OWN_TRAFFIC, 1);
        return Ok(());
    }

    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let data_offset = ((tcp[12] >> 4) as usize) * 4;
    let tcp_flags = tcp[13];
    let payload_start = located.l4 + data_offset;
    let payload_len = located.end.saturating_sub(payload_start);

    // Bare ACKs carry nothing to rebuild; SYN, FIN and RST are kept for connection tracking.
    let control = tcp_flags & (tcp_flag::SYN | tcp_flag::FIN | tcp_flag::RST) != 0;
    if payload_len == 0 && !control {
        return Ok(());
    }
    bump(counter::PACKETS_COPIED, 1);

    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the per-CPU scratch entry is valid for this program run and used by it alone.
    let scratch = unsafe { &mut *scratch };
    let mut flags = direction;
    if located.ipv6 {
        flags |= record_flag::IPV6;
    }
    scratch.header = SegmentHeader {
        // SAFETY: a helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        saddr: located.saddr,
        daddr: located.daddr,
        sport,
        dport,
        seq,
        ack,
        wire_len: 0,
        captured_len: 0,
        // SAFETY: reading a field of the context the kernel passed in.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        tcp_flags,
        flags,
        _pad: [0; 6],
    };

    if payload_len == 0 {
        emit(scratch, 0);
        return Ok(());
    }

    let mut offset = 0usize;
    for chunk in 0..MAX_CHUNKS {
        if offset >= payload_len {
            break;
        }
        let remaining = payload_len - offset;
        let len = if remaining > CHUNK_BYTES {
            CHUNK_BYTES
        } else {
            remaining
        };
        let last = chunk == MAX_CHUNKS - 1 || remaining <= CHUNK_BYTES;

        scratch.header.seq = seq.wrapping_add(offset as u32);
        // SYN belongs to the first chunk, FIN and RST to the last.
        let mut chunk_flags = tcp_flags;
        if chunk > 0 {
            chunk_flags &= !tcp_flag::SYN;
        }
        if !last {
            chunk_flags &= !(tcp_flag::FIN | tcp_flag::RST);
        }
        scratch.header.tcp_flags = chunk_flags;
        scratch.header.wire_len = if last { remaining as u32 } else { len as u32 };
        if last && remaining > len {
            scratch.header.flags = flags | record_flag::TRUNCATED;
            bump(counter::TRUNCATED, 1);
        }

        if copy_payload(ctx, scratch, payload_start + offset, len) {
            scratch.header.captured_len = len as u32;
        } else {
            scratch.header.captured_len = 0;
            scratch.header.flags = flags | record_flag::TRUNCATED;
            bump(counter::TRUNCATED, 1);
        }
        emit(scratch, scratch.header.captured_len as usize);
        offset += len;
    }
    Ok(())
}

/// Copies `len` payload bytes at `offset` into the scratch record; false when it cannot.
#[inline(always)]
fn copy_payload(ctx: &TcContext, scratch: &mut Scratch, offset: usize, len: usize) -> bool {
    if len == 0 || len > CHUNK_BYTES {
        return false;
    }
    // Older verifiers (6.1) do not learn `len != 0` from the test above, and the helper refuses
    // a size that may be zero. Masking `len - 1` and adding one gives them the range
    // [1, CHUNK_BYTES] by arithmetic alone; the volatile read keeps the compiler from folding
    // the mask away, since it knows the range too.
    // SAFETY: reading a local through a valid reference.
    let len_minus_one = unsafe { core::ptr::read_volatile(&(len - 1)) };
    let len = (len_minus_one & (CHUNK_BYTES - 1)) + 1;
    // SAFETY: the destination is the scratch payload, at least `len` bytes long (checked above).
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            scratch.payload.as_mut_ptr().cast(),
            len as u32,
        )
    };
    ret == 0
}

/// Copies the header and `captured` payload bytes to the ring, counting a full ring.
#[inline(always)]
fn emit(scratch: &Scratch, captured: usize) {
    // SAFETY: reading a local through a valid reference; see `copy_payload`.
    let size = unsafe { core::ptr::read_volatile(&(HEADER_BYTES + captured)) };
    if size > HEADER_BYTES + CHUNK_BYTES {
        return;
    }
    // SAFETY: `scratch` is at least `size` bytes long (checked above).
    let record =
        unsafe { core::slice::from_raw_parts((scratch as *const Scratch).cast::<u8>(), size) };
    match SEGMENTS.output::<[u8]>(record, 0) {
        Ok(()) => bump(counter::BYTES_COPIED, captured as u64),
        Err(_) => bump(counter::RING_DROPS, 1),
    }
}

/// Finds the TCP header behind Ethernet, up to two VLAN tags, and IPv4 or IPv6.
#[inline(always)]
fn locate(ctx: &TcContext) -> Result<Located, ()> {
    let mut offset = ETH_HLEN;
    let mut proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = u16::from_be(ctx.load::<u16>(offset + 2).map_err(|_| ())?);
            offset += 4;
        }
    }

    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if proto == ETH_P_IP {
        let ip: [u8; 20] = ctx.load(offset).map_err(|_| ())?;
        if ip[9] != IPPROTO_TCP {
            return Err(());
        }
        // A fragment other than the first has no TCP header; the first lacks the rest.
        let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF;
        if fragment != 0 {
            bump(counter::FRAGMENTS, 1);
            return Err(());
        }
        let header_len = ((ip[0] & 0x0F) as usize) * 4;
        let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        saddr[..4].copy_from_slice(&ip[12..16]);
        daddr[..4].copy_from_slice(&ip[16..20]);
        // GSO packets may carry 0 in tot_len; the skb length is then the bound.
        let end = if total_len == 0 {
            ctx.len() as usize
        } else {
            offset + total_len
        };
        return Ok(Located {
            saddr,
            daddr,
            ipv6: false,
            l4: offset + header_len,
            end,
        });
    }
    if proto == ETH_P_IPV6 {
        let ip: [u8; 40] = ctx.load(offset).map_err(|_| ())?;
        let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        saddr.copy_from_slice(&ip[8..24]);
        daddr.copy_from_slice(&ip[24..40]);
        let end = if payload_len == 0 {
            ctx.len() as usize
        } else {
            offset + 40 + payload_len
        };
        let mut next = ip[6];
        let mut l4 = offset + 40;
        // Extension headers: hop-by-hop, routing, fragment, destination options, AH.
        for _ in 0..6 {
            match next {
                IPPROTO_TCP => {
                    return Ok(Located {
                        saddr,
                        daddr,
                        ipv6: true,
                        l4,
                        end,
                    });
                }
                0 | 43 | 60 => {
                    let ext: [u8; 2] = ctx.load(l4).map_err(|_| ())?;
                    next = ext[0];
                    l4 += (ext[1] as usize + 1) * 8;
                }
                44 => {
                    let ext: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
                    if u16::from_be_bytes([ext[2], ext[3]]) & 0xFFF9 != 0 {
                        bump(counter::FRAGMENTS, 1);
                        return Err(());
                    }
                    next = ext[0];
                    l4 += 8;
                }
                51 => {
                    let ext: [u8; 2] = ctx.load(l4).map_err(|_| ())?;
                    next = ext[0];
                    l4 += (ext[1] as usize + 2) * 4;
                }
                _ => return Err(()),
            }
        }
        if next == IPPROTO_TCP {
            return Ok(Located {
                saddr,
                daddr,
                ipv6: true,
                l4,
                end,
            });
        }
    }
    Err(())
}

#[inline(always)]
fn bump(index: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the per-CPU array lookup and is valid for this CPU for
        // the whole program run; no other program instance on this CPU runs concurrently.
        unsafe { *slot += by };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
