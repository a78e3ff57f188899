//! Dirty map: which blocks of the device were written while we imaged it.
//!
//! Trace readers mark the 512-byte sector ranges of write events
//! ([`DirtyMap::mark_sectors`]); the catch-up takes the marked blocks as byte
//! extents and clears them in the same atomic step ([`DirtyMap::take_into`],
//! [`DirtyMap::take_bounded`]), reads them, and repeats until a take finds
//! nothing. Marking and taking are lock-free and never call the allocator;
//! a take may run while producers keep marking.
//!
//! # Block size
//!
//! One bit stands for one block of `block_bytes` (a power of two, at least one
//! sector). A write is rounded *outward* to whole blocks, so the block size is
//! the catch-up's read granularity: a 4 KiB write costs one 4 KiB re-read at
//! 4 KiB blocks but a 64 KiB re-read at 64 KiB blocks (16× read amplification
//! for small random writes, which is what a journal or a database does). Small
//! blocks cost bitmap memory instead: a *flat* bitmap needs
//! `device_bytes / block_bytes / 8` bytes, i.e. per TiB of device
//!
//! | block   | flat bitmap per TiB |
//! |---------|---------------------|
//! | 512 B   | 256 MiB (the original tool, one bit per sector) |
//! | 4 KiB   | 32 MiB |
//! | 64 KiB  | 2 MiB  |
//!
//! 4 KiB (the default) is the page size and the physical sector of modern
//! devices, and filesystems write whole 4 KiB blocks, so in practice only rare
//! sub-4 KiB writes are amplified. The layout below keeps 4 KiB blocks and
//! still pays memory only where writes land: about 8 bytes per isolated
//! dirty block, 1 bit per block where they are dense.
//!
//! # Layout: lazily claimed leaves from pools reserved at start
//!
//! The bitmap is cut into *leaves* of [`LEAF_WORD_COUNT`] `AtomicU64` words
//! ([`LEAF_BLOCK_COUNT`] = 4096 blocks, 512 bytes; 16 MiB of device at 4 KiB
//! blocks). Per leaf the map keeps, allocated once in [`DirtyMap::new`]:
//!
//! - a slot (`AtomicU32`, 4 bytes): 0 while the leaf has never been written,
//!   else the index + 1 of the pool leaf that holds its bits;
//! - a *summary* bit: "this leaf may hold dirty bits". A take visits only leaves
//!   whose summary bit is set, so taking from a clean 1 TiB map reads 8 KiB;
//! - a *coarse* bit: "the whole leaf is dirty", the fallback when the pool is
//!   used up (see below);
//! - a sparse slot (`AtomicU32`, 4 bytes): 0, or the index + 1 of a *sparse
//!   leaf* from a second pool.
//!
//! A sparse leaf is [`SPARSE_WORD_COUNT`] words (32 bytes) of four 16-bit
//! lanes each: a lane is 0 or a block's offset in its leaf plus one. A mark of
//! one or two blocks ([`SPARSE_MARK_BLOCKS_MAX`]) in a leaf that has no
//! bitmap leaf yet goes to the leaf's sparse leaf, a lane per block (a block
//! already in a lane takes none); when all 16 lanes hold other blocks, or the
//! mark is larger, it goes to the bitmap leaf, which from then on takes every
//! mark of that leaf. A take reads both and reports their union. Scattered
//! single-block writes (a database, a journal, a random-write benchmark) thus
//! cost 32 bytes per 16 MiB region written instead of 512.
//!
//! Bitmap leaves come from one zero-filled pool reserved in `new`. The
//! first mark of a leaf claims the next pool leaf with one `fetch_add` and
//! publishes it with one `compare_exchange` on the slot; a producer that loses
//! that race puts its untouched (still zero) leaf into a small spare list for
//! the next claim. Leaves are never given back during the map's life (a
//! producer may hold a reference to one at any time, and rewritten areas tend
//! to be rewritten again); a take only zeroes their words.
//!
//! The pool is requested zero-filled (`calloc`), so on Linux it is fresh
//! anonymous memory whose pages are committed only when first written, and
//! leaves are claimed in order: resident memory follows the leaves claimed,
//! rounded up to 4 KiB pages. The sparse pool works the same way, except that
//! a sparse leaf claimed by a producer that lost the install race is not
//! reused (32 bytes, and marks are serialised by the caller in practice).
//! [`DirtyMap::memory_bytes`] reports the fixed tables plus claimed leaves;
//! [`DirtyMap::memory_bytes_max`] the bound.
//!
//! ## Memory per TiB at 4 KiB blocks
//!
//! Fixed: slots 256 KiB + sparse slots 256 KiB + summary 8 KiB + coarse
//! 8 KiB = 528 KiB. Leaves: 512 bytes per leaf whose marks outgrew its sparse
//! leaf, 32 bytes per leaf ever written. Upper bound (every leaf written
//! densely): 34.5 MiB, 8 % above the flat bitmap. Measured by a real run on a
//! 1 TiB sparse loop device (`tools/perf/dirtymap.sh`, PERF.md) and by the
//! `dirty_map` bench; at 0.1 % dirty as uniformly scattered single 4 KiB
//! blocks (268 000 writes, the worst case for any bitmap: they touch 98 % of
//! the leaves) the map takes about 2.5 MiB, where leaves alone would take
//! 32 MiB. [`DirtyMap::with_memory_limit`] bounds memory harder still.
//!
//! ## A hard memory bound: [`DirtyMap::with_memory_limit`]
//!
//! A caller that must bound memory below that (a huge device, a small machine)
//! sizes the pools from a budget: what is left after the fixed tables goes to
//! sparse leaves first (up to one per leaf), the rest to bitmap leaves. When a
//! mark finds no room (no sparse leaf or lane, and the bitmap pool used up) it
//! sets the leaf's coarse bit instead, and the next take yields the whole
//! leaf (16 MiB at 4 KiB blocks). That re-reads more than was written, which is
//! always safe; it never misses a write. `new` sizes the pool for every leaf, so
//! it never coarsens (unless producers lose install races while all
//! [`SPARE_SLOT_COUNT`] spare slots are full, leaking pool leaves; still safe,
//! as above).
//!
//! # Why a take loses nothing
//!
//! Producer, per leaf: (P1) `fetch_or` the block bits into the leaf words, or
//! put each block into a sparse lane with a successful `compare_exchange` on
//! the lane's word (one that leaves the word as it was if a lane already
//! holds the block: still a read-modify-write), or `fetch_or` the coarse bit;
//! (P2) set the summary bit. P2 is a `fetch_or`, skipped when a load shows
//! the bit already set, except after installing a leaf (of either kind) or
//! setting a coarse bit, when it is always a `fetch_or`.
//! Taker, per leaf: (T1) clear the summary bit with `fetch_and`, and only if it
//! was set: (T2) clear the coarse bit, read both slots and `swap(0)` every word
//! of both leaves. All read-modify-writes are `AcqRel`, loads `Acquire`. Every
//! P1 is a read-modify-write of one word that T2 swaps, which is all the
//! argument below uses.
//!
//! A bit set by P1 is either taken by some T2 (which then reports it) or still
//! set after every T2 so far; it is lost only if its summary bit is clear while
//! it is still set. Suppose a T1 clears the summary bit and the T2 after it does
//! not take our bit. Then T2's `swap` of that word came before P1 in the word's
//! modification order, so P1 read the swap's value and synchronised with it:
//! T1 happens before P1, hence before P2. P2 then either sets the summary bit
//! after T1, or (skipped) loaded it set after T1: at P2's point the summary
//! bit is set. The next take to clear it does so after that point, so by the
//! same argument its swap cannot precede P1 (that would put its T1 before
//! P2's point): it takes our bit. The same holds for the coarse bit, which
//! both sides also modify only with RMWs.
//! The forced `fetch_or` after an install makes the taker see the slot: if T1
//! reads that `fetch_or` (or a later RMW) it synchronises with it and sees the
//! slot; if T1 came first, the summary bit is set again after it.
//!
//! Consequences for callers: a mark that *happens before* a take starts (the
//! trace batch was drained before the catch-up round, with a channel, a join or
//! the same thread between them) is in that take's result or an earlier
//! concurrent take's result. A mark concurrent with a take is in this take or
//! stays for the next one. A take is therefore not a snapshot; the catch-up
//! repeats rounds until one finds nothing. Concurrent takers each get a
//! disjoint part; one taker is the intended use.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::geom::{ByteExtent, SECTOR_BYTES};
/// Smallest block the map tracks: one sector.
pub const BLOCK_BYTES_MIN: u32 = 512;
/// Bits in one bitmap word.
const WORD_BITS: u64 = u64::BITS as u64;
/// Words in one leaf. 64 words (512 bytes, 8 cache lines) balance the fixed
/// per-leaf cost (a 4-byte slot) against memory spent on clean blocks in a
/// leaf that was written once.
pub const LEAF_WORD_COUNT: usize = 64;
/// Blocks one leaf covers.
pub const LEAF_BLOCK_COUNT: u64 = LEAF_WORD_COUNT as u64 * WORD_BITS;
/// Bytes of memory one leaf takes.
pub const LEAF_BYTES: u64 = LEAF_WORD_COUNT as u64 * 8;
/// Leaves whose summary (and coarse) bits share one word.
const LEAVES_PER_SUMMARY_WORD: usize = u64::BITS as usize;
/// Spare slots holding pool leaves claimed by producers that lost an install
/// race; bounds how many such leaves can be in flight before one leaks.
pub const SPARE_SLOT_COUNT: usize = 8;
/// Words in one sparse leaf: 32 bytes, 16 lanes of 16 bits, each lane 0
/// (empty) or a block's offset in its leaf plus one.
pub const SPARSE_WORD_COUNT: usize = 4;
/// Bytes of memory one sparse leaf takes.
pub const SPARSE_BYTES: u64 = SPARSE_WORD_COUNT as u64 * 8;
const SPARSE_LANE_BITS: u64 = 16;
const SPARSE_LANES_PER_WORD: u64 = WORD_BITS / SPARSE_LANE_BITS;
const SPARSE_LANE_MASK: u64 = (1 << SPARSE_LANE_BITS) - 1;
/// A mark of at most this many blocks of a leaf that has no bitmap leaf yet
/// goes to its sparse leaf (one lane a block); larger marks go to the bitmap.
pub const SPARSE_MARK_BLOCKS_MAX: u64 = 2;

