//! Record lines: parsing and encoding. Pure functions over byte slices.

use super::REVISION_EXTENDED;
use super::error::{FormatErrorKind, quote_line};
use crate::geom::ByteExtent;
use std::io::{self, Write};

/// How the imaging run ended, as the `STATE:` record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// A final catch-up round found nothing new: every write is captured.
    Converged,
    /// The run stopped at its round limit while writes continued; the bytes
    /// that changed during the last round may be older than the device's.
    Unconverged { changed_bytes: u64 },
}

/// The end trailer's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub crc32c: u32,
    /// Bytes of the image before the trailer line.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `S:` — `len_bytes` bytes of device data follow the line.
    Data(ByteExtent),
    /// `Z:` (revision 2) — the extent reads as zeros; no data follows.
    Zero(ByteExtent),
    /// `B:` (revision 2) — the source could not read this extent; no data
    /// follows and the image holds nothing trustworthy for it.
    Bad(ByteExtent),
    /// `STATE:` (revision 2).
    State(RunState),
    /// `END` — the trailer; always the last line.
    End(Trailer),
}

impl Record {
    /// Bytes of data that follow the record line.
    pub fn data_bytes(&self) -> u64 {
        match self {
            Record::Data(extent) => extent.len_bytes,
            _ => 0,
        }
    }
}

/// Parses one record line, newline included, of an image whose banner
/// declares `revision`.
pub fn parse_record(line: &[u8], revision: u32) -> Result<Record, FormatErrorKind> {
    let Some(body) = line.strip_suffix(b"\n") else {
        return Err(FormatErrorKind::TruncatedLine(quote_line(line)));
    };
    let malformed = || FormatErrorKind::MalformedRecord(quote_line(line));
    let (tag, rest) = match body.iter().position(|&b| b == b':' || b == b'\t') {
        Some(i) => (&body[..i], &body[i..]),
        None => (body, &body[body.len()..]),
    };
    let need_extended = |tag: &'static str| {
        if revision >= REVISION_EXTENDED {
            Ok(())
        } else {
            Err(FormatErrorKind::RecordNeedsRevision {
                tag,
                needed: REVISION_EXTENDED,
                declared: revision,
            })
        }
    };
    match tag {
        b"S" => parse_extent(rest, malformed).map(Record::Data),
        b"Z" => {
            need_extended("Z:")?;
            parse_extent(rest, malformed).map(Record::Zero)
        }
        b"B" => {
            need_extended("B:")?;
            parse_extent(rest, malformed).map(Record::Bad)
        }
        b"STATE" => {
            need_extended("STATE:")?;
            parse_state(rest).map(Record::State).ok_or_else(malformed)
        }
        b"END" => parse_trailer(rest)
            .map(Record::End)
            .ok_or_else(|| FormatErrorKind::MalformedTrailer(quote_line(line))),
        _ => Err(FormatErrorKind::UnknownRecord(quote_line(line))),
    }
}

/// `:<sector>\tL:<bytes>`, converted to bytes here: the only place the
/// image's sector addresses are read. An address whose bytes do not fit in a
/// `u64` is [`FormatErrorKind::ExtentOverflow`].
fn parse_extent(
    rest: &[u8],
    malformed: impl Fn() -> FormatErrorKind,
) -> Result<ByteExtent, FormatErrorKind> {
    let fields = || {
        let rest = rest.strip_prefix(b":")?;
        let tab = rest.iter().position(|&b| b == b'\t')?;
        let sector = parse_decimal(&rest[..tab])?;
        let len_bytes = parse_decimal(rest[tab..].strip_prefix(b"\tL:")?)?;
        Some((sector, len_bytes))
    };
    let (sector, len_bytes) = fields().ok_or_else(malformed)?;
    ByteExtent::from_sectors(sector, len_bytes).map_err(|overflow| {
        FormatErrorKind::ExtentOverflow {
            sector: overflow.sector_first,
            len_bytes: overflow.len_bytes,
        }
    })
}

/// `:converged` or `:unconverged\tCHANGED_BYTES:<n>`
fn parse_state(rest: &[u8]) -> Option<RunState> {
    if rest == b":converged" {
        return Some(RunState::Converged);
    }
    let n = rest.strip_prefix(b":unconverged\tCHANGED_BYTES:")?;
    Some(RunState::Unconverged {
        changed_bytes: parse_decimal(n)?,
    })
}

/// `\tCRC:<8 lowercase hex>\tBYTES:<decimal>`
fn parse_trailer(rest: &[u8]) -> Option<Trailer> {
    let rest = rest.strip_prefix(b"\tCRC:")?;
    if rest.len() < 8 {
        return None;
    }
    let (hex, rest) = rest.split_at(8);
    let mut crc32c = 0u32;
    for &b in hex {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        crc32c = crc32c << 4 | u32::from(digit);
    }
    let bytes = parse_decimal(rest.strip_prefix(b"\tBYTES:")?)?;
    Some(Trailer { crc32c, bytes })
}

