//! Parser for the classic blktrace relay stream: `struct blk_io_trace` records
//! (include/uapi/linux/blktrace_api.h) as read from
//! `/sys/kernel/debug/block/DEV/traceN`, each followed by `pdu_len` bytes.
//!
//! Records are in host byte order and packed back to back; a read can end in
//! the middle of one, so the parsers report how many bytes they consumed and
//! the caller keeps the rest for the next read.
//!
//! Two record versions exist: version 7 (`struct blk_io_trace`, 48 bytes, a
//! 32-bit action), what `BLKTRACESETUP` produces, and version 8
//! (`struct blk_io_trace2`, 64 bytes, a 64-bit action with zone and
//! write-zeroes categories) from `BLKTRACESETUP2` on newer kernels. Both are
//! decoded.
//!
//! An action is `category bits << 16 | action code`. The category bits tell the
//! direction: the kernel sets `BLK_TC_WRITE` for every operation whose op
//! number is odd (`op_is_write`: write, discard, secure erase, write-zeroes,
//! zone append, zone reset) and `BLK_TC_READ` otherwise, so a bare flush is
//! `READ | FLUSH`, and write-zeroes in a version 7 record is a plain `WRITE`.

use super::{DevT, Phase, WriteEvent, WriteKind};
use crate::geom::SECTOR_BYTES;

/// `BLK_IO_TRACE_MAGIC`: the top 24 bits of `magic`; the low 8 are the version.
pub const MAGIC: u32 = 0x6561_7400;
const MAGIC_MASK: u32 = 0xffff_ff00;
/// `BLK_IO_TRACE_VERSION`.
pub const VERSION_1: u8 = 7;
/// `BLK_IO_TRACE2_VERSION`.
pub const VERSION_2: u8 = 8;
/// `sizeof(struct blk_io_trace)`: 4+4+8+8+4+4+4+4+4+2+2.
pub const HEADER_BYTES_V1: usize = 48;
/// `sizeof(struct blk_io_trace2)`: 4+4+8+8+4+4+8+4+4+2+2+12 (pad).
pub const HEADER_BYTES_V2: usize = 64;
/// Largest record: the bigger header and the largest `pdu_len`.
pub const RECORD_BYTES_MAX: usize = HEADER_BYTES_V2 + u16::MAX as usize;

const _: () = assert!(HEADER_BYTES_V1 == 4 + 4 + 8 + 8 + 4 + 4 + 4 + 4 + 4 + 2 + 2);
const _: () = assert!(HEADER_BYTES_V2 == 4 + 4 + 8 + 8 + 4 + 4 + 8 + 4 + 4 + 2 + 2 + 12);
const _: () = assert!(HEADER_BYTES_V1.is_multiple_of(8) && HEADER_BYTES_V2.is_multiple_of(8));

/// `BLK_TC_SHIFT`: categories sit above the 16-bit action code.
pub const CATEGORY_SHIFT: u32 = 16;

/// Trace categories (`enum blktrace_cat`), before shifting.
pub mod category {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const FLUSH: u64 = 1 << 2;
    pub const SYNC: u64 = 1 << 3;
    pub const QUEUE: u64 = 1 << 4;
    pub const REQUEUE: u64 = 1 << 5;
    pub const ISSUE: u64 = 1 << 6;
    pub const COMPLETE: u64 = 1 << 7;
    pub const FS: u64 = 1 << 8;
    pub const PC: u64 = 1 << 9;
    pub const NOTIFY: u64 = 1 << 10;
    pub const AHEAD: u64 = 1 << 11;
    pub const META: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const DRV_DATA: u64 = 1 << 14;
    pub const FUA: u64 = 1 << 15;
    // Version 2 only.
    pub const ZONE_APPEND: u64 = 1 << 16;
    pub const ZONE_RESET: u64 = 1 << 17;
    pub const ZONE_RESET_ALL: u64 = 1 << 18;
    pub const ZONE_FINISH: u64 = 1 << 19;
    pub const ZONE_OPEN: u64 = 1 << 20;
    pub const ZONE_CLOSE: u64 = 1 << 21;
    pub const WRITE_ZEROES: u64 = 1 << 22;
}

