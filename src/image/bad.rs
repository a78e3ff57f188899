//! The run's unreadable ranges: which bytes of the device the last read
//! could not read. Pure (no I/O), so it is unit-tested here.
//!
//! A block enters when a read of it fails after retries (main pass or a
//! catch-up round) and leaves when a later read of it succeeds: a block
//! that was bad in the main pass and reads in a catch-up round has its data
//! in the image, and a block that read in the main pass and fails when a
//! round re-reads it (after a write) has no current data, only stale bytes.
//! The image gets one `B:` record per maximal range, written after every
//! section (so that a restore's zeros there win over any stale section).

use std::ops::Range;

/// Ranges the map holds at most; past it the run ends (a device that
/// fails every other block is not worth tracking block by block). 16 MiB of
/// ranges; at the default `--max-bad-bytes` of 1 GiB at 4 KiB blocks at
/// most 262144 are ever needed.
pub const RANGES_MAX: usize = 1 << 20;

/// Sorted, disjoint, non-adjacent byte ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BadMap {
    ranges: Vec<Range<u64>>,
    bytes: u64,
}

impl BadMap {
    /// Adds `range`, merging it with any range it overlaps or touches.
    /// Returns false (and adds nothing) if that would take more than
    /// [`RANGES_MAX`] ranges.
    pub fn insert(&mut self, range: Range<u64>) -> bool {
        assert!(range.start < range.end, "an empty bad range");
        // First range that ends at or after range.start (may merge).
        let first = self.ranges.partition_point(|r| r.end < range.start);
        // One past the last range that starts at or before range.end.
        let last = self.ranges.partition_point(|r| r.start <= range.end);
        if first == last && self.ranges.len() >= RANGES_MAX {
            return false;
        }
        let mut merged = range;
        for r in &self.ranges[first..last] {
            merged.start = merged.start.min(r.start);
            merged.end = merged.end.max(r.end);
            self.bytes -= r.end - r.start;
        }
        self.bytes += merged.end - merged.start;
        self.ranges.splice(first..last, [merged]);
        true
    }

    /// Removes `range` (it was read): ranges it covers go, one it cuts in
    /// two becomes two. Returns false (and changes nothing) if that would
    /// take more than [`RANGES_MAX`] ranges.
    pub fn remove(&mut self, range: Range<u64>) -> bool {
        let first = self.ranges.partition_point(|r| r.end <= range.start);
        let last = self.ranges.partition_point(|r| r.start < range.end);
        if first == last {
            return true;
        }
        let mut kept: [Option<Range<u64>>; 2] = [None, None];
        let (head, tail) = (&self.ranges[first], &self.ranges[last - 1]);
        if head.start < range.start {
            kept[0] = Some(head.start..range.start);
        }
        if range.end < tail.end {
            kept[1] = Some(range.end..tail.end);
        }
        let kept_count = kept.iter().flatten().count();
        if self.ranges.len() - (last - first) + kept_count > RANGES_MAX {
            return false;
        }
        for r in &self.ranges[first..last] {
            self.bytes -= r.end - r.start;
        }
        for r in kept.iter().flatten() {
            self.bytes += r.end - r.start;
        }
        self.ranges.splice(first..last, kept.into_iter().flatten());
        true
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn inserts_merge_overlapping_and_touching_ranges() {
        let mut map = BadMap::default();
        assert!(map.insert(4096..8192));
        assert!(map.insert(16384..20480));
        assert_eq!(map.len(), 2);
        assert!(map.insert(8192..12288)); // touches the first
        assert_eq!(map.ranges(), [4096..12288, 16384..20480]);
        assert!(map.insert(0..32768)); // covers both
        assert_eq!(map.len(), 1);
        assert_eq!(map.ranges()[0], 0..32768);
        assert_eq!(map.bytes(), 32768);
    }

    #[test]
    fn removing_cuts_and_drops_ranges() {
        let mut map = BadMap::default();
        map.insert(0..40960);
        map.insert(81920..90112);
        assert!(map.remove(8192..12288));
        assert_eq!(map.ranges(), [0..8192, 12288..40960, 81920..90112]);
        assert!(map.remove(36864..86016));
        assert_eq!(map.ranges(), [0..8192, 12288..36864, 86016..90112]);
        assert!(map.remove(0..1 << 20));
        assert!(map.is_empty());
        assert_eq!(map.bytes(), 0);
        assert!(map.remove(0..4096)); // nothing there
    }

    proptest! {
        /// Against a block-by-block model: the same blocks, maximal ranges,
        /// the right byte count.
        #[test]
        fn agrees_with_a_set_of_blocks(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..8), 0..64)) {
            let mut map = BadMap::default();
            let mut model = [false; 80];
            for (add, first, count) in ops {
                let range = first * 512..(first + count) * 512;
                if add {
                    prop_assert!(map.insert(range));
                } else {
                    prop_assert!(map.remove(range));
                }
                for block in first..first + count {
                    model[block as usize] = add;
                }
            }
            let mut expected: Vec<Range<u64>> = Vec::new();
            for (block, &bad) in model.iter().enumerate() {
                let at = block as u64 * 512;
                if !bad {
                    continue;
                }
                match expected.last_mut() {
                    Some(last) if last.end == at => last.end += 512,
                    _ => expected.push(at..at + 512),
                }
            }
            prop_assert_eq!(map.ranges(), &expected[..]);
            prop_assert_eq!(map.bytes(), model.iter().filter(|&&b| b).count() as u64 * 512);
        }
    }
}
