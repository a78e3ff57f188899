//! The `.hc` image stream: banner, sections, optional extension records and
//! the end trailer. FORMAT.md is the specification; this module is its only
//! implementation, and does no I/O beyond `Read`/`BufRead`/`Write`.
//!
//! ```text
//! This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone[ hc=N key=value ...]\n
//! S:<sector>\tL:<bytes>\n<bytes of data>          (any number, any order)
//! END\tCRC:<8 lowercase hex>\tBYTES:<decimal>\n   (CRC-32C of every byte before it)
//! ```

mod banner;
mod error;
mod reader;
mod record;
mod writer;

pub use banner::{Banner, Meta, printable};
pub use error::{FormatError, FormatErrorKind};
pub use reader::ImageReader;
pub use record::{Record, RunState, Trailer};
pub use writer::ImageWriter;

/// The banner the original tool writes, byte for byte (without its newline).
pub const BANNER_PLAIN: &str =
    "This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone";

/// What a reader looks for in line 1, as the original reader does.
pub const BANNER_MARK: &str = "Hot-Clone";

/// Revision 1: metadata in the banner; only `S:` sections and the trailer.
/// Every reader of the original tool (which checks only that line 1 contains
/// `Hot-Clone`) restores it.
pub const REVISION_META: u32 = 1;

/// Revision 2: adds `Z:` zero extents, `B:` bad ranges and the `STATE:`
/// record. The original tools cannot read these; written only when asked for.
pub const REVISION_EXTENDED: u32 = 2;

/// The newest revision this build reads and writes.
pub const REVISION_MAX: u32 = REVISION_EXTENDED;

/// Longest record line we accept (the longest legal one is well under 80).
pub const RECORD_LINE_MAX_BYTES: usize = 128;

/// Longest banner line we accept (the banner carries metadata such as the
/// source path, so it may be longer than a record).
pub const BANNER_LINE_MAX_BYTES: usize = 4096;

/// Buffers at least this long are checksummed by folding (`crc-fast`) and
/// combined; shorter ones (record lines) with the crc32 instruction loop.
const CRC_FOLD_BYTES_MIN: usize = 16 << 10;

/// CRC-32C (Castagnoli) as the trailer records it: standard init and final XOR.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    if bytes.len() < CRC_FOLD_BYTES_MIN {
        return crc32c::crc32c_append(crc, bytes);
    }
    let crc_bytes = crc32c_of(bytes);
    if crc == 0 {
        crc_bytes
    } else {
        crc32c_combine(crc, crc_bytes, bytes.len() as u64)
    }
}

/// CRC-32C of `bytes` alone.
pub fn crc32c_of(bytes: &[u8]) -> u32 {
    if bytes.len() < CRC_FOLD_BYTES_MIN {
        return crc32c::crc32c(bytes);
    }
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// The CRC-32C of `a ++ b` from the CRC-32C of `a` and of `b` (`len_b`
/// bytes long), in O(log len_b).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    crc32c::crc32c_combine(crc_a, crc_b, len_b as usize)
}

#[cfg(test)]
mod tests;
