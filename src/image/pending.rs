//! Writes the trace has seen queued but not yet seen complete.
//!
//! # Why the run tracks them
//!
//! The trace reports each write twice: `block_bio_queue` when it is
//! submitted (`submit_bio_noacct_nocheck` in block/blk-core.c, which also
//! sets `BIO_TRACE_COMPLETION` on the bio) and a completion once its data is
//! on the device — `block_rq_complete` from `blk_update_request`
//! (block/blk-mq.c) on request-based devices, `block_bio_complete` from
//! `bio_endio` (block/bio.c) on bio-based ones. A write whose queue event was
//! drained and whose completion has not been is *in flight*: a read of its
//! blocks may or may not see it, and the run cannot end while one is. This is
//! exact where the device reports its completions with the range it was
//! queued at, unlike `/sys/block/DISK/inflight`, which counts only requests a
//! driver has started (`blk_mq_in_flight`), not bios in a plug, the I/O
//! scheduler, rq-qos throttling or a tag wait.
//!
//! Queue and completion events do not pair one to one — bios merge into one
//! request (`blk_attempt_bio_merge`: a back or front merge of *adjacent*
//! ranges), a request may complete in pieces (`blk_update_request` with fewer
//! bytes than the request), a bio may be split (`bio_split` copies
//! `BIO_TRACE_COMPLETION`, so each part completes with its own range) — but
//! their *sector coverage* does: every sector of a queued write is covered by
//! exactly one completion of that write. So the tracker counts, per sector,
//! writes queued minus writes completed, as disjoint ranges with a count.
//!
//! A completion over sectors with no queued write left is *unmatched*: a
//! write queued before tracing started, or a second completion of the same
//! request (`blk_flush_complete_seq` ends a flush-sequenced request again at
//! `REQ_FSEQ_DONE`, by then with 0 bytes, which the trace filter drops). It
//! marks its blocks dirty like any event and is counted here, nothing more.
//!
//! # Devices that do not report in-range completions
//!
//! Some drivers complete writes with an advanced `bi_iter` (brd: `W end+0`),
//! or under another dev_t (NVMe multipath heads, md/dm members). On them a
//! queued write never leaves the tracker. [`PendingWrites::completions`]
//! calls that out once a write has waited longer than any healthy device
//! takes ([`COMPLETION_WAIT_MAX`]), or sooner when no completion has matched
//! at all ([`COMPLETION_WAIT_NONE_SEEN`]); the run then cannot prove a racing
//! write was re-read, and refuses an exit-0 image unless `--freeze` stops
//! the writes.

use smallvec::{SmallVec, smallvec};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// A write still pending after this long means the device does not report
/// completions for the range it queued (or the write hangs, which the run
/// cannot wait out either).
pub const COMPLETION_WAIT_MAX: Duration = Duration::from_secs(30);

/// With writes queued and not one completion matched, this long is enough
/// to say the device reports none (a healthy device completes its first
/// write in milliseconds).
pub const COMPLETION_WAIT_NONE_SEEN: Duration = Duration::from_secs(2);

/// Queued writes seen before [`COMPLETION_WAIT_NONE_SEEN`] applies.
pub const COMPLETION_NONE_SEEN_QUEUED_MIN: u64 = 8;

/// Disjoint pending ranges kept at most. Each in-flight write adds at most
/// three; a healthy device has at most a few thousand writes in flight.
/// Past the bound the device is taken not to report completions.
pub const PENDING_RANGES_MAX: usize = 1 << 16;

/// Early completions kept at most (see [`PendingWrites::completed`]).
pub const EARLY_COMPLETIONS_MAX: usize = 4096;

/// How long, in trace time, an early completion waits for its queue event.
/// A queue event is committed before its bio reaches the driver, so it is
/// readable long before then; this only bounds memory.
pub const EARLY_COMPLETION_KEEP_NS: u64 = 1_000_000_000;