const _: () = assert!(BLOCK_BYTES_MIN as u64 == SECTOR_BYTES);
const _: () = assert!(LEAF_BLOCK_COUNT.is_power_of_two());
const _: () = assert!(LEAF_BYTES == LEAF_BLOCK_COUNT / 8);
const _: () = assert!(LEAVES_PER_SUMMARY_WORD as u64 == WORD_BITS);
const _: () = assert!(LEAF_BLOCK_COUNT < SPARSE_LANE_MASK);

/// Where a bounded pass over the map ([`DirtyMap::take_bounded`]) resumes.
/// A fresh cursor starts at the device start; once the pass has reached the
/// device end it is finished and takes nothing more: start a new one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakeCursor {
    leaf_index_next: usize,
    finished: bool,
}

impl TakeCursor {
    pub fn new() -> TakeCursor {
        TakeCursor::default()
    }

    /// The pass has visited every leaf up to the device end.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// A lock-free, sharded bitmap of dirty blocks; see the module documentation.
pub struct DirtyMap {
    device_bytes: u64,
    device_sector_count: u64,
    block_bytes: u32,
    /// log2(sectors per block).
    sectors_per_block_shift: u32,
    block_count: u64,
    leaf_count: usize,
    /// Per leaf: 0 = never written, else pool leaf index + 1.
    leaf_slots: Box<[AtomicU32]>,
    /// Per leaf, one bit: the leaf may hold dirty bits.
    leaf_summary: Box<[AtomicU64]>,
    /// Per leaf, one bit: every block of the leaf is dirty.
    leaf_coarse: Box<[AtomicU64]>,
    /// `pool_leaf_count` leaves of `LEAF_WORD_COUNT` words, zero until marked.
    pool_words: Box<[AtomicU64]>,
    pool_leaf_count: usize,
    /// Pool leaves handed out so far (may run past `pool_leaf_count` once the
    /// pool is used up; each failed claim adds one, so it cannot wrap).
    pool_claimed_count: AtomicUsize,
    /// 0 = empty, else pool leaf index + 1 of a zero leaf nobody uses.
    spare_leaves: [AtomicU32; SPARE_SLOT_COUNT],
    /// Per leaf: 0 = no sparse leaf, else sparse pool index + 1.
    sparse_slots: Box<[AtomicU32]>,
    /// `sparse_leaf_count` sparse leaves of `SPARSE_WORD_COUNT` words.
    sparse_words: Box<[AtomicU64]>,
    sparse_leaf_count: usize,
    /// Sparse leaves handed out so far (a leaf claimed by a producer that
    /// lost the install race is not reused; it stays counted).
    sparse_claimed_count: AtomicUsize,
    /// Coarse bits set from clear (statistics only).
    coarse_mark_count: AtomicU64,
}

impl fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyMap")
            .field("device_bytes", &self.device_bytes)
            .field("block_bytes", &self.block_bytes)
            .field("leaf_count", &self.leaf_count)
            .field("pool_leaf_count", &self.pool_leaf_count)
            .field("leaves_claimed", &self.leaves_claimed())
            .finish_non_exhaustive()
    }
}

impl DirtyMap {
    /// A map of `device_bytes` at `block_bytes` granularity whose leaf pool
    /// covers every leaf: it never over-reports, and its memory bound is
    /// [`memory_bytes_max`](Self::memory_bytes_max) (34.5 MiB per TiB at
    /// 4 KiB blocks), committed only as leaves are written.
    ///
    /// # Panics
    /// If `block_bytes` is not a power of two of at least [`BLOCK_BYTES_MIN`],
    /// or the device has 2^32 - 1 leaves or more (16 EiB at 4 KiB blocks).
    pub fn new(device_bytes: u64, block_bytes: u32) -> DirtyMap {
        DirtyMap::with_pool(device_bytes, block_bytes, None)
    }

    /// Like [`new`](Self::new), but the whole map takes at most
    /// `memory_bytes_max`: the leaf pool is what remains after the fixed
    /// tables. Leaves first marked after the pool is used up are kept as
    /// "whole leaf dirty" (see the module documentation), so a take may then
    /// return clean blocks too, never fewer than were marked. If the fixed
    /// tables alone exceed the budget, the map still works, coarsely, at the
    /// size of the tables.
    ///
    /// # Panics
    /// As [`new`](Self::new).
    pub fn with_memory_limit(
        device_bytes: u64,
        block_bytes: u32,
        memory_bytes_max: u64,
    ) -> DirtyMap {
        DirtyMap::with_pool(device_bytes, block_bytes, Some(memory_bytes_max))
    }

    fn with_pool(device_bytes: u64, block_bytes: u32, memory_bytes_max: Option<u64>) -> DirtyMap {
        assert!(
            block_bytes.is_power_of_two() && block_bytes >= BLOCK_BYTES_MIN,
            "dirty map block size {block_bytes} is not a power of two >= {BLOCK_BYTES_MIN}"
        );
        let block_count = device_bytes.div_ceil(u64::from(block_bytes));
        let leaf_count_u64 = block_count.div_ceil(LEAF_BLOCK_COUNT);
        assert!(
            leaf_count_u64 < u64::from(u32::MAX),
            "device of {device_bytes} bytes has too many dirty-map leaves at {block_bytes}-byte blocks"
        );
        let leaf_count = usize::try_from(leaf_count_u64).expect("leaf count fits usize");
        let summary_word_count = leaf_count.div_ceil(LEAVES_PER_SUMMARY_WORD);
        let fixed_bytes = fixed_bytes_for(leaf_count, summary_word_count);
        // Under a budget the sparse pool comes first (it is 1/16 of the
        // bitmap pool and holds scattered blocks 16x more densely), the
        // bitmap pool gets the rest.
        let (sparse_leaf_count, pool_leaf_count) = match memory_bytes_max {
            None => (leaf_count, leaf_count),
            Some(bytes_max) => {
                let affordable = |bytes: u64, leaf_bytes: u64| {
                    leaf_count.min(usize::try_from(bytes / leaf_bytes).unwrap_or(usize::MAX))
                };
                let rest = bytes_max.saturating_sub(fixed_bytes);
                let sparse_leaf_count = affordable(rest, SPARSE_BYTES);
                let rest = rest - sparse_leaf_count as u64 * SPARSE_BYTES;
                (sparse_leaf_count, affordable(rest, LEAF_BYTES))
            }
        };
        let pool_word_count = pool_leaf_count
            .checked_mul(LEAF_WORD_COUNT)
            .expect("dirty map pool size fits usize");
        DirtyMap {
            device_bytes,
            device_sector_count: device_bytes.div_ceil(SECTOR_BYTES),
            block_bytes,
            sectors_per_block_shift: (u64::from(block_bytes) / SECTOR_BYTES).trailing_zeros(),
            block_count,
            leaf_count,
            leaf_slots: zeroed_u32s(leaf_count),
            leaf_summary: zeroed_u64s(summary_word_count),
            leaf_coarse: zeroed_u64s(summary_word_count),
            pool_words: zeroed_u64s(pool_word_count),
            pool_leaf_count,
            pool_claimed_count: AtomicUsize::new(0),
            spare_leaves: std::array::from_fn(|_| AtomicU32::new(0)),
            sparse_slots: zeroed_u32s(leaf_count),
            sparse_words: zeroed_u64s(
                sparse_leaf_count
                    .checked_mul(SPARSE_WORD_COUNT)
                    .expect("dirty map sparse pool size fits usize"),
            ),
            sparse_leaf_count,
            sparse_claimed_count: AtomicUsize::new(0),
            coarse_mark_count: AtomicU64::new(0),
        }
    }

    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    /// Blocks the device spans; the last one may be partial.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Bytes in use now: the fixed tables plus every pool leaf (bitmap and
    /// sparse) claimed so far.
    pub fn memory_bytes(&self) -> u64 {
        self.fixed_bytes()
            + self.leaves_claimed() as u64 * LEAF_BYTES
            + self.sparse_leaves_claimed() as u64 * SPARSE_BYTES
    }