/// Action codes (`enum blktrace_act`), the low 16 bits of `action`.
pub mod action {
    pub const QUEUE: u16 = 1;
    pub const BACKMERGE: u16 = 2;
    pub const FRONTMERGE: u16 = 3;
    pub const GETRQ: u16 = 4;
    pub const SLEEPRQ: u16 = 5;
    pub const REQUEUE: u16 = 6;
    pub const ISSUE: u16 = 7;
    pub const COMPLETE: u16 = 8;
    pub const PLUG: u16 = 9;
    pub const UNPLUG_IO: u16 = 10;
    pub const UNPLUG_TIMER: u16 = 11;
    pub const INSERT: u16 = 12;
    pub const SPLIT: u16 = 13;
    pub const BOUNCE: u16 = 14;
    pub const REMAP: u16 = 15;
    pub const ABORT: u16 = 16;
    pub const DRV_DATA: u16 = 17;
    pub const ZONE_PLUG: u16 = 18;
    pub const ZONE_UNPLUG: u16 = 19;
    /// `__BLK_TA_CGROUP`: a cgroup id (8 bytes) precedes the pdu.
    pub const CGROUP_FLAG: u16 = 1 << 8;
}

/// One record. `action` is widened to 64 bits for both versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub version: u8,
    /// Per-CPU event number, incremented before the relay reserve: a gap
    /// within one CPU's stream means records were dropped. Notes carry 0.
    pub sequence: u32,
    pub time_ns: u64,
    pub sector: u64,
    pub bytes: u32,
    pub action: u64,
    pub pid: u32,
    /// Device in the kernel encoding (`bt->dev`).
    pub device: u32,
    pub cpu: u32,
    /// Completion error as the kernel truncated it to 16 bits.
    pub error: u16,
    /// The `pdu_len` bytes after the header (cgroup id first if flagged).
    pub pdu: &'a [u8],
}

impl Record<'_> {
    /// The action code without categories or the cgroup flag.
    pub fn action_code(&self) -> u16 {
        (self.action as u16) & !action::CGROUP_FLAG
    }

    /// The category bits (`enum blktrace_cat`).
    pub fn categories(&self) -> u64 {
        self.action >> CATEGORY_SHIFT
    }

    /// Whether this is a notification (process name, timestamp, message)
    /// rather than an I/O event.
    pub fn is_notify(&self) -> bool {
        self.categories() & category::NOTIFY != 0
    }

    /// Bytes of the record including its pdu.
    pub fn record_bytes(&self) -> usize {
        header_bytes(self.version) + self.pdu.len()
    }

    /// What kind of write the record's I/O is; `None` for reads, data-less
    /// flushes and notifications. Unrecognised category combinations count
    /// as writes.
    pub fn write_kind(&self) -> Option<WriteKind> {
        let categories = self.categories();
        if categories & category::NOTIFY != 0 {
            return None;
        }
        // A passthrough command (`blk_add_trace_rq` sets `BLK_TC_PC` for
        // `blk_rq_is_passthrough` requests and reports sector 0): where it
        // wrote is unknown, whatever its direction (NVMe Write Zeroes is
        // `REQ_OP_DRV_IN`, a "read").
        if categories & category::PC != 0 {
            return Some(WriteKind::Passthrough);
        }
        // Zone categories first: zone open and finish are "reads" by op number.
        if categories & category::ZONE_RESET_ALL != 0 {
            return Some(WriteKind::ZoneResetAll);
        }
        if categories & category::ZONE_RESET != 0 {
            return Some(WriteKind::ZoneReset);
        }
        if categories & (category::ZONE_FINISH | category::ZONE_OPEN | category::ZONE_CLOSE) != 0 {
            return Some(WriteKind::ZoneManagement);
        }
        if categories & category::ZONE_APPEND != 0 {
            return Some(WriteKind::ZoneAppend);
        }
        if categories & category::WRITE != 0 {
            // Secure erase carries DISCARD too and cannot be told apart.
            if categories & category::DISCARD != 0 {
                return Some(WriteKind::Discard);
            }
            if categories & category::WRITE_ZEROES != 0 {
                return Some(WriteKind::WriteZeroes);
            }
            return Some(WriteKind::Write);
        }
        if categories & category::READ != 0 {
            // A read, or a bare flush (READ | FLUSH): no data changes.
            return None;
        }
        Some(WriteKind::Unknown)
    }

    /// The phase of the I/O this record reports, for the actions that mark
    /// the range dirty: queue, issue and completion. Merges, plugs, inserts,
    /// splits and remaps repeat ranges a queue event already reported.
    pub fn phase(&self) -> Option<Phase> {
        match self.action_code() {
            action::QUEUE => Some(Phase::Queue),
            action::ISSUE => Some(Phase::Issue),
            action::COMPLETE => Some(Phase::Complete),
            _ => None,
        }
    }

    /// The write this record reports, if it reports one.
    pub fn write_event(&self) -> Option<WriteEvent> {
        let phase = self.phase()?;
        let kind = self.write_kind()?;
        Some(WriteEvent {
            dev: DevT(self.device),
            sector_first: self.sector,
            // Round up: a partial sector still changes that sector.
            sector_count: u64::from(self.bytes).div_ceil(SECTOR_BYTES),
            kind,
            phase,
            pid: self.pid,
            timestamp_ns: self.time_ns,
            cpu: self.cpu,
            error: i32::from(self.error as i16),
        })
    }
}