/// Whether the device's completions can be relied on to end in-flight
/// writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completions {
    /// Every write queued so far completed within the bound, or is still
    /// within it.
    Reported,
    /// A write queued at `sector_first` (target-relative) has had no
    /// completion for `waited`; or, with `sector_first` `None`, more writes
    /// were pending than [`PENDING_RANGES_MAX`] ranges hold.
    Missing {
        sector_first: Option<u64>,
        waited: Duration,
        matched_total: u64,
    },
}

/// What a look at the pending writes found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingSummary {
    /// Sectors with at least one write queued and not complete.
    pub sectors: u64,
    /// The pending range that has gone longest without a completion: its
    /// first sector, and since when.
    pub stalest: Option<(u64, Instant)>,
}

impl PendingSummary {
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Piece {
    /// One past the last sector.
    sector_end: u64,
    /// Queue-event times of the writes queued over this range and not
    /// complete, ascending; never empty.
    queued_ns: SmallVec<[u64; 2]>,
    /// When the range became pending or last saw a completion: a range
    /// that keeps being rewritten keeps completing, a write that never
    /// completes does not.
    progress: Instant,
}

/// A completion drained before the queue event of its write (the two were
/// on different CPUs' buffers, and the drain read the completion's first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Early {
    sector_first: u64,
    sector_end: u64,
    timestamp_ns: u64,
}

/// Per-sector writes queued and not yet complete, as disjoint ranges.
/// Sectors are target-relative, as the trace source reports them; times
/// are the trace's clock (`mono`, one clock for every CPU).
///
/// A completion ends one write queued over its sectors *before its own
/// time*: a write's completion follows its queue event (`submit_bio` runs
/// the queue tracepoint before the bio reaches the driver), so a completion
/// no later than a queue event cannot be that write's. Writes to the same
/// sectors complete in any order (a write-zeroes overtakes a write), so of
/// the writes queued before it, a completion ends the *latest*: that leaves
/// the earliest queue times, which the most completions still to come can
/// end. The count per sector, which is what convergence rests on, is the
/// same whichever write is chosen. A completion with no write queued
/// before it is kept as *early* for a while: its queue event may still be
/// on another CPU's buffer (a drain reads one CPU after the other).
///
/// Times from different CPUs compare because both sources stamp events
/// with one clock for every CPU: the tracefs instance is set to `mono`
/// (`trace_clock` in trace/live/tracefs.rs), and blktrace's relay records
/// take `ktime_get()` (`relay_blktrace_event` in kernel/trace/blktrace.c).
#[derive(Debug)]
pub struct PendingWrites {
    /// Keyed by first sector.
    pieces: BTreeMap<u64, Piece>,
    early: VecDeque<Early>,
    ranges_max: usize,
    overflowed: bool,
    /// Sticky once decided.
    missing: Option<Completions>,
    queued_total: u64,
    /// Completion events that ended (part of) at least one queued write.
    matched_total: u64,
    /// Sectors of completion events with nothing queued there when drained.
    unmatched_sectors: u64,
    /// Scratch of `queued` and `completed`, kept so that the pump's drains
    /// do not allocate per event once these have grown (a range's queue
    /// times are inline up to two). Matching a write against early
    /// completions still allocates, only while some are held.
    scratch_ranges: Vec<(u64, u64)>,
    scratch_starts: Vec<u64>,
}

impl Default for PendingWrites {
    fn default() -> PendingWrites {
        PendingWrites::new(PENDING_RANGES_MAX)
    }
}

impl PendingWrites {
    pub fn new(ranges_max: usize) -> PendingWrites {
        assert!(ranges_max > 0, "the tracker needs room for one range");
        PendingWrites {
            pieces: BTreeMap::new(),
            early: VecDeque::new(),
            ranges_max,
            overflowed: false,
            missing: None,
            queued_total: 0,
            matched_total: 0,
            unmatched_sectors: 0,
            scratch_ranges: Vec::new(),
            scratch_starts: Vec::new(),
        }
    }