    /// The most this map will ever use: the fixed tables plus both pools.
    pub fn memory_bytes_max(&self) -> u64 {
        self.fixed_bytes()
            + self.pool_leaf_count as u64 * LEAF_BYTES
            + self.sparse_leaf_count as u64 * SPARSE_BYTES
    }

    fn sparse_leaves_claimed(&self) -> usize {
        self.sparse_claimed_count
            .load(Ordering::Relaxed)
            .min(self.sparse_leaf_count)
    }

    fn fixed_bytes(&self) -> u64 {
        fixed_bytes_for(self.leaf_count, self.leaf_summary.len())
    }

    /// How often a leaf was marked "whole leaf dirty" (from clean) because
    /// the pool was used up: each such mark costs the catch-up a whole-leaf
    /// re-read. Only a map [`with_memory_limit`](Self::with_memory_limit)
    /// below its need does this.
    pub fn coarse_mark_count(&self) -> u64 {
        self.coarse_mark_count.load(Ordering::Relaxed)
    }

    fn leaves_claimed(&self) -> usize {
        self.pool_claimed_count
            .load(Ordering::Relaxed)
            .min(self.pool_leaf_count)
    }

    /// Marks the blocks touched by `sector_count` 512-byte sectors from
    /// `sector_first`, rounded outward to whole blocks. Sectors past the
    /// device end are ignored; returns how many (0 for an in-range event; a
    /// non-zero count means the event does not belong to this device's range,
    /// e.g. a partition offset was not applied). An empty range marks nothing.
    ///
    /// Lock-free; never allocates. The first mark of a leaf claims a pool
    /// leaf (one `fetch_add`, one `compare_exchange`); a mark of one or two
    /// blocks takes a lane of a sparse leaf with a `compare_exchange` loop
    /// (which retries only when another thread changed the same word).
    pub fn mark_sectors(&self, sector_first: u64, sector_count: u64) -> u64 {
        let sector_end = sector_first.saturating_add(sector_count);
        let in_first = sector_first.min(self.device_sector_count);
        let in_end = sector_end.min(self.device_sector_count);
        let sectors_clamped = sector_count - (in_end - in_first);
        if in_first < in_end {
            let block_first = in_first >> self.sectors_per_block_shift;
            let block_end = (in_end - 1) >> self.sectors_per_block_shift;
            self.mark_blocks(block_first, block_end + 1);
        }
        sectors_clamped
    }

