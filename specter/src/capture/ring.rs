//! The ring consumer: waits for the ring's fd to be readable, drains records in batches,
//! decodes them and feeds reassembly; rebuilt exchanges go to the sink (the pipeline).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::{CaptureError, decode};
use crate::{
    exchange::Exchange,
    reassembly::{Reassembler, ReassemblyStats},
};

/// Records handled before yielding to other tasks.
const BATCH: usize = 1024;
/// How often idle connections are expired and figures published.
const TICK: Duration = Duration::from_millis(500);

/// The ring buffer the classifiers fill.
pub struct Ring {
    ring: RingBuf<MapData>,
    ports: Vec<u16>,
}

impl Ring {
    pub(super) fn new(ring: RingBuf<MapData>, ports: Vec<u16>) -> Result<Self, CaptureError> {
        Ok(Self { ring, ports })
    }
}

/// What the consumer has seen, published for the admin API.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RingFigures {
    pub records: u64,
    pub record_bytes: u64,
    pub decode_errors: u64,
    pub reassembly: ReassemblyStats,
}

/// Reads the ring until `shutdown` resolves, then ends reassembly (pending exchanges are
/// emitted as incomplete).
pub async fn run(
    ring: Ring,
    mut reassembler: Reassembler,
    mut sink: impl FnMut(Exchange),
    figures: Arc<Mutex<RingFigures>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let Ring { ring, ports } = ring;
    // SAFETY: the ring owns its map fd for as long as the AsyncFd owns the ring, and the fd is
    // never swapped for another while registered.
    let mut fd = unsafe { AsyncFd::register(ring)? };
    let mut out = Vec::new();
    let mut local = RingFigures::default();
    let mut tick = tokio::time::interval(TICK);
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                let mut drained = 0;
                while drained < BATCH {
                    let Some(item) = ring.next() else { break };
                    drained += 1;
                    local.records += 1;
                    local.record_bytes += item.len() as u64;
                    match decode::decode(&item, &ports) {
                        Ok(segment) => reassembler.push(segment, &mut out),
                        Err(error) => {
                            local.decode_errors += 1;
                            debug!(%error, "Undecodable ring record skipped");
                        }
                    }
                }
                // A full batch may have left records behind: stay ready and come back.
                if drained < BATCH {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                reassembler.expire(monotonic_now(), &mut out);
                local.reassembly = reassembler.stats();
                *figures.lock().unwrap_or_else(|p| p.into_inner()) = local;
            }
            () = &mut shutdown => break,
        }
        for exchange in out.drain(..) {
            sink(exchange);
        }
        tokio::task::yield_now().await;
    }

    reassembler.finish(&mut out);
    for exchange in out.drain(..) {
        sink(exchange);
    }
    local.reassembly = reassembler.stats();
    *figures.lock().unwrap_or_else(|p| p.into_inner()) = local;
    if local.decode_errors > 0 {
        warn!(
            errors = local.decode_errors,
            "Some ring records could not be decoded"
        );
    }
    Ok(())
}

/// CLOCK_MONOTONIC now, the clock of the kernel's record timestamps.
pub fn monotonic_now() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The wall-clock time that corresponds to kernel timestamp zero.
pub fn wall_clock_at_zero() -> SystemTime {
    SystemTime::now() - monotonic_now()
}
