use super::*;

const LIMIT: usize = 1024;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A stream started by a SYN with `isn`, plus what it delivered and counted.
struct Harness {
    stream: Stream,
    stats: ReassemblyStats,
    out: Vec<Chunk>,
    isn: u32,
}

impl Harness {
    fn new(isn: u32) -> Self {
        let mut stream = Stream::new();
        assert!(stream.syn(isn));
        Self {
            stream,
            stats: ReassemblyStats::default(),
            out: Vec::new(),
            isn,
        }
    }

    /// Sends `data` at stream offset `at`.
    fn send(&mut self, at: u32, data: &[u8]) {
        self.send_full(at, data, data.len() as u32, false);
    }

    fn send_full(&mut self, at: u32, data: &[u8], wire_len: u32, fin: bool) {
        let seq = self.isn.wrapping_add(1).wrapping_add(at);
        let payload = Bytes::copy_from_slice(data);
        self.stream.segment(
            seq,
            payload,
            wire_len,
            fin,
            ms(u64::from(at)),
            LIMIT,
            &mut self.stats,
            &mut self.out,
        );
    }

    fn ack(&mut self, at: u32) {
        let ack = self.isn.wrapping_add(1).wrapping_add(at);
        self.stream
            .acked(ack, ms(999), &mut self.stats, &mut self.out);
    }

    /// Delivered bytes, with gaps shown as `_` per missing byte and the end as `|`.
    fn delivered(&self) -> String {
        let mut text = String::new();
        for chunk in &self.out {
            match chunk {
                Chunk::Data { bytes, .. } => text.push_str(&String::from_utf8_lossy(bytes)),
                Chunk::Gap { len, .. } => text.push_str(&"_".repeat(*len as usize)),
                Chunk::End { .. } => text.push('|'),
            }
        }
        text
    }
}

#[test]
fn in_order_segments_are_delivered_at_once() {
    let mut h = Harness::new(1000);
    h.send(0, b"hello ");
    h.send(6, b"world");
    assert_eq!(h.delivered(), "hello world");
    assert_eq!(h.stats, ReassemblyStats::default());
    assert!(!h.stream.has_backlog());
}

#[test]
fn out_of_order_segments_wait_for_the_hole() {
    let mut h = Harness::new(1000);
    h.send(6, b"world");
    h.send(11, b"!");
    assert_eq!(h.delivered(), "");
    assert!(h.stream.has_backlog());
    h.send(0, b"hello ");
    assert_eq!(h.delivered(), "hello world!");
    assert_eq!(h.stats.out_of_order, 2);
    assert!(!h.stream.has_backlog());
}

#[test]
fn retransmissions_and_overlaps_keep_the_first_copy() {
    let mut h = Harness::new(7);
    h.send(0, b"abcd");
    h.send(0, b"abcd");
    // Overlaps the delivered bytes and brings two new ones.
    h.send(2, b"XXef");
    // Buffered ahead, then overlapped by a different copy of the same range.
    h.send(8, b"ij");
    h.send(6, b"ghYY");
    assert_eq!(h.delivered(), "abcdefghij");
    assert_eq!(h.stats.retransmits, 3);
}

#[test]
fn a_segment_covering_several_buffered_pieces_fills_only_the_holes() {
    let mut h = Harness::new(0);
    h.send(2, b"c");
    h.send(5, b"f");
    h.send(0, b"ABCDEFG");
    assert_eq!(h.delivered(), "ABcDEfG");
}

#[test]
fn sequence_numbers_wrap_at_two_to_the_32() {
    let mut h = Harness::new(u32::MAX - 3);
    h.send(0, b"abc");
    // Starts at u32::MAX - 0 and crosses into 0, 1, 2.
    h.send(6, b"ghi");
    h.send(3, b"def");
    assert_eq!(h.delivered(), "abcdefghi");
    h.ack(9);
    assert_eq!(h.stats.gaps, 0);
}

#[test]
fn over_the_bound_the_oldest_hole_becomes_a_gap() {
    let mut h = Harness::new(0);
    h.send(0, b"ab");
    // A hole of 3 bytes, then more than LIMIT bytes behind it.
    h.send(5, &[b'x'; LIMIT]);
    assert_eq!(h.delivered(), "ab");
    h.send(5 + LIMIT as u32, b"y");
    assert_eq!(h.delivered(), format!("ab___{}y", "x".repeat(LIMIT)));
    assert_eq!(h.stats.gaps, 1);
    assert!(!h.stream.has_backlog());
}