    fn mark_blocks(&self, block_first: u64, block_end: u64) {
        debug_assert!(block_first < block_end && block_end <= self.block_count);
        let mut block = block_first;
        while block < block_end {
            let leaf_index = (block / LEAF_BLOCK_COUNT) as usize;
            let leaf_block_first = leaf_index as u64 * LEAF_BLOCK_COUNT;
            let leaf_block_end = (leaf_block_first + LEAF_BLOCK_COUNT).min(block_end);
            let (first, end) = (block - leaf_block_first, leaf_block_end - leaf_block_first);
            let mut summary_forced = false;
            let mut placed = false;
            if end - first <= SPARSE_MARK_BLOCKS_MAX
                && self.leaf_slots[leaf_index].load(Ordering::Acquire) == 0
            {
                (placed, summary_forced) = self.mark_sparse(leaf_index, first, end);
            }
            if !placed {
                summary_forced |= match self.leaf_for_mark(leaf_index) {
                    LeafForMark::Words { words, installed } => {
                        mark_in_leaf(words, first, end);
                        installed
                    }
                    LeafForMark::PoolExhausted => {
                        let (word, bit) = leaf_bit(&self.leaf_coarse, leaf_index);
                        if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                            self.coarse_mark_count.fetch_add(1, Ordering::Relaxed);
                        }
                        true
                    }
                };
            }
            // P2 (module docs): after the bits, never before.
            let (summary, bit) = leaf_bit(&self.leaf_summary, leaf_index);
            if summary_forced || summary.load(Ordering::Acquire) & bit == 0 {
                summary.fetch_or(bit, Ordering::AcqRel);
            }
            block = leaf_block_end;
        }
    }

    /// Puts leaf-relative blocks `[first, end)` into the leaf's sparse leaf,
    /// installing one if needed. Returns (every block placed, a sparse leaf
    /// was installed). Blocks placed before a full leaf stopped it stay
    /// placed; the caller marks the whole range in the bitmap too.
    fn mark_sparse(&self, leaf_index: usize, first: u64, end: u64) -> (bool, bool) {
        let slot = &self.sparse_slots[leaf_index];
        let mut slot_value = slot.load(Ordering::Acquire);
        let mut installed = false;
        if slot_value == 0 {
            let Some(sparse_index) = claim_next(&self.sparse_claimed_count, self.sparse_leaf_count)
            else {
                return (false, false);
            };
            let claimed = sparse_index + 1;
            match slot.compare_exchange(0, claimed, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    slot_value = claimed;
                    installed = true;
                }
                // The claimed leaf stays unused (and counted): races are rare.
                Err(winner) => slot_value = winner,
            }
        }
        let words = self.sparse_leaf(slot_value);
        let placed = (first..end).all(|offset| insert_lane(words, offset + 1));
        (placed, installed)
    }

    /// The leaf's words, installing a pool leaf on its first mark.
    fn leaf_for_mark(&self, leaf_index: usize) -> LeafForMark<'_> {
        let slot = &self.leaf_slots[leaf_index];
        let slot_value = slot.load(Ordering::Acquire);
        if slot_value != 0 {
            return LeafForMark::Words {
                words: self.pool_leaf(slot_value),
                installed: false,
            };
        }
        let Some(pool_index) = self.claim_pool_leaf() else {
            return LeafForMark::PoolExhausted;
        };
        match slot.compare_exchange(0, pool_index + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => LeafForMark::Words {
                words: self.pool_leaf(pool_index + 1),
                installed: true,
            },
            Err(winner) => {
                self.release_pool_leaf(pool_index);
                LeafForMark::Words {
                    words: self.pool_leaf(winner),
                    installed: false,
                }
            }
        }
    }

    /// Words of the sparse leaf a non-zero sparse slot value names.
    fn sparse_leaf(&self, slot_value: u32) -> &[AtomicU64] {
        let word_first = (slot_value as usize - 1) * SPARSE_WORD_COUNT;
        &self.sparse_words[word_first..word_first + SPARSE_WORD_COUNT]
    }

    /// Words of the pool leaf a non-zero slot value names.
    fn pool_leaf(&self, slot_value: u32) -> &[AtomicU64] {
        let word_first = (slot_value as usize - 1) * LEAF_WORD_COUNT;
        &self.pool_words[word_first..word_first + LEAF_WORD_COUNT]
    }

    /// A zero pool leaf nobody else holds: a spare, else the next unclaimed.
    fn claim_pool_leaf(&self) -> Option<u32> {
        for spare in &self.spare_leaves {
            if spare.load(Ordering::Relaxed) != 0 {
                let slot_value = spare.swap(0, Ordering::AcqRel);
                if slot_value != 0 {
                    return Some(slot_value - 1);
                }
            }
        }
        claim_next(&self.pool_claimed_count, self.pool_leaf_count)
    }

    /// Returns a claimed, never published (so still zero) leaf to the spares.
    /// If every spare slot is full the leaf stays unused until the map drops.
    fn release_pool_leaf(&self, pool_index: u32) {
        for spare in &self.spare_leaves {
            if spare
                .compare_exchange(0, pool_index + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Takes every dirty block and appends it to `out` as coalesced extents
    /// in device order, each at most `extent_bytes_max` (rounded down to whole
    /// blocks; pass `u64::MAX` for no split) and clamped at the device end.
    /// Returns the bytes appended. The taken blocks are clear afterwards,
    /// unless marked again meanwhile (see "Why a take loses nothing").
    /// Every extent's `offset_bytes` is a multiple of the block size;
    /// `len_bytes` is too, except for one that ends at a device end which is
    /// not a block multiple.
    ///
    /// `out` grows by up to one extent per dirty run; use
    /// [`take_bounded`](Self::take_bounded) to cap it.
    ///
    /// # Panics
    /// If `extent_bytes_max` is smaller than a block.
    pub fn take_into(&self, out: &mut Vec<ByteExtent>, extent_bytes_max: u64) -> u64 {
        let mut cursor = TakeCursor::new();
        self.take_bounded(&mut cursor, out, extent_bytes_max, usize::MAX)
    }

    /// Like [`take_into`](Self::take_into), but stops before the next dirty
    /// leaf once `out` holds `extent_count_max` extents, and records in
    /// `cursor` where to resume; call again with the same cursor until
    /// [`TakeCursor::is_finished`]. Blocks marked behind the cursor meanwhile
    /// are left for the next pass. `out` may exceed `extent_count_max` by at
    /// most [`extent_overshoot_max`](Self::extent_overshoot_max) (one leaf's
    /// worth), since a leaf is taken whole.
    ///
    /// # Panics
    /// If `extent_bytes_max` is smaller than a block, or `extent_count_max`
    /// is 0.
    pub fn take_bounded(
        &self,
        cursor: &mut TakeCursor,
        out: &mut Vec<ByteExtent>,
        extent_bytes_max: u64,
        extent_count_max: usize,
    ) -> u64 {
        assert!(
            extent_count_max > 0,
            "a take needs room for at least one extent"
        );
        let mut sink = ExtentSink::new(out, self, extent_bytes_max);
        let mut leaf_index = cursor.leaf_index_next;
        while !cursor.finished && leaf_index < self.leaf_count {
            let summary_index = leaf_index / LEAVES_PER_SUMMARY_WORD;
            let bit_first = leaf_index % LEAVES_PER_SUMMARY_WORD;
            let summary = &self.leaf_summary[summary_index];
            let pending = summary.load(Ordering::Acquire) & (u64::MAX << bit_first);
            if pending == 0 {
                leaf_index = (summary_index + 1) * LEAVES_PER_SUMMARY_WORD;
                continue;
            }
            leaf_index =
                summary_index * LEAVES_PER_SUMMARY_WORD + pending.trailing_zeros() as usize;
            if sink.out.len() >= extent_count_max {
                break;
            }
            let bit = 1u64 << (leaf_index % LEAVES_PER_SUMMARY_WORD);
            // T1 (module docs): clear the summary bit before taking the words.
            if summary.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                self.take_leaf(leaf_index, &mut sink);
            }
            leaf_index += 1;
        }
        sink.flush();
        cursor.leaf_index_next = leaf_index.min(self.leaf_count);
        cursor.finished = cursor.leaf_index_next == self.leaf_count;
        sink.bytes_appended
    }

    /// T2 (module docs): clears one leaf's coarse bit and words, feeding what
    /// was set to `sink`.
    fn take_leaf(&self, leaf_index: usize, sink: &mut ExtentSink<'_>) {
        let leaf_block_first = leaf_index as u64 * LEAF_BLOCK_COUNT;
        let (coarse, bit) = leaf_bit(&self.leaf_coarse, leaf_index);
        let whole_leaf = coarse.load(Ordering::Acquire) & bit != 0
            && coarse.fetch_and(!bit, Ordering::AcqRel) & bit != 0;
        let take = |word: &AtomicU64| word.swap(0, Ordering::AcqRel);
        let slot_value = self.leaf_slots[leaf_index].load(Ordering::Acquire);
        if self.sparse_slots[leaf_index].load(Ordering::Acquire) == 0 && slot_value != 0 {
            // Bitmap only (the common case of dense writes): no union to build.
            for (word_index, word) in self.pool_leaf(slot_value).iter().enumerate() {
                let bits = take(word);
                if !whole_leaf {
                    sink.push_word(leaf_block_first + word_index as u64 * WORD_BITS, bits);
                }
            }
        } else {
            let bits = self.leaf_bits(leaf_index, take);
            if !whole_leaf {
                for (word_index, &word_bits) in bits.iter().enumerate() {
                    sink.push_word(leaf_block_first + word_index as u64 * WORD_BITS, word_bits);
                }
            }
        }
        if whole_leaf {
            let leaf_block_end = (leaf_block_first + LEAF_BLOCK_COUNT).min(self.block_count);
            sink.push_run(leaf_block_first, leaf_block_end);
        }
    }

    /// The leaf's blocks as one bitmap: its bitmap leaf's words and its
    /// sparse leaf's lanes, each word read (or taken) with `read`.
    fn leaf_bits(
        &self,
        leaf_index: usize,
        read: impl Fn(&AtomicU64) -> u64,
    ) -> [u64; LEAF_WORD_COUNT] {
        let mut bits = [0u64; LEAF_WORD_COUNT];
        let slot_value = self.leaf_slots[leaf_index].load(Ordering::Acquire);
        if slot_value != 0 {
            for (bits_word, word) in bits.iter_mut().zip(self.pool_leaf(slot_value)) {
                *bits_word = read(word);
            }
        }
        let sparse_value = self.sparse_slots[leaf_index].load(Ordering::Acquire);
        if sparse_value != 0 {
            for word in self.sparse_leaf(sparse_value) {
                let lanes = read(word);
                for lane in 0..SPARSE_LANES_PER_WORD {
                    let lane_value = (lanes >> (lane * SPARSE_LANE_BITS)) & SPARSE_LANE_MASK;
                    if lane_value != 0 {
                        let offset = lane_value - 1;
                        bits[(offset / WORD_BITS) as usize] |= 1 << (offset % WORD_BITS);
                    }
                }
            }
        }
        bits
    }

    /// How many extents one leaf can add to a take at this `extent_bytes_max`:
    /// the most a bounded take appends beyond its `extent_count_max`.
    pub fn extent_overshoot_max(&self, extent_bytes_max: u64) -> usize {
        let extent_block_count_max = self.extent_block_count_max(extent_bytes_max);
        // Runs alternate with gaps (half the blocks), each run may be split,
        // plus the run carried in from the previous leaf.
        (LEAF_BLOCK_COUNT / 2 + LEAF_BLOCK_COUNT.div_ceil(extent_block_count_max) + 2) as usize
    }

    fn extent_block_count_max(&self, extent_bytes_max: u64) -> u64 {
        let block_bytes = u64::from(self.block_bytes);
        assert!(
            extent_bytes_max >= block_bytes,
            "extent limit {extent_bytes_max} bytes is smaller than a {block_bytes}-byte block"
        );
        extent_bytes_max / block_bytes
    }

    /// Dirty blocks now, a coarse leaf counting whole. Under concurrent marks
    /// and takes it is a sum over leaves read at different moments: exact when
    /// quiet, approximate (but never counting a block twice) otherwise.
    pub fn count_dirty_blocks(&self) -> u64 {
        let mut block_count = 0;
        self.for_each_flagged_leaf(|leaf_block_count| {
            block_count += leaf_block_count;
            true
        });
        block_count
    }

    /// No block is dirty, as far as a scan that races marks can tell.
    pub fn is_empty(&self) -> bool {
        let mut empty = true;
        self.for_each_flagged_leaf(|leaf_block_count| {
            empty = leaf_block_count == 0;
            empty
        });
        empty
    }

    /// Calls `visit` with the dirty block count of each leaf whose summary bit
    /// is set, in order, while it returns true.
    fn for_each_flagged_leaf(&self, mut visit: impl FnMut(u64) -> bool) {
        for (summary_index, summary) in self.leaf_summary.iter().enumerate() {
            let mut pending = summary.load(Ordering::Acquire);
            while pending != 0 {
                let bit = pending.trailing_zeros() as usize;
                pending &= pending - 1;
                let leaf_index = summary_index * LEAVES_PER_SUMMARY_WORD + bit;
                let leaf_block_first = leaf_index as u64 * LEAF_BLOCK_COUNT;
                let (coarse, coarse_bit) = leaf_bit(&self.leaf_coarse, leaf_index);
                let leaf_block_count = if coarse.load(Ordering::Acquire) & coarse_bit != 0 {
                    (leaf_block_first + LEAF_BLOCK_COUNT).min(self.block_count) - leaf_block_first
                } else {
                    self.leaf_bits(leaf_index, |word| word.load(Ordering::Relaxed))
                        .iter()
                        .map(|word| u64::from(word.count_ones()))
                        .sum()
                };
                if !visit(leaf_block_count) {
                    return;
                }
            }
        }
    }
}

enum LeafForMark<'a> {
    Words {
        words: &'a [AtomicU64],
        installed: bool,
    },
    PoolExhausted,
}

/// Joins neighbouring extents (sorted, disjoint, as a take yields them)
/// whose gap is at most `gap_bytes_max`, so that one read covers both and
/// the clean blocks between. Re-reading a clean block is harmless: it
/// holds the device's current data, never older than what was read before.
/// Worth it where a read's fixed cost exceeds reading the gap: at ~100k
/// IOPS and ~3 GB/s, a 4 KiB read costs as much as reading ~30 KiB.
///
/// In place: no allocation, whatever the number of extents.
pub fn merge_small_gaps(extents: &mut Vec<ByteExtent>, gap_bytes_max: u64) {
    let mut kept = 0;
    for index in 0..extents.len() {
        let extent = extents[index];
        if kept > 0 {
            let last = &mut extents[kept - 1];
            if extent.offset_bytes >= last.end_bytes()
                && extent.offset_bytes - last.end_bytes() <= gap_bytes_max
            {
                last.len_bytes = extent.end_bytes() - last.offset_bytes;
                continue;
            }
        }
        extents[kept] = extent;
        kept += 1;
    }
    extents.truncate(kept);
}

