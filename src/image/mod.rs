//! `hot-clone image`: images a live block device into a `.hc` stream.
//!
//! # Shape of a run
//!
//! 1. Trace on: a write-event source ([`crate::trace::live`]) starts tracing
//!    the device's writes; a pump thread drains it continuously and marks
//!    each write's blocks in the [`DirtyMap`], inside the source's lock (so a
//!    round that holds the lock knows every drained event is marked).
//! 2. Settle: wait until no write is in flight on the disk. Every write
//!    submitted before tracing started is then complete, so the main pass
//!    reads its data (see "Why no write can be missed").
//! 3. Main pass: the [`Engine`] reads the whole device; each completed read
//!    becomes one self-addressed `S:` section, in completion order. A range
//!    the device cannot read (after `--read-retries`) is split off and
//!    recorded (`bad.rs`); the main pass and every round go on.
//! 4. Catch-up rounds: take-and-clear the dirty set, read it, emit it, until
//!    a round finds nothing new with no write in flight (converged), or the
//!    round limit is reached (unconverged: a `STATE:` record, exit 3).
//! 5. One `B:` record per range whose last read failed (more than
//!    `--max-bad-bytes` ends the run instead), then the END trailer, only
//!    for a run that can vouch for what it captured.
//!    Lost events, a signal, or an error end the stream without one.

pub mod adaptive;
mod bad;
pub mod output;
mod pending;
mod rounds;

pub use pending::{COMPLETION_WAIT_MAX, COMPLETION_WAIT_NONE_SEEN, Completions};

use crate::dirty::{self, DirtyMap};
use crate::engine::{
    Engine, EngineConfig, EngineSettings, ReadDone, ReadStats, Salvage, Unreadable,
};
use crate::format::{Banner, ImageWriter, Meta, REVISION_EXTENDED, RunState, crc32c_of};
use crate::geom::{ByteExtent, SECTOR_BYTES};
use crate::signals::{self, Interrupted};
use crate::source::SourceDevice;
use crate::source::freeze::{self, Frozen, Mount};
use crate::trace::live::{self, EventSource, SourceConfig, TraceTarget};
use crate::trace::{DevT, Phase, WriteEvent};
use crate::units::{Bytes, Rate};
use adaptive::{Controller, LatencyProbe};
use anyhow::{Context, bail};
use bad::BadMap;
use hdrhistogram::Histogram;
use output::ImageOut;
use pending::PendingWrites;
use rounds::{Ending, Look, RoundRead, Rounds, RoundsConfig, World};
use serde::Serialize;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Catch-up rounds at most before the run ends unconverged (`--max-rounds`).
pub const ROUNDS_MAX_DEFAULT: u32 = 32;

/// Re-reads of a block that failed (`--read-retries`): a sector a drive
/// could not read at once sometimes reads on the next try; more tries
/// mostly add seconds per bad block on a dying disk (GNU ddrescue makes
/// none by default and leaves more to later passes).
pub const READ_RETRIES_DEFAULT: u32 = 2;

/// Unreadable bytes at most before the run ends without a trailer
/// (`--max-bad-bytes`). A live, mounted device is mostly readable: a
/// failing disk shows kilobytes to megabytes of bad sectors, and 1 GiB
/// leaves room for far more. A device that fails everywhere (a dead disk
/// answering EIO, a pulled cable) is stopped after 1 GiB of failing reads
/// instead of grinding through terabytes of them, and the bound keeps the
/// list of bad ranges small (at most 262144 at 4 KiB blocks).
pub const MAX_BAD_BYTES_DEFAULT: u64 = 1 << 30;

/// Unreadable ranges listed in the summary and `--stats-json`, and logged
/// as found; the rest are counted.
pub const UNREADABLE_RANGES_LISTED: usize = 16;

/// Dirty-map granularity: a 4 KiB page, the unit every Linux filesystem and
/// the page cache write in, so a block is almost never shared by two
/// unrelated writes; a 512-byte write costs one 4 KiB re-read, which on any
/// device costs the same as a 512-byte one. Devices with larger logical
/// blocks use their block size. At 4 KiB the map needs 1.4 MiB per TiB when
/// 0.1% of the device is written (PERF.md).
pub const DIRTY_BLOCK_BYTES: u32 = 4096;

/// How long to wait, before the main pass, for the disk to have no write in
/// flight. A disk that never pauses for this long cannot be imaged safely.
pub const QUIESCE_WAIT_MAX: Duration = Duration::from_secs(30);

/// With nothing dirty but writes in flight, how long looks wait for them
/// before a round is counted.
pub const ROUND_SETTLE_WAIT_MAX: Duration = Duration::from_secs(1);

/// A catch-up round reads across clean gaps up to this long between dirty
/// extents in one read (`dirty::merge_small_gaps`): on a densely dirtied
/// device this turns many small reads into few sequential ones (PERF.md,
/// "Catch-up").
pub const CATCH_UP_GAP_MERGE_BYTES: u64 = 32 << 10;

/// `--freeze` freezes once a round's dirty set is this small (or the rounds
/// converged, or ran out): the final rounds, read while frozen, then take
/// about as long as reading this much.
pub const FREEZE_DIRTY_BYTES_MAX: u64 = 32 << 20;

/// `--freeze-timeout` by default: the time Windows VSS gives writers to
/// stay frozen (flush-and-hold).
pub const FREEZE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// `--freeze-memory` by default: image bytes held while frozen, written
/// after the thaw.
pub const FREEZE_MEMORY_DEFAULT_BYTES: usize = 256 << 20;

/// What besides a section's data can reach the output with it: the
/// buffered record lines before it, and its header.
const HOLD_SLACK_BYTES: usize = OUTPUT_BUFFER_BYTES + 4096;

/// The image stream as the run writes it.
type Writer = ImageWriter<BufWriter<ImageOut>>;

/// The pump drains the trace at least this often.
const PUMP_INTERVAL: Duration = Duration::from_millis(2);

/// The pump asks the source for lost events at least this often.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Progress lines at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Extents handed to the engine at most this long (it splits them further).
const EXTENT_BYTES_MAX: u64 = 64 << 20;

/// Extents one catch-up look takes at most (plus one leaf's worth): 1 MiB
/// of extent list however many blocks are dirty; a larger dirty set is read
/// in several looks (a pass, `rounds.rs`).
const TAKE_EXTENTS_MAX: usize = 1 << 16;

/// Output buffer for record lines; data of a completed read goes straight
/// through (a buffer this small is flushed before a larger write).
const OUTPUT_BUFFER_BYTES: usize = 64 << 10;

/// Where the image goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    /// Written as a 0600 temporary beside it, renamed onto it when the
    /// image is complete ([`crate::image::output`]); a block device or character
    /// device is written in place.
    File(PathBuf),
}