    /// A write's queue event over `[sector_first, sector_first + count)`,
    /// emitted at `timestamp_ns` and drained at `now`.
    pub fn queued(
        &mut self,
        sector_first: u64,
        sector_count: u64,
        timestamp_ns: u64,
        now: Instant,
    ) {
        let Some(end) = range_end(sector_first, sector_count) else {
            return;
        };
        self.queued_total += 1;
        if self.overflowed {
            return;
        }
        self.early
            .retain(|e| e.timestamp_ns.saturating_add(EARLY_COMPLETION_KEEP_NS) >= timestamp_ns);
        if self.early.is_empty() {
            self.add_pending(sector_first, end, timestamp_ns, now);
        } else {
            // Sectors an early completion already ended are not pending.
            for (first, end) in self.take_early(sector_first, end, timestamp_ns) {
                self.add_pending(first, end, timestamp_ns, now);
            }
        }
        if self.pieces.len() > self.ranges_max {
            // Not a healthy device's in-flight set: stop tracking, and say
            // completions cannot be relied on.
            self.overflowed = true;
            self.pieces.clear();
        }
    }

    /// A completion event over `[sector_first, sector_first + count)`,
    /// emitted at `timestamp_ns` and drained at `now`.
    pub fn completed(
        &mut self,
        sector_first: u64,
        sector_count: u64,
        timestamp_ns: u64,
        now: Instant,
    ) {
        let Some(end) = range_end(sector_first, sector_count) else {
            return;
        };
        if self.overflowed {
            return;
        }
        self.split_at(sector_first);
        self.split_at(end);
        let mut matched = false;
        let mut emptied = std::mem::take(&mut self.scratch_starts);
        let mut unended = std::mem::take(&mut self.scratch_ranges);
        emptied.clear();
        unended.clear();
        let mut cursor = sector_first;
        for (&start, piece) in self.pieces.range_mut(sector_first..end) {
            if start > cursor {
                unended.push((cursor, start));
            }
            cursor = piece.sector_end;
            // The latest write queued before this completion.
            let before = piece.queued_ns.partition_point(|&q| q < timestamp_ns);
            if before > 0 {
                piece.queued_ns.remove(before - 1);
                piece.progress = now;
                matched = true;
                if piece.queued_ns.is_empty() {
                    emptied.push(start);
                }
            } else {
                unended.push((start, piece.sector_end));
            }
        }
        if cursor < end {
            unended.push((cursor, end));
        }
        for &start in &emptied {
            self.pieces.remove(&start);
        }
        self.scratch_starts = emptied;
        if matched {
            self.matched_total += 1;
        }
        coalesce_in_place(&mut unended);
        for &(first, end) in &unended {
            self.unmatched_sectors += end - first;
            if self.early.len() >= EARLY_COMPLETIONS_MAX {
                self.early.pop_front();
            }
            self.early.push_back(Early {
                sector_first: first,
                sector_end: end,
                timestamp_ns,
            });
        }
        self.scratch_ranges = unended;
    }

    /// Sectors pending and the stalest pending range.
    pub fn summary(&self) -> PendingSummary {
        let mut sectors = 0;
        let mut stalest: Option<(u64, Instant)> = None;
        for (&start, piece) in &self.pieces {
            sectors += piece.sector_end - start;
            if stalest.is_none_or(|(_, since)| piece.progress < since) {
                stalest = Some((start, piece.progress));
            }
        }
        PendingSummary { sectors, stalest }
    }

    /// Whether completions end the pending writes, as of `now`. Once
    /// `Missing`, always `Missing`.
    pub fn completions(&mut self, now: Instant) -> Completions {
        if let Some(missing) = self.missing {
            return missing;
        }
        let verdict = if self.overflowed {
            Some(Completions::Missing {
                sector_first: None,
                waited: Duration::ZERO,
                matched_total: self.matched_total,
            })
        } else if let Some((sector_first, since)) = self.summary().stalest {
            let waited = now.saturating_duration_since(since);
            let none_seen = self.matched_total == 0
                && self.queued_total >= COMPLETION_NONE_SEEN_QUEUED_MIN
                && waited >= COMPLETION_WAIT_NONE_SEEN;
            (none_seen || waited >= COMPLETION_WAIT_MAX).then_some(Completions::Missing {
                sector_first: Some(sector_first),
                waited,
                matched_total: self.matched_total,
            })
        } else {
            None
        };
        self.missing = verdict;
        verdict.unwrap_or(Completions::Reported)
    }

