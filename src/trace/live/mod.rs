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
//! of `per_cpu/cpuN/stats`. [`EventSource::health`] also adds `overrun`
//! and `commit overrun` (should overwrite ever be on) and the `RB_MISSED_EVENTS`
//! flags of the pages read, plus pages that could not be parsed. blktrace
//! counts its drops in `/sys/kernel/debug/block/DEV/dropped`; the source adds
//! records whose per-CPU sequence number breaks the run (a record copied while
//! the kernel was still writing it: a relay reader can see a reserved record
//! before it is filled) and streams it could not parse. Any loss means a
//! write may have been missed: the run cannot vouch for the image.
//!
//! # Health
//!
//! Loss is one of three things [`EventSource::health`] reports; any of them
//! ends the run without a trailer (exit 4):
//!
//! - lost events (above);
//! - writes the trace cannot place: passthrough commands
//!   ([`WriteKind::Passthrough`], see [`TraceTarget::clip`] for why they are
//!   not widened), with the best-named one (pid and comm of an issue event);
//! - tampering: the trace's control files (tracefs: `tracing_on`, each
//!   event's `enable` and `filter`, buffer size and mode, CPU mask, pid
//!   filters, clock; blktrace: `/sys/block/DISK/trace/*`) no longer read as
//!   they did right after setup, or the instance is gone. Such a change moves
//!   no loss counter (`echo 0 > tracing_on`, `trace-cmd reset`), so it has to
//!   be looked for.
//!
//! # CPUs
//!
//! The tracefs source reads every *possible* CPU, so a CPU that comes online
//! and goes offline between two drains cannot take unread events with it
//! (see `PipeRead::NoBufferYet` in tracefs.rs for the kernel's behaviour).
//! blktrace's relay files exist only for CPUs online since setup; a CPU that
//! comes online later is an error ([`LiveError::CpuOnline`]).

mod blktrace;
pub mod foreground;
mod integrity;
mod reader;
mod sys;
mod tracefs;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use super::blktrace::BlktraceError;
use super::tracefs::PageError;
use super::{DevT, Phase, WriteEvent, WriteKind};

pub use blktrace::{BlktraceSource, open_blktrace};
pub use tracefs::{
    INSTANCE_PREFIX, Identity, InstanceName, StaleAction, TRACEFS_ROOT, TracefsSource,
    cleanup_stale_instances, open_tracefs, stale_action,
};

/// This process's [`Identity`] (pid, boot id, pid namespace), as instance
/// names carry it; for tests and tools that need to name an instance.
pub fn current_identity() -> Result<Identity, LiveError> {
    Ok(Identity {
        pid: std::process::id(),
        boot: sys::boot_id()?,
        pid_namespace: sys::pid_namespace()?,
    })
}

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
    /// sector of the range), clipped to the range.
    ///
    /// - Another device, or a range entirely outside: [`Clipped::Outside`].
    /// - An exact range of 0 sectors (an empty preflush write `FWS 0 + 0`, the
    ///   data-less completion after an emulated FUA): `Outside`, no data.
    /// - A passthrough command on the disk ([`WriteKind::Passthrough`]: `N`
    ///   at sector `u64::MAX` or with 0 sectors, blktrace `PC`), wherever it
    ///   claims to be: [`Clipped::Unplaceable`]. Widening it to the whole
    ///   range, as this did before, does not make the image right: a
    ///   passthrough request is invisible to `/sys/block/DEV/inflight`
    ///   (`blk_mq_check_inflight` counts only `RQF_IO_STAT` requests, and
    ///   `blk_account_io_start` never sets it on passthrough), it has
    ///   no queue event at submission (it never passes `submit_bio`), so a
    ///   final round can neither wait for it nor see it coming, and the
    ///   block layer cannot say whether it wrote this disk's data at all
    ///   (an NVMe Format or a vendor command may change everything).
    /// - Zone management (reset, open, close, finish: the zone start and 0
    ///   sectors): widened to the whole target. These are ordinary block
    ///   requests: queued through `submit_bio` (so `block_bio_queue` reports
    ///   them before they run) and counted in flight like any write, so the
    ///   catch-up re-reads the range after they complete; only their extent
    ///   is unknown here (no zone size), and they are rare (the filesystem of
    ///   a zoned disk issues them). A consumer that knows the zone size could
    ///   narrow them.
    /// - A range that overflows `u64` is clipped at `u64::MAX` first.
    pub fn clip(&self, event: &WriteEvent) -> Clipped {
        if event.dev != self.disk {
            return Clipped::Outside;
        }
        if event.kind == WriteKind::Passthrough {
            return Clipped::Unplaceable;
        }
        if !event.kind.range_is_exact() {
            return Clipped::Write(WriteEvent {
                sector_first: 0,
                sector_count: self.sector_count,
                ..*event
            });
        }
        if event.sector_count == 0 {
            return Clipped::Outside;
        }
        let event_end = event.sector_end().unwrap_or(u64::MAX);
        let first = event.sector_first.max(self.sector_first);
        let end = event_end.min(self.sector_end());
        if first >= end {
            return Clipped::Outside;
        }
        Clipped::Write(WriteEvent {
            sector_first: first - self.sector_first,
            sector_count: end - first,
            ..*event
        })
    }
}