/// Everything a run needs to know.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    pub device: PathBuf,
    pub output: Output,
    /// Turn every refusal of the output guard ([`crate::image::output`]) and of
    /// source aliases ([`SourceDevice::refuse_aliases`]) off.
    pub force: bool,
    pub engine: EngineConfig,
    pub source: SourceConfig,
    /// Catch-up rounds at most (not counting rounds held by `hold_file`).
    pub rounds_max: u32,
    /// Log every write event on stderr.
    pub print_writes: bool,
    pub stats_json: Option<PathBuf>,
    /// While this file exists, the run keeps catching up instead of ending
    /// (for a workload that will stop soon: remove the file when it has).
    pub hold_file: Option<PathBuf>,
    pub verbose: bool,
    /// Set once the main pass has read the whole device.
    pub main_pass_done: Option<Arc<AtomicBool>>,
    /// Freeze the device's mounted filesystems for the final round.
    pub freeze: bool,
    /// Test hook: while frozen, stay frozen while this file exists (so a
    /// test can interrupt a run while the filesystem is frozen); FILE.frozen
    /// is created once the run holds (stderr is held while frozen).
    pub hold_frozen_file: Option<PathBuf>,
    /// Thaw after this long at most and carry on unfrozen.
    pub freeze_timeout: Duration,
    /// Image bytes held in memory while frozen at most; past it, thaw.
    pub freeze_memory_max: usize,
    /// Pace reads by the workload's write latency (`crate::image::adaptive`).
    pub adaptive: bool,
    /// Bytes the dirty map may take at most; `None` = enough for every
    /// block (34.5 MiB per TiB at 4 KiB blocks, committed as written).
    /// Past the bound, a write that finds no room keeps its 16 MiB region whole
    /// ([`DirtyMap::with_memory_limit`]): the catch-up re-reads more, never
    /// less, than was written.
    pub dirty_map_memory_max: Option<u64>,
    /// Re-reads of each block that fails with a range error (`--read-retries`).
    pub read_retries: u32,
    /// End the run, without a trailer, once more than this many bytes are
    /// unreadable (`--max-bad-bytes`).
    pub max_bad_bytes: u64,
}

impl ImageOptions {
    pub fn new(device: PathBuf, output: Output) -> ImageOptions {
        ImageOptions {
            device,
            output,
            force: false,
            engine: EngineConfig::default(),
            source: SourceConfig::default(),
            rounds_max: ROUNDS_MAX_DEFAULT,
            print_writes: false,
            stats_json: None,
            hold_file: None,
            verbose: false,
            main_pass_done: None,
            freeze: false,
            hold_frozen_file: None,
            freeze_timeout: FREEZE_TIMEOUT_DEFAULT,
            freeze_memory_max: FREEZE_MEMORY_DEFAULT_BYTES,
            adaptive: false,
            dirty_map_memory_max: None,
            read_retries: READ_RETRIES_DEFAULT,
            max_bad_bytes: MAX_BAD_BYTES_DEFAULT,
        }
    }
}

/// How a finished run ended; the image has its trailer either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A final round found nothing new and no write in flight: the image
    /// holds every write completed before that round.
    Converged,
    /// Writes did not quiesce within the round limit; `changed_bytes` of the
    /// image may be older than the device's.
    Unconverged { changed_bytes: u64 },
}

/// The event source cannot vouch for every write (events lost, writes it
/// cannot place, tracing changed from outside): the run cannot vouch for
/// the image, which was left without a trailer. Exit status 4.
#[derive(Debug)]
pub struct EventsLost {
    pub source_name: &'static str,
    pub health: live::TraceHealth,
    pub kept: u64,
    pub buffer: Bytes,
}

/// The device does not report where its writes complete, and `--freeze`
/// was not asked for: no round can prove that a write racing a read was
/// read again. The image was ended without a trailer.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} does not report where its writes complete: {}; without that the run cannot prove that a write racing a read was read again, so the image was ended without its END trailer. Devices like this (brd, NVMe multipath heads, md/dm devices whose completions name a member) can be imaged with --freeze, which stops the filesystem's writes for the final round, or image the device underneath",
    device.display(),
    match sector_first {
        Some(sector) => format!(
            "a write at sector {sector} of it has had no completion event for {:.1}s ({matched_total} completions matched so far)",
            waited.as_secs_f64()
        ),
        None => format!("more writes were left without a completion than the run can track ({matched_total} completions matched)"),
    }
)]
pub struct CompletionsMissing {
    pub device: PathBuf,
    pub sector_first: Option<u64>,
    pub waited: Duration,
    pub matched_total: u64,
}

impl std::fmt::Display for EventsLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} trace cannot vouch for every write ({} seen): {}; some writes may be missing, so the image was ended without its END trailer",
            self.source_name, self.kept, self.health
        )?;
        if self.health.tampered.is_some() {
            f.write_str("; leave tracing alone while imaging (do not run `trace-cmd reset` or change tracefs) and image again")?;
        }
        if self.health.unplaceable > 0 {
            f.write_str("; stop the tool issuing passthrough commands while imaging (smartd, nvme-cli, sg3_utils, hdparm and the like; --freeze does not stop them) and image again")?;
        }
        if self.health.lost > 0 {
            write!(
                f,
                "; give the trace more buffer (e.g. -blktrace.bufsize 1048576 -blktrace.bufcount 64, now {} per CPU) or image while the disk is less busy",
                self.buffer
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for EventsLost {}

/// More of the device could not be read than `--max-bad-bytes` allows (or
/// than the run can track): the image was ended without a trailer.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} could not be read in {} (more than {} in {range_count} ranges, the first at byte offset {first_offset_bytes}){}, so the image was ended without its END trailer. The device may be failing: to keep what reads, image it again with a larger --max-bad-bytes (and --read-retries 0 to spend less time on each bad block), or rescue it with GNU ddrescue first",
    device.display(),
    Bytes(*bad_bytes),
    Bytes(*max_bad_bytes),
    if *ranges_full { format!("; the run tracks at most {} separate ranges", bad::RANGES_MAX) } else { String::new() }
)]
pub struct TooManyUnreadable {
    pub device: PathBuf,
    pub bad_bytes: u64,
    pub max_bad_bytes: u64,
    pub range_count: usize,
    pub first_offset_bytes: u64,
    pub ranges_full: bool,
}

/// Ranges the device could not read, in `--stats-json` and the summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UnreadableStats {
    /// Maximal ranges, each a `B:` record in the image.
    pub range_count: u64,
    pub bytes: u64,
    /// The first [`UNREADABLE_RANGES_LISTED`] ranges, by offset.
    pub ranges: Vec<ByteRange>,
    /// `--read-retries` and `--max-bad-bytes`.
    pub read_retries: u32,
    pub max_bad_bytes: u64,
    /// Chunks whose read failed and were re-read in pieces and blocks, the
    /// reads that took, and of them the retries of a failing block.
    pub chunks_salvaged: u64,
    pub salvage_reads: u64,
    pub retry_reads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

impl std::fmt::Display for UnreadableStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unreadable range{}, {} ({} bytes): ",
            self.range_count,
            if self.range_count == 1 { "" } else { "s" },
            Bytes(self.bytes),
            self.bytes
        )?;
        for (index, range) in self.ranges.iter().enumerate() {
            let sep = if index == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}bytes {}..{}",
                range.offset_bytes,
                range.offset_bytes + range.len_bytes
            )?;
        }
        if self.range_count > self.ranges.len() as u64 {
            write!(
                f,
                ", ... ({} more)",
                self.range_count - self.ranges.len() as u64
            )?;
        }
        Ok(())
    }
}

