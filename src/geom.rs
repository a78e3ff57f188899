//! Device geometry shared by every layer: the sector, and the one extent
//! type ([`ByteExtent`]) that the dirty map, the read engine, the image
//! format and restore all pass around. Addresses in sectors exist only at
//! the edges that speak them (trace events, sysfs, the `.hc` record lines),
//! and are converted here, checked.

/// Bytes in one sector: the unit the block layer counts in (trace events,
/// `bi_sector`, sysfs `start` and `size`) and the `.hc` format addresses
/// sections in (the original tool's convention), whatever the device's
/// logical block size.
pub const SECTOR_BYTES: u64 = 512;

const _: () = assert!(SECTOR_BYTES.is_power_of_two());

/// A byte range of the device: `[offset_bytes, offset_bytes + len_bytes)`.
///
/// Whoever builds one keeps its end inside a `u64` (the parsers convert with
/// [`ByteExtent::from_sectors`], which checks; the dirty map's extents lie on
/// the device); [`ByteExtent::end_bytes`] asserts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteExtent {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

/// A sector address whose byte offset or end does not fit in a `u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "extent at sector {sector_first} with length {len_bytes}: its end overflows a 64-bit byte offset"
)]
pub struct SectorOverflow {
    pub sector_first: u64,
    pub len_bytes: u64,
}

impl ByteExtent {
    /// The extent starting at sector `sector_first`, `len_bytes` long (any
    /// length: the `.hc` format's lengths are bytes); an error when its start
    /// or end does not fit in a byte offset.
    pub fn from_sectors(sector_first: u64, len_bytes: u64) -> Result<ByteExtent, SectorOverflow> {
        let overflow = SectorOverflow {
            sector_first,
            len_bytes,
        };
        let offset_bytes = sector_first.checked_mul(SECTOR_BYTES).ok_or(overflow)?;
        offset_bytes.checked_add(len_bytes).ok_or(overflow)?;
        Ok(ByteExtent {
            offset_bytes,
            len_bytes,
        })
    }

    /// One past the last byte.
    ///
    /// # Panics
    ///
    /// If the end overflows a `u64`: no extent built as this type says
    /// (module documentation) does.
    pub fn end_bytes(&self) -> u64 {
        self.offset_bytes
            .checked_add(self.len_bytes)
            .unwrap_or_else(|| panic!("{self:?}: end overflows a u64"))
    }

    /// The end, or `None` when it does not fit in a `u64`, for callers that
    /// check extents they did not build.
    pub fn checked_end_bytes(&self) -> Option<u64> {
        self.offset_bytes.checked_add(self.len_bytes)
    }

    /// Starts on a sector boundary and is whole sectors long.
    pub fn is_whole_sectors(&self) -> bool {
        self.offset_bytes.is_multiple_of(SECTOR_BYTES)
            && self.len_bytes.is_multiple_of(SECTOR_BYTES)
    }

    /// The sector the extent starts at.
    ///
    /// # Panics
    ///
    /// If `offset_bytes` is not on a sector boundary: addressing such an
    /// extent in sectors would silently move it, so it is a bug upstream.
    pub fn sector_first(&self) -> u64 {
        sector_of(self.offset_bytes)
    }
}

/// The sector at byte `offset_bytes`.
///
/// # Panics
///
/// If `offset_bytes` is not on a sector boundary.
pub fn sector_of(offset_bytes: u64) -> u64 {
    assert!(
        offset_bytes.is_multiple_of(SECTOR_BYTES),
        "byte offset {offset_bytes} is not on a {SECTOR_BYTES}-byte sector boundary"
    );
    offset_bytes / SECTOR_BYTES
}

/// The byte offset of sector `sector`, or `None` past a `u64`.
pub fn checked_sector_bytes(sector: u64) -> Option<u64> {
    sector.checked_mul(SECTOR_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_convert_to_bytes_and_back() {
        let extent = ByteExtent::from_sectors(7, 4096).unwrap();
        assert_eq!(
            extent,
            ByteExtent {
                offset_bytes: 7 * 512,
                len_bytes: 4096
            }
        );
        assert_eq!(extent.sector_first(), 7);
        assert_eq!(extent.end_bytes(), 7 * 512 + 4096);
        assert!(extent.is_whole_sectors());
        // Lengths are bytes: an odd length is an extent, just not whole sectors.
        let odd = ByteExtent::from_sectors(1, 3).unwrap();
        assert!(!odd.is_whole_sectors());
        assert_eq!(odd.sector_first(), 1);
    }

    #[test]
    fn conversions_refuse_overflow_at_the_start_and_at_the_end() {
        let last_sector = u64::MAX / SECTOR_BYTES;
        assert!(ByteExtent::from_sectors(last_sector, 0).is_ok());
        assert_eq!(
            ByteExtent::from_sectors(last_sector + 1, 0),
            Err(SectorOverflow {
                sector_first: last_sector + 1,
                len_bytes: 0
            })
        );
        assert!(ByteExtent::from_sectors(last_sector, SECTOR_BYTES).is_err());
        assert!(ByteExtent::from_sectors(0, u64::MAX).is_ok());
        assert!(ByteExtent::from_sectors(1, u64::MAX).is_err());
        assert_eq!(checked_sector_bytes(last_sector + 1), None);
        let wide = ByteExtent {
            offset_bytes: u64::MAX,
            len_bytes: 1,
        };
        assert_eq!(wide.checked_end_bytes(), None);
    }

    #[test]
    #[should_panic(expected = "not on a 512-byte sector boundary")]
    fn an_unaligned_offset_has_no_sector() {
        ByteExtent {
            offset_bytes: 100,
            len_bytes: 512,
        }
        .sector_first();
    }

    #[test]
    #[should_panic(expected = "end overflows")]
    fn end_bytes_asserts_the_end_fits() {
        ByteExtent {
            offset_bytes: u64::MAX,
            len_bytes: 1,
        }
        .end_bytes();
    }
}