/// What [`TraceTarget::clip`] made of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clipped {
    /// Not a write to the range (another device, outside, no data).
    Outside,
    /// A write to the range, in target-relative sectors.
    Write(WriteEvent),
    /// A write to the disk whose range the trace cannot give: counted, and
    /// the run cannot vouch for its image.
    Unplaceable,
}

impl Clipped {
    /// The write, if it is one to the range.
    pub fn write(self) -> Option<WriteEvent> {
        match self {
            Clipped::Write(event) => Some(event),
            Clipped::Outside | Clipped::Unplaceable => None,
        }
    }
}

/// The first write a source could not place, for the message that ends
/// the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaceable {
    /// The submitting task, where the event names it (a queue or issue
    /// event); `None` for a completion, whose pid is whatever task the
    /// interrupt found running.
    pub pid: Option<u32>,
    /// The submitting task's name, where known.
    pub comm: Option<String>,
    /// tracefs `rwbs` letters, or `PC` and the direction for blktrace.
    pub rwbs: String,
    /// The sector the event reported (`u64::MAX` for a tracefs completion).
    pub sector: u64,
    pub cpu: u32,
    pub phase: Phase,
}

impl Unplaceable {
    /// From an event [`TraceTarget::clip`] called unplaceable, with the
    /// task name if the event carried one.
    pub fn from_event(event: &WriteEvent, rwbs: String, comm: Option<String>) -> Unplaceable {
        let submitter = event.phase != Phase::Complete;
        Unplaceable {
            pid: submitter.then_some(event.pid),
            comm: if submitter { comm } else { None },
            rwbs,
            sector: event.sector_first,
            cpu: event.cpu,
            phase: event.phase,
        }
    }

    /// Whether this one names its submitter better than `other`.
    fn names_more_than(&self, other: &Unplaceable) -> bool {
        let rank = |u: &Unplaceable| u8::from(u.pid.is_some()) + u8::from(u.comm.is_some());
        rank(self) > rank(other)
    }
}

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::Queue => "queued",
            Phase::Issue => "issued",
            Phase::Complete => "completed",
        };
        match (self.pid, &self.comm) {
            (Some(pid), Some(comm)) => write!(f, "by pid {pid} ({comm})")?,
            (Some(pid), None) => write!(f, "by pid {pid}")?,
            (None, _) => f.write_str("by an unknown process (only its completion was seen)")?,
        }
        let sector = if self.sector == u64::MAX {
            "-1".to_string()
        } else {
            self.sector.to_string()
        };
        write!(
            f,
            ", {phase} on CPU {} as `{}` at sector {sector}",
            self.cpu, self.rwbs
        )
    }
}