    /// Forgets every pending write and early completion; totals stay.
    /// Called when the disk was seen with no write in flight before the
    /// main pass: a completion drained before then cannot be told from one
    /// of a write queued before tracing started, so writes queued until
    /// then are not tracked (README, "What an image promises").
    pub fn restart(&mut self) {
        self.pieces.clear();
        self.early.clear();
    }

    /// Queue events seen.
    pub fn queued_total(&self) -> u64 {
        self.queued_total
    }

    /// Completion events that ended a queued write.
    pub fn matched_total(&self) -> u64 {
        self.matched_total
    }

    /// Sectors completed with no write queued there when drained (writes
    /// queued before tracing started, repeated completions, completions
    /// drained before their queue event).
    pub fn unmatched_sectors(&self) -> u64 {
        self.unmatched_sectors
    }

    /// Adds one queued write over `[first, end)`.
    fn add_pending(&mut self, first: u64, end: u64, timestamp_ns: u64, now: Instant) {
        self.split_at(first);
        self.split_at(end);
        let mut gaps = std::mem::take(&mut self.scratch_ranges);
        gaps.clear();
        let mut cursor = first;
        for (&start, piece) in self.pieces.range_mut(first..end) {
            if start > cursor {
                gaps.push((cursor, start));
            }
            let at = piece.queued_ns.partition_point(|&q| q <= timestamp_ns);
            piece.queued_ns.insert(at, timestamp_ns);
            cursor = piece.sector_end;
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        for &(start, sector_end) in &gaps {
            self.pieces.insert(
                start,
                Piece {
                    sector_end,
                    queued_ns: smallvec![timestamp_ns],
                    progress: now,
                },
            );
        }
        self.scratch_ranges = gaps;
    }

    /// Ends, with the early completions, what a write queued at
    /// `timestamp_ns` over `[first, end)` explains, and returns the parts of
    /// the range they do not cover. Each sector of the write takes at most
    /// one early completion — a completion ends one write — the earliest one
    /// after the write's queue event (the closest partner; later ones are
    /// left for later writes).
    fn take_early(&mut self, first: u64, end: u64, timestamp_ns: u64) -> Vec<(u64, u64)> {
        self.early.make_contiguous().sort_by_key(|e| e.timestamp_ns);
        let mut open: Vec<(u64, u64)> = vec![(first, end)];
        let mut kept: VecDeque<Early> = VecDeque::with_capacity(self.early.len());
        for early in std::mem::take(&mut self.early) {
            if early.timestamp_ns <= timestamp_ns || open.is_empty() {
                kept.push_back(early);
                continue;
            }
            // The parts of `early` that meet an open part of the write are
            // used up on both sides; the rest of each stays.
            let mut early_left: Vec<(u64, u64)> = vec![(early.sector_first, early.sector_end)];
            let mut still_open: Vec<(u64, u64)> = Vec::with_capacity(open.len() + 1);
            for &(open_first, open_end) in &open {
                let mut cursor = open_first;
                let mut pieces: Vec<(u64, u64)> = Vec::new();
                for &(e_first, e_end) in &early_left {
                    let a = e_first.max(cursor);
                    let b = e_end.min(open_end);
                    if a >= b {
                        pieces.push((e_first, e_end));
                        continue;
                    }
                    if cursor < a {
                        still_open.push((cursor, a));
                    }
                    cursor = b;
                    if e_first < a {
                        pieces.push((e_first, a));
                    }
                    if b < e_end {
                        pieces.push((b, e_end));
                    }
                }
                if cursor < open_end {
                    still_open.push((cursor, open_end));
                }
                pieces.sort_unstable();
                early_left = pieces;
            }
            open = still_open;
            for (sector_first, sector_end) in early_left {
                kept.push_back(Early {
                    sector_first,
                    sector_end,
                    ..early
                });
            }
        }
        self.early = kept;
        open
    }

    /// Splits the piece that strictly contains `sector`, if any, at it.
    fn split_at(&mut self, sector: u64) {
        let Some((&start, piece)) = self.pieces.range(..sector).next_back() else {
            return;
        };
        if piece.sector_end <= sector {
            return;
        }
        let right = piece.clone();
        self.pieces.get_mut(&start).expect("just found").sector_end = sector;
        self.pieces.insert(sector, right);
    }
}

/// Sorts ranges and joins those that touch or overlap, in place.
fn coalesce_in_place(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut kept = 0;
    for index in 0..ranges.len() {
        let (first, end) = ranges[index];
        if kept > 0 && first <= ranges[kept - 1].1 {
            ranges[kept - 1].1 = ranges[kept - 1].1.max(end);
        } else {
            ranges[kept] = (first, end);
            kept += 1;
        }
    }
    ranges.truncate(kept);
}

/// `first + count`, or `None` for an empty range. A range past `u64::MAX`
/// ends there (the trace source clips ranges to the target first).
fn range_end(sector_first: u64, sector_count: u64) -> Option<u64> {
    (sector_count > 0).then(|| sector_first.saturating_add(sector_count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn a_write_is_pending_until_its_range_completes() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(100, 8, 10, t);
        assert_eq!(pending.summary().sectors, 8);
        pending.completed(100, 4, 20, t);
        assert_eq!(pending.summary().sectors, 4);
        assert_eq!(pending.summary().stalest, Some((104, t)));
        pending.completed(104, 4, 21, t);
        assert!(pending.summary().is_empty());
        assert_eq!(pending.matched_total(), 2);
        assert_eq!(pending.unmatched_sectors(), 0);
    }

    #[test]
    fn merged_bios_complete_as_one_request() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        // Three adjacent bios, back-merged into one request.
        pending.queued(0, 8, 1, t);
        pending.queued(8, 8, 2, t);
        pending.queued(16, 1, 3, t);
        pending.completed(0, 17, 9, t);
        assert!(pending.summary().is_empty());
        assert_eq!(pending.matched_total(), 1);
    }

    #[test]
    fn overlapping_writes_need_a_completion_each() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(0, 8, 1, t);
        pending.queued(4, 8, 2, at(t, 5));
        pending.completed(0, 8, 3, t);
        // The second write is still in flight over 4..12.
        assert_eq!(pending.summary().sectors, 8);
        pending.completed(4, 8, 4, t);
        assert!(pending.summary().is_empty());
    }