fn header_bytes(version: u8) -> usize {
    if version == VERSION_2 {
        HEADER_BYTES_V2
    } else {
        HEADER_BYTES_V1
    }
}

/// Why the stream cannot be parsed further. There is no way to resynchronise
/// a relay stream, so the run must stop trusting this CPU's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlktraceError {
    #[error(
        "bad magic {magic:#010x} at byte {offset_bytes} of the blktrace stream (expected {MAGIC:#010x} | version)"
    )]
    BadMagic { offset_bytes: usize, magic: u32 },
    #[error("unsupported blktrace record version {version} at byte {offset_bytes} (known: 7, 8)")]
    UnsupportedVersion { offset_bytes: usize, version: u8 },
}

/// The result of looking at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole record; `record_bytes` of the buffer belong to it.
    Record {
        record: Record<'a>,
        record_bytes: usize,
    },
    /// The buffer ends inside a record (or is empty); at least `bytes_needed`
    /// bytes in total are required to go on.
    Incomplete { bytes_needed: usize },
}

/// Parses the record at the start of `buf`. Errors carry offset 0.
pub fn parse_record(buf: &[u8]) -> Result<Parsed<'_>, BlktraceError> {
    let Some(magic) = read_u32(buf, 0) else {
        return Ok(Parsed::Incomplete {
            bytes_needed: HEADER_BYTES_V1,
        });
    };
    if magic & MAGIC_MASK != MAGIC {
        return Err(BlktraceError::BadMagic {
            offset_bytes: 0,
            magic,
        });
    }
    let version = magic as u8;
    let header_bytes = match version {
        VERSION_1 => HEADER_BYTES_V1,
        VERSION_2 => HEADER_BYTES_V2,
        _ => {
            return Err(BlktraceError::UnsupportedVersion {
                offset_bytes: 0,
                version,
            });
        }
    };
    if buf.len() < header_bytes {
        return Ok(Parsed::Incomplete {
            bytes_needed: header_bytes,
        });
    }
    // Field offsets of struct blk_io_trace / blk_io_trace2; the header is
    // complete, so every read below is in bounds.
    let (action, pid, device, cpu, error, pdu_len) = if version == VERSION_1 {
        (
            u64::from(read_u32(buf, 28).unwrap_or(0)),
            read_u32(buf, 32).unwrap_or(0),
            read_u32(buf, 36).unwrap_or(0),
            read_u32(buf, 40).unwrap_or(0),
            read_u16(buf, 44).unwrap_or(0),
            read_u16(buf, 46).unwrap_or(0),
        )
    } else {
        (
            read_u64(buf, 32).unwrap_or(0),
            read_u32(buf, 28).unwrap_or(0),
            read_u32(buf, 40).unwrap_or(0),
            read_u32(buf, 44).unwrap_or(0),
            read_u16(buf, 48).unwrap_or(0),
            read_u16(buf, 50).unwrap_or(0),
        )
    };
    let record_bytes = header_bytes + usize::from(pdu_len);
    debug_assert!(record_bytes <= RECORD_BYTES_MAX);
    let Some(pdu) = buf.get(header_bytes..record_bytes) else {
        return Ok(Parsed::Incomplete {
            bytes_needed: record_bytes,
        });
    };
    let record = Record {
        version,
        sequence: read_u32(buf, 4).unwrap_or(0),
        time_ns: read_u64(buf, 8).unwrap_or(0),
        sector: read_u64(buf, 16).unwrap_or(0),
        bytes: read_u32(buf, 24).unwrap_or(0),
        action,
        pid,
        device,
        cpu,
        error,
        pdu,
    };
    Ok(Parsed::Record {
        record,
        record_bytes,
    })
}