/// Unplaceable writes seen so far: a count and the best-named one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnplaceableLog {
    pub count: u64,
    pub first: Option<Unplaceable>,
}

impl UnplaceableLog {
    /// Counts `count` unplaceable writes, of which `seen` is one, and keeps
    /// `seen` if it names its submitter better than the one kept (an issue
    /// event's pid and comm beat a completion's nothing).
    pub fn note(&mut self, count: u64, seen: Option<Unplaceable>) {
        self.count += count;
        let Some(seen) = seen else {
            return;
        };
        let better = match &self.first {
            None => true,
            Some(first) => seen.names_more_than(first),
        };
        if better {
            self.first = Some(seen);
        }
    }
}

/// Whether a source's trace can still vouch for every write: see
/// [`EventSource::health`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHealth {
    /// Events lost (buffer full, torn records, unparsable pages).
    pub lost: u64,
    /// Write events whose range the trace cannot give (passthrough).
    pub unplaceable: u64,
    pub first_unplaceable: Option<Unplaceable>,
    /// What changed in the trace's setup since it started, if anything did
    /// (tracing switched off, an event disabled, a filter replaced, the
    /// instance removed): a sentence naming the file and both values.
    pub tampered: Option<String>,
}

impl TraceHealth {
    /// Nothing lost, nothing unplaceable, nothing changed.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.unplaceable == 0 && self.tampered.is_none()
    }
}