    #[test]
    fn a_completion_without_a_queue_event_is_unmatched() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.completed(50, 8, 5, t);
        assert!(pending.summary().is_empty());
        assert_eq!(pending.unmatched_sectors(), 8);
        assert_eq!(pending.matched_total(), 0);
        // It does not end a write queued after it.
        pending.queued(50, 8, 6, t);
        assert_eq!(pending.summary().sectors, 8);
    }

    #[test]
    fn a_late_drained_old_completion_does_not_end_a_newer_write() {
        // A write queued before tracing completes at 116; a new write to the
        // same sectors is queued at 117, and its queue event is drained
        // before the old completion (another CPU's buffer).
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(40, 8, 117, t);
        pending.completed(40, 8, 116, t);
        assert_eq!(pending.summary().sectors, 8);
        pending.completed(40, 8, 148, t);
        assert!(pending.summary().is_empty());
    }

    #[test]
    fn a_completion_drained_before_its_queue_event_ends_it() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.completed(0, 16, 20, t);
        pending.queued(0, 8, 10, t);
        pending.queued(8, 16, 11, t);
        // 0..16 was ended by the early completion; 16..24 is in flight.
        let summary = pending.summary();
        assert_eq!(summary.sectors, 8);
        assert_eq!(summary.stalest.map(|(s, _)| s), Some(16));
        // An early completion ends one write only.
        pending.queued(0, 8, 12, t);
        assert_eq!(pending.summary().sectors, 16);
    }

    #[test]
    fn writes_that_complete_out_of_order_all_end() {
        // Seen on a loop device under hc-writer: a write-zeroes overtakes
        // two writes to the same block, and a write queued on the other
        // CPU is drained late. Completions must not end the wrong write.
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(0, 8, 450_154, t);
        pending.queued(0, 8, 453_474, t);
        pending.queued(0, 8, 456_698, t);
        pending.completed(0, 8, 456_763, t);
        pending.queued(0, 8, 443_429, t);
        pending.completed(0, 8, 443_565, t);
        pending.completed(0, 8, 450_445, t);
        pending.completed(0, 8, 453_713, t);
        assert!(pending.summary().is_empty(), "{:?}", pending.pieces);
        assert!(pending.early.is_empty());
    }

    #[test]
    fn one_queue_event_ends_one_early_completion() {
        // Seen on a loop device with writes hammering its last block: two
        // completions drained before their queue events. Each write takes
        // one of them, the earliest after it.
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.completed(98_296, 8, 528_312, t);
        pending.completed(98_296, 8, 529_560, t);
        pending.queued(98_296, 8, 528_224, t);
        assert_eq!(pending.early.len(), 1);
        assert_eq!(pending.early[0].timestamp_ns, 529_560);
        pending.queued(98_296, 8, 529_453, t);
        assert!(pending.summary().is_empty(), "{:?}", pending.pieces);
        assert!(pending.early.is_empty());
    }

    #[test]
    fn an_early_completion_covers_only_what_it_overlaps() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.completed(0, 8, 100, t);
        pending.completed(4, 8, 101, t);
        // 0..8 from the first, 8..12 from the second; 4..8 of the second
        // is left for another write.
        pending.queued(0, 12, 50, t);
        assert!(pending.summary().is_empty());
        assert_eq!(
            pending
                .early
                .iter()
                .map(|e| (e.sector_first, e.sector_end))
                .collect::<Vec<_>>(),
            [(4, 8)]
        );
    }

    #[test]
    fn early_completions_expire() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.completed(0, 8, 5, t);
        pending.queued(0, 8, 5 + EARLY_COMPLETION_KEEP_NS + 1, t);
        assert_eq!(pending.summary().sectors, 8);
    }

    #[test]
    fn split_bios_complete_in_parts() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(0, 2048, 1, t);
        for part in 0..8 {
            pending.completed(part * 256, 256, 2 + part, t);
        }
        assert!(pending.summary().is_empty());
    }

    #[test]
    fn empty_ranges_are_ignored() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(10, 0, 1, t);
        pending.completed(10, 0, 2, t);
        assert_eq!(pending.queued_total(), 0);
        assert!(pending.summary().is_empty());
        pending.queued(u64::MAX - 1, 10, 3, t);
        assert_eq!(pending.summary().sectors, 1);
    }

    #[test]
    fn a_device_that_never_completes_in_range_is_called_out() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        for i in 0..COMPLETION_NONE_SEEN_QUEUED_MIN {
            pending.queued(i * 8, 8, i * 2, t);
            // brd-style completions: the end of the range, 0 sectors.
            pending.completed(i * 8 + 8, 0, i * 2 + 1, t);
        }
        assert_eq!(pending.completions(at(t, 100)), Completions::Reported);
        let late = t + COMPLETION_WAIT_NONE_SEEN;
        assert!(matches!(
            pending.completions(late),
            Completions::Missing {
                sector_first: Some(0),
                matched_total: 0,
                ..
            }
        ));
        // Sticky, even once nothing is pending.
        pending.pieces.clear();
        assert!(matches!(
            pending.completions(late),
            Completions::Missing { .. }
        ));
    }

    #[test]
    fn a_device_that_completes_others_but_not_one_write() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(0, 8, 0, t);
        for i in 1..100 {
            pending.queued(i * 8, 8, i * 10, at(t, i));
            pending.completed(i * 8, 8, i * 10 + 5, t);
        }
        assert_eq!(
            pending.completions(t + COMPLETION_WAIT_MAX - Duration::from_millis(1)),
            Completions::Reported
        );
        assert!(matches!(
            pending.completions(t + COMPLETION_WAIT_MAX),
            Completions::Missing {
                sector_first: Some(0),
                ..
            }
        ));
    }

    #[test]
    fn too_many_pending_ranges_means_missing_completions() {
        let t = Instant::now();
        let mut pending = PendingWrites::new(4);
        for i in 0..5 {
            pending.queued(i * 16, 8, i, t);
        }
        assert!(matches!(
            pending.completions(t),
            Completions::Missing {
                sector_first: None,
                ..
            }
        ));
    }

    #[test]
    fn few_writes_without_completions_wait_for_the_long_bound() {
        let t = Instant::now();
        let mut pending = PendingWrites::default();
        pending.queued(0, 8, 0, t);
        assert_eq!(
            pending.completions(t + COMPLETION_WAIT_NONE_SEEN),
            Completions::Reported
        );
    }

    /// A write of the model: sectors, queue time, and its completion in
    /// parts (each part a range and a delay after the queue).
    #[derive(Clone, Debug)]
    struct ModelWrite {
        first: u64,
        count: u64,
        queue_ns: u64,
        parts: Vec<(u64, u64, u64)>,
    }

    fn arb_write() -> impl Strategy<Value = ModelWrite> {
        (0u64..64, 1u64..24, 0u64..1000, 1usize..4, 1u64..200).prop_map(
            |(first, count, queue_ns, parts, delay)| {
                // Split into up to `parts` contiguous completion pieces.
                let mut cuts: Vec<u64> = (1..parts as u64)
                    .map(|i| first + count * i / parts as u64)
                    .collect();
                cuts.dedup();
                let mut bounds = vec![first];
                bounds.extend(cuts.into_iter().filter(|&c| c > first && c < first + count));
                bounds.push(first + count);
                let parts = bounds
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| (w[0], w[1] - w[0], queue_ns + delay + i as u64))
                    .collect();
                ModelWrite {
                    first,
                    count,
                    queue_ns,
                    parts,
                }
            },
        )
    }

    proptest! {
        /// Whatever the order events are drained in (CPUs' buffers read one
        /// after another), once every write has completed nothing is
        /// pending, and while a write has not, its sectors are pending.
        #[test]
        fn pending_matches_a_model(
            writes in prop::collection::vec(arb_write(), 1..12),
            done in prop::collection::vec(any::<bool>(), 12),
            order in prop::collection::vec(any::<u64>(), 64),
        ) {
            let t = Instant::now();
            // Events: (timestamp, kind, write, part); writes not `done`
            // never complete.
            let mut events: Vec<(u64, bool, usize, usize)> = Vec::new();
            for (i, w) in writes.iter().enumerate() {
                events.push((w.queue_ns, true, i, 0));
                if done[i] {
                    for (p, part) in w.parts.iter().enumerate() {
                        events.push((part.2, false, i, p));
                    }
                }
            }
            events.sort();
            // Drain order: time order, except that a queue event may be read
            // up to 300 ns late (its CPU's buffer read after another's), so
            // one or several completions can come before it.
            let mut drained = events.clone();
            drained.sort_by_key(|&(ts, is_queue, i, p)| {
                let late = if is_queue { order[i % order.len()] % 300 } else { 0 };
                (ts + late, i, p)
            });
            let mut pending = PendingWrites::default();
            for &(ts, is_queue, i, p) in &drained {
                let w = &writes[i];
                if is_queue {
                    pending.queued(w.first, w.count, ts, t);
                } else {
                    let (first, count, _) = w.parts[p];
                    pending.completed(first, count, ts, t);
                }
            }
            let mut model = vec![0u32; 128];
            for (i, w) in writes.iter().enumerate() {
                if !done[i] {
                    for s in w.first..w.first + w.count {
                        model[s as usize] += 1;
                    }
                }
            }
            let model_sectors = model.iter().filter(|&&c| c > 0).count() as u64;
            prop_assert_eq!(pending.summary().sectors, model_sectors);
        }
    }
}
