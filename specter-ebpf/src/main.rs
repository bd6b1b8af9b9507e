//! Specter's TC classifiers.
//!
//! They only look and count: every program returns `TC_ACT_UNSPEC`, so the packet continues
//! exactly as if no program were attached and any other TC program on the interface still runs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use specter_common::counter;

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[classifier]
pub fn specter_ingress(ctx: TcContext) -> i32 {
    observe(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn specter_egress(ctx: TcContext) -> i32 {
    observe(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn observe(_ctx: &TcContext) {
    bump(counter::PACKETS_SEEN, 1);
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