#[test]
fn an_ack_beyond_the_captured_bytes_declares_a_gap() {
    let mut h = Harness::new(0);
    h.send(0, b"ab");
    h.send(6, b"gh");
    h.ack(8);
    assert_eq!(h.delivered(), "ab____gh");
    h.ack(12);
    assert_eq!(h.delivered(), "ab____gh____");
    assert_eq!(h.stats.gaps, 2);
    // The late copy of a skipped range is only a retransmission.
    h.send(2, b"cdef");
    assert_eq!(h.delivered(), "ab____gh____");
    assert_eq!(h.stats.retransmits, 1);
}

#[test]
fn old_or_equal_acks_change_nothing() {
    let mut h = Harness::new(0);
    h.send(0, b"abc");
    h.ack(3);
    h.ack(1);
    assert_eq!(h.delivered(), "abc");
    assert_eq!(h.stats.gaps, 0);
}

#[test]
fn a_truncated_segment_leaves_a_gap_for_its_missing_tail() {
    let mut h = Harness::new(0);
    h.send_full(0, b"abc", 6, false);
    h.send(6, b"ghi");
    assert_eq!(h.delivered(), "abc___ghi");
    assert_eq!(h.stats.gaps, 1);

    // Out of order too: the hole is buffered with the bytes.
    let mut h = Harness::new(0);
    h.send_full(3, b"d", 3, false);
    h.send(6, b"g");
    h.send(0, b"abc");
    assert_eq!(h.delivered(), "abcd__g");
}

#[test]
fn the_fin_ends_the_stream_once_the_bytes_before_it_are_in() {
    let mut h = Harness::new(0);
    h.send_full(3, b"def", 3, true);
    assert_eq!(h.delivered(), "");
    assert!(!h.stream.ended());
    h.send(0, b"abc");
    assert_eq!(h.delivered(), "abcdef|");
    assert!(h.stream.ended());
    assert!(matches!(h.out.last(), Some(Chunk::End { clean: true, .. })));
    // Nothing is delivered after the end.
    h.send(6, b"zzz");
    assert_eq!(h.delivered(), "abcdef|");
}

#[test]
fn an_ack_covering_the_fin_does_not_count_it_as_a_byte() {
    let mut h = Harness::new(0);
    h.send(0, b"ab");
    h.send_full(4, b"", 0, true);
    h.ack(5);
    assert_eq!(h.delivered(), "ab__|");
    assert_eq!(h.stats.gaps, 1);
}

#[test]
fn flush_delivers_everything_with_gaps_then_ends() {
    let mut h = Harness::new(0);
    h.send(0, b"a");
    h.send(3, b"d");
    h.send(6, b"g");
    h.stream.flush(ms(50), &mut h.stats, &mut h.out);
    assert_eq!(h.delivered(), "a__d__g|");
    assert!(matches!(
        h.out.last(),
        Some(Chunk::End { clean: false, .. })
    ));
    assert_eq!(h.stats.gaps, 2);
}

#[test]
fn a_stream_without_syn_starts_at_its_first_segment() {
    let mut stream = Stream::new();
    let mut stats = ReassemblyStats::default();
    let mut out = Vec::new();
    stream.segment(
        5000,
        Bytes::from_static(b"xyz"),
        3,
        false,
        ms(1),
        LIMIT,
        &mut stats,
        &mut out,
    );
    assert!(stream.is_started());
    assert!(!stream.synced());
    assert_eq!(stream.isn(), None);
    // Bytes from before the first segment are old; the overlap is trimmed.
    stream.segment(
        4998,
        Bytes::from_static(b"vwx"),
        3,
        false,
        ms(2),
        LIMIT,
        &mut stats,
        &mut out,
    );
    stream.segment(
        5002,
        Bytes::from_static(b"zAB"),
        3,
        false,
        ms(3),
        LIMIT,
        &mut stats,
        &mut out,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[1],
        Chunk::Data {
            bytes: Bytes::from_static(b"AB"),
            time: ms(3)
        }
    );
    assert_eq!(stats.retransmits, 2);
    // A bare ACK does not start a stream.
    let mut other = Stream::new();
    other.segment(
        1,
        Bytes::new(),
        0,
        false,
        ms(1),
        LIMIT,
        &mut stats,
        &mut out,
    );
    assert!(!other.is_started());
}

#[test]
fn a_segment_far_outside_the_window_is_dropped() {
    let mut h = Harness::new(0);
    h.send(0, b"ab");
    h.send(0x7000_0000, b"zz");
    assert!(!h.stream.has_backlog());
    assert_eq!(h.delivered(), "ab");
}

#[test]
fn a_syn_retransmission_is_recognised() {
    let mut stream = Stream::new();
    assert!(stream.syn(42));
    assert!(!stream.syn(42));
    assert_eq!(stream.isn(), Some(42));
    assert!(stream.synced());
}