impl fmt::Display for TraceHealth {
    /// What went wrong, one clause per problem, joined by "; "; "clean" if
    /// nothing did.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return f.write_str("clean");
        }
        let mut separator = "";
        if let Some(tampered) = &self.tampered {
            write!(
                f,
                "tracing was changed from outside: {tampered} (another tool, e.g. `trace-cmd reset` or a script writing to tracefs, switched tracing off or changed what it records)"
            )?;
            separator = "; ";
        }
        if self.unplaceable > 0 {
            write!(
                f,
                "{separator}{} write(s) the trace cannot place: passthrough commands (SG_IO, NVMe ioctls or io_uring passthrough, which bypass the block layer's sector accounting)",
                self.unplaceable
            )?;
            if let Some(first) = &self.first_unplaceable {
                write!(f, ", the first {first}")?;
            }
            separator = "; ";
        }
        if self.lost > 0 {
            write!(f, "{separator}lost {} write events", self.lost)?;
        }
        Ok(())
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
    /// As of the last [`EventSource::health`] call.
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

    /// Whether the trace still sees every write: events lost so far,
    /// writes it could not place (passthrough commands), and whether its
    /// setup was changed from outside since it started (see each source).
    /// Anything but [`TraceHealth::is_clean`] means the run cannot promise
    /// that its image holds every write. Cheap enough to call every 100 ms:
    /// a few small reads of tracefs or sysfs files.
    fn health(&mut self) -> Result<TraceHealth, LiveError>;

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
    #[error(
        "CPU {cpu} came online after blktrace started; its relay file is not read, so its events are lost (the tracefs source reads every possible CPU: use --event-source tracefs)"
    )]
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

    fn range(clipped: Clipped) -> Option<(u64, u64)> {
        clipped.write().map(|e| (e.sector_first, e.sector_count))
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
        assert_eq!(target.clip(&other), Clipped::Outside);
        // An empty preflush write carries no data.
        assert_eq!(
            target.clip(&event(0, 0, WriteKind::Write)),
            Clipped::Outside
        );
        assert_eq!(
            target.clip(&event(3000, 0, WriteKind::Discard)),
            Clipped::Outside
        );
        // The flush request's sector, should one ever get here.
        assert_eq!(
            target.clip(&event(u64::MAX, 0, WriteKind::Write)),
            Clipped::Outside
        );
        // A passthrough command on another disk is not ours.
        let mut other = event(u64::MAX, 8, WriteKind::Passthrough);
        other.dev = DevT(DISK.0 + 1);
        assert_eq!(target.clip(&other), Clipped::Outside);
    }

    #[test]
    fn clip_widens_zone_management() {
        let target = partition();
        for kind in [
            WriteKind::ZoneReset,
            WriteKind::ZoneResetAll,
            WriteKind::ZoneManagement,
        ] {
            assert_eq!(range(target.clip(&event(4096, 0, kind))), Some((0, 10_000)));
        }
    }

    #[test]
    fn clip_calls_passthrough_unplaceable_wherever_it_claims_to_be() {
        let target = partition();
        // Completion at (sector_t)-1, issue at 0 (before the partition),
        // blktrace PC at 0 with bytes, and one claiming a sector inside.
        for (sector, count) in [(u64::MAX, 8), (u64::MAX, 0), (0, 0), (0, 8), (2100, 8)] {
            assert_eq!(
                target.clip(&event(sector, count, WriteKind::Passthrough)),
                Clipped::Unplaceable,
                "{sector} + {count}"
            );
        }
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
        let clipped = partition().clip(&original).write().unwrap();
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

    fn unplaceable(phase: Phase, comm: Option<&str>) -> Unplaceable {
        let mut seen = event(u64::MAX, 0, WriteKind::Passthrough);
        seen.phase = phase;
        seen.pid = 4321;
        Unplaceable::from_event(&seen, "N".to_string(), comm.map(str::to_string))
    }

    #[test]
    fn a_completion_names_nobody_and_an_issue_names_its_submitter() {
        let completion = unplaceable(Phase::Complete, Some("irq"));
        assert_eq!((completion.pid, completion.comm.as_deref()), (None, None));
        let issue = unplaceable(Phase::Issue, Some("smartd"));
        assert_eq!(
            (issue.pid, issue.comm.as_deref()),
            (Some(4321), Some("smartd"))
        );
        assert_eq!(
            issue.to_string(),
            "by pid 4321 (smartd), issued on CPU 0 as `N` at sector -1"
        );
        let mut log = UnplaceableLog::default();
        log.note(1, Some(completion.clone()));
        log.note(2, Some(issue.clone()));
        log.note(1, Some(completion.clone()));
        log.note(1, None);
        assert_eq!(log.count, 5);
        assert_eq!(log.first, Some(issue));
    }

    #[test]
    fn health_is_clean_only_without_loss_unplaceable_writes_or_changes() {
        let clean = TraceHealth::default();
        assert!(clean.is_clean());
        assert_eq!(clean.to_string(), "clean");
        let lost = TraceHealth {
            lost: 3,
            ..TraceHealth::default()
        };
        assert!(!lost.is_clean());
        assert_eq!(lost.to_string(), "lost 3 write events");
        let passthrough = TraceHealth {
            unplaceable: 2,
            first_unplaceable: Some(unplaceable(Phase::Issue, Some("nvme"))),
            ..TraceHealth::default()
        };
        assert!(!passthrough.is_clean());
        let text = passthrough.to_string();
        assert!(text.contains("2 write(s) the trace cannot place"), "{text}");
        assert!(text.contains("by pid 4321 (nvme)"), "{text}");
        let tampered = TraceHealth {
            tampered: Some("tracing_on is 0, was 1".to_string()),
            lost: 1,
            ..TraceHealth::default()
        };
        assert!(!tampered.is_clean());
        let text = tampered.to_string();
        assert!(
            text.starts_with("tracing was changed from outside: tracing_on is 0, was 1"),
            "{text}"
        );
        assert!(text.ends_with("; lost 1 write events"), "{text}");
    }

    #[test]
    fn source_kind_names() {
        for kind in [SourceKind::Auto, SourceKind::Tracefs, SourceKind::Blktrace] {
            assert_eq!(kind.name().parse::<SourceKind>(), Ok(kind));
        }
        assert!("relay".parse::<SourceKind>().is_err());
    }
}
