//! What to read: the caller's extents widened to the device's logical block
//! size, clamped to the device end, and cut into reads of at most one chunk.
//! Pure arithmetic, no I/O, so it is unit-tested here.

use crate::geom::{ByteExtent, SECTOR_BYTES};

/// The device facts and the chunk size the plan needs. All sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub device_bytes: u64,
    /// The logical block size: every O_DIRECT offset and length is a multiple.
    pub block_bytes: u64,
    /// The largest read; a multiple of `block_bytes`.
    pub chunk_bytes: u64,
}

impl Geometry {
    pub fn new(device_bytes: u64, block_bytes: u64, chunk_bytes: u64) -> Geometry {
        assert!(
            block_bytes.is_power_of_two() && block_bytes >= SECTOR_BYTES,
            "logical block size {block_bytes} is not a power of two of at least 512"
        );
        assert!(
            device_bytes.is_multiple_of(block_bytes),
            "device size {device_bytes} is not a multiple of the logical block size {block_bytes}"
        );
        assert!(
            chunk_bytes >= block_bytes && chunk_bytes.is_multiple_of(block_bytes),
            "chunk {chunk_bytes} is not a positive multiple of the logical block size {block_bytes}"
        );
        Geometry {
            device_bytes,
            block_bytes,
            chunk_bytes,
        }
    }

    /// `extent` widened outward to whole logical blocks and clamped to the
    /// device end; `None` when that leaves nothing (an empty extent; one
    /// starting past the end is refused earlier by [`Geometry::check_extent`]).
    pub fn widen(&self, extent: &ByteExtent) -> Option<Span> {
        let offset_bytes = extent.offset_bytes - extent.offset_bytes % self.block_bytes;
        let end_bytes = extent
            .end_bytes()
            .div_ceil(self.block_bytes)
            .saturating_mul(self.block_bytes)
            .min(self.device_bytes);
        (offset_bytes < end_bytes).then_some(Span {
            offset_bytes,
            end_bytes,
        })
    }

    /// The caller's promise: whole sectors, starting on the device. An extent
    /// that runs past the device end is clamped; one that starts past it is a
    /// bug upstream (the dirty map clamps to the device), so it panics.
    pub fn check_extent(&self, extent: &ByteExtent) {
        assert!(
            extent.is_whole_sectors(),
            "extent {extent:?} is not a whole number of 512-byte sectors"
        );
        assert!(
            extent.len_bytes == 0 || extent.offset_bytes < self.device_bytes,
            "extent {extent:?} starts past the device end {}",
            self.device_bytes
        );
        assert!(
            extent.checked_end_bytes().is_some(),
            "extent {extent:?} overflows"
        );
    }

    /// Reads the extents take once widened, without merging neighbours: an
    /// upper bound on what [`Cursor`] hands out, used to size the crew.
    pub fn read_count_max(&self, extents: &[ByteExtent]) -> u64 {
        extents
            .iter()
            .filter_map(|e| self.widen(e))
            .map(|s| (s.end_bytes - s.offset_bytes).div_ceil(self.chunk_bytes))
            .sum()
    }
}

/// A block-aligned byte range `[offset_bytes, end_bytes)` of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub offset_bytes: u64,
    pub end_bytes: u64,
}

/// One read: block-aligned, at most one chunk, inside the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub offset_bytes: u64,
    pub len_bytes: u32,
}