/// What one run did, for `--stats-json` and the summary.
#[derive(Clone, Debug, Serialize)]
pub struct RunStats {
    pub device: PathBuf,
    pub device_bytes: u64,
    pub logical_block_bytes: u32,
    pub dirty_block_bytes: u32,
    pub event_source: String,
    pub engine: EngineStats,
    pub quiesce_wait_seconds: f64,
    pub main_pass: PassStats,
    pub rounds: Vec<RoundStats>,
    pub catch_up: PassStats,
    pub events: EventStats,
    pub dirty_map_memory_bytes: u64,
    /// `--dirty-map-memory`: the bound, and how often a region had to be
    /// marked whole because the map had reached it.
    pub dirty_map_memory_max_bytes: u64,
    pub dirty_map_whole_region_marks: u64,
    pub image_bytes: u64,
    /// CPU time of the whole process (user + system), from getrusage.
    pub cpu_seconds: f64,
    /// Peak resident memory of the process (read buffers, trace buffers
    /// mapped, dirty map, extents), from getrusage.
    pub max_rss_bytes: u64,
    pub converged: bool,
    /// Bytes that changed during the last round of an unconverged run.
    pub unconverged_changed_bytes: u64,
    /// `--freeze`: the mountpoints frozen for the final round, and for how
    /// long writes to them were blocked.
    pub frozen: Vec<PathBuf>,
    pub freeze_seconds: Option<f64>,
    /// Why the freeze ended before the rounds did (`--freeze-timeout`,
    /// `--freeze-memory`): the image is then not one instant of the
    /// filesystem.
    pub freeze_ended_early: Option<String>,
    /// `--adaptive`: the lowest and highest read rate it set (bytes/s).
    pub adaptive_rate_range: Option<(u64, u64)>,
    /// What the device could not read (each range a `B:` record).
    pub unreadable: UnreadableStats,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineStats {
    pub threads: usize,
    pub queue_depth: u32,
    pub chunk_bytes: u32,
    pub device_kind: String,
    pub registered_buffers: bool,
    pub pool_bytes: usize,
    pub notes: Vec<String>,
}

impl From<&EngineSettings> for EngineStats {
    fn from(s: &EngineSettings) -> EngineStats {
        EngineStats {
            threads: s.threads,
            queue_depth: s.queue_depth,
            chunk_bytes: s.chunk_bytes,
            device_kind: format!("{:?}", s.device_kind),
            registered_buffers: s.registered_buffers,
            pool_bytes: s.pool_bytes,
            notes: s.notes.clone(),
        }
    }
}

/// Reads of one pass (the main pass, or all catch-up rounds together).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassStats {
    pub bytes: u64,
    pub reads: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
    pub latency_us: Latency,
}

/// Read latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        Latency {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p99_9: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "no reads");
        }
        write!(
            f,
            "p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us ({} reads)",
            self.p50, self.p90, self.p99, self.p99_9, self.max, self.count
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundStats {
    pub round: u32,
    /// Dirty bytes taken for this round (whole dirty blocks).
    pub dirty_bytes: u64,
    pub extents: usize,
    pub bytes_read: u64,
    pub seconds: f64,
    /// Writes were still in flight when the round read, so it will read its
    /// extents again.
    pub unsettled: bool,
    /// The hold file existed: the round did not count toward the limit.
    pub held: bool,
    /// `--freeze`: the round read while the filesystems were frozen.
    pub frozen: bool,
    /// Sectors of writes queued and not yet seen complete at the look.
    pub pending_sectors: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EventStats {
    pub events_read: u64,
    pub writes_seen: u64,
    pub pages_read: u64,
    pub lost: u64,
    /// Queue events of writes in the imaged range.
    pub writes_queued: u64,
    /// Completion events that ended a queued write.
    pub completions_matched: u64,
    /// Sectors completed with no write queued there: writes queued before
    /// tracing started, or repeated completions.
    pub completions_unmatched_sectors: u64,
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub stats: RunStats,
}

/// Images a device as `options` say. Returns the verdict of a run that
/// wrote a trailer; every other ending is an error ([`EventsLost`],
/// [`Interrupted`], or what went wrong), after which the image has no
/// trailer and tracing is torn down.
pub fn run(options: &ImageOptions) -> anyhow::Result<Outcome> {
    require_root()?;
    let device = SourceDevice::open(&options.device)?;
    if !options.force {
        device.refuse_aliases()?;
    }
    let mounts = if options.freeze {
        mounts_to_freeze(&device, &options.output)?
    } else {
        Vec::new()
    };
    let (output, placement) = output::open(&options.output, &device, options.force)?;

    match live::cleanup_stale_instances() {
        Ok(removed) if !removed.is_empty() => eprintln!(
            "Removed tracing left behind by a killed run: {}",
            removed.join(", ")
        ),
        Ok(_) => {}
        // Not fatal: a stale instance costs memory, not correctness, and
        // the source reports a missing tracefs itself.
        Err(error) => eprintln!("hot-clone: WARNING: cannot look for stale tracing: {error}"),
    }
    let target = TraceTarget {
        disk: DevT::from_major_minor(device.disk.major, device.disk.minor).with_context(|| {
            format!(
                "{}: device number {} does not fit the kernel's encoding",
                device.path.display(),
                device.disk
            )
        })?,
        sector_first: device.start_sector,
        sector_count: device.size_bytes / SECTOR_BYTES,
    };
    let (source, reason) = live::open_source(&target, &options.source)
        .with_context(|| format!("cannot trace the writes of {}", device.path.display()))?;
    if let Some(reason) = reason {
        eprintln!("Event source: {reason}");
    }
    if options.verbose {
        eprintln!("Event source: {}", source.describe());
    }
    let engine = Engine::new(
        &device,
        EngineConfig {
            // --adaptive sets the rate while reads run.
            paced: options.engine.paced || options.adaptive,
            ..options.engine
        },
    )?;
    let block_bytes = DIRTY_BLOCK_BYTES.max(device.logical_block_bytes);
    let dirty = match options.dirty_map_memory_max {
        None => DirtyMap::new(device.size_bytes, block_bytes),
        Some(bytes_max) => DirtyMap::with_memory_limit(device.size_bytes, block_bytes, bytes_max),
    };

    let banner = Banner {
        revision: REVISION_EXTENDED,
        meta: Meta {
            device_bytes: Some(device.size_bytes),
            logical_block_bytes: Some(u64::from(device.logical_block_bytes)),
            source: Some(device.path.clone()),
            tool: Some(format!("hot-clone/{}", env!("CARGO_PKG_VERSION"))),
        },
    };
    let output_name = match &options.output {
        Output::Stdout => "standard output".to_string(),
        Output::File(path) => path.display().to_string(),
    };
    let writer = ImageWriter::new(
        BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, ImageOut::new(output, output_name)),
        &banner,
    )
    .context("cannot write the image")?;

    let run = Run {
        options,
        device: &device,
        engine,
        dirty,
        traced: Mutex::new(Traced {
            source,
            pending: PendingWrites::default(),
        }),
        completions_missing: Mutex::new(None),
        writer: Mutex::new(Some(writer)),
        stop: AtomicBool::new(false),
        lost: AtomicU64::new(0),
        unclean: Mutex::new(None),
        started: Instant::now(),
        mounts,
        freeze: Mutex::new(FreezeState::default()),
        freeze_seconds: Mutex::new(None),
        probe: Mutex::new(LatencyProbe::default()),
        rates: Mutex::new((u64::MAX, 0)),
        bad: Mutex::new(BadMap::default()),
        bad_nonempty: AtomicBool::new(false),
        bad_logged: AtomicU64::new(0),
        salvage_counts: Mutex::new([0; 3]),
    };
    let result = run.image();
    let writer = lock(&run.writer).take();
    match result {
        Ok((verdict, mut stats)) => {
            let Some(mut writer) = writer else {
                bail!("the image output failed earlier");
            };
            // Thawed by now; anything still held goes out first.
            writer
                .get_mut()
                .get_mut()
                .release()
                .context("cannot write the image")?;
            let (out, trailer) = writer.finish().context("cannot write the image trailer")?;
            out.get_ref()
                .file()
                .sync_data()
                .or_else(ignore_unsyncable)
                .context("cannot flush the image to its file")?;
            stats.image_bytes = trailer.bytes;
            drop(run);
            write_stats(options, &stats)?;
            // Last: FILE appears only for a run that wrote its trailer.
            placement.commit(out.get_ref().file())?;
            Ok(Outcome { verdict, stats })
        }
        Err(error) => {
            if let Some(writer) = writer {
                // Ends the stream without a trailer; the error is what counts.
                let _ = writer.abandon();
            }
            drop(run); // tracing off before anything else is said
            Err(error)
        }
    }
}

/// `sync_data` on a pipe or terminal fails with EINVAL: nothing to sync.
fn ignore_unsyncable(error: io::Error) -> io::Result<()> {
    if error.raw_os_error() == Some(libc::EINVAL) {
        Ok(())
    } else {
        Err(error)
    }
}

/// `--freeze`: the filesystems mounted from the device (or, for a whole
/// disk, its partitions). The image must not go onto one of them: writing it
/// would block on the freeze.
fn mounts_to_freeze(device: &SourceDevice, output: &Output) -> anyhow::Result<Vec<Mount>> {
    let mut devs = vec![device.dev];
    devs.extend(crate::source::blockdev::partitions_of(device.dev));
    let mounts = freeze::mounts_of(&devs)?;
    if mounts.is_empty() {
        bail!(
            "--freeze: no filesystem is mounted from {}, so there is nothing to freeze (without --freeze the image is crash-consistent)",
            device.path.display()
        );
    }
    if let Output::File(path) = output
        && freeze::is_on(path, &mounts)
    {
        bail!(
            "--freeze: the image {} would be written onto a filesystem that the run freezes",
            path.display()
        );
    }
    Ok(mounts)
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no failure mode and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "imaging needs root, to trace the device's writes and read it directly (effective uid is {euid}); run hot-clone as root"
        );
    }
    Ok(())
}

