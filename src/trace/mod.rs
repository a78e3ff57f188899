//! Write-event sources and their pure record parsers.
//!
//! Two kernel interfaces report the block I/O we must not miss while imaging:
//!
//! - [`tracefs`]: the block tracepoints (`block_bio_queue`, `block_bio_complete`,
//!   `block_rq_complete`, `block_rq_issue`) read as binary ring-buffer pages from
//!   `per_cpu/cpuN/trace_pipe_raw` of a private tracefs instance. Works on
//!   kernels in lockdown mode.
//! - [`blktrace`]: the classic `struct blk_io_trace` relay stream behind
//!   `BLKTRACESETUP`, what the original tool used. Its debugfs files cannot be
//!   opened under lockdown, so it is the fallback.
//!
//! Both parsers take bytes (`&[u8]`/`&str`) and do no I/O, so they can be unit
//! tested on captured fixtures, fuzzed and benched. Both reduce what they read to
//! [`WriteEvent`]: a device, a 512-byte sector range, what kind of write it was
//! and whether it was seen at submission or at completion.
//!
//! Which operations count as writes is decided in one place, [`classify_rwbs`]
//! (tracefs) and [`blktrace::Record::write_kind`] (relay), by the same rule:
//! every operation except a read and a flush that carries no data may change
//! the device's contents, including discards, secure erases, write-zeroes, zone
//! management and anything this code does not recognise. Counting an unknown
//! operation as a write costs one extra re-read; missing a real write costs a
//! corrupt image.

pub mod blktrace;
pub mod tracefs;

use std::fmt;

/// A device number in the kernel's internal encoding, `major << 20 | minor`
/// (`MINORBITS` = 20), as trace events carry it and as tracefs filters
/// (`dev == N`) compare it. This is *not* the userspace `dev_t` of `stat(2)`;
/// convert with [`DevT::from_userspace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevT(pub u32);

impl DevT {
    /// Bits of the minor number in the kernel encoding.
    pub const MINOR_BITS: u32 = 20;
    /// Largest major number the kernel encoding can hold (12 bits).
    pub const MAJOR_MAX: u32 = (1 << (32 - Self::MINOR_BITS)) - 1;
    /// Largest minor number the kernel encoding can hold (20 bits).
    pub const MINOR_MAX: u32 = (1 << Self::MINOR_BITS) - 1;

    /// Encodes `major:minor`; `None` if either does not fit the kernel encoding.
    pub fn from_major_minor(major: u32, minor: u32) -> Option<DevT> {
        if major > Self::MAJOR_MAX || minor > Self::MINOR_MAX {
            return None;
        }
        Some(DevT((major << Self::MINOR_BITS) | minor))
    }

    /// Converts a userspace `dev_t` (`st_rdev`, glibc's 64-bit encoding as in
    /// `gnu_dev_major`/`gnu_dev_minor`) to the kernel encoding; `None` if the
    /// numbers do not fit it.
    pub fn from_userspace(dev: u64) -> Option<DevT> {
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let major = u32::try_from(major).ok()?;
        let minor = u32::try_from(minor).ok()?;
        Self::from_major_minor(major, minor)
    }

    /// The major number.
    pub fn major(self) -> u32 {
        self.0 >> Self::MINOR_BITS
    }

    /// The minor number.
    pub fn minor(self) -> u32 {
        self.0 & Self::MINOR_MAX
    }
}

impl fmt::Display for DevT {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.major(), self.minor())
    }
}