fn fixed_bytes_for(leaf_count: usize, summary_word_count: usize) -> u64 {
    (2 * leaf_count * size_of::<AtomicU32>() + 2 * summary_word_count * size_of::<AtomicU64>())
        as u64
}

/// The word and bit of `leaf_index` in a one-bit-per-leaf table.
fn leaf_bit(table: &[AtomicU64], leaf_index: usize) -> (&AtomicU64, u64) {
    (
        &table[leaf_index / LEAVES_PER_SUMMARY_WORD],
        1 << (leaf_index % LEAVES_PER_SUMMARY_WORD),
    )
}

/// The next unclaimed index of a pool of `count` leaves whose claims
/// `claimed` counts; None once it is used up. `count` < u32::MAX is checked
/// in `DirtyMap::new` (a pool has at most one leaf per leaf).
fn claim_next(claimed: &AtomicUsize, count: usize) -> Option<u32> {
    if claimed.load(Ordering::Relaxed) >= count {
        return None;
    }
    let index = claimed.fetch_add(1, Ordering::Relaxed);
    (index < count).then_some(index as u32)
}

/// Puts `lane_value` (a leaf-relative block + 1) into a lane of a sparse
/// leaf: P1 (module docs) is the successful `compare_exchange`, which leaves
/// the word unchanged when a lane already holds the block (still a
/// read-modify-write, so the ordering argument holds). False if every lane
/// is taken by other blocks.
fn insert_lane(words: &[AtomicU64], lane_value: u64) -> bool {
    for word in words {
        let mut current = word.load(Ordering::Acquire);
        loop {
            let mut empty_lane = None;
            let mut present = false;
            for lane in 0..SPARSE_LANES_PER_WORD {
                let value = (current >> (lane * SPARSE_LANE_BITS)) & SPARSE_LANE_MASK;
                if value == lane_value {
                    present = true;
                    break;
                }
                if value == 0 && empty_lane.is_none() {
                    empty_lane = Some(lane);
                }
            }
            let new = match (present, empty_lane) {
                (true, _) => current,
                (false, Some(lane)) => current | lane_value << (lane * SPARSE_LANE_BITS),
                (false, None) => break,
            };
            match word.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
    false
}

/// Sets blocks `[block_first, block_end)` of a leaf (leaf-relative).
fn mark_in_leaf(words: &[AtomicU64], block_first: u64, block_end: u64) {
    debug_assert!(block_first < block_end && block_end <= LEAF_BLOCK_COUNT);
    let mut block = block_first;
    while block < block_end {
        let word_index = block / WORD_BITS;
        let word_block_first = word_index * WORD_BITS;
        let bit_first = block - word_block_first;
        let bit_end = (block_end - word_block_first).min(WORD_BITS);
        // P1 (module docs).
        words[word_index as usize].fetch_or(bit_range(bit_first, bit_end), Ordering::AcqRel);
        block = word_block_first + bit_end;
    }
}

/// Bits `[bit_first, bit_end)` of a word; `bit_first < bit_end <= 64`.
fn bit_range(bit_first: u64, bit_end: u64) -> u64 {
    debug_assert!(bit_first < bit_end && bit_end <= WORD_BITS);
    let width = bit_end - bit_first;
    let ones = if width == WORD_BITS {
        u64::MAX
    } else {
        (1 << width) - 1
    };
    ones << bit_first
}

/// Coalesces taken blocks, in increasing order, into extents.
struct ExtentSink<'a> {
    out: &'a mut Vec<ByteExtent>,
    block_bytes: u64,
    device_bytes: u64,
    extent_block_count_max: u64,
    /// The run being built, `[first, end)` in blocks, shorter than an extent.
    run: Option<(u64, u64)>,
    bytes_appended: u64,
}

impl<'a> ExtentSink<'a> {
    fn new(out: &'a mut Vec<ByteExtent>, map: &DirtyMap, extent_bytes_max: u64) -> ExtentSink<'a> {
        ExtentSink {
            out,
            block_bytes: u64::from(map.block_bytes),
            device_bytes: map.device_bytes,
            extent_block_count_max: map.extent_block_count_max(extent_bytes_max),
            run: None,
            bytes_appended: 0,
        }
    }

    /// The set bits of the word covering blocks from `block_first`.
    fn push_word(&mut self, block_first: u64, mut bits: u64) {
        while bits != 0 {
            let bit_first = u64::from(bits.trailing_zeros());
            let bit_end = bit_first + u64::from((bits >> bit_first).trailing_ones());
            self.push_run(block_first + bit_first, block_first + bit_end);
            if bit_end == WORD_BITS {
                break;
            }
            bits &= u64::MAX << bit_end;
        }
    }

    /// Blocks `[block_first, block_end)`, starting at or after the last run's end.
    fn push_run(&mut self, block_first: u64, block_end: u64) {
        let (mut first, end) = match self.run {
            Some((run_first, run_end)) if run_end == block_first => (run_first, block_end),
            Some(_) => {
                self.flush();
                (block_first, block_end)
            }
            None => (block_first, block_end),
        };
        debug_assert!(first < end);
        // Emit whole extents now, so a long run never needs more than one
        // pending extent (the bound `extent_overshoot_max` relies on this).
        while end - first >= self.extent_block_count_max {
            self.emit(first, first + self.extent_block_count_max);
            first += self.extent_block_count_max;
        }
        self.run = (first < end).then_some((first, end));
    }

    fn flush(&mut self) {
        if let Some((first, end)) = self.run.take() {
            self.emit(first, end);
        }
    }

    fn emit(&mut self, block_first: u64, block_end: u64) {
        let offset_bytes = block_first * self.block_bytes;
        let end_bytes = block_end
            .saturating_mul(self.block_bytes)
            .min(self.device_bytes);
        debug_assert!(
            offset_bytes < end_bytes,
            "a dirty block past the device end"
        );
        let extent = ByteExtent {
            offset_bytes,
            len_bytes: end_bytes - offset_bytes,
        };
        self.bytes_appended += extent.len_bytes;
        self.out.push(extent);
    }
}

/// A zero-filled slice, from zeroed memory (`calloc`), so the pages are
/// committed only when first written.
fn zeroed_u64s(len: usize) -> Box<[AtomicU64]> {
    let zeroed = Box::<[AtomicU64]>::new_zeroed_slice(len);
    // SAFETY: every element is all-zero bytes, and `AtomicU64` has the bit
    // validity of `u64`, so that is `AtomicU64::new(0)`.
    unsafe { zeroed.assume_init() }
}

/// As [`zeroed_u64s`].
fn zeroed_u32s(len: usize) -> Box<[AtomicU32]> {
    let zeroed = Box::<[AtomicU32]>::new_zeroed_slice(len);
    // SAFETY: every element is all-zero bytes, and `AtomicU32` has the bit
    // validity of `u32`, so that is `AtomicU32::new(0)`.
    unsafe { zeroed.assume_init() }
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn e(offset_bytes: u64, len_bytes: u64) -> ByteExtent {
        ByteExtent {
            offset_bytes,
            len_bytes,
        }
    }

    #[test]
    fn small_gaps_merge_large_ones_do_not() {
        let mut extents = vec![e(0, 4096), e(8192, 4096), e(100_000, 512), e(200_000, 4096)];
        merge_small_gaps(&mut extents, 4096);
        assert_eq!(extents, [e(0, 12_288), e(100_000, 512), e(200_000, 4096)]);
        let mut touching = vec![e(0, 4096), e(4096, 4096)];
        merge_small_gaps(&mut touching, 0);
        assert_eq!(touching, [e(0, 8192)]);
        let mut empty = Vec::new();
        merge_small_gaps(&mut empty, 1 << 20);
        assert!(empty.is_empty());
    }

    #[test]
    fn merging_covers_every_input_byte() {
        let mut state = 7u64;
        let mut extents = Vec::new();
        let mut at = 0;
        for _ in 0..1000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            at += (state % 64) * 512;
            let len = (1 + state % 16) * 512;
            extents.push(e(at, len));
            at += len;
        }
        let original = extents.clone();
        merge_small_gaps(&mut extents, 8192);
        assert!(extents.len() < original.len());
        for x in &original {
            assert!(
                extents
                    .iter()
                    .any(|m| m.offset_bytes <= x.offset_bytes && x.end_bytes() <= m.end_bytes())
            );
        }
        assert!(
            extents
                .windows(2)
                .all(|w| w[1].offset_bytes > w[0].end_bytes() + 8192)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const TIB: u64 = 1024 * 1024 * MIB;

    fn extent(offset_bytes: u64, len_bytes: u64) -> ByteExtent {
        ByteExtent {
            offset_bytes,
            len_bytes,
        }
    }

    fn take_all(map: &DirtyMap, extent_bytes_max: u64) -> Vec<ByteExtent> {
        let mut out = Vec::new();
        let bytes = map.take_into(&mut out, extent_bytes_max);
        assert_eq!(bytes, out.iter().map(|e| e.len_bytes).sum::<u64>());
        out
    }

    /// Blocks covered by `extents`, checking they are block-aligned, inside
    /// the device and in increasing order without overlap.
    fn blocks_of(map: &DirtyMap, extents: &[ByteExtent]) -> BTreeSet<u64> {
        let block_bytes = u64::from(map.block_bytes());
        let mut blocks = BTreeSet::new();
        let mut end_previous = 0;
        for e in extents {
            assert!(e.len_bytes > 0, "{e:?}");
            assert_eq!(e.offset_bytes % block_bytes, 0, "{e:?}");
            assert!(e.end_bytes() <= map.device_bytes(), "{e:?}");
            assert!(
                e.end_bytes() % block_bytes == 0 || e.end_bytes() == map.device_bytes(),
                "{e:?}"
            );
            assert!(e.offset_bytes >= end_previous, "out of order: {extents:?}");
            end_previous = e.end_bytes();
            blocks.extend(e.offset_bytes / block_bytes..e.end_bytes().div_ceil(block_bytes));
        }
        blocks
    }

    /// The model: marks sector by sector.
    fn reference_mark(
        blocks: &mut BTreeSet<u64>,
        device_bytes: u64,
        block_bytes: u64,
        sector_first: u64,
        sector_count: u64,
    ) -> u64 {
        let mut sectors_clamped = 0;
        for sector in sector_first..sector_first + sector_count {
            if sector * SECTOR_BYTES < device_bytes {
                blocks.insert(sector * SECTOR_BYTES / block_bytes);
            } else {
                sectors_clamped += 1;
            }
        }
        sectors_clamped
    }

    /// The model: runs of consecutive blocks, cut every `extent_bytes_max`.
    fn reference_extents(
        blocks: &BTreeSet<u64>,
        device_bytes: u64,
        block_bytes: u64,
        extent_bytes_max: u64,
    ) -> Vec<ByteExtent> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &block in blocks {
            match runs.last_mut() {
                Some((_, end)) if *end == block => *end += 1,
                _ => runs.push((block, block + 1)),
            }
        }
        let per_extent = extent_bytes_max / block_bytes;
        let mut extents = Vec::new();
        for (first, end) in runs {
            let mut piece_first = first;
            while piece_first < end {
                let piece_end = end.min(piece_first.saturating_add(per_extent));
                let offset_bytes = piece_first * block_bytes;
                let end_bytes = (piece_end * block_bytes).min(device_bytes);
                extents.push(extent(offset_bytes, end_bytes - offset_bytes));
                piece_first = piece_end;
            }
        }
        extents
    }

    #[test]
    fn rounds_outward_to_whole_blocks() {
        let map = DirtyMap::new(MIB, 4096);
        // One sector in the middle of block 0.
        assert_eq!(map.mark_sectors(3, 1), 0);
        assert_eq!(take_all(&map, MIB), [extent(0, 4096)]);
        // Sectors 7..9 straddle blocks 0 and 1.
        map.mark_sectors(7, 2);
        assert_eq!(take_all(&map, MIB), [extent(0, 8192)]);
        // Exactly block 1.
        map.mark_sectors(8, 8);
        assert_eq!(take_all(&map, MIB), [extent(4096, 4096)]);
        // Unaligned start and end: sectors 15..25 touch blocks 1, 2 and 3.
        map.mark_sectors(15, 10);
        assert_eq!(take_all(&map, MIB), [extent(4096, 3 * 4096)]);
        // Several 512-byte writes inside one block make one dirty block.
        for sector in 16..24 {
            map.mark_sectors(sector, 1);
        }
        assert_eq!(map.count_dirty_blocks(), 1);
        assert_eq!(take_all(&map, MIB), [extent(2 * 4096, 4096)]);
        // An empty range (a flush) marks nothing.
        assert_eq!(map.mark_sectors(40, 0), 0);
        assert!(map.is_empty());
    }

    #[test]
    fn clamps_at_a_device_end_that_is_not_a_block_multiple() {
        let device_bytes = 3 * 4096 + 1024; // 26 sectors, last block partial
        let map = DirtyMap::new(device_bytes, 4096);
        assert_eq!(map.block_count(), 4);
        // Sectors 20..60: 20..26 are inside.
        assert_eq!(map.mark_sectors(20, 40), 34);
        assert_eq!(map.count_dirty_blocks(), 2);
        assert_eq!(take_all(&map, MIB), [extent(2 * 4096, 4096 + 1024)]);
        // Wholly past the end, or absurd: counted, ignored, no panic.
        assert_eq!(map.mark_sectors(26, 1), 1);
        assert_eq!(map.mark_sectors(u64::MAX - 1, 10), 10);
        assert_eq!(map.mark_sectors(u64::MAX, u64::MAX), u64::MAX);
        assert!(map.is_empty());
        // The whole device and more.
        assert_eq!(map.mark_sectors(0, u64::MAX), u64::MAX - 26);
        assert_eq!(take_all(&map, MIB), [extent(0, device_bytes)]);
        // Extent splits also clamp: the last piece is the partial block.
        map.mark_sectors(0, 26);
        assert_eq!(
            take_all(&map, 8192),
            [extent(0, 8192), extent(8192, 4096 + 1024)]
        );
    }

    #[test]
    fn empty_device_takes_every_mark_as_clamped() {
        let map = DirtyMap::new(0, 4096);
        assert_eq!(map.mark_sectors(0, 8), 8);
        assert!(map.is_empty());
        assert!(take_all(&map, MIB).is_empty());
    }

    #[test]
    fn coalesces_across_word_and_leaf_boundaries() {
        // 512-byte blocks: block numbers are sector numbers.
        let map = DirtyMap::new(4 * LEAF_BLOCK_COUNT * 512, 512);
        map.mark_sectors(60, 10); // words 0 and 1
        map.mark_sectors(LEAF_BLOCK_COUNT - 6, 12); // leaves 0 and 1
        map.mark_sectors(3 * LEAF_BLOCK_COUNT - 64, 64); // the last word of leaf 2 ...
        map.mark_sectors(3 * LEAF_BLOCK_COUNT, 1); // ... and the first of leaf 3
        assert_eq!(
            take_all(&map, u64::MAX),
            [
                extent(60 * 512, 10 * 512),
                extent((LEAF_BLOCK_COUNT - 6) * 512, 12 * 512),
                extent((3 * LEAF_BLOCK_COUNT - 64) * 512, 65 * 512),
            ]
        );
        // A run spanning every word of a leaf and into the next.
        map.mark_sectors(0, LEAF_BLOCK_COUNT + 1);
        assert_eq!(
            take_all(&map, u64::MAX),
            [extent(0, (LEAF_BLOCK_COUNT + 1) * 512)]
        );
    }

    #[test]
    fn splits_extents_at_the_maximum() {
        let map = DirtyMap::new(MIB, 4096);
        map.mark_sectors(8, 80); // blocks 1..11
        assert_eq!(
            take_all(&map, 16 * KIB),
            [
                extent(4096, 16 * KIB),
                extent(20 * KIB, 16 * KIB),
                extent(36 * KIB, 8 * KIB)
            ]
        );
        // A maximum that is not a block multiple is rounded down.
        map.mark_sectors(0, 24); // blocks 0..3
        assert_eq!(
            take_all(&map, 10 * KIB),
            [extent(0, 8192), extent(8192, 4096)]
        );
        // One block per extent.
        map.mark_sectors(0, 16);
        assert_eq!(take_all(&map, 4096), [extent(0, 4096), extent(4096, 4096)]);
    }

    #[test]
    #[should_panic(expected = "smaller than a 4096-byte block")]
    fn an_extent_maximum_below_a_block_is_a_bug() {
        DirtyMap::new(MIB, 4096).take_into(&mut Vec::new(), 2048);
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn a_block_size_that_is_not_a_power_of_two_is_a_bug() {
        DirtyMap::new(MIB, 3 * 512);
    }

    #[test]
    fn take_and_clear_leaves_the_map_empty() {
        let map = DirtyMap::new(64 * MIB, 4096);
        for i in 0..1000u64 {
            map.mark_sectors((i * 7919) % (64 * MIB / 512), 1 + i % 300);
        }
        assert!(!map.is_empty());
        let memory_bytes = map.memory_bytes();
        let taken = take_all(&map, MIB);
        assert!(!taken.is_empty());
        assert!(map.is_empty());
        assert_eq!(map.count_dirty_blocks(), 0);
        assert!(take_all(&map, MIB).is_empty());
        // Leaves stay claimed for the next writes.
        assert_eq!(map.memory_bytes(), memory_bytes);
    }

    #[test]
    fn memory_follows_the_leaves_written() {
        let map = DirtyMap::new(TIB, 4096);
        let fixed_bytes = 528 * KIB; // documented in the module docs
        assert_eq!(map.memory_bytes(), fixed_bytes);
        assert_eq!(map.memory_bytes_max(), fixed_bytes + 32 * MIB + 2 * MIB);
        // Single blocks go to one sparse leaf per leaf...
        map.mark_sectors(0, 1);
        map.mark_sectors(8 * (LEAF_BLOCK_COUNT - 1), 8); // the same leaf
        assert_eq!(map.memory_bytes(), fixed_bytes + SPARSE_BYTES);
        // ... larger marks to a bitmap leaf.
        map.mark_sectors(8 * 100, 8 * 3);
        assert_eq!(map.memory_bytes(), fixed_bytes + SPARSE_BYTES + LEAF_BYTES);
        map.mark_sectors(TIB / 512 - 1, 1); // the last leaf
        assert_eq!(
            map.memory_bytes(),
            fixed_bytes + 2 * SPARSE_BYTES + LEAF_BYTES
        );
        assert_eq!(
            take_all(&map, MIB),
            [
                extent(0, 4096),
                extent(100 * 4096, 3 * 4096),
                extent((LEAF_BLOCK_COUNT - 1) * 4096, 4096),
                extent(TIB - 4096, 4096),
            ]
        );
        assert_eq!(
            map.memory_bytes(),
            fixed_bytes + 2 * SPARSE_BYTES + LEAF_BYTES
        );
    }

    /// The case no bitmap can serve: 0.1 % of a TiB as scattered single
    /// 4 KiB blocks. Sparse leaves hold it in under 4 MiB, exactly.
    #[test]
    fn scattered_single_blocks_fit_in_sparse_leaves() {
        let map = DirtyMap::new(TIB, 4096);
        let block_count = TIB / 4096;
        let mut rng = Rng(7);
        let mut marked = BTreeSet::new();
        while (marked.len() as u64) < block_count / 1000 {
            let block = rng.next() % block_count;
            map.mark_sectors(block * 8, 8);
            marked.insert(block);
        }
        assert!(map.memory_bytes() <= 4 * MIB, "{}", map.memory_bytes());
        assert_eq!(map.count_dirty_blocks(), marked.len() as u64);
        let taken = take_all(&map, u64::MAX);
        assert_eq!(blocks_of(&map, &taken), marked);
        assert!(map.is_empty());
    }

    /// A sparse leaf holds 16 blocks; the 17th goes to a bitmap leaf, and
    /// a take returns the union.
    #[test]
    fn a_full_sparse_leaf_spills_into_the_bitmap() {
        let map = DirtyMap::new(64 * MIB, 4096);
        let blocks: Vec<u64> = (0..40).map(|i| i * 97).collect();
        for &block in &blocks {
            map.mark_sectors(block * 8, 8);
            map.mark_sectors(block * 8, 8); // again: no second lane
        }
        assert_eq!(
            map.memory_bytes(),
            DirtyMap::new(64 * MIB, 4096).memory_bytes() + SPARSE_BYTES + LEAF_BYTES
        );
        assert_eq!(map.count_dirty_blocks(), 40);
        let taken = take_all(&map, u64::MAX);
        assert_eq!(
            blocks_of(&map, &taken),
            blocks.iter().copied().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn a_used_up_pool_marks_whole_leaves() {
        let leaf_bytes_of_device = LEAF_BLOCK_COUNT * 4096; // 16 MiB
        // Four whole leaves and a last leaf of 3.5 blocks.
        let device_bytes = 4 * leaf_bytes_of_device + 3 * 4096 + 2048;
        let fixed_bytes = DirtyMap::with_memory_limit(device_bytes, 4096, 0).memory_bytes_max();
        // Sparse leaves for all five leaves, and one bitmap leaf.
        let budget = fixed_bytes + 5 * SPARSE_BYTES + LEAF_BYTES;
        let map = DirtyMap::with_memory_limit(device_bytes, 4096, budget);
        assert_eq!(map.memory_bytes_max(), budget);
        // Three blocks at a time: bitmap marks.
        map.mark_sectors(8, 24); // leaf 0 takes the only bitmap leaf
        map.mark_sectors(leaf_bytes_of_device / 512 + 16, 24); // leaf 1: coarse
        map.mark_sectors(4 * leaf_bytes_of_device / 512, 24); // leaf 4 (partial): coarse
        assert_eq!(map.count_dirty_blocks(), 3 + LEAF_BLOCK_COUNT + 4);
        assert_eq!(map.memory_bytes(), fixed_bytes + LEAF_BYTES);
        assert_eq!(
            take_all(&map, u64::MAX),
            [
                extent(4096, 3 * 4096),
                extent(leaf_bytes_of_device, leaf_bytes_of_device),
                extent(4 * leaf_bytes_of_device, 3 * 4096 + 2048),
            ]
        );
        assert!(map.is_empty());
        // Leaf 0 keeps its exact bits (a single block goes to its bitmap
        // leaf once it has one); a coarse leaf coalesces with neighbours.
        map.mark_sectors(0, 8);
        map.mark_sectors(leaf_bytes_of_device / 512 - 8, 32);
        assert_eq!(
            take_all(&map, u64::MAX),
            [
                extent(0, 4096),
                extent(leaf_bytes_of_device - 4096, leaf_bytes_of_device + 4096)
            ]
        );

        // Two sparse leaves and no bitmap leaf: a third leaf's single block
        // is kept whole, and so is a 17th block in a sparse leaf.
        let map = DirtyMap::with_memory_limit(device_bytes, 4096, fixed_bytes + 2 * SPARSE_BYTES);
        map.mark_sectors(0, 8);
        map.mark_sectors(leaf_bytes_of_device / 512, 8);
        assert_eq!(map.coarse_mark_count(), 0);
        map.mark_sectors(2 * leaf_bytes_of_device / 512, 8);
        assert_eq!(map.coarse_mark_count(), 1);
        assert_eq!(map.memory_bytes(), map.memory_bytes_max());
        assert_eq!(
            take_all(&map, u64::MAX),
            [
                extent(0, 4096),
                extent(leaf_bytes_of_device, 4096),
                extent(2 * leaf_bytes_of_device, leaf_bytes_of_device),
            ]
        );
        for block in 0..17 {
            map.mark_sectors(block * 16, 8);
        }
        assert_eq!(take_all(&map, u64::MAX), [extent(0, leaf_bytes_of_device)]);

        // No pool at all still works, and counts each whole-leaf mark once
        // per take.
        let map = DirtyMap::with_memory_limit(device_bytes, 4096, 0);
        map.mark_sectors(0, 1);
        map.mark_sectors(8, 1);
        assert_eq!(map.coarse_mark_count(), 1);
        assert_eq!(take_all(&map, u64::MAX), [extent(0, leaf_bytes_of_device)]);
        map.mark_sectors(0, 1);
        assert_eq!(map.coarse_mark_count(), 2);
        assert_eq!(DirtyMap::new(device_bytes, 4096).coarse_mark_count(), 0);
    }

    #[test]
    fn bounded_takes_resume_where_they_stopped() {
        let map = DirtyMap::new(8 * LEAF_BLOCK_COUNT * 512, 512);
        let mut marked = BTreeSet::new();
        for block in (0..8 * LEAF_BLOCK_COUNT).step_by(37) {
            map.mark_sectors(block, 3);
            marked.extend(block..(block + 3).min(8 * LEAF_BLOCK_COUNT));
        }
        let overshoot_max = map.extent_overshoot_max(u64::MAX);
        let mut cursor = TakeCursor::new();
        let mut taken = BTreeSet::new();
        let mut call_count = 0;
        while !cursor.is_finished() {
            let mut out = Vec::new();
            map.take_bounded(&mut cursor, &mut out, u64::MAX, 10);
            assert!(out.len() <= 10 + overshoot_max);
            taken.extend(blocks_of(&map, &out));
            call_count += 1;
            assert!(call_count <= 8 + 1, "a bounded pass must make progress");
            if call_count == 2 {
                // Behind the cursor: left for the next pass.
                map.mark_sectors(0, 1);
            }
        }
        assert!(call_count > 1);
        assert_eq!(taken, marked);
        assert_eq!(take_all(&map, u64::MAX), [extent(0, 512)]);
        // A finished cursor takes nothing.
        map.mark_sectors(0, 1);
        let mut out = Vec::new();
        assert_eq!(map.take_bounded(&mut cursor, &mut out, u64::MAX, 10), 0);
        assert!(out.is_empty());
    }

    /// splitmix64: a deterministic generator without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// Producers mark random ranges while a taker keeps taking: the union of
    /// all takes is what was marked, nothing lost, nothing invented (except
    /// whole coarse leaves when the pool is small).
    fn concurrent_producers_and_a_taker(map: DirtyMap, exact: bool) {
        concurrent_producers_and_a_taker_marking(map, exact, 300);
    }

    /// As above, each mark 1..=`sector_count_max` sectors.
    fn concurrent_producers_and_a_taker_marking(map: DirtyMap, exact: bool, sector_count_max: u64) {
        const PRODUCER_COUNT: u64 = 3;
        const MARK_COUNT: usize = 4000;
        let map = Arc::new(map);
        let device_sector_count = map.device_bytes() / 512;
        let producers_done = Arc::new(AtomicBool::new(false));
        let taker = {
            let map = Arc::clone(&map);
            let producers_done = Arc::clone(&producers_done);
            std::thread::spawn(move || {
                let mut taken = Vec::new();
                let mut take_count = 0u64;
                // Runs until the producers are done (bounded by them), and
                // takes at least twice so a take always races some marks
                // even when the scheduler runs the producers to completion
                // first.
                while !producers_done.load(Ordering::Acquire) || take_count < 2 {
                    map.take_into(&mut taken, 64 * KIB);
                    take_count += 1;
                    std::thread::yield_now();
                }
                taken
            })
        };
        let producers: Vec<_> = (0..PRODUCER_COUNT)
            .map(|producer| {
                let map = Arc::clone(&map);
                std::thread::spawn(move || {
                    let mut rng = Rng(producer + 1);
                    let mut marks = Vec::with_capacity(MARK_COUNT);
                    for _ in 0..MARK_COUNT {
                        let sector_first = rng.next() % (device_sector_count + 64);
                        let sector_count = 1 + rng.next() % sector_count_max;
                        map.mark_sectors(sector_first, sector_count);
                        marks.push((sector_first, sector_count));
                    }
                    marks
                })
            })
            .collect();
        let marks: Vec<_> = producers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect();
        producers_done.store(true, Ordering::Release);
        let mut taken = taker.join().unwrap();
        map.take_into(&mut taken, 64 * KIB);
        assert!(map.is_empty());

        let block_bytes = u64::from(map.block_bytes());
        let mut marked = BTreeSet::new();
        for &(sector_first, sector_count) in &marks {
            reference_mark(
                &mut marked,
                map.device_bytes(),
                block_bytes,
                sector_first,
                sector_count,
            );
        }
        let mut taken_blocks = BTreeSet::new();
        for e in &taken {
            taken_blocks.extend(e.offset_bytes / block_bytes..e.end_bytes().div_ceil(block_bytes));
        }
        let missing: Vec<_> = marked.difference(&taken_blocks).take(10).collect();
        assert!(missing.is_empty(), "marked but never taken: {missing:?}");
        // `new` coarsens only when producers lose install races while every
        // spare slot is full (module docs): then whole leaves are taken,
        // more than was marked but never less.
        if exact && map.coarse_mark_count() == 0 {
            assert_eq!(taken_blocks, marked);
        } else {
            let marked_leaves: BTreeSet<u64> =
                marked.iter().map(|b| b / LEAF_BLOCK_COUNT).collect();
            assert!(
                taken_blocks
                    .iter()
                    .all(|b| marked_leaves.contains(&(b / LEAF_BLOCK_COUNT)))
            );
        }
    }

    #[test]
    fn concurrent_producers_lose_nothing() {
        // 512-byte blocks: 256 leaves, 4 summary words, many install races.
        concurrent_producers_and_a_taker(DirtyMap::new(256 * LEAF_BLOCK_COUNT * 512, 512), true);
    }

    /// Single and double blocks: sparse lanes raced by three producers and
    /// a taker, filling up and spilling into bitmap leaves.
    #[test]
    fn concurrent_producers_of_single_blocks_lose_nothing() {
        concurrent_producers_and_a_taker_marking(
            DirtyMap::new(256 * LEAF_BLOCK_COUNT * 512, 512),
            true,
            2,
        );
        // Few leaves: many marks per sparse leaf.
        concurrent_producers_and_a_taker_marking(
            DirtyMap::new(4 * LEAF_BLOCK_COUNT * 512, 512),
            true,
            2,
        );
    }

    #[test]
    fn concurrent_producers_lose_nothing_with_a_small_pool() {
        let device_bytes = 256 * LEAF_BLOCK_COUNT * 512;
        let fixed_bytes = DirtyMap::with_memory_limit(device_bytes, 512, 0).memory_bytes_max();
        let map = DirtyMap::with_memory_limit(device_bytes, 512, fixed_bytes + 40 * LEAF_BYTES);
        concurrent_producers_and_a_taker(map, false);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark {
            sector_first: u64,
            sector_count: u64,
        },
        Take {
            extent_bytes_max: u64,
        },
        TakeBounded {
            extent_count_max: usize,
        },
    }

    fn op_strategy(device_sector_count: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..device_sector_count + 100, 0..2048u64)
                .prop_map(|(sector_first, sector_count)| Op::Mark { sector_first, sector_count }),
            // Small marks: sparse lanes.
            6 => (0..device_sector_count + 100, 0..9u64)
                .prop_map(|(sector_first, sector_count)| Op::Mark { sector_first, sector_count }),
            1 => prop::sample::select(vec![4096, 3 * 4096, 64 * KIB, MIB, u64::MAX])
                .prop_map(|extent_bytes_max| Op::Take { extent_bytes_max }),
            1 => (1..20usize).prop_map(|extent_count_max| Op::TakeBounded { extent_count_max }),
        ]
    }

    fn case_strategy() -> impl Strategy<Value = (u64, u32, Option<u64>, Vec<Op>)> {
        // Up to 6 leaves at 512-byte blocks; any device size, even unaligned.
        (
            0..6 * LEAF_BLOCK_COUNT * 512,
            prop::sample::select(vec![512u32, 1024, 4096]),
            prop::option::weighted(0.3, 0..4u64),
        )
            .prop_flat_map(|(device_bytes, block_bytes, pool_leaf_count)| {
                let device_sector_count = device_bytes.div_ceil(512);
                (
                    Just(device_bytes),
                    Just(block_bytes),
                    Just(pool_leaf_count),
                    prop::collection::vec(op_strategy(device_sector_count), 1..24),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The map against a `BTreeSet` of dirty blocks. With a memory limit
        /// the map may report whole leaves where the model has single blocks.
        #[test]
        fn matches_a_reference_model((device_bytes, block_bytes, pool_leaf_count, ops) in case_strategy()) {
            let map = match pool_leaf_count {
                None => DirtyMap::new(device_bytes, block_bytes),
                Some(leaf_count) => {
                    let fixed_bytes = DirtyMap::with_memory_limit(device_bytes, block_bytes, 0)
                        .memory_bytes_max();
                    DirtyMap::with_memory_limit(device_bytes, block_bytes, fixed_bytes + leaf_count * LEAF_BYTES)
                }
            };
            let exact = map.memory_bytes_max() == DirtyMap::new(device_bytes, block_bytes).memory_bytes_max();
            let block_bytes = u64::from(block_bytes);
            let mut model = BTreeSet::new();
            for op in ops {
                if exact {
                    prop_assert_eq!(map.count_dirty_blocks(), model.len() as u64);
                } else {
                    prop_assert!(map.count_dirty_blocks() >= model.len() as u64);
                }
                prop_assert_eq!(map.is_empty(), model.is_empty());
                match op {
                    Op::Mark { sector_first, sector_count } => {
                        let clamped = reference_mark(&mut model, device_bytes, block_bytes, sector_first, sector_count);
                        prop_assert_eq!(map.mark_sectors(sector_first, sector_count), clamped);
                    }
                    Op::Take { extent_bytes_max } => {
                        let taken = take_all(&map, extent_bytes_max);
                        let expected = reference_extents(&model, device_bytes, block_bytes, extent_bytes_max);
                        if exact {
                            prop_assert_eq!(taken, expected);
                        } else {
                            let blocks = blocks_of(&map, &taken);
                            prop_assert!(blocks.is_superset(&model));
                            let model_leaves: BTreeSet<u64> = model.iter().map(|b| b / LEAF_BLOCK_COUNT).collect();
                            prop_assert!(blocks.iter().all(|b| model_leaves.contains(&(b / LEAF_BLOCK_COUNT))));
                            prop_assert!(taken.iter().all(|e| e.len_bytes <= extent_bytes_max));
                        }
                        model.clear();
                    }
                    Op::TakeBounded { extent_count_max } => {
                        let mut cursor = TakeCursor::new();
                        let mut blocks = BTreeSet::new();
                        let mut call_count = 0;
                        while !cursor.is_finished() {
                            let mut out = Vec::new();
                            map.take_bounded(&mut cursor, &mut out, MIB, extent_count_max);
                            prop_assert!(out.len() <= extent_count_max + map.extent_overshoot_max(MIB));
                            blocks.extend(blocks_of(&map, &out));
                            call_count += 1;
                            prop_assert!(call_count <= 7);
                        }
                        if exact {
                            prop_assert_eq!(&blocks, &model);
                        } else {
                            prop_assert!(blocks.is_superset(&model));
                        }
                        model.clear();
                    }
                }
            }
        }
    }
}
