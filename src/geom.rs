//! Device geometry shared by every layer.

/// Bytes in one sector: the unit the block layer counts in (trace events,
/// `bi_sector`, sysfs `start` and `size`) and the `.hc` format addresses
/// sections in (the original tool's convention), whatever the device's
/// logical block size.
pub const SECTOR_BYTES: u64 = 512;