/// Hands out the reads of a list of extents in order, one chunk at a time.
/// Shared by the workers behind a mutex: one claim per read of up to a chunk
/// (a megabyte, tens of microseconds of device time) makes the lock's cost
/// invisible, and it needs no table sized by the extent count.
///
/// Widening can make neighbouring extents overlap (two 512-byte extents in
/// one 4 KiB block); a span that overlaps the one before it starts where that
/// one ended, so a block is read once when the extents come sorted, as the
/// dirty map yields them. Unsorted input is read correctly, perhaps twice.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    geometry: Geometry,
    extents: &'a [ByteExtent],
    /// The next extent to widen.
    extent_index_next: usize,
    /// Where the current span started (it may have been extended).
    span_offset_bytes: u64,
    /// What is left of the current span: `[offset_bytes, end_bytes)`.
    offset_bytes: u64,
    end_bytes: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(geometry: Geometry, extents: &'a [ByteExtent]) -> Cursor<'a> {
        Cursor {
            geometry,
            extents,
            extent_index_next: 0,
            span_offset_bytes: 0,
            offset_bytes: 0,
            end_bytes: 0,
        }
    }

    /// Whether a read is left: moves past extents that widen to nothing
    /// or were read with the one before, without handing out a read.
    pub fn has_more(&mut self) -> bool {
        // Bounded by the extent count: each turn consumes one extent.
        while self.offset_bytes == self.end_bytes {
            let Some(extent) = self.extents.get(self.extent_index_next) else {
                return false;
            };
            self.extent_index_next += 1;
            let Some(span) = self.geometry.widen(extent) else {
                continue;
            };
            let starts_inside_previous =
                self.span_offset_bytes <= span.offset_bytes && span.offset_bytes < self.end_bytes;
            if !starts_inside_previous {
                self.span_offset_bytes = span.offset_bytes;
                self.offset_bytes = span.offset_bytes;
                self.end_bytes = span.end_bytes;
            } else if span.end_bytes > self.end_bytes {
                // Extends the previous span: read only the new part.
                self.offset_bytes = self.end_bytes;
                self.end_bytes = span.end_bytes;
            }
            // Otherwise wholly inside the previous span: already read.
        }
        true
    }

    /// The next read, or `None` when every extent has been handed out.
    #[cfg(test)]
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        self.next_chunk_at_most(self.geometry.chunk_bytes as u32)
    }

    /// The next read, of at most `len_bytes_max` (rounded down to the
    /// logical block, at least one) and the geometry's chunk size; `None`
    /// when every extent has been handed out.
    pub fn next_chunk_at_most(&mut self, len_bytes_max: u32) -> Option<Chunk> {
        let block_bytes = self.geometry.block_bytes;
        let len_bytes_max = (u64::from(len_bytes_max) / block_bytes).max(1) * block_bytes;
        if !self.has_more() {
            return None;
        }
        let len_bytes = (self.end_bytes - self.offset_bytes)
            .min(self.geometry.chunk_bytes)
            .min(len_bytes_max);
        let chunk = Chunk {
            offset_bytes: self.offset_bytes,
            len_bytes: u32::try_from(len_bytes).expect("chunk_bytes fits in u32"),
        };
        self.offset_bytes += len_bytes;
        debug_assert!(chunk.offset_bytes.is_multiple_of(self.geometry.block_bytes));
        debug_assert!(u64::from(chunk.len_bytes).is_multiple_of(self.geometry.block_bytes));
        debug_assert!(
            chunk.offset_bytes + u64::from(chunk.len_bytes) <= self.geometry.device_bytes
        );
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn extent(offset_bytes: u64, len_bytes: u64) -> ByteExtent {
        ByteExtent {
            offset_bytes,
            len_bytes,
        }
    }

    fn chunk(offset_bytes: u64, len_bytes: u64) -> Chunk {
        Chunk {
            offset_bytes,
            len_bytes: len_bytes as u32,
        }
    }

    fn all_chunks(geometry: Geometry, extents: &[ByteExtent]) -> Vec<Chunk> {
        let mut cursor = Cursor::new(geometry, extents);
        let mut chunks = Vec::new();
        while let Some(c) = cursor.next_chunk() {
            chunks.push(c);
        }
        assert!(
            cursor.next_chunk().is_none(),
            "a finished cursor stays finished"
        );
        chunks
    }

    #[test]
    fn a_smaller_limit_mid_extent_shortens_reads_and_loses_nothing() {
        // The gait switches to gentle after the first read and back after
        // the third: the reads still tile the extent, in order.
        let geometry = Geometry::new(4 * MIB, 4096, MIB);
        let extents = [extent(0, 3 * MIB)];
        let mut cursor = Cursor::new(geometry, &extents);
        let limits = [1 << 20, 128 << 10, 5000, 1 << 30];
        let mut chunks = Vec::new();
        for limit in limits {
            chunks.push(cursor.next_chunk_at_most(limit).unwrap());
        }
        while let Some(c) = cursor.next_chunk_at_most(1 << 30) {
            chunks.push(c);
        }
        assert_eq!(
            chunks[..4],
            [
                chunk(0, MIB),
                chunk(MIB, 128 * KIB),
                // Rounded down to the block, at least one block.
                chunk(MIB + 128 * KIB, 4 * KIB),
                chunk(MIB + 132 * KIB, MIB),
            ]
        );
        let mut at = 0;
        for c in &chunks {
            assert_eq!(c.offset_bytes, at, "{chunks:?}");
            at += u64::from(c.len_bytes);
        }
        assert_eq!(at, 3 * MIB);
    }

    #[test]
    fn a_whole_device_that_is_not_a_chunk_multiple_ends_with_a_short_read() {
        let geometry = Geometry::new(2 * MIB + 12 * KIB, 4096, MIB);
        assert_eq!(
            all_chunks(geometry, &[extent(0, 2 * MIB + 12 * KIB)]),
            [chunk(0, MIB), chunk(MIB, MIB), chunk(2 * MIB, 12 * KIB)]
        );
        assert_eq!(geometry.read_count_max(&[extent(0, 2 * MIB + 12 * KIB)]), 3);
    }

    #[test]
    fn sub_block_extents_widen_to_the_logical_block() {
        let geometry = Geometry::new(MIB, 4096, 64 * KIB);
        assert_eq!(
            geometry.widen(&extent(4096 + 512, 1024)),
            Some(Span {
                offset_bytes: 4096,
                end_bytes: 8192
            })
        );
        assert_eq!(
            geometry.widen(&extent(3 * 512, 6 * 512)),
            Some(Span {
                offset_bytes: 0,
                end_bytes: 8192
            })
        );
        // At 512-byte blocks nothing widens.
        let geometry = Geometry::new(MIB, 512, 64 * KIB);
        assert_eq!(
            all_chunks(geometry, &[extent(512, 512), extent(3 * 512, 512)]),
            [chunk(512, 512), chunk(3 * 512, 512)]
        );
    }

    #[test]
    fn widening_clamps_to_the_device_end() {
        let geometry = Geometry::new(16 * KIB, 4096, 64 * KIB);
        assert_eq!(
            all_chunks(geometry, &[extent(12 * KIB + 512, 64 * KIB)]),
            [chunk(12 * KIB, 4096)]
        );
    }

    #[test]
    fn overlapping_widened_neighbours_are_read_once() {
        let geometry = Geometry::new(MIB, 4096, 8192);
        let extents = [
            extent(0, 512),
            extent(512, 512),          // same block as the one before
            extent(4096 - 512, 1024),  // straddles blocks 0 and 1
            extent(8192, 512),         // block 2
            extent(8192 + 1024, 8192), // blocks 2..4, overlapping block 2
            extent(64 * KIB, 0),       // empty
            extent(64 * KIB, 512),
        ];
        assert_eq!(
            all_chunks(geometry, &extents),
            [
                chunk(0, 4096),
                chunk(4096, 4096),
                chunk(8192, 4096),
                chunk(12 * KIB, 8192),
                chunk(64 * KIB, 4096),
            ]
        );
    }

    #[test]
    fn a_span_inside_a_longer_one_before_it_is_skipped() {
        let geometry = Geometry::new(MIB, 4096, MIB);
        let extents = [
            extent(0, 64 * KIB),
            extent(4096, 512),
            extent(32 * KIB, 4096),
        ];
        assert_eq!(all_chunks(geometry, &extents), [chunk(0, 64 * KIB)]);
    }

    #[test]
    fn unsorted_extents_are_all_read() {
        let geometry = Geometry::new(MIB, 4096, MIB);
        let extents = [extent(64 * KIB, 4096), extent(0, 4096)];
        assert_eq!(
            all_chunks(geometry, &extents),
            [chunk(64 * KIB, 4096), chunk(0, 4096)]
        );
    }

    /// Every byte asked for is in some read; every read is aligned, at most a
    /// chunk and inside the device; nothing beyond the widened extents is read.
    #[test]
    fn chunks_cover_exactly_the_widened_extents() {
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let block_bytes = [512u64, 4096][(next() % 2) as usize];
            let device_bytes = block_bytes * (1 + next() % 200);
            let chunk_bytes = block_bytes * (1 + next() % 9);
            let geometry = Geometry::new(device_bytes, block_bytes, chunk_bytes);
            let mut extents = Vec::new();
            for _ in 0..next() % 12 {
                let offset_bytes = (next() % (device_bytes / 512)) * 512;
                let len_bytes = (next() % 40) * 512;
                extents.push(extent(offset_bytes, len_bytes));
            }
            if next() % 2 == 0 {
                extents.sort();
            }
            let chunks = all_chunks(geometry, &extents);
            assert!(chunks.len() as u64 <= geometry.read_count_max(&extents));
            let mut read = vec![0u32; (device_bytes / 512) as usize];
            for c in &chunks {
                assert!(c.offset_bytes.is_multiple_of(block_bytes));
                assert!(u64::from(c.len_bytes).is_multiple_of(block_bytes));
                assert!(c.len_bytes > 0 && u64::from(c.len_bytes) <= chunk_bytes);
                assert!(c.offset_bytes + u64::from(c.len_bytes) <= device_bytes);
                for s in c.offset_bytes / 512..(c.offset_bytes + u64::from(c.len_bytes)) / 512 {
                    read[s as usize] += 1;
                }
            }
            let mut wanted = vec![false; read.len()];
            for e in &extents {
                if let Some(span) = geometry.widen(e) {
                    for s in span.offset_bytes / 512..span.end_bytes / 512 {
                        wanted[s as usize] = true;
                    }
                }
                for s in e.offset_bytes / 512..(e.end_bytes() / 512).min(read.len() as u64) {
                    assert!(read[s as usize] > 0, "sector {s} of {e:?} never read");
                }
            }
            for (s, &count) in read.iter().enumerate() {
                assert!(count == 0 || wanted[s], "sector {s} read but not asked for");
                if extents.is_sorted() {
                    assert!(
                        count <= 1,
                        "sector {s} read {count} times from sorted extents"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "not a whole number of 512-byte sectors")]
    fn a_partial_sector_is_a_bug() {
        Geometry::new(MIB, 512, MIB).check_extent(&extent(0, 100));
    }

    #[test]
    #[should_panic(expected = "starts past the device end")]
    fn an_extent_past_the_end_is_a_bug() {
        Geometry::new(MIB, 512, MIB).check_extent(&extent(MIB, 512));
    }
}
