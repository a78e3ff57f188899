//! Live write-event sources: the kernel interfaces read while imaging, turned
//! into [`WriteEvent`]s for the imaged range.
//!
//! Two sources implement [`EventSource`]:
//!
//! - [`TracefsSource`]: a private tracefs instance with the block tracepoints
//!   `block_bio_queue`, `block_bio_complete` and `block_rq_complete`, filtered
//!   in the kernel to the disk (and to sectors below the range's end, reads
//!   excluded), read as binary ring-buffer pages from
//!   `per_cpu/cpuN/trace_pipe_raw`. Works under kernel lockdown. Pages are
//!   read with `read(2)` by default; io_uring is available
//!   ([`TracefsSource::use_io_uring`]) but 6 times slower on 6.18, because
//!   io_uring waits for data on an empty pipe and each read needs a linked
//!   timeout (see `reader.rs`).
//! - [`BlktraceSource`]: the classic `BLKTRACESETUP` relay stream the original
//!   tool used, read through io_uring in 256 KiB reads. Its debugfs files
//!   cannot be opened under lockdown.
//!
//! [`open_source`] picks one ([`SourceKind::Auto`]: blktrace, else tracefs,
//! with the reason) and starts it: when it returns, every write submitted
//! afterwards is traced. Dropping the source stops tracing and removes what it
//! set up, on every path including unwinding; [`cleanup_stale_instances`]
//! removes tracefs instances of runs that were killed.
//!
//! # What a drain guarantees
//!
//! [`EventSource::drain`] reads every CPU's buffer until the kernel says it is
//! empty (or until more pages were read than the buffer can hold, which
//! proves every event present at the call was consumed: buffers are FIFO). So
//! every event *committed* to a buffer before `drain` was called is returned.
//!
//! Committed versus emitted: a tracepoint reserves space, writes the event and
//! commits it with preemption disabled, and a CPU's buffer only publishes
//! events up to the oldest reservation still being written. An event that a
//! process-context tracepoint (the submission of a write, `block_bio_queue`)
//! emitted is therefore committed before the tracepoint returns, long before
//! the write can reach the device. Only an event emitted in an interrupt that
//! landed inside another event's reserve..commit window on the same CPU (a
//! completion, typically) stays unpublished until the interrupted event
//! commits, microseconds later. [`EventSource::sync_drain`] closes that gap:
//! it first waits for an RCU grace period (`membarrier`), after which no CPU
//! is still inside a section that was open when it was called, and then
//! drains. Use it for the final round, where "nothing new" ends the run.
//!
//! Pages: a non-blocking read of `trace_pipe_raw` returns the reader page when
//! the writer has left it, or a copy of the events committed on it so far when
//! the writer is still on it (`ring_buffer_read_page`), so a drain never waits
//! for a page to fill. An empty buffer returns `EAGAIN`.
//!
//! # Loss
//!
//! The tracefs instance runs with `options/overwrite` = 0: when a CPU's buffer
//! is full the kernel drops the *new* event and counts it in `dropped events`
//! of `per_cpu/cpuN/stats`. [`EventSource::lost_events`] also adds `overrun`
//! and `commit overrun` (should overwrite ever be on) and the `RB_MISSED_EVENTS`
//! flags of the pages read, plus pages that could not be parsed. blktrace
//! counts its drops in `/sys/kernel/debug/block/DEV/dropped`; the source adds
//! records whose per-CPU sequence number breaks the run (a record copied while
//! the kernel was still writing it: a relay reader can see a reserved record
//! before it is filled) and streams it could not parse. Any loss means a
//! write may have been missed: the run cannot vouch for the image.

mod blktrace;
mod reader;
mod sys;
mod tracefs;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use super::blktrace::BlktraceError;
use super::tracefs::PageError;
use super::{DevT, WriteEvent, WriteKind};

pub use blktrace::{BlktraceSource, open_blktrace};
pub use tracefs::{
    INSTANCE_PREFIX, TRACEFS_ROOT, TracefsSource, cleanup_stale_instances, open_tracefs,
};

/// Which kernel interface to read write events from (`--event-source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SourceKind {
    /// blktrace if its relay files can be opened, tracefs otherwise.
    #[default]
    Auto,
    Tracefs,
    Blktrace,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Auto => "auto",
            SourceKind::Tracefs => "tracefs",
            SourceKind::Blktrace => "blktrace",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SourceKind {
    type Err = String;

    fn from_str(text: &str) -> Result<SourceKind, String> {
        match text {
            "auto" => Ok(SourceKind::Auto),
            "tracefs" => Ok(SourceKind::Tracefs),
            "blktrace" => Ok(SourceKind::Blktrace),
            _ => Err(format!(
                "unknown event source {text:?} (expected auto, tracefs or blktrace)"
            )),
        }
    }
}