/// Iterator over the whole records of a buffer. After it returns `None`,
/// [`Records::bytes_consumed`] tells how much of the buffer was used; the rest
/// is the start of an incomplete record. It stops after the first error.
#[derive(Clone, Debug)]
pub struct Records<'a> {
    buf: &'a [u8],
    bytes_consumed: usize,
    failed: bool,
}

/// Iterates over the records of `buf`.
pub fn records(buf: &[u8]) -> Records<'_> {
    Records {
        buf,
        bytes_consumed: 0,
        failed: false,
    }
}

impl Records<'_> {
    /// Bytes of whole records returned so far.
    pub fn bytes_consumed(&self) -> usize {
        self.bytes_consumed
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, BlktraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = &self.buf[self.bytes_consumed..];
        match parse_record(rest) {
            Ok(Parsed::Record {
                record,
                record_bytes,
            }) => {
                debug_assert!(record_bytes >= HEADER_BYTES_V1 && record_bytes <= rest.len());
                self.bytes_consumed += record_bytes;
                Some(Ok(record))
            }
            Ok(Parsed::Incomplete { .. }) => None,
            Err(error) => {
                self.failed = true;
                Some(Err(with_offset(error, self.bytes_consumed)))
            }
        }
    }
}

fn with_offset(error: BlktraceError, offset: usize) -> BlktraceError {
    match error {
        BlktraceError::BadMagic { magic, .. } => BlktraceError::BadMagic {
            offset_bytes: offset,
            magic,
        },
        BlktraceError::UnsupportedVersion { version, .. } => BlktraceError::UnsupportedVersion {
            offset_bytes: offset,
            version,
        },
    }
}

/// What [`parse_write_events`] got through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ParseProgress {
    /// Bytes of whole records parsed; keep `buf[bytes_consumed..]` for the
    /// next call.
    pub bytes_consumed: usize,
    pub records_parsed: usize,
    /// Write events appended to the output.
    pub events_write: usize,
}