fn write_stats(options: &ImageOptions, stats: &RunStats) -> anyhow::Result<()> {
    if let Some(path) = &options.stats_json {
        let text = serde_json::to_string_pretty(stats).expect("stats serialize");
        output::write_atomically(
            path,
            (text + "\n").as_bytes(),
            "--stats-json",
            options.force,
        )
        .with_context(|| format!("cannot write the run statistics to {}", path.display()))?;
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One imaging run's shared state.
struct Run<'a> {
    options: &'a ImageOptions,
    device: &'a SourceDevice,
    engine: Engine,
    dirty: DirtyMap,
    /// The pump drains under this lock and marks before releasing it; a
    /// look drains and takes under it (see `rounds`).
    traced: Mutex<Traced>,
    /// Set by the pump once the device is found not to report in-range
    /// completions and nothing (no `--freeze`) can stop its writes.
    completions_missing: Mutex<Option<Completions>>,
    /// Lock order: `writer`, then `freeze`.
    writer: Mutex<Option<Writer>>,
    /// Set on loss, signal or a pump error: the engine stops reading.
    stop: AtomicBool,
    lost: AtomicU64,
    /// The last health check that was not clean (counts only grow).
    unclean: Mutex<Option<live::TraceHealth>>,
    started: Instant,
    /// `--freeze`: what to freeze for the final round.
    mounts: Vec<Mount>,
    /// `--freeze`: the freeze, once taken; thawed by the rounds, by the
    /// pump at `--freeze-timeout`, or by a read at `--freeze-memory`.
    freeze: Mutex<FreezeState>,
    freeze_seconds: Mutex<Option<f64>>,
    /// `--adaptive`: the workload's write latencies, fed by every drain.
    probe: Mutex<LatencyProbe>,
    /// `--adaptive`: the lowest and highest rate set.
    rates: Mutex<(u64, u64)>,
    /// What the last read of each block could not read (`bad.rs`).
    bad: Mutex<BadMap>,
    /// `bad` is not empty: only then does a delivery take its lock.
    bad_nonempty: AtomicBool,
    /// Unreadable ranges logged as found (at most UNREADABLE_RANGES_LISTED).
    bad_logged: AtomicU64,
    /// Salvage: chunks salvaged, reads, retry reads, over every pass.
    salvage_counts: Mutex<[u64; 3]>,
}

/// The freeze of one run: taken once, thawed once.
#[derive(Default)]
struct FreezeState {
    frozen: Option<Frozen>,
    ended_early: Option<String>,
}

/// The outcome of waiting for the disk to have no write in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settled {
    /// After the last drain, no write was in flight on the disk.
    Quiet,
    /// Writes stayed in flight for the whole wait.
    Busy,
}