/// The range whose writes we want, in the kernel's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceTarget {
    /// Kernel-encoded dev_t of the *whole* disk: the kernel reports a
    /// partition's writes against its disk.
    pub disk: DevT,
    /// Disk-absolute first 512-byte sector of the imaged range (the partition
    /// start, 0 for a whole disk).
    pub sector_first: u64,
    /// Size of the imaged range in 512-byte sectors (rounded up).
    pub sector_count: u64,
}

impl TraceTarget {
    /// One past the last disk-absolute sector of the range.
    pub fn sector_end(&self) -> u64 {
        self.sector_first + self.sector_count
    }

    fn check(&self) -> Result<(), LiveError> {
        if self.sector_count == 0 {
            return Err(LiveError::InvalidTarget(format!(
                "{self:?}: the range is empty"
            )));
        }
        if self.sector_first.checked_add(self.sector_count).is_none() {
            return Err(LiveError::InvalidTarget(format!(
                "{self:?}: the range overflows 64 bits"
            )));
        }
        if self.disk.major() == 0 {
            return Err(LiveError::InvalidTarget(format!(
                "{self:?}: {} is not a block device number",
                self.disk
            )));
        }
        Ok(())
    }

    /// Translates a disk event to the target's own sectors (0 = the first
    /// sector of the range), clipped to the range; `None` if it is not a write
    /// to the range.
    ///
    /// - Another device, or a range entirely outside: `None`.
    /// - An exact range of 0 sectors (an empty preflush write `FWS 0 + 0`, the
    ///   data-less completion after an emulated FUA): `None`, no data.
    /// - A range the event does not describe (zone management, which reports
    ///   the zone start and 0 sectors; an `N` operation of 0 sectors, which is
    ///   what a passthrough command such as `SG_IO` looks like): widened to
    ///   the whole target. Conservative: the block layer cannot tell us what
    ///   such a command changed.
    /// - A range that overflows `u64` is clipped at `u64::MAX` first.
    pub fn clip(&self, event: &WriteEvent) -> Option<WriteEvent> {
        if event.dev != self.disk {
            return None;
        }
        let unbounded = !event.kind.range_is_exact()
            || (event.sector_count == 0
                && matches!(event.kind, WriteKind::Other | WriteKind::Unknown));
        if unbounded {
            return Some(WriteEvent {
                sector_first: 0,
                sector_count: self.sector_count,
                ..*event
            });
        }
        if event.sector_count == 0 {
            return None;
        }
        let event_end = event.sector_end().unwrap_or(u64::MAX);
        let first = event.sector_first.max(self.sector_first);
        let end = event_end.min(self.sector_end());
        if first >= end {
            return None;
        }
        Some(WriteEvent {
            sector_first: first - self.sector_first,
            sector_count: end - first,
            ..*event
        })
    }
}

/// How a source is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Trace buffer per CPU, from `-blktrace.bufsize` × `-blktrace.bufcount`
    /// (65536 × 16 = 1 MiB by default): tracefs `buffer_size_kb`, or blktrace
    /// relay sub-buffers of 64 KiB.
    pub buffer_bytes_per_cpu: u64,
}

impl Default for SourceConfig {
    fn default() -> SourceConfig {
        SourceConfig {
            kind: SourceKind::Auto,
            buffer_bytes_per_cpu: 65536 * 16,
        }
    }
}

/// What one drain read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Events decoded (tracefs: every data event on the pages; blktrace:
    /// every record).
    pub events_read: u64,
    /// Write events appended to the output.
    pub writes_kept: u64,
    /// tracefs pages, or blktrace relay reads, that returned data.
    pub pages_read: u64,
}

/// Totals since the source started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceCounters {
    pub events_read: u64,
    pub writes_kept: u64,
    pub pages_read: u64,
    /// As of the last [`EventSource::lost_events`] call.
    pub lost_events: u64,
}

impl SourceCounters {
    fn add(&mut self, drain: &DrainStats) {
        self.events_read += drain.events_read;
        self.writes_kept += drain.writes_kept;
        self.pages_read += drain.pages_read;
    }
}

/// A running trace of the target's writes.
pub trait EventSource: Send {
    /// `"tracefs"` or `"blktrace"`.
    fn name(&self) -> &'static str;