/// A canonical unsigned decimal: digits only, no sign, no leading zero
/// (the original writes Go's `%d`), and no overflow.
pub(crate) fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    let mut value = 0u64;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// Writes one record line. Returns the bytes written.
pub fn encode_record(out: &mut impl Write, record: &Record) -> io::Result<()> {
    match record {
        // sector_first asserts the extent starts on a sector: the format
        // cannot address anything else.
        Record::Data(e) => writeln!(out, "S:{}\tL:{}", e.sector_first(), e.len_bytes),
        Record::Zero(e) => writeln!(out, "Z:{}\tL:{}", e.sector_first(), e.len_bytes),
        Record::Bad(e) => writeln!(out, "B:{}\tL:{}", e.sector_first(), e.len_bytes),
        Record::State(RunState::Converged) => out.write_all(b"STATE:converged\n"),
        Record::State(RunState::Unconverged { changed_bytes }) => {
            writeln!(out, "STATE:unconverged\tCHANGED_BYTES:{changed_bytes}")
        }
        Record::End(t) => writeln!(out, "END\tCRC:{:08x}\tBYTES:{}", t.crc32c, t.bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str, revision: u32) -> Result<Record, FormatErrorKind> {
        parse_record(line.as_bytes(), revision)
    }

    #[test]
    fn parses_each_record_type() {
        let e = ByteExtent {
            offset_bytes: 7 * 512,
            len_bytes: 512,
        };
        assert_eq!(parse("S:7\tL:512\n", 0).unwrap(), Record::Data(e));
        assert_eq!(parse("Z:7\tL:512\n", 2).unwrap(), Record::Zero(e));
        assert_eq!(parse("B:7\tL:512\n", 2).unwrap(), Record::Bad(e));
        assert_eq!(
            parse("STATE:converged\n", 2).unwrap(),
            Record::State(RunState::Converged)
        );
        assert_eq!(
            parse("STATE:unconverged\tCHANGED_BYTES:4096\n", 2).unwrap(),
            Record::State(RunState::Unconverged {
                changed_bytes: 4096
            })
        );
        assert_eq!(
            parse("END\tCRC:0000abcd\tBYTES:99\n", 0).unwrap(),
            Record::End(Trailer {
                crc32c: 0xabcd,
                bytes: 99
            })
        );
    }

    #[test]
    fn encode_then_parse_is_identity() {
        let records = [
            Record::Data(ByteExtent {
                offset_bytes: u64::MAX / 512 * 512,
                len_bytes: 0,
            }),
            Record::Zero(ByteExtent {
                offset_bytes: 0,
                len_bytes: u64::MAX,
            }),
            Record::Bad(ByteExtent {
                offset_bytes: 512,
                len_bytes: 2,
            }),
            Record::State(RunState::Converged),
            Record::State(RunState::Unconverged { changed_bytes: 0 }),
            Record::End(Trailer {
                crc32c: u32::MAX,
                bytes: 0,
            }),
        ];
        for record in records {
            let mut line = Vec::new();
            encode_record(&mut line, &record).unwrap();
            assert_eq!(parse_record(&line, 2).unwrap(), record);
        }
    }

    #[test]
    fn sector_addresses_past_a_u64_of_bytes_are_overflows() {
        let first_past = u64::MAX / 512 + 1;
        for line in [
            format!("S:{first_past}\tL:0\n"),
            format!("S:{}\tL:512\n", first_past - 1),
        ] {
            assert!(
                matches!(parse(&line, 2), Err(FormatErrorKind::ExtentOverflow { .. })),
                "{line:?} accepted"
            );
        }
    }

    #[test]
    fn extension_records_need_revision_2() {
        for line in ["Z:0\tL:512\n", "B:0\tL:512\n", "STATE:converged\n"] {
            for revision in [0, 1] {
                assert!(matches!(
                    parse(line, revision),
                    Err(FormatErrorKind::RecordNeedsRevision { .. })
                ));
            }
        }
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in [
            "S:1\tL:512",                    // no newline
            "S:-1\tL:512\n",                 // sign
            "S:+1\tL:512\n",                 // sign
            "S:01\tL:512\n",                 // leading zero
            "S:1 L:512\n",                   // space, not tab
            "S:1\tL:\n",                     // empty number
            "S:\tL:5\n",                     // empty number
            "S:1\tL:5\tX\n",                 // trailing field
            "S:18446744073709551616\tL:1\n", // overflow
            "S:1\tL:1\r\n",
        ] {
            assert!(
                matches!(
                    parse(line, 2),
                    Err(FormatErrorKind::MalformedRecord(_) | FormatErrorKind::TruncatedLine(_))
                ),
                "{line:?} accepted"
            );
        }
        for line in [
            "END\n",
            "END\tCRC:abc\tBYTES:1\n",
            "END\tCRC:0000ABCD\tBYTES:1\n",
            "END\tCRC:0000abcd\tBYTES:\n",
            "END\tCRC:0000abcd\tBYTES:1\tX\n",
        ] {
            assert!(
                matches!(parse(line, 2), Err(FormatErrorKind::MalformedTrailer(_))),
                "{line:?} accepted"
            );
        }
        for line in ["X:1\tL:1\n", "\n", "hello\n", "s:1\tL:1\n", "S1\tL:1\n"] {
            assert!(
                matches!(parse(line, 2), Err(FormatErrorKind::UnknownRecord(_))),
                "{line:?} accepted"
            );
        }
    }
}
