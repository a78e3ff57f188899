//! Every way an image can be wrong, each tied to the byte offset in the image
//! where it was found, so an operator can look at the bytes themselves.

use std::fmt;
use std::io;

/// A problem in an image stream, at a byte offset of the image.
#[derive(Debug)]
pub struct FormatError {
    /// Byte offset in the image where the offending line or data starts.
    pub offset: u64,
    pub kind: FormatErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatErrorKind {
    #[error("the image is empty")]
    Empty,
    #[error(
        "line 1 does not contain \"Hot-Clone\": this is not a hot-clone image (it starts with {0})"
    )]
    NotAnImage(String),
    #[error("line is longer than {max_bytes} bytes without a newline: not a record ({start})")]
    LineTooLong { max_bytes: usize, start: String },
    #[error("the image ends in the middle of a record line ({0})")]
    TruncatedLine(String),
    #[error("malformed record line {0}: expected S:<sector>\\tL:<bytes> or the END trailer")]
    MalformedRecord(String),
    #[error("unknown record type {0}: this image needs a newer hot-clone, or is damaged")]
    UnknownRecord(String),
    #[error(
        "record {tag} needs format revision {needed}, but the banner declares revision {declared}"
    )]
    RecordNeedsRevision {
        tag: &'static str,
        needed: u32,
        declared: u32,
    },
    #[error("malformed END trailer {0}: expected END\\tCRC:<8 lowercase hex>\\tBYTES:<decimal>")]
    MalformedTrailer(String),
    #[error("banner declares format revision {declared}; this hot-clone reads up to {supported}")]
    NewerRevision { declared: u32, supported: u32 },
    #[error("malformed banner metadata {0}")]
    MalformedMeta(String),
    #[error("unknown banner metadata key {0}: this image needs a newer hot-clone")]
    UnknownMetaKey(String),
    #[error(
        "section at sector {sector} with length {len_bytes}: its end overflows a 64-bit byte offset"
    )]
    ExtentOverflow { sector: u64, len_bytes: u64 },
    #[error(
        "section at sector {sector} with length {len_bytes} ends at byte {end_bytes}, past the device size the banner declares ({device_bytes} bytes)"
    )]
    PastDeclaredSize {
        sector: u64,
        len_bytes: u64,
        end_bytes: u64,
        device_bytes: u64,
    },
    #[error(
        "truncated image: section at sector {sector} declares {len_bytes} bytes but the image ends after {got_bytes} of them"
    )]
    TruncatedSection {
        sector: u64,
        len_bytes: u64,
        got_bytes: u64,
    },
    #[error(
        "CRC mismatch: the trailer records {recorded:08x}, the {bytes} bytes before it hash to {computed:08x} (the image is corrupt)"
    )]
    CrcMismatch {
        recorded: u32,
        computed: u32,
        bytes: u64,
    },
    #[error(
        "byte count mismatch: the trailer records {recorded} bytes, {counted} bytes precede it (the image was cut or spliced)"
    )]
    ByteCountMismatch { recorded: u64, counted: u64 },
    #[error("data after the END trailer (the trailer must be the last line)")]
    DataAfterTrailer,
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
}

impl FormatError {
    pub fn new(offset: u64, kind: FormatErrorKind) -> Self {
        FormatError { offset, kind }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "image byte offset {}: {}", self.offset, self.kind)
    }
}

impl std::error::Error for FormatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            FormatErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Shows a raw line in an error message: quoted, escaped, and cut short.
pub(crate) fn quote_line(line: &[u8]) -> String {
    const SHOWN_MAX_BYTES: usize = 60;
    let shown = &line[..line.len().min(SHOWN_MAX_BYTES)];
    let mut out = String::with_capacity(shown.len() + 8);
    out.push('"');
    out.push_str(&shown.escape_ascii().to_string());
    if line.len() > SHOWN_MAX_BYTES {
        out.push_str("...");
    }
    out.push('"');
    out
}