    /// One line for logs: what is traced where, buffer sizes, read method.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// Reads, on every CPU, every event committed before this call started,
    /// until each per-CPU buffer is empty, and appends the write events (both
    /// phases; reads and data-less flushes are not writes) that overlap the
    /// target range, translated to target-relative sectors and clipped to it
    /// (see [`TraceTarget::clip`]). See the module documentation for the
    /// committed-versus-emitted distinction.
    fn drain(&mut self, out: &mut Vec<WriteEvent>) -> Result<DrainStats, LiveError>;

    /// Like [`EventSource::drain`], but first waits until every event whose
    /// tracepoint *started* before this call is committed (an RCU grace
    /// period, a few milliseconds). After it returns, every write event whose
    /// kernel emission happened before the call is in `out`.
    fn sync_drain(&mut self, out: &mut Vec<WriteEvent>) -> Result<DrainStats, LiveError> {
        sys::wait_for_cpus_quiescent()?;
        self.drain(out)
    }

    /// Events lost so far. Any non-zero value means the run cannot promise
    /// that it saw every write.
    fn lost_events(&mut self) -> Result<u64, LiveError>;

    /// Counts since the start.
    fn counters(&self) -> SourceCounters;
}

/// Everything that can stop a source from starting or from vouching for its
/// trace.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("tracing block I/O needs root (effective uid is {euid}); run hot-clone as root")]
    NotRoot { euid: u32 },
    #[error(
        "tracefs is not available at {path} ({error}); mount it with `mount -t tracefs nodev /sys/kernel/tracing` (the kernel needs CONFIG_FTRACE)"
    )]
    TracefsMissing { path: PathBuf, error: io::Error },
    #[error(
        "the kernel has no block tracepoints ({path} is missing); it needs CONFIG_BLK_DEV_IO_TRACE"
    )]
    BlockEventsMissing { path: PathBuf },
    #[error("blktrace relay files are blocked ({reason}): cannot open {path}")]
    Lockdown { path: PathBuf, reason: String },
    #[error(
        "debugfs is not mounted at /sys/kernel/debug and mounting it failed ({error}); mount it with `mount -t debugfs none /sys/kernel/debug`"
    )]
    DebugfsMissing { error: io::Error },
    #[error(
        "a blktrace session is already active on {disk} (another blktrace, or a killed run of a blktrace-based tool); stop it with `blktrace -k -d /dev/{disk}`"
    )]
    BlktraceBusy { disk: String },
    #[error("invalid trace target {0}")]
    InvalidTarget(String),
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("trace page from CPU {cpu} cannot be parsed, its events are lost: {error}")]
    Page { cpu: u32, error: PageError },
    #[error("blktrace stream of CPU {cpu} cannot be parsed, its events are lost: {error}")]
    Relay { cpu: u32, error: BlktraceError },
    #[error("{op} failed: {error}")]
    Uring { op: &'static str, error: io::Error },
    #[error("CPU {cpu} came online after tracing started; its events are not read")]
    CpuOnline { cpu: u32 },
    #[error("no write-event source could start: blktrace: {blktrace}; tracefs: {tracefs}")]
    NoSource {
        blktrace: Box<LiveError>,
        tracefs: Box<LiveError>,
    },
}