/// Parses whole records from `buf`, appending the writes they report to `out`,
/// and stops after `events_max` writes (a bounded batch), at an incomplete
/// record, or at the end of `buf`.
///
/// Reserve `events_max` in `out` beforehand and this never allocates. On error
/// `out` is left as it was on entry and nothing counts as consumed.
pub fn parse_write_events(
    buf: &[u8],
    out: &mut Vec<WriteEvent>,
    events_max: usize,
) -> Result<ParseProgress, BlktraceError> {
    let out_length_before = out.len();
    let mut progress = ParseProgress::default();
    let mut iter = records(buf);
    while progress.events_write < events_max {
        let Some(record) = iter.next() else {
            break;
        };
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                out.truncate(out_length_before);
                return Err(error);
            }
        };
        progress.records_parsed += 1;
        if let Some(event) = record.write_event() {
            out.push(event);
            progress.events_write += 1;
        }
    }
    progress.bytes_consumed = iter.bytes_consumed();
    debug_assert!(progress.bytes_consumed <= buf.len());
    Ok(progress)
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let end = offset.checked_add(2)?;
    Some(u16::from_ne_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    Some(u32::from_ne_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    let end = offset.checked_add(8)?;
    Some(u64::from_ne_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEV_LOOP0: u32 = 7 << 20;

    /// Builds a version 7 record field by field from the documented layout.
    #[allow(clippy::too_many_arguments)]
    fn record_v1(
        sequence: u32,
        time_ns: u64,
        sector: u64,
        bytes: u32,
        action: u32,
        pid: u32,
        device: u32,
        cpu: u32,
        error: u16,
        pdu: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(MAGIC | u32::from(VERSION_1)).to_ne_bytes());
        out.extend_from_slice(&sequence.to_ne_bytes());
        out.extend_from_slice(&time_ns.to_ne_bytes());
        out.extend_from_slice(&sector.to_ne_bytes());
        out.extend_from_slice(&bytes.to_ne_bytes());
        out.extend_from_slice(&action.to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out.extend_from_slice(&device.to_ne_bytes());
        out.extend_from_slice(&cpu.to_ne_bytes());
        out.extend_from_slice(&error.to_ne_bytes());
        out.extend_from_slice(&(pdu.len() as u16).to_ne_bytes());
        assert_eq!(out.len(), HEADER_BYTES_V1);
        out.extend_from_slice(pdu);
        out
    }

    fn act(code: u16, categories: u64) -> u32 {
        (u64::from(code) | (categories << CATEGORY_SHIFT)) as u32
    }

    fn queue_write(sector: u64, bytes: u32) -> Vec<u8> {
        record_v1(
            1,
            1000,
            sector,
            bytes,
            act(
                action::QUEUE,
                category::WRITE | category::QUEUE | category::SYNC,
            ),
            42,
            DEV_LOOP0,
            0,
            0,
            &[],
        )
    }

    #[test]
    fn header_layout_matches_uapi() {
        // Byte-exact: magic, then sequence at 4, time at 8, sector at 16, bytes at 24,
        // action at 28, pid at 32, device at 36, cpu at 40, error at 44, pdu_len at 46.
        let buf = record_v1(
            0x0102_0304,
            0x1112_1314_1516_1718,
            0x2122_2324_2526_2728,
            0x3132_3334,
            0x4142_4344,
            0x5152_5354,
            0x6162_6364,
            0x7172_7374,
            0x8182,
            &[0xaa, 0xbb, 0xcc],
        );
        assert_eq!(&buf[0..4], &0x6561_7407u32.to_ne_bytes());
        assert_eq!(&buf[28..32], &0x4142_4344u32.to_ne_bytes());
        assert_eq!(&buf[46..48], &3u16.to_ne_bytes());
        let Parsed::Record {
            record,
            record_bytes,
        } = parse_record(&buf).unwrap()
        else {
            panic!("expected a record");
        };
        assert_eq!(record_bytes, 51);
        assert_eq!(record.version, 7);
        assert_eq!(record.sequence, 0x0102_0304);
        assert_eq!(record.time_ns, 0x1112_1314_1516_1718);
        assert_eq!(record.sector, 0x2122_2324_2526_2728);
        assert_eq!(record.bytes, 0x3132_3334);
        assert_eq!(record.action, 0x4142_4344);
        assert_eq!(record.pid, 0x5152_5354);
        assert_eq!(record.device, 0x6162_6364);
        assert_eq!(record.cpu, 0x7172_7374);
        assert_eq!(record.error, 0x8182);
        assert_eq!(record.pdu, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(record.record_bytes(), 51);
    }

    #[test]
    fn version_2_layout() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(MAGIC | u32::from(VERSION_2)).to_ne_bytes());
        buf.extend_from_slice(&9u32.to_ne_bytes()); // sequence
        buf.extend_from_slice(&77u64.to_ne_bytes()); // time
        buf.extend_from_slice(&4096u64.to_ne_bytes()); // sector
        buf.extend_from_slice(&8192u32.to_ne_bytes()); // bytes
        buf.extend_from_slice(&1234u32.to_ne_bytes()); // pid (before action in v2)
        let action = u64::from(action::COMPLETE)
            | ((category::WRITE | category::COMPLETE | category::WRITE_ZEROES) << CATEGORY_SHIFT);
        buf.extend_from_slice(&action.to_ne_bytes());
        buf.extend_from_slice(&DEV_LOOP0.to_ne_bytes()); // device
        buf.extend_from_slice(&1u32.to_ne_bytes()); // cpu
        buf.extend_from_slice(&0u16.to_ne_bytes()); // error
        buf.extend_from_slice(&0u16.to_ne_bytes()); // pdu_len
        buf.extend_from_slice(&[0; 12]); // pad
        assert_eq!(buf.len(), HEADER_BYTES_V2);
        let mut out = Vec::new();
        let progress = parse_write_events(&buf, &mut out, 16).unwrap();
        assert_eq!(progress.bytes_consumed, HEADER_BYTES_V2);
        assert_eq!(
            out,
            vec![WriteEvent {
                dev: DevT(DEV_LOOP0),
                sector_first: 4096,
                sector_count: 16,
                kind: WriteKind::WriteZeroes,
                phase: Phase::Complete,
                pid: 1234,
                timestamp_ns: 77,
                cpu: 1,
                error: 0,
            }]
        );
    }

    #[test]
    fn classify_actions() {
        type Case = (u16, u64, Option<(WriteKind, Phase)>);
        let cases: &[Case] = &[
            (
                action::QUEUE,
                category::WRITE | category::QUEUE,
                Some((WriteKind::Write, Phase::Queue)),
            ),
            (
                action::COMPLETE,
                category::WRITE | category::COMPLETE | category::FUA,
                Some((WriteKind::Write, Phase::Complete)),
            ),
            (
                action::ISSUE,
                category::WRITE | category::ISSUE,
                Some((WriteKind::Write, Phase::Issue)),
            ),
            (
                action::QUEUE,
                category::WRITE | category::DISCARD | category::QUEUE,
                Some((WriteKind::Discard, Phase::Queue)),
            ),
            (
                action::QUEUE | action::CGROUP_FLAG,
                category::WRITE | category::QUEUE,
                Some((WriteKind::Write, Phase::Queue)),
            ),
            // Reads and a bare flush are not writes.
            (action::QUEUE, category::READ | category::QUEUE, None),
            (
                action::COMPLETE,
                category::READ | category::FLUSH | category::COMPLETE,
                None,
            ),
            // Merges repeat what the queue event reported.
            (action::BACKMERGE, category::WRITE | category::QUEUE, None),
            (action::INSERT, category::WRITE | category::QUEUE, None),
            // Notifications are not I/O.
            (0, category::NOTIFY, None),
            // Neither read nor write: unknown, counted as a write.
            (
                action::QUEUE,
                category::QUEUE,
                Some((WriteKind::Unknown, Phase::Queue)),
            ),
            // Version 2 zone categories win over the read direction.
            (
                action::COMPLETE,
                category::READ | category::ZONE_FINISH,
                Some((WriteKind::ZoneManagement, Phase::Complete)),
            ),
            (
                action::COMPLETE,
                category::WRITE | category::ZONE_APPEND,
                Some((WriteKind::ZoneAppend, Phase::Complete)),
            ),
            (
                action::QUEUE,
                category::WRITE | category::ZONE_RESET_ALL,
                Some((WriteKind::ZoneResetAll, Phase::Queue)),
            ),
            // Passthrough, either direction (`REQ_OP_DRV_OUT` is a write,
            // `REQ_OP_DRV_IN` a "read" that may write, e.g. NVMe Write Zeroes).
            (
                action::ISSUE,
                category::WRITE | category::PC,
                Some((WriteKind::Passthrough, Phase::Issue)),
            ),
            (
                action::COMPLETE,
                category::READ | category::PC,
                Some((WriteKind::Passthrough, Phase::Complete)),
            ),
            // Its insertion repeats the issue.
            (action::INSERT, category::WRITE | category::PC, None),
        ];
        for &(code, categories, expected) in cases {
            let record = Record {
                version: VERSION_2,
                sequence: 1,
                time_ns: 0,
                sector: 8,
                bytes: 4096,
                action: u64::from(code) | (categories << CATEGORY_SHIFT),
                pid: 1,
                device: DEV_LOOP0,
                cpu: 0,
                error: 0,
                pdu: &[],
            };
            let got = record.write_event().map(|event| (event.kind, event.phase));
            assert_eq!(got, expected, "code {code} categories {categories:#x}");
        }
    }

    #[test]
    fn stream_with_partial_tail() {
        let mut buf = queue_write(80, 4096);
        buf.extend(record_v1(
            2,
            2000,
            80,
            4096,
            act(action::COMPLETE, category::WRITE | category::COMPLETE),
            0,
            DEV_LOOP0,
            1,
            (-5i16) as u16,
            &[],
        ));
        // A read between them is parsed but not reported.
        buf.extend(record_v1(
            3,
            2500,
            800,
            4096,
            act(action::QUEUE, category::READ | category::QUEUE),
            43,
            DEV_LOOP0,
            0,
            0,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        ));
        let whole_bytes = buf.len();
        let next = queue_write(2048, 65536);
        buf.extend_from_slice(&next[..30]); // cut mid-header
        let mut out = Vec::with_capacity(16);
        let progress = parse_write_events(&buf, &mut out, 16).unwrap();
        assert_eq!(progress.bytes_consumed, whole_bytes);
        assert_eq!(progress.records_parsed, 3);
        assert_eq!(progress.events_write, 2);
        assert_eq!(out[0].sector_first, 80);
        assert_eq!(out[0].sector_count, 8);
        assert_eq!(out[0].phase, Phase::Queue);
        assert_eq!(out[0].pid, 42);
        assert_eq!(out[1].phase, Phase::Complete);
        assert_eq!(out[1].error, -5);
        assert_eq!(out[1].cpu, 1);

        // The caller keeps the tail, appends the rest, and resumes.
        let mut rest = buf[progress.bytes_consumed..].to_vec();
        assert_eq!(
            parse_record(&rest).unwrap(),
            Parsed::Incomplete {
                bytes_needed: HEADER_BYTES_V1
            }
        );
        rest.extend_from_slice(&next[30..]);
        out.clear();
        let progress = parse_write_events(&rest, &mut out, 16).unwrap();
        assert_eq!(progress.bytes_consumed, rest.len());
        assert_eq!((out[0].sector_first, out[0].sector_count), (2048, 128));
    }

    /// What `blk_add_trace_rq` writes for a passthrough write on 6.18:
    /// `BLK_TC_PC` added to the action, sector `blk_rq_trace_sector` = 0,
    /// bytes = the transfer, no pdu.
    #[test]
    fn passthrough_records_are_recognised() {
        let pc_write = act(action::ISSUE, category::WRITE | category::PC);
        let mut buf = record_v1(1, 10, 0, 4096, pc_write, 777, DEV_LOOP0, 0, 0, &[]);
        // Byte-exact: the PC bit (1 << 9) sits at bit 25 of the action word.
        assert_eq!(&buf[28..32], &(7u32 | (1 << 17) | (1 << 25)).to_ne_bytes());
        assert_eq!(&buf[16..24], &0u64.to_ne_bytes());
        buf.extend(queue_write(80, 4096));
        let mut out = Vec::new();
        let progress = parse_write_events(&buf, &mut out, 16).unwrap();
        assert_eq!(progress.events_write, 2);
        assert_eq!(
            (out[0].kind, out[0].phase, out[0].pid, out[0].sector_first),
            (WriteKind::Passthrough, Phase::Issue, 777, 0)
        );
        assert!(!out[0].kind.range_is_exact());
        assert_eq!(out[1].kind, WriteKind::Write);
    }

    #[test]
    fn truncated_pdu_is_incomplete() {
        let buf = record_v1(
            1,
            0,
            0,
            0,
            act(action::QUEUE, category::WRITE),
            0,
            0,
            0,
            0,
            &[9; 20],
        );
        assert_eq!(
            parse_record(&buf[..HEADER_BYTES_V1 + 5]).unwrap(),
            Parsed::Incomplete {
                bytes_needed: HEADER_BYTES_V1 + 20
            }
        );
        assert_eq!(
            parse_record(&[]).unwrap(),
            Parsed::Incomplete {
                bytes_needed: HEADER_BYTES_V1
            }
        );
    }

    #[test]
    fn bad_magic_and_version() {
        let mut buf = queue_write(0, 512);
        let good = buf.len();
        let mut bad = queue_write(8, 512);
        bad[0..4].copy_from_slice(&0xdead_beefu32.to_ne_bytes());
        buf.extend(bad);
        let mut out = vec![];
        assert_eq!(
            parse_write_events(&buf, &mut out, 16),
            Err(BlktraceError::BadMagic {
                offset_bytes: good,
                magic: 0xdead_beef
            })
        );
        assert!(out.is_empty(), "output is restored on error");

        let mut old = queue_write(0, 512);
        old[0..4].copy_from_slice(&(MAGIC | 6).to_ne_bytes());
        assert_eq!(
            parse_record(&old),
            Err(BlktraceError::UnsupportedVersion {
                offset_bytes: 0,
                version: 6
            })
        );
    }

    #[test]
    fn batch_bound_is_respected() {
        let mut buf = Vec::new();
        for index in 0..10 {
            buf.extend(queue_write(index * 8, 4096));
        }
        let mut out = Vec::with_capacity(4);
        let progress = parse_write_events(&buf, &mut out, 4).unwrap();
        assert_eq!(progress.events_write, 4);
        assert_eq!(progress.bytes_consumed, 4 * HEADER_BYTES_V1);
        assert_eq!(out.capacity(), 4, "no reallocation within the bound");
    }

    #[test]
    fn partial_sector_rounds_up() {
        let buf = queue_write(0, 513);
        let mut out = vec![];
        parse_write_events(&buf, &mut out, 1).unwrap();
        assert_eq!(out[0].sector_count, 2);
    }

    proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut out = Vec::new();
            if let Ok(progress) = parse_write_events(&bytes, &mut out, usize::MAX) {
                prop_assert!(progress.bytes_consumed <= bytes.len());
            }
        }

        #[test]
        fn never_panics_on_valid_magic_random_rest(
            version in prop_oneof![Just(VERSION_1), Just(VERSION_2), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = (MAGIC | u32::from(version)).to_ne_bytes().to_vec();
            bytes.extend(rest);
            let mut out = Vec::new();
            let _ = parse_write_events(&bytes, &mut out, usize::MAX);
            for record in records(&bytes).flatten() {
                let _ = record.write_event();
            }
        }

        #[test]
        fn split_anywhere_gives_the_same_events(split in 0usize..200) {
            let mut buf = queue_write(80, 4096);
            buf.extend(queue_write(160, 8192));
            buf.extend(record_v1(5, 0, 1, 512, act(action::QUEUE, category::WRITE), 0, DEV_LOOP0, 0, 0, &[1, 2, 3]));
            let split = split.min(buf.len());
            let mut whole = Vec::new();
            parse_write_events(&buf, &mut whole, usize::MAX).unwrap();
            let mut pieces = Vec::new();
            let first = parse_write_events(&buf[..split], &mut pieces, usize::MAX).unwrap();
            let rest = &buf[first.bytes_consumed..];
            let second = parse_write_events(rest, &mut pieces, usize::MAX).unwrap();
            prop_assert_eq!(first.bytes_consumed + second.bytes_consumed, buf.len());
            prop_assert_eq!(whole, pieces);
        }
    }
}