/// What kind of data-changing operation an event reports. Reads and bare
/// flushes are not represented: they are not writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// `W`: an ordinary write (with or without FUA or a preflush).
    Write,
    /// `D`: a discard; the range may read back as anything afterwards.
    Discard,
    /// `DE`: a secure erase.
    SecureErase,
    /// Write-zeroes. Kernels up to at least 6.18 report it as `N` in tracefs
    /// (so tracefs yields [`WriteKind::Other`]); blktrace v2 records have a
    /// category bit for it, and later kernels may print `WZ`.
    WriteZeroes,
    /// `ZA`: zone append; the sector is the zone start at queue time.
    ZoneAppend,
    /// `ZR`: zone reset; the event's range does not describe the zone (see
    /// [`WriteKind::range_is_exact`]).
    ZoneReset,
    /// `ZRA`: reset of every zone of the device.
    ZoneResetAll,
    /// `ZO`, `ZC`, `ZF`: zone open, close and finish. Counted as writes because
    /// a finish moves the write pointer; the range is not exact.
    ZoneManagement,
    /// `N`: an operation the kernel prints no letter for (write-zeroes,
    /// driver-private operations).
    Other,
    /// Letters or categories this code does not know; counted as a write.
    Unknown,
    /// A passthrough command (SG_IO, an NVMe ioctl, io_uring `uring_cmd`):
    /// the driver executes a command the block layer does not interpret, so
    /// the event carries no usable range. tracefs: `N` at sector
    /// `(sector_t)-1` (`block_rq_complete` takes `blk_rq_pos`, and a
    /// passthrough request keeps the `-1` `blk_mq_alloc_request` gave it) or
    /// `N` with 0 sectors (`block_rq_issue` takes `blk_rq_trace_sector` and
    /// `blk_rq_trace_nr_sectors`, 0 for passthrough); blktrace: a record with
    /// the `PC` category, at sector 0 (`blk_add_trace_rq`). Direction does
    /// not help: NVMe Write Zeroes (opcode 0x08) is `REQ_OP_DRV_IN`, the
    /// "read" direction (`nvme_req_op`). Such a write cannot be re-read, so
    /// a consumer must not widen it: the run cannot vouch for its image.
    Passthrough,
}

impl WriteKind {
    /// Whether `sector_first`/`sector_count` of an event of this kind cover
    /// exactly the sectors whose contents may have changed. Zone management
    /// operations report the zone start (or 0) with a count of 0: a caller must
    /// widen them to the zone, or the whole device for
    /// [`WriteKind::ZoneResetAll`], or declare the run untrustworthy.
    pub fn range_is_exact(self) -> bool {
        !matches!(
            self,
            WriteKind::ZoneReset
                | WriteKind::ZoneResetAll
                | WriteKind::ZoneManagement
                | WriteKind::Passthrough
        )
    }
}

/// Where in an I/O's life an event was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Submitted to the block layer (`block_bio_queue`, blktrace `Q`). The data
    /// may not be on the device yet.
    Queue,
    /// Handed to the driver (`block_rq_issue`, blktrace `D`).
    Issue,
    /// Completed by the device (`block_bio_complete`, `block_rq_complete`,
    /// blktrace `C`). A completion can cover several merged bios, or only the
    /// part of a request that finished.
    Complete,
}

/// One data-changing block I/O as reported by a trace source.
///
/// Queue and completion events do not pair one-to-one (bios merge into
/// requests, requests complete in parts, flushes carry no data), so a consumer
/// marks the range dirty on every event rather than counting them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteEvent {
    /// The device, in the kernel encoding. For a partition this is the whole
    /// disk, and `sector_first` is disk-absolute.
    pub dev: DevT,
    /// First 512-byte sector touched.
    pub sector_first: u64,
    /// Number of 512-byte sectors touched; 0 for a data-less operation such as
    /// an empty preflush write.
    pub sector_count: u64,
    pub kind: WriteKind,
    pub phase: Phase,
    /// The task that was current when the event fired: the submitter for queue
    /// events, often an interrupt or kernel thread for completions.
    pub pid: u32,
    /// Trace clock time in nanoseconds (tracefs: the instance's `trace_clock`,
    /// `local` by default, `mono` (CLOCK_MONOTONIC) in the live source's
    /// instances; blktrace: `ktime_get`, also CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// CPU whose buffer held the event.
    pub cpu: u32,
    /// Completion status as a negative errno, 0 on success and for non-completion
    /// events. A failed write may still have changed some sectors.
    pub error: i32,
}