/// Picks and starts a source. [`SourceKind::Auto`] tries blktrace first and
/// falls back to tracefs, returning the one-line reason (e.g. "blktrace relay
/// files are blocked (kernel lockdown: integrity): cannot open ...; using
/// tracefs").
pub fn open_source(
    target: &TraceTarget,
    config: &SourceConfig,
) -> Result<(Box<dyn EventSource>, Option<String>), LiveError> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(LiveError::NotRoot { euid });
    }
    target.check()?;
    match config.kind {
        SourceKind::Tracefs => Ok((Box::new(open_tracefs(target, config)?), None)),
        SourceKind::Blktrace => Ok((Box::new(open_blktrace(target, config)?), None)),
        SourceKind::Auto => match open_blktrace(target, config) {
            Ok(source) => Ok((Box::new(source), None)),
            Err(blktrace) => match open_tracefs(target, config) {
                Ok(source) => Ok((Box::new(source), Some(format!("{blktrace}; using tracefs")))),
                Err(tracefs) => Err(LiveError::NoSource {
                    blktrace: Box::new(blktrace),
                    tracefs: Box::new(tracefs),
                }),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Phase;

    const DISK: DevT = DevT(7 << 20);

    fn event(sector_first: u64, sector_count: u64, kind: WriteKind) -> WriteEvent {
        WriteEvent {
            dev: DISK,
            sector_first,
            sector_count,
            kind,
            phase: Phase::Queue,
            pid: 1,
            timestamp_ns: 2,
            cpu: 0,
            error: 0,
        }
    }

    fn partition() -> TraceTarget {
        TraceTarget {
            disk: DISK,
            sector_first: 2049,
            sector_count: 10_000,
        }
    }

    fn range(event: Option<WriteEvent>) -> Option<(u64, u64)> {
        event.map(|e| (e.sector_first, e.sector_count))
    }

    #[test]
    fn clip_translates_and_clips() {
        let target = partition();
        let clip = |first, count| range(target.clip(&event(first, count, WriteKind::Write)));
        assert_eq!(clip(2049, 8), Some((0, 8)));
        assert_eq!(clip(2049 + 100, 16), Some((100, 16)));
        // Straddling the start and the end.
        assert_eq!(clip(2040, 16), Some((0, 7)));
        assert_eq!(clip(12_040, 16), Some((9_991, 9)));
        assert_eq!(clip(0, 1 << 40), Some((0, 10_000)));
        // Entirely outside, touching the edges.
        assert_eq!(clip(2041, 8), None);
        assert_eq!(clip(12_049, 8), None);
        assert_eq!(clip(0, 8), None);
        // Overflowing ranges are clipped, not dropped.
        assert_eq!(clip(u64::MAX - 4, 100), None);
        assert_eq!(clip(12_000, u64::MAX), Some((9_951, 49)));
    }

    #[test]
    fn clip_other_device_and_empty() {
        let target = partition();
        let mut other = event(2049, 8, WriteKind::Write);
        other.dev = DevT(DISK.0 + 1);
        assert_eq!(target.clip(&other), None);
        // An empty preflush write carries no data.
        assert_eq!(target.clip(&event(0, 0, WriteKind::Write)), None);
        assert_eq!(target.clip(&event(3000, 0, WriteKind::Discard)), None);
        // The flush request's sector, should one ever get here.
        assert_eq!(target.clip(&event(u64::MAX, 0, WriteKind::Write)), None);
    }

    #[test]
    fn clip_widens_unknown_ranges() {
        let target = partition();
        for kind in [
            WriteKind::ZoneReset,
            WriteKind::ZoneResetAll,
            WriteKind::ZoneManagement,
        ] {
            assert_eq!(range(target.clip(&event(4096, 0, kind))), Some((0, 10_000)));
        }
        // Passthrough: N with no sectors.
        assert_eq!(
            range(target.clip(&event(0, 0, WriteKind::Other))),
            Some((0, 10_000))
        );
        // Write-zeroes reported as N with a range is exact.
        assert_eq!(
            range(target.clip(&event(3000, 8, WriteKind::Other))),
            Some((951, 8))
        );
    }

    #[test]
    fn clip_keeps_the_rest_of_the_event() {
        let mut original = event(2049 + 8, 8, WriteKind::Discard);
        original.phase = Phase::Complete;
        original.error = -5;
        let clipped = partition().clip(&original).unwrap();
        assert_eq!(
            clipped,
            WriteEvent {
                sector_first: 8,
                ..original
            }
        );
    }

    #[test]
    fn whole_disk_target() {
        let target = TraceTarget {
            disk: DISK,
            sector_first: 0,
            sector_count: 131_072,
        };
        assert_eq!(
            range(target.clip(&event(80, 8, WriteKind::Write))),
            Some((80, 8))
        );
        assert_eq!(
            range(target.clip(&event(131_064, 100, WriteKind::Write))),
            Some((131_064, 8))
        );
    }

    #[test]
    fn target_checks() {
        assert!(partition().check().is_ok());
        let mut empty = partition();
        empty.sector_count = 0;
        assert!(matches!(empty.check(), Err(LiveError::InvalidTarget(_))));
        let mut overflow = partition();
        overflow.sector_first = u64::MAX;
        assert!(matches!(overflow.check(), Err(LiveError::InvalidTarget(_))));
        let mut no_device = partition();
        no_device.disk = DevT(5);
        assert!(matches!(
            no_device.check(),
            Err(LiveError::InvalidTarget(_))
        ));
    }

    #[test]
    fn source_kind_names() {
        for kind in [SourceKind::Auto, SourceKind::Tracefs, SourceKind::Blktrace] {
            assert_eq!(kind.name().parse::<SourceKind>(), Ok(kind));
        }
        assert!("relay".parse::<SourceKind>().is_err());
    }
}