impl Run<'_> {
    fn image(&self) -> anyhow::Result<(Verdict, RunStats)> {
        let pump_done = AtomicBool::new(false);
        let pump_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| {
                if let Err(error) = self.pump(&pump_done) {
                    *lock(&pump_error) = Some(error);
                    self.stop.store(true, Ordering::SeqCst);
                }
            });
            let _stop_pump = SetOnDrop(&pump_done);
            self.passes()
        });
        if let Some(error) = lock(&pump_error).take() {
            return Err(error);
        }
        self.check_events()?;
        result
    }

    /// Main pass and catch-up rounds.
    fn passes(&self) -> anyhow::Result<(Verdict, RunStats)> {
        let quiesce_started = Instant::now();
        if self.settle(QUIESCE_WAIT_MAX)? == Settled::Busy {
            bail!(
                "{} had writes in flight for {}s without a pause; a write submitted before tracing started could be missed, so imaging did not start",
                self.device.path.display(),
                QUIESCE_WAIT_MAX.as_secs()
            );
        }
        let quiesce_wait = quiesce_started.elapsed();

        let settings = self.engine.settings();
        eprintln!(
            "Main pass: {} of {} ({} threads, {} reads of {} in flight each, {} buffers)",
            Bytes(self.device.size_bytes),
            self.device.path.display(),
            settings.threads,
            settings.queue_depth,
            Bytes(u64::from(settings.chunk_bytes)),
            if settings.registered_buffers {
                "registered"
            } else {
                "unregistered"
            }
        );
        for note in &settings.notes {
            eprintln!("Note: {note}");
        }
        let whole = [ByteExtent {
            offset_bytes: 0,
            len_bytes: self.device.size_bytes,
        }];
        let main = self.read_with_progress(&whole)?;
        if let Some(done) = &self.options.main_pass_done {
            done.store(true, Ordering::SeqCst);
        }
        eprintln!(
            "Main pass done: {} in {:.1}s ({}) -- {} dirty sectors{}",
            Bytes(main.bytes_read),
            main.elapsed.as_secs_f64(),
            Rate(main.bytes_read as f64 / main.elapsed.as_secs_f64().max(1e-9)),
            self.dirty_sectors(),
            match main.bytes_unreadable {
                0 => String::new(),
                bytes => format!(", {} unreadable", Bytes(bytes)),
            }
        );

        let mut rounds = Vec::new();
        let mut catch_up_latency = Histogram::<u64>::new(3).expect("histogram");
        let mut catch_up = PassStats::default();
        let (verdict, changed_bytes) = self.catch_up(&mut rounds, &mut catch_up_latency)?;
        let unreadable = self.write_bad_ranges()?;
        for round in &rounds {
            catch_up.bytes += round.bytes_read;
            catch_up.seconds += round.seconds;
        }
        catch_up.reads = catch_up_latency.len();
        catch_up.bytes_per_second = catch_up.bytes as f64 / catch_up.seconds.max(1e-9);
        catch_up.latency_us = Latency::of(&catch_up_latency);

        let (counters, pending) = {
            let traced = lock(&self.traced);
            (
                traced.source.counters(),
                (
                    traced.pending.queued_total(),
                    traced.pending.matched_total(),
                    traced.pending.unmatched_sectors(),
                ),
            )
        };
        let stats = RunStats {
            device: self.device.path.clone(),
            device_bytes: self.device.size_bytes,
            logical_block_bytes: self.device.logical_block_bytes,
            dirty_block_bytes: self.dirty.block_bytes(),
            event_source: lock(&self.traced).source.name().to_string(),
            engine: EngineStats::from(settings),
            quiesce_wait_seconds: quiesce_wait.as_secs_f64(),
            main_pass: pass_stats(&main),
            rounds,
            catch_up,
            events: EventStats {
                events_read: counters.events_read,
                writes_seen: counters.writes_kept,
                pages_read: counters.pages_read,
                lost: self.lost.load(Ordering::SeqCst),
                writes_queued: pending.0,
                completions_matched: pending.1,
                completions_unmatched_sectors: pending.2,
            },
            dirty_map_memory_bytes: self.dirty.memory_bytes(),
            dirty_map_memory_max_bytes: self.dirty.memory_bytes_max(),
            dirty_map_whole_region_marks: self.dirty.coarse_mark_count(),
            image_bytes: 0,
            cpu_seconds: cpu_seconds(),
            max_rss_bytes: max_rss_bytes(),
            converged: verdict == Verdict::Converged,
            unconverged_changed_bytes: changed_bytes,
            frozen: self.mounts.iter().map(|m| m.mountpoint.clone()).collect(),
            freeze_seconds: *lock(&self.freeze_seconds),
            freeze_ended_early: lock(&self.freeze).ended_early.clone(),
            adaptive_rate_range: self.options.adaptive.then(|| *lock(&self.rates)),
            unreadable,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        Ok((verdict, stats))
    }

    /// After the last read: one `B:` record per range whose last read
    /// failed, after every section, so that a restore's zeros there win over
    /// an older section of the same bytes (`bad.rs`).
    fn write_bad_ranges(&self) -> anyhow::Result<UnreadableStats> {
        let bad = lock(&self.bad);
        let mut guard = lock(&self.writer);
        for range in bad.ranges() {
            assert!(
                range.start.is_multiple_of(SECTOR_BYTES)
                    && range.end.is_multiple_of(SECTOR_BYTES)
                    && range.end <= self.device.size_bytes,
                "bad range {range:?} is whole blocks on the device"
            );
            let Some(writer) = guard.as_mut() else {
                bail!("the image output failed earlier");
            };
            let written = writer.write_bad(ByteExtent {
                offset_bytes: range.start,
                len_bytes: range.end - range.start,
            });
            if written.is_err() {
                *guard = None;
            }
            written.context("cannot write the image")?;
        }
        let [chunks_salvaged, salvage_reads, retry_reads] = *lock(&self.salvage_counts);
        Ok(UnreadableStats {
            range_count: bad.len() as u64,
            bytes: bad.bytes(),
            ranges: bad
                .ranges()
                .iter()
                .take(UNREADABLE_RANGES_LISTED)
                .map(|r| ByteRange {
                    offset_bytes: r.start,
                    len_bytes: r.end - r.start,
                })
                .collect(),
            read_retries: self.options.read_retries,
            max_bad_bytes: self.options.max_bad_bytes,
            chunks_salvaged,
            salvage_reads,
            retry_reads,
        })
    }

    /// A read found `unreadable` (after its retries): record it, log the
    /// first few, and fail once more is bad than `--max-bad-bytes` allows.
    fn report_unreadable(&self, unreadable: Unreadable) -> anyhow::Result<()> {
        let range = unreadable.offset_bytes..unreadable.offset_bytes + unreadable.len_bytes;
        let mut bad = lock(&self.bad);
        let fits = bad.insert(range.clone());
        self.bad_nonempty.store(!bad.is_empty(), Ordering::Relaxed);
        if !fits || bad.bytes() > self.options.max_bad_bytes {
            return Err(TooManyUnreadable {
                device: self.device.path.clone(),
                bad_bytes: bad.bytes() + if fits { 0 } else { unreadable.len_bytes },
                max_bad_bytes: self.options.max_bad_bytes,
                range_count: bad.len(),
                first_offset_bytes: bad.ranges().first().map_or(range.start, |r| r.start),
                ranges_full: !fits,
            }
            .into());
        }
        drop(bad);
        let logged = self.bad_logged.fetch_add(1, Ordering::Relaxed);
        if logged < UNREADABLE_RANGES_LISTED as u64 {
            eprintln!(
                "Unreadable: bytes {}..{} of {} ({} bytes): {} after {} retr{} of each block; recorded as a bad range{}",
                range.start,
                range.end,
                self.device.path.display(),
                unreadable.len_bytes,
                io::Error::from_raw_os_error(unreadable.errno),
                self.options.read_retries,
                if self.options.read_retries == 1 {
                    "y"
                } else {
                    "ies"
                },
                if logged + 1 == UNREADABLE_RANGES_LISTED as u64 {
                    " (further ones are counted in the summary)"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// The catch-up rounds ([`rounds`]); returns the verdict and, when
    /// unconverged, the bytes that changed during the last round.
    fn catch_up(
        &self,
        rounds: &mut Vec<RoundStats>,
        latency: &mut Histogram<u64>,
    ) -> anyhow::Result<(Verdict, u64)> {
        let mut policy = Rounds::new(RoundsConfig {
            rounds_max: self.options.rounds_max,
            freeze: !self.mounts.is_empty(),
            freeze_dirty_bytes_max: FREEZE_DIRTY_BYTES_MAX,
            settle_wait_max: ROUND_SETTLE_WAIT_MAX,
            hold_file: self.options.hold_file.clone(),
        });
        let mut world = LiveWorld {
            run: self,
            latency,
            events: Vec::new(),
            cursor: dirty::TakeCursor::new(),
            hold_frozen_said: false,
        };
        match rounds::catch_up(&mut world, &mut policy, rounds, self.device.size_bytes)? {
            Ending::Converged => Ok((Verdict::Converged, 0)),
            Ending::Unconverged { changed_bytes } => {
                Ok((Verdict::Unconverged { changed_bytes }, changed_bytes))
            }
            Ending::NoCompletions(completions) => Err(self.no_completions(completions).into()),
        }
    }

    /// The error for a device whose writes are not seen to complete.
    fn no_completions(&self, completions: Completions) -> CompletionsMissing {
        let Completions::Missing {
            sector_first,
            waited,
            matched_total,
        } = completions
        else {
            unreachable!("called only once completions are missing");
        };
        CompletionsMissing {
            device: self.device.path.clone(),
            sector_first,
            waited,
            matched_total,
        }
    }

    fn held(&self) -> bool {
        self.options.hold_file.as_deref().is_some_and(Path::exists)
    }

    /// Before the main pass: drains the trace (waiting until every event
    /// emitted before the call is readable) and then looks at the disk's
    /// in-flight writes, until none is in flight or `wait_max` has passed.
    /// On a quiet look, with the source's lock still held so no drain comes
    /// between, the pending writes start afresh (`PendingWrites::restart`):
    /// the writes the look saw complete, and later completions are of
    /// writes the trace saw queued.
    fn settle(&self, wait_max: Duration) -> anyhow::Result<Settled> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(50);
        let mut events = Vec::new();
        loop {
            signals::check()?;
            {
                events.clear();
                let mut traced = lock(&self.traced);
                self.drain_locked(&mut traced, true, &mut events)?;
                let (_, writes) = self.device.inflight()?;
                if writes == 0 {
                    traced.pending.restart();
                    return Ok(Settled::Quiet);
                }
            }
            if started.elapsed() >= wait_max {
                return Ok(Settled::Busy);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Reads `extents` into the image.
    fn read(
        &self,
        extents: &[ByteExtent],
        progress: Option<&AtomicU64>,
    ) -> anyhow::Result<ReadStats> {
        let deliver = |done: ReadDone<'_>| -> anyhow::Result<()> {
            // Checksummed on the reading thread, in parallel; only the write
            // itself is serialized.
            let crc = crc32c_of(done.data);
            let mut guard = lock(&self.writer);
            let Some(writer) = guard.as_mut() else {
                bail!("the image output failed earlier");
            };
            if let Err(error) = self.make_room(writer, done.data.len()) {
                *guard = None;
                return Err(error);
            }
            let written =
                writer.write_section_checksummed(done.offset_bytes / SECTOR_BYTES, done.data, crc);
            if written.is_err() {
                // The stream is broken mid-section: nothing more may be
                // written to it, by this read or one completing later.
                *guard = None;
            }
            drop(guard);
            written.context("cannot write the image")?;
            if self.bad_nonempty.load(Ordering::Relaxed) {
                // Read now: its data section overrides an earlier failure.
                let end_bytes = done.offset_bytes + done.data.len() as u64;
                let mut bad = lock(&self.bad);
                if !bad.remove(done.offset_bytes..end_bytes) {
                    return Err(TooManyUnreadable {
                        device: self.device.path.clone(),
                        bad_bytes: bad.bytes(),
                        max_bad_bytes: self.options.max_bad_bytes,
                        range_count: bad.len(),
                        first_offset_bytes: bad.ranges().first().map_or(0, |r| r.start),
                        ranges_full: true,
                    }
                    .into());
                }
                self.bad_nonempty.store(!bad.is_empty(), Ordering::Relaxed);
            }
            Ok(())
        };
        let report = |unreadable: Unreadable| self.report_unreadable(unreadable);
        let salvage = Salvage {
            retries: self.options.read_retries,
            report: &report,
        };
        match self.engine.read_extents_salvaging(
            extents,
            &deliver,
            Some(&salvage),
            progress,
            &self.stop,
        ) {
            Ok(stats) => {
                let mut counts = lock(&self.salvage_counts);
                counts[0] += stats.chunks_salvaged;
                counts[1] += stats.salvage_reads;
                counts[2] += stats.retry_reads;
                Ok(stats)
            }
            Err(error) => {
                // A stop has a cause; report the cause, not the stop.
                signals::check()?;
                self.check_events()?;
                Err(error)
            }
        }
    }

    /// The main pass, with a progress line every second.
    fn read_with_progress(&self, extents: &[ByteExtent]) -> anyhow::Result<ReadStats> {
        let progress = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let total: u64 = extents.iter().map(|e| e.len_bytes).sum();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let started = Instant::now();
                let mut next = started + PROGRESS_INTERVAL;
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    if Instant::now() < next {
                        continue;
                    }
                    next += PROGRESS_INTERVAL;
                    let read = progress.load(Ordering::Relaxed);
                    let rate = read as f64 / started.elapsed().as_secs_f64();
                    let eta = if rate > 0.0 {
                        format!("{:.0}s", total.saturating_sub(read) as f64 / rate)
                    } else {
                        "unknown".to_string()
                    };
                    eprintln!(
                        "Read {} of {} ({}, ETA {eta}) -- {} dirty sectors ({} event drops)",
                        Bytes(read),
                        Bytes(total),
                        Rate(rate),
                        self.dirty_sectors(),
                        self.lost.load(Ordering::Relaxed)
                    );
                }
            });
            // Stops the progress thread on every way out, unwinding too.
            let _stop_progress = SetOnDrop(&done);
            self.read(extents, Some(&progress))
        })
    }

    fn dirty_sectors(&self) -> u64 {
        (self.dirty.count_dirty_blocks() * u64::from(self.dirty.block_bytes()))
            .min(self.device.size_bytes)
            / SECTOR_BYTES
    }

    fn mark_bytes(&self, offset_bytes: u64, len_bytes: u64) {
        self.dirty.mark_sectors(
            offset_bytes / SECTOR_BYTES,
            len_bytes.div_ceil(SECTOR_BYTES),
        );
    }

    fn write_state(&self, state: RunState) -> anyhow::Result<()> {
        let mut guard = lock(&self.writer);
        let Some(writer) = guard.as_mut() else {
            bail!("the image output failed earlier");
        };
        let written = writer.write_state(state);
        if written.is_err() {
            *guard = None;
        }
        written.context("cannot write the image")
    }

    /// Fails with [`EventsLost`] once a health check of the source was not
    /// clean.
    fn check_events(&self) -> anyhow::Result<()> {
        if let Some(completions) = *lock(&self.completions_missing) {
            return Err(self.no_completions(completions).into());
        }
        let Some(health) = lock(&self.unclean).clone() else {
            return Ok(());
        };
        let traced = lock(&self.traced);
        let source = &traced.source;
        Err(EventsLost {
            source_name: source.name(),
            health,
            kept: source.counters().writes_kept,
            buffer: Bytes(self.options.source.buffer_bytes_per_cpu),
        }
        .into())
    }

    /// Drains the trace once, marking every write. `sync` waits first until
    /// every event emitted before the call is readable.
    /// `events` is scratch space the caller keeps, so that draining every
    /// couple of milliseconds allocates nothing once it has grown.
    fn drain(&self, sync: bool, events: &mut Vec<WriteEvent>) -> anyhow::Result<usize> {
        events.clear();
        let mut traced = lock(&self.traced);
        self.drain_locked(&mut traced, sync, events)?;
        if self.options.adaptive {
            let mut probe = lock(&self.probe);
            for event in events.iter() {
                match event.phase {
                    Phase::Queue => probe.queued(event.sector_first, event.timestamp_ns),
                    Phase::Complete => probe.completed(event.sector_first, event.timestamp_ns),
                    Phase::Issue => {}
                }
            }
        }
        // Marked before the lock is released: whoever takes the dirty set
        // after holding this lock sees these writes.
        drop(traced);
        Ok(events.len())
    }

    /// Drains with the lock held: marks every write and updates the
    /// pending writes.
    fn drain_locked(
        &self,
        traced: &mut Traced,
        sync: bool,
        events: &mut Vec<WriteEvent>,
    ) -> anyhow::Result<()> {
        let Traced { source, pending } = traced;
        if sync {
            source.sync_drain(events)
        } else {
            source.drain(events)
        }
        .context("cannot read the trace")?;
        // One CPU's buffer after another: put the batch in time order, so
        // a completion meets the queue event before it (`pending.rs`).
        events.sort_unstable_by_key(|event| event.timestamp_ns);
        let now = Instant::now();
        for event in events.iter() {
            self.mark(event);
            match event.phase {
                Phase::Queue => pending.queued(
                    event.sector_first,
                    event.sector_count,
                    event.timestamp_ns,
                    now,
                ),
                Phase::Complete => pending.completed(
                    event.sector_first,
                    event.sector_count,
                    event.timestamp_ns,
                    now,
                ),
                Phase::Issue => {}
            }
        }
        Ok(())
    }

    fn mark(&self, event: &WriteEvent) {
        self.dirty
            .mark_sectors(event.sector_first, event.sector_count);
        if self.options.print_writes {
            eprintln!(
                "{} {}+{} {:?} pid {} cpu {}{}",
                match event.phase {
                    Phase::Queue => "Q",
                    Phase::Issue => "D",
                    Phase::Complete => "C",
                },
                event.sector_first,
                event.sector_count,
                event.kind,
                event.pid,
                event.cpu,
                if event.error != 0 {
                    format!(" error {}", event.error)
                } else {
                    String::new()
                }
            );
        }
    }

    /// Drains the trace until `done`, checking for loss; on loss or a
    /// signal it sets `stop` so the engine stops reading.
    fn pump(&self, done: &AtomicBool) -> anyhow::Result<()> {
        let mut last_loss_check = Instant::now();
        let mut controller = Controller::new(self.options.engine.max_rate_bytes_per_second);
        let mut last_window = Instant::now();
        let mut events = Vec::new();
        if self.options.adaptive {
            self.set_rate(controller.rate());
        }
        while !done.load(Ordering::SeqCst) {
            if self.options.adaptive
                && last_window.elapsed() >= Duration::from_millis(adaptive::WINDOW_MS)
            {
                last_window = Instant::now();
                let latency = lock(&self.probe).take_window();
                let rate = controller.on_window(latency);
                self.set_rate(rate);
                if self.options.verbose {
                    eprintln!(
                        "Adaptive: workload write latency {} -> reading at {}",
                        latency.map_or("none".to_string(), |l| format!("{l:.0} us")),
                        Rate(rate as f64)
                    );
                }
            }
            if signals::interrupted() {
                self.stop.store(true, Ordering::SeqCst);
            }
            self.check_freeze_timeout()?;
            let drained = self.drain(false, &mut events)?;
            if last_loss_check.elapsed() >= LOSS_CHECK_INTERVAL {
                last_loss_check = Instant::now();
                self.update_lost()?;
            }
            if drained == 0 {
                std::thread::sleep(PUMP_INTERVAL);
            }
        }
        self.update_lost()
    }

    /// Freezes the mounts, holding the image output from just before the
    /// first FIFREEZE (nothing may be written while frozen).
    fn freeze_now(&self) -> anyhow::Result<String> {
        let mut guard = lock(&self.writer);
        let Some(writer) = guard.as_mut() else {
            bail!("the image output failed earlier");
        };
        let out = writer.get_mut().get_mut();
        out.hold(self.options.freeze_memory_max);
        let mut state = lock(&self.freeze);
        assert!(
            state.frozen.is_none() && state.ended_early.is_none(),
            "frozen once per run"
        );
        match Frozen::freeze(&self.mounts) {
            Ok(frozen) => {
                let what = frozen.describe();
                state.frozen = Some(frozen);
                Ok(what)
            }
            Err(error) => {
                drop(state);
                if let Err(release) = out.release() {
                    *guard = None;
                    return Err(release).context("cannot write the image");
                }
                Err(error)
            }
        }
    }

    fn freeze_held(&self) -> bool {
        lock(&self.freeze).frozen.is_some()
    }

    /// Thaws, if frozen. `early`: why the freeze ends before the rounds do,
    /// said loudly; the image is then not one instant of the filesystem.
    /// Callable from any thread; the held output is written by the next
    /// writer ([`Run::make_room`], [`Run::release_output`]).
    fn thaw(&self, early: Option<String>) -> anyhow::Result<()> {
        let mut state = lock(&self.freeze);
        let Some(frozen) = state.frozen.take() else {
            return Ok(());
        };
        let what = frozen.describe();
        let held = frozen.held_for();
        // Stderr is the real one again once this returns.
        let thawed = frozen.thaw();
        eprintln!(
            "Thawed {what}: writes were blocked for {:.0} ms",
            held.as_secs_f64() * 1000.0
        );
        *lock(&self.freeze_seconds) = Some(held.as_secs_f64());
        if let Some(why) = early {
            eprintln!(
                "hot-clone: WARNING: {why}, so {what} was thawed before the final round ended: the image is NOT point-in-time (not one instant of the filesystem); the run goes on unfrozen, and the image is what the trace alone can promise (crash-consistent, as without --freeze)"
            );
            state.ended_early = Some(why);
        }
        thawed.map(|_| ())
    }

    /// The pump's check of `--freeze-timeout`.
    fn check_freeze_timeout(&self) -> anyhow::Result<()> {
        let timeout = self.options.freeze_timeout;
        let expired = lock(&self.freeze)
            .frozen
            .as_ref()
            .is_some_and(|frozen| frozen.held_for() >= timeout);
        if expired {
            self.thaw(Some(format!(
                "the freeze reached --freeze-timeout ({:.1} s)",
                timeout.as_secs_f64()
            )))?;
        }
        Ok(())
    }

    /// Before `len_bytes` of section data go to the output: while frozen,
    /// keeps the output held unless that would pass `--freeze-memory` (then
    /// thaws early); once thawed, writes out what was held.
    fn make_room(&self, writer: &mut Writer, len_bytes: usize) -> anyhow::Result<()> {
        let out = writer.get_mut().get_mut();
        if !out.is_held() {
            return Ok(());
        }
        let max = self.options.freeze_memory_max;
        if self.freeze_held() {
            if out.held_bytes() + len_bytes + HOLD_SLACK_BYTES <= max {
                return Ok(());
            }
            self.thaw(Some(format!(
                "the image held in memory while frozen reached --freeze-memory ({})",
                Bytes(max as u64)
            )))?;
        }
        out.release().context("cannot write the image")
    }

    /// Writes out what was held while frozen, once thawed.
    fn release_output(&self) -> anyhow::Result<()> {
        let mut guard = lock(&self.writer);
        let Some(writer) = guard.as_mut() else {
            return Ok(());
        };
        let out = writer.get_mut().get_mut();
        if !out.is_held() || self.freeze_held() {
            return Ok(());
        }
        let released = out.release();
        if released.is_err() {
            *guard = None;
        }
        released.context("cannot write the image")
    }

    fn set_rate(&self, bytes_per_second: u64) {
        self.engine.set_rate_limit(bytes_per_second);
        let mut rates = lock(&self.rates);
        rates.0 = rates.0.min(bytes_per_second);
        rates.1 = rates.1.max(bytes_per_second);
    }

    fn update_lost(&self) -> anyhow::Result<()> {
        let (health, completions) = {
            let mut traced = lock(&self.traced);
            let health = traced.source.health().context("cannot check the trace")?;
            (health, traced.pending.completions(Instant::now()))
        };
        if self.mounts.is_empty() && matches!(completions, Completions::Missing { .. }) {
            // No freeze can end this device's writes: the run cannot vouch
            // for an image, so stop reading now rather than after the pass.
            *lock(&self.completions_missing) = Some(completions);
            self.stop.store(true, Ordering::SeqCst);
        }
        self.lost.store(health.lost, Ordering::SeqCst);
        if !health.is_clean() {
            *lock(&self.unclean) = Some(health);
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// The trace source and what its events say is in flight, under one lock.
struct Traced {
    source: Box<dyn EventSource>,
    pending: PendingWrites,
}

/// The catch-up rounds' view of a live run ([`rounds::World`]).
struct LiveWorld<'r, 'a> {
    run: &'r Run<'a>,
    latency: &'r mut Histogram<u64>,
    events: Vec<WriteEvent>,
    /// Where the current pass's next bounded take starts.
    cursor: dirty::TakeCursor,
    /// The hold-frozen hook's marker file was made.
    hold_frozen_said: bool,
}

impl World for LiveWorld<'_, '_> {
    fn check(&mut self) -> anyhow::Result<()> {
        signals::check()?;
        self.run.check_events()
    }

    fn look(&mut self, extents: &mut Vec<ByteExtent>) -> anyhow::Result<Look> {
        let run = self.run;
        // Thawed early by the pump (timeout): what was held goes out.
        run.release_output()?;
        self.events.clear();
        let (dirty_bytes, pass_whole, pending, completions) = {
            // Drain and take under one hold of the lock: no pump drain can
            // mark a block between what this look saw and what it took.
            let mut traced = lock(&run.traced);
            run.drain_locked(&mut traced, true, &mut self.events)?;
            let mut pass_whole = self.cursor.is_finished();
            if pass_whole {
                self.cursor = dirty::TakeCursor::new();
            }
            let mut dirty_bytes = run.dirty.take_bounded(
                &mut self.cursor,
                extents,
                EXTENT_BYTES_MAX,
                TAKE_EXTENTS_MAX,
            );
            if extents.is_empty() && !pass_whole {
                // The rest of this pass was clean; what was marked behind
                // it is in the next one, which starts now: "took nothing"
                // must mean the whole map.
                pass_whole = true;
                self.cursor = dirty::TakeCursor::new();
                dirty_bytes = run.dirty.take_bounded(
                    &mut self.cursor,
                    extents,
                    EXTENT_BYTES_MAX,
                    TAKE_EXTENTS_MAX,
                );
            }
            let now = Instant::now();
            (
                dirty_bytes,
                pass_whole,
                traced.pending.summary(),
                traced.pending.completions(now),
            )
        };
        dirty::merge_small_gaps(extents, CATCH_UP_GAP_MERGE_BYTES);
        // An extra check after the take, never the proof: it misses writes
        // in a plug, the scheduler, rq-qos or a tag wait (`blk_mq_in_flight`
        // counts started requests only).
        let (_, writes_in_flight) = run.device.inflight()?;
        // After the take: held now means held since the freeze (a freeze
        // that ended is never taken again).
        let frozen = run.freeze_held();
        let hold_frozen = frozen
            && run
                .options
                .hold_frozen_file
                .as_deref()
                .is_some_and(Path::exists);
        if hold_frozen && !self.hold_frozen_said {
            // Test hook: stderr is held while frozen, so say it in a file
            // beside the hold file (never on a frozen filesystem: the test
            // puts it elsewhere).
            self.hold_frozen_said = true;
            if let Some(file) = &run.options.hold_frozen_file {
                let mut said = file.as_os_str().to_owned();
                said.push(".frozen");
                let _ = std::fs::write(said, b"");
            }
        }
        Ok(Look {
            dirty_bytes,
            extent_count: extents.len(),
            pass_complete: self.cursor.is_finished(),
            pass_whole: pass_whole && self.cursor.is_finished(),
            pending,
            completions,
            writes_in_flight,
            held: !frozen && run.held(),
            hold_frozen,
            frozen,
            now: Instant::now(),
        })
    }

    fn put_back(&mut self, extents: &[ByteExtent]) {
        for extent in extents {
            self.run.mark_bytes(extent.offset_bytes, extent.len_bytes);
        }
    }

    fn read(&mut self, extents: &[ByteExtent]) -> anyhow::Result<RoundRead> {
        let stats = self.run.read(extents, None)?;
        self.latency
            .add(&stats.latency_us)
            .expect("histograms agree");
        Ok(RoundRead {
            bytes_read: stats.bytes_read,
            seconds: stats.elapsed.as_secs_f64(),
        })
    }

    fn freeze(&mut self) -> anyhow::Result<String> {
        self.run.freeze_now()
    }

    fn thaw(&mut self) -> anyhow::Result<()> {
        let thawed = self.run.thaw(None);
        let released = self.run.release_output();
        thawed.and(released)
    }

    fn dirty_bytes(&mut self) -> u64 {
        self.run.dirty.count_dirty_blocks() * u64::from(self.run.dirty.block_bytes())
    }

    fn mark_unconverged(&mut self, changed_bytes: u64) -> anyhow::Result<()> {
        self.run
            .write_state(RunState::Unconverged { changed_bytes })
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Sets the flag when dropped: a helper thread's stop signal that also
/// fires when its scope unwinds.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// getrusage(RUSAGE_SELF).
fn own_usage() -> libc::rusage {
    // SAFETY: getrusage fills the struct we pass; zeroed is a valid start.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    }
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let usage = own_usage();
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn max_rss_bytes() -> u64 {
    // Linux reports ru_maxrss in KiB.
    u64::try_from(own_usage().ru_maxrss).unwrap_or(0) * 1024
}

fn pass_stats(stats: &ReadStats) -> PassStats {
    let seconds = stats.elapsed.as_secs_f64();
    PassStats {
        bytes: stats.bytes_read,
        reads: stats.reads,
        seconds,
        bytes_per_second: stats.bytes_read as f64 / seconds.max(1e-9),
        latency_us: Latency::of(&stats.latency_us),
    }
}

/// Prints the end-of-run summary on stderr.
pub fn print_summary(outcome: &Outcome) {
    let stats = &outcome.stats;
    eprintln!(
        "Summary: main pass {} at {}; read latency {}",
        Bytes(stats.main_pass.bytes),
        Rate(stats.main_pass.bytes_per_second),
        stats.main_pass.latency_us
    );
    eprintln!(
        "Summary: catch-up {} rounds, {} re-read; read latency {}",
        stats.rounds.len(),
        Bytes(stats.catch_up.bytes),
        stats.catch_up.latency_us
    );
    eprintln!(
        "Summary: {} write events seen, {} lost ({}); dirty map {}{}",
        stats.events.writes_seen,
        stats.events.lost,
        stats.event_source,
        Bytes(stats.dirty_map_memory_bytes),
        match stats.dirty_map_whole_region_marks {
            0 => String::new(),
            marks => format!(" (at its bound: {marks} regions marked whole, re-read in full)"),
        }
    );
    if let Some(seconds) = stats.freeze_seconds {
        eprintln!(
            "Summary: froze {} for {:.0} ms{}",
            stats
                .frozen
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            seconds * 1000.0,
            match &stats.freeze_ended_early {
                Some(why) => format!(
                    ", thawed early ({why}): the image is NOT point-in-time, only crash-consistent"
                ),
                None => String::new(),
            }
        );
    }
    if stats.unreadable.range_count > 0 {
        eprintln!(
            "Summary: {} (B: records; restored as zeros); {} chunks re-read block by block, {} retries",
            stats.unreadable, stats.unreadable.chunks_salvaged, stats.unreadable.retry_reads
        );
    }
    eprintln!(
        "Summary: image {} in {:.1}s{}",
        Bytes(stats.image_bytes),
        stats.seconds,
        match outcome.verdict {
            Verdict::Converged => String::new(),
            Verdict::Unconverged { changed_bytes } =>
                format!(", NOT converged ({} may be stale)", Bytes(changed_bytes)),
        }
    );
}

/// Is `error` (or a cause of it) a stop for a signal?
pub fn is_interrupted(error: &anyhow::Error) -> bool {
    error.chain().any(|c| c.is::<Interrupted>())
}