impl WriteEvent {
    /// One past the last sector touched; `None` if the range would overflow
    /// `u64` (a malformed or data-less event: the kernel reports flush requests
    /// at sector `u64::MAX` with a count of 0).
    pub fn sector_end(&self) -> Option<u64> {
        self.sector_first.checked_add(self.sector_count)
    }
}

/// Classifies a tracefs `rwbs` string (as filled by the kernel's
/// `blk_fill_rwbs`): `None` for reads and data-less flushes, the kind of write
/// otherwise. Stops at the first NUL, so the raw `char rwbs[N]` field can be
/// passed as is.
///
/// `blk_fill_rwbs` (kernel/trace/blktrace.c, 6.18) writes, in order:
/// an optional `F` for `REQ_PREFLUSH`; exactly one operation, `W` write, `D`
/// discard, `DE` secure erase, `F` flush, `R` read, `ZA` zone append, `ZR`/`ZRA`
/// zone reset (all), `ZF` zone finish, `ZO` zone open, `ZC` zone close, `N`
/// anything else (write-zeroes among them); then flag letters `F` FUA, `A`
/// read-ahead, `S` sync, `M` meta, `U` atomic. Observed on loop: `WS`, `WFS`
/// (O_DSYNC write, FUA), `FWS` (empty preflush write from fsync), `FF` (the
/// flush request at completion), `DS`, `NS` (write-zeroes), `RS`, `RA`.
pub fn classify_rwbs(rwbs: &[u8]) -> Option<WriteKind> {
    let length = rwbs.iter().position(|&b| b == 0).unwrap_or(rwbs.len());
    let rwbs = &rwbs[..length];
    // Skip the preflush marker. A leading 'F' is the preflush only when an
    // operation letter follows; otherwise it is the flush operation itself
    // ("F", "FS", "FF": no data either way).
    let operation = match rwbs {
        [b'F', next, ..] if is_operation_letter(*next) => &rwbs[1..],
        _ => rwbs,
    };
    match operation {
        [] => Some(WriteKind::Unknown),
        [b'R', ..] => None,
        [b'F', ..] => None,
        [b'W', b'Z', ..] => Some(WriteKind::WriteZeroes),
        [b'W', ..] => Some(WriteKind::Write),
        [b'D', b'E', ..] => Some(WriteKind::SecureErase),
        [b'D', ..] => Some(WriteKind::Discard),
        [b'Z', b'A', ..] => Some(WriteKind::ZoneAppend),
        [b'Z', b'R', b'A', ..] => Some(WriteKind::ZoneResetAll),
        [b'Z', b'R', ..] => Some(WriteKind::ZoneReset),
        [b'Z', b'F' | b'O' | b'C', ..] => Some(WriteKind::ZoneManagement),
        [b'N', ..] => Some(WriteKind::Other),
        _ => Some(WriteKind::Unknown),
    }
}

/// Letters that can start the operation part of an rwbs string after a
/// preflush `F`.
fn is_operation_letter(letter: u8) -> bool {
    matches!(letter, b'W' | b'D' | b'R' | b'Z' | b'N')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_t_kernel_encoding() {
        let dev = DevT::from_major_minor(7, 0).unwrap();
        assert_eq!(dev.0, 7_340_032); // 7 << 20, as the tracefs filter wants it
        assert_eq!((dev.major(), dev.minor()), (7, 0));
        assert_eq!(dev.to_string(), "7,0");
        let dev = DevT::from_major_minor(259, 65_537).unwrap();
        assert_eq!((dev.major(), dev.minor()), (259, 65_537));
        assert_eq!(DevT::from_major_minor(4096, 0), None);
        assert_eq!(DevT::from_major_minor(0, 1 << 20), None);
    }

    #[test]
    fn dev_t_from_userspace_matches_libc() {
        for (major, minor) in [
            (7u32, 0u32),
            (7, 3),
            (8, 17),
            (259, 0),
            (252, 1),
            (511, 300),
        ] {
            let user = libc::makedev(major, minor);
            let dev = DevT::from_userspace(user).unwrap();
            assert_eq!((dev.major(), dev.minor()), (major, minor));
        }
        // A major beyond 12 bits is representable in userspace but not in the kernel.
        assert_eq!(DevT::from_userspace(libc::makedev(5000, 0)), None);
    }

    #[test]
    fn rwbs_reads_and_bare_flushes_are_not_writes() {
        for rwbs in [
            "R", "RS", "RA", "RAS", "RM", "RSM", "F", "FS", "FF", "FFS", "FR", "FRS",
        ] {
            assert_eq!(classify_rwbs(rwbs.as_bytes()), None, "{rwbs}");
        }
    }

    #[test]
    fn rwbs_writes() {
        let cases: &[(&str, WriteKind)] = &[
            ("W", WriteKind::Write),
            ("WS", WriteKind::Write),
            ("WFS", WriteKind::Write),
            ("WF", WriteKind::Write),
            ("FW", WriteKind::Write),
            ("FWS", WriteKind::Write),
            ("FWFSM", WriteKind::Write),
            ("WSU", WriteKind::Write),
            ("D", WriteKind::Discard),
            ("DS", WriteKind::Discard),
            ("FD", WriteKind::Discard),
            ("DE", WriteKind::SecureErase),
            ("DES", WriteKind::SecureErase),
            ("N", WriteKind::Other),
            ("NS", WriteKind::Other),
            ("FN", WriteKind::Other),
            ("WZ", WriteKind::WriteZeroes),
            ("WZS", WriteKind::WriteZeroes),
            ("ZA", WriteKind::ZoneAppend),
            ("ZAS", WriteKind::ZoneAppend),
            ("ZR", WriteKind::ZoneReset),
            ("ZRA", WriteKind::ZoneResetAll),
            ("ZRS", WriteKind::ZoneReset),
            ("ZF", WriteKind::ZoneManagement),
            ("ZO", WriteKind::ZoneManagement),
            ("ZC", WriteKind::ZoneManagement),
            ("", WriteKind::Unknown),
            ("X", WriteKind::Unknown),
            ("?S", WriteKind::Unknown),
            ("Z", WriteKind::Unknown),
        ];
        for &(rwbs, kind) in cases {
            assert_eq!(classify_rwbs(rwbs.as_bytes()), Some(kind), "{rwbs}");
        }
    }

    #[test]
    fn rwbs_stops_at_nul() {
        assert_eq!(classify_rwbs(b"RS\0\0\0\0\0\0\0\0"), None);
        assert_eq!(classify_rwbs(b"WS\0R\0\0\0\0\0\0"), Some(WriteKind::Write));
        assert_eq!(classify_rwbs(b"\0WS"), Some(WriteKind::Unknown));
    }

    #[test]
    fn zone_ranges_are_not_exact() {
        assert!(WriteKind::Write.range_is_exact());
        assert!(WriteKind::Discard.range_is_exact());
        assert!(!WriteKind::ZoneReset.range_is_exact());
        assert!(!WriteKind::ZoneResetAll.range_is_exact());
        assert!(!WriteKind::Passthrough.range_is_exact());
    }

    #[test]
    fn sector_end_overflow() {
        let mut event = WriteEvent {
            dev: DevT(0),
            sector_first: 10,
            sector_count: 8,
            kind: WriteKind::Write,
            phase: Phase::Queue,
            pid: 0,
            timestamp_ns: 0,
            cpu: 0,
            error: 0,
        };
        assert_eq!(event.sector_end(), Some(18));
        event.sector_first = u64::MAX;
        assert_eq!(event.sector_end(), None);
    }
}
pub mod live;
