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

//!
//! # Modules, along the data flow
//!
//! This file is the wiring: the run's start (root check, source, trace,
//! output) and its end (trailer or abandon). `pump.rs` drains the trace
//! into the dirty map; `world.rs` is what the catch-up rounds
//! (`rounds.rs`, the policy) see of the run; `reads.rs` puts what the
//! engine read into the image; `frozen.rs` is `--freeze`; `output.rs` is
//! where the image goes; `stats.rs` and `report.rs` count and tell;
//! `yielding.rs` keeps out of other programs' way; `error.rs` is how a
//! run fails.

mod bad;
mod error;
mod frozen;
pub mod output;
mod pending;
mod pump;
mod reads;
mod report;
mod rounds;
mod stats;
mod world;
pub mod yielding;

pub use error::{CompletionsMissing, EventsLost, ImageError, TooManyUnreadable};
pub use pending::{COMPLETION_WAIT_MAX, COMPLETION_WAIT_NONE_SEEN, Completions};
pub use report::{ending, print_summary};
pub use stats::{
    ByteRange, EngineStats, EventStats, Latency, PassStats, RoundStats, RunStats,
    UNREADABLE_RANGES_LISTED, UnreadableStats,
};
pub use world::CATCH_UP_GAP_MERGE_BYTES;

use crate::dirty::{self, DirtyMap};
use crate::engine::{Engine, EngineConfig, ReadStats};
use crate::format::{Banner, ImageWriter, Meta, REVISION_EXTENDED};
use crate::geom::{ByteExtent, SECTOR_BYTES};
use crate::signals;
use crate::source::SourceDevice;
use crate::source::freeze::{self, Mount};
use crate::trace::DevT;
use crate::trace::live::foreground::{DiskstatsWrites, TracefsForeground};
use crate::trace::live::{self, EventSource, SourceConfig, TraceTarget};
use crate::units::{Bytes, Rate};
use anyhow::{Context, bail};
use frozen::FreezeState;
use hdrhistogram::Histogram;
use output::{ImageOut, Placement};
use pending::PendingWrites;
use reads::UnreadableRanges;
use rounds::{Ending, Rounds, RoundsConfig};
use stats::{Usage, YieldStats};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use world::LiveWorld;

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

/// While settling, the first pause between looks at the disk's in-flight
/// writes, and the longest (each pause doubles).
const SETTLE_PAUSE_FIRST: Duration = Duration::from_micros(50);
const SETTLE_PAUSE_MAX: Duration = Duration::from_millis(5);

/// With nothing dirty but writes in flight, how long looks wait for them
/// before a round is counted.
pub const ROUND_SETTLE_WAIT_MAX: Duration = Duration::from_secs(1);

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

/// The image stream as the run writes it.
type Writer = ImageWriter<BufWriter<ImageOut>>;

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

/// How much memory the dirty map may take (`--dirty-map-memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyMapMemory {
    /// Enough for every block (34.5 MiB per TiB at 4 KiB blocks, committed
    /// as written).
    #[default]
    Unbounded,
    /// At most this many bytes. Past the bound, a write that finds no room
    /// keeps its 16 MiB region whole ([`DirtyMap::with_memory_limit`]): the
    /// catch-up re-reads more, never less, than was written.
    AtMost(u64),
}

impl DirtyMapMemory {
    /// The flag's spelling: 0 is no bound.
    pub fn from_flag(bytes: u64) -> DirtyMapMemory {
        match bytes {
            0 => DirtyMapMemory::Unbounded,
            bytes => DirtyMapMemory::AtMost(bytes),
        }
    }
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
    /// Set once the main pass has read the whole device.
    pub main_pass_done: Option<Arc<AtomicBool>>,
    /// Freeze the device's mounted filesystems for the final round.
    pub freeze: bool,
    /// Test hook: while frozen, stay frozen while this file exists (so a
    /// test can interrupt a run while the filesystem is frozen); FILE.frozen
    /// is created once the run holds (stderr is held while frozen).
    #[cfg(feature = "test-hooks")]
    pub hold_frozen_file: Option<PathBuf>,
    /// Thaw after this long at most and carry on unfrozen.
    pub freeze_timeout: Duration,
    /// Image bytes held in memory while frozen at most; past it, thaw.
    pub freeze_memory_max: usize,
    /// Yield to other programs' I/O on the disk (`yielding.rs`): the
    /// default; false = `--full-speed`.
    pub yield_to_foreground: bool,
    pub dirty_map_memory: DirtyMapMemory,
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
            main_pass_done: None,
            freeze: false,
            #[cfg(feature = "test-hooks")]
            hold_frozen_file: None,
            freeze_timeout: FREEZE_TIMEOUT_DEFAULT,
            freeze_memory_max: FREEZE_MEMORY_DEFAULT_BYTES,
            yield_to_foreground: true,
            dirty_map_memory: DirtyMapMemory::Unbounded,
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

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub stats: RunStats,
}

/// Images a device as `options` say. Returns the verdict of a run that
/// wrote a trailer; every other ending is an [`ImageError`], after which
/// the image has no trailer and tracing is torn down.
pub fn run(options: &ImageOptions) -> Result<Outcome, ImageError> {
    // Dropped in reverse: the run (tracing off) before the placement.
    let (placement, run) = start(options)?;
    let result = run.image();
    let writer = lock(&run.writer).take();
    match result {
        Ok((verdict, mut stats)) => {
            let Some(writer) = writer else {
                return Err(run.reported(write_failed()).into());
            };
            let out = finish_image(writer, &mut stats)?;
            drop(run);
            report::write_stats(options, &stats)?;
            // Last: FILE appears only for a run that wrote its trailer.
            placement.commit(out.get_ref().file())?;
            Ok(Outcome { verdict, stats })
        }
        Err(error) => {
            if let Some(writer) = writer {
                // Ends the stream without a trailer; the error is what counts.
                let _ = writer.abandon();
            }
            let error = run.reported(error);
            drop(run); // tracing off before anything else is said
            Err(error.into())
        }
    }
}

/// The run's start: root, the source device, what to freeze, the output,
/// tracing on, the engine, the dirty map and the image's banner.
fn start(options: &ImageOptions) -> anyhow::Result<(Placement, Run<'_>)> {
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
    let (source, target) = trace_on(&device, options)?;
    let engine = Engine::new(&device, options.engine)?;
    let yielding = options.yield_to_foreground.then(|| {
        // From the first read on, until the pump has seen the disk idle.
        engine.set_gentle(true);
        open_foreground(&device, &target)
    });
    let block_bytes = DIRTY_BLOCK_BYTES.max(device.logical_block_bytes);
    let dirty = match options.dirty_map_memory {
        DirtyMapMemory::Unbounded => DirtyMap::new(device.size_bytes, block_bytes),
        DirtyMapMemory::AtMost(bytes_max) => {
            DirtyMap::with_memory_limit(device.size_bytes, block_bytes, bytes_max)
        }
    };
    let writer = open_image(&device, &options.output, output)?;
    Ok((
        placement,
        Run::new(options, device, engine, dirty, source, writer, mounts).yielding(yielding),
    ))
}

/// The sensor of other programs' I/O on the disk (`yielding.rs`): tracefs,
/// else the disk's write counts (saying what that misses), else none (the
/// run then reads gently throughout, saying so).
fn open_foreground(device: &SourceDevice, target: &TraceTarget) -> pump::Yielding {
    let tracefs_error = match TracefsForeground::open(target) {
        Ok(sensor) => return pump::Yielding::new(Some(Box::new(sensor))),
        Err(error) => error,
    };
    match DiskstatsWrites::open(target.disk) {
        Ok(sensor) => {
            eprintln!(
                "hot-clone: WARNING: cannot see other programs' reads of {} ({tracefs_error}); yielding to their writes only, seen in {}. Add --max-rate to spare a workload that only reads",
                device.path.display(),
                sensor.path().display()
            );
            pump::Yielding::new(Some(Box::new(sensor)))
        }
        Err(error) => {
            eprintln!(
                "hot-clone: WARNING: cannot see other programs' I/O on {} ({tracefs_error}; {error}): reading gently throughout; --full-speed reads at full speed",
                device.path.display()
            );
            pump::Yielding::new(None)
        }
    }
}

/// Tracing on: a stale instance of a killed run removed, then the source.
/// Returns it with the range it traces.
fn trace_on(
    device: &SourceDevice,
    options: &ImageOptions,
) -> anyhow::Result<(Box<dyn EventSource>, TraceTarget)> {
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
    tracing::info!("Event source: {}", source.describe());
    Ok((source, target))
}

/// The image stream on `out`, its banner written.
fn open_image(
    device: &SourceDevice,
    output: &Output,
    out: std::fs::File,
) -> anyhow::Result<Writer> {
    let banner = Banner {
        revision: REVISION_EXTENDED,
        meta: Meta {
            device_bytes: Some(device.size_bytes),
            logical_block_bytes: Some(u64::from(device.logical_block_bytes)),
            source: Some(device.path.clone()),
            tool: Some(format!("hot-clone/{}", env!("CARGO_PKG_VERSION"))),
        },
    };
    let output_name = match output {
        Output::Stdout => "standard output".to_string(),
        Output::File(path) => path.display().to_string(),
    };
    ImageWriter::new(
        BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, ImageOut::new(out, output_name)),
        &banner,
    )
    .context("cannot write the image")
}

/// The end of a run that can vouch for its image: what was held while
/// frozen, then the trailer, synced. Returns the output to place.
fn finish_image(mut writer: Writer, stats: &mut RunStats) -> anyhow::Result<BufWriter<ImageOut>> {
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
    Ok(out)
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
    let devs = crate::source::blockdev::with_partitions(device.dev);
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What every caller of a writer that was dropped after a failed write
/// gets, the failing one included; the failure itself is kept in
/// [`Run::output_error`] and is what the run reports ([`Run::reported`]).
#[derive(Debug, thiserror::Error)]
#[error("the image output failed earlier")]
struct OutputFailedEarlier;

fn write_failed() -> anyhow::Error {
    OutputFailedEarlier.into()
}

/// One imaging run's shared state: the main thread reads and runs the
/// rounds, the pump drains the trace, the engine's threads deliver.
///
/// Lock order, where two are held together: `unreadable`, then `writer`,
/// then `freeze`. `traced` and `trouble` are never held with another.
struct Run<'a> {
    options: &'a ImageOptions,
    engine: Engine,
    dirty: DirtyMap,
    /// The pump drains under this lock and marks before releasing it; a
    /// look drains and takes under it (see `rounds`).
    traced: Mutex<Traced>,
    /// What the pump found that the run cannot vouch for an image with.
    trouble: Mutex<Trouble>,
    /// `None` once a write failed: the stream is broken.
    writer: Mutex<Option<Writer>>,
    /// The error of the write that broke the stream. Several engine threads
    /// deliver at once: without it, one that found the writer gone could
    /// record "failed earlier" as the run's error before the one whose
    /// write failed (EPIPE, ENOSPC) recorded its own. Set under `writer`.
    output_error: Mutex<Option<anyhow::Error>>,
    /// Set on loss, signal or a pump error: the engine stops reading.
    stop: AtomicBool,
    /// Events the source lost, for the progress line (also in `trouble`).
    lost: AtomicU64,
    started: Instant,
    /// `--freeze`: what to freeze for the final round.
    mounts: Vec<Mount>,
    /// `--freeze`: the freeze, once taken (`frozen.rs`).
    freeze: Mutex<FreezeState>,
    /// What the last read of each block could not read.
    unreadable: Mutex<UnreadableRanges>,
    /// `unreadable` is not empty: only then does a delivery take its lock.
    bad_nonempty: AtomicBool,
    /// Unreadable ranges logged as found (at most UNREADABLE_RANGES_LISTED).
    bad_logged: AtomicU64,
    /// The default's yielding until the pump takes it; `None` with
    /// `--full-speed`.
    yielding: Mutex<Option<pump::Yielding>>,
    /// What the yielding's sensor is, for the stats.
    yield_sensor: Option<(String, bool)>,
    /// Bytes delivered by the engine, main pass and catch-up.
    read_bytes: AtomicU64,
    /// A gentle catch-up read took too long: full speed from then on
    /// (`yielding.rs`).
    catch_up_full_speed: AtomicBool,
    /// How long the last catch-up read took, in nanoseconds (0: none yet).
    last_catch_up_read_ns: AtomicU64,
    /// Last: dropped after the engine and the trace that use it.
    device: SourceDevice,
}

/// The trace source and what its events say is in flight, under one lock.
struct Traced {
    source: Box<dyn EventSource>,
    pending: PendingWrites,
}

/// Why the run cannot vouch for an image, as the pump found it; both may
/// be found, and missing completions are said first.
#[derive(Default)]
struct Trouble {
    /// The device does not report in-range completions and nothing (no
    /// `--freeze`) can stop its writes.
    completions_missing: Option<Completions>,
    /// The last health check that was not clean (counts only grow).
    unclean: Option<live::TraceHealth>,
}

/// The outcome of waiting for the disk to have no write in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settled {
    /// After the last drain, no write was in flight on the disk.
    Quiet,
    /// Writes stayed in flight for the whole wait.
    Busy,
}

impl<'a> Run<'a> {
    fn new(
        options: &'a ImageOptions,
        device: SourceDevice,
        engine: Engine,
        dirty: DirtyMap,
        source: Box<dyn EventSource>,
        writer: Writer,
        mounts: Vec<Mount>,
    ) -> Run<'a> {
        Run {
            options,
            engine,
            dirty,
            traced: Mutex::new(Traced {
                source,
                pending: PendingWrites::default(),
            }),
            trouble: Mutex::new(Trouble::default()),
            writer: Mutex::new(Some(writer)),
            output_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            started: Instant::now(),
            mounts,
            freeze: Mutex::new(FreezeState::default()),
            unreadable: Mutex::new(UnreadableRanges::default()),
            bad_nonempty: AtomicBool::new(false),
            bad_logged: AtomicU64::new(0),
            yielding: Mutex::new(None),
            yield_sensor: None,
            read_bytes: AtomicU64::new(0),
            catch_up_full_speed: AtomicBool::new(false),
            last_catch_up_read_ns: AtomicU64::new(0),
            device,
        }
    }
}

impl Run<'_> {
    /// The run, yielding to other programs as `yielding` says (`None`:
    /// `--full-speed`).
    fn yielding(mut self, yielding: Option<pump::Yielding>) -> Self {
        self.yield_sensor = yielding.as_ref().map(pump::Yielding::sensor_facts);
        self.yielding = Mutex::new(yielding);
        self
    }

    /// Drops the writer after `error` broke it, keeping `error` for
    /// [`Run::reported`]; what the caller returns instead.
    fn output_broke(&self, writer: &mut Option<Writer>, error: anyhow::Error) -> anyhow::Error {
        *writer = None;
        lock(&self.output_error).get_or_insert(error);
        write_failed()
    }

    /// The error the run ends with: `error`, unless it only says the
    /// output failed earlier, then the failure itself.
    fn reported(&self, error: anyhow::Error) -> anyhow::Error {
        if error.chain().any(|c| c.is::<OutputFailedEarlier>())
            && let Some(broke) = lock(&self.output_error).take()
        {
            return broke;
        }
        error
    }

    /// The pump on its thread, the passes on this one.
    fn image(&self) -> anyhow::Result<(Verdict, RunStats)> {
        let pump_done = AtomicBool::new(false);
        let (result, pumped) = std::thread::scope(|scope| {
            let pump = scope.spawn(|| {
                let pumped = self.pump(&pump_done);
                if pumped.is_err() {
                    self.stop.store(true, Ordering::SeqCst);
                }
                pumped
            });
            let stop_pump = report::SetOnDrop(&pump_done);
            let result = self.passes();
            drop(stop_pump);
            let pumped = pump
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (result, pumped)
        });
        let gait_changes = pumped?;
        self.check_events()?;
        let (verdict, mut stats) = result?;
        stats.yielding = self
            .yield_sensor
            .clone()
            .map(|(sensor, blind_to_reads)| YieldStats {
                sensor,
                blind_to_reads,
                gentle_seconds: yielding::gentle_seconds(&gait_changes, stats.seconds),
                gait_changes,
            });
        Ok((verdict, stats))
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
        let main = self.main_pass()?;
        let mut rounds = Vec::new();
        let mut latency = Histogram::<u64>::new(3).expect("histogram");
        let verdict = self.catch_up(&mut rounds, &mut latency)?;
        let unreadable = self.write_bad_ranges()?;
        let catch_up = PassStats::of_rounds(&rounds, &latency);
        let stats = self.stats(quiesce_wait, &main, rounds, catch_up, verdict, unreadable);
        Ok((verdict, stats))
    }

    /// The whole device, once, with progress lines.
    fn main_pass(&self) -> anyhow::Result<ReadStats> {
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
        let status = || (self.dirty_sectors(), self.lost.load(Ordering::Relaxed));
        let main = report::with_progress(self.device.size_bytes, status, |progress| {
            self.read(&whole, Some(progress))
        })?;
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
        Ok(main)
    }

    /// The run's statistics, once the last read is in the image.
    fn stats(
        &self,
        quiesce_wait: Duration,
        main: &ReadStats,
        rounds: Vec<RoundStats>,
        catch_up: PassStats,
        verdict: Verdict,
        unreadable: UnreadableStats,
    ) -> RunStats {
        let (event_source, events) = self.event_stats();
        let usage = Usage::own();
        let freeze = lock(&self.freeze);
        RunStats {
            device: self.device.path.clone(),
            device_bytes: self.device.size_bytes,
            logical_block_bytes: self.device.logical_block_bytes,
            dirty_block_bytes: self.dirty.block_bytes(),
            event_source,
            engine: EngineStats::from(self.engine.settings()),
            quiesce_wait_seconds: quiesce_wait.as_secs_f64(),
            main_pass: PassStats::of(main),
            rounds,
            catch_up,
            events,
            dirty_map_memory_bytes: self.dirty.memory_bytes(),
            dirty_map_memory_max_bytes: self.dirty.memory_bytes_max(),
            dirty_map_whole_region_marks: self.dirty.coarse_mark_count(),
            image_bytes: 0,
            cpu_seconds: usage.cpu_seconds,
            max_rss_bytes: usage.max_rss_bytes,
            converged: verdict == Verdict::Converged,
            unconverged_changed_bytes: match verdict {
                Verdict::Converged => 0,
                Verdict::Unconverged { changed_bytes } => changed_bytes,
            },
            frozen: self.mounts.iter().map(|m| m.mountpoint.clone()).collect(),
            freeze_seconds: freeze.held_seconds,
            freeze_ended_early: freeze.ended_early.clone(),
            // Known once the pump has stopped (`Run::image`).
            yielding: None,
            unreadable,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }

    /// The source's name and what it and the pending writes counted.
    fn event_stats(&self) -> (String, EventStats) {
        let traced = lock(&self.traced);
        let counters = traced.source.counters();
        let events = EventStats {
            events_read: counters.events_read,
            writes_seen: counters.writes_kept,
            pages_read: counters.pages_read,
            lost: self.lost.load(Ordering::SeqCst),
            writes_queued: traced.pending.queued_total(),
            completions_matched: traced.pending.matched_total(),
            completions_unmatched_sectors: traced.pending.unmatched_sectors(),
        };
        (traced.source.name().to_string(), events)
    }

    /// The catch-up rounds ([`rounds`]).
    fn catch_up(
        &self,
        rounds: &mut Vec<RoundStats>,
        latency: &mut Histogram<u64>,
    ) -> anyhow::Result<Verdict> {
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
            #[cfg(feature = "test-hooks")]
            hold_frozen_said: false,
        };
        match rounds::catch_up(&mut world, &mut policy, rounds, self.device.size_bytes)? {
            Ending::Converged => Ok(Verdict::Converged),
            Ending::Unconverged { changed_bytes } => Ok(Verdict::Unconverged { changed_bytes }),
            Ending::NoCompletions(completions) => {
                Err(ImageError::from(self.no_completions(completions)).into())
            }
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
        let mut pause = SETTLE_PAUSE_FIRST;
        let mut events = Vec::new();
        loop {
            signals::check().map_err(ImageError::from)?;
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
            pause = (pause * 2).min(SETTLE_PAUSE_MAX);
        }
    }

    fn dirty_sectors(&self) -> u64 {
        (self.dirty.count_dirty_blocks() * u64::from(self.dirty.block_bytes()))
            .min(self.device.size_bytes)
            / SECTOR_BYTES
    }

    /// Marks `extents` dirty again: what a look took and will not read, or
    /// read while a write may still land behind the read.
    fn mark_again(&self, extents: &[ByteExtent]) {
        for extent in extents {
            self.dirty.mark_sectors(
                extent.offset_bytes / SECTOR_BYTES,
                extent.len_bytes.div_ceil(SECTOR_BYTES),
            );
        }
    }

    /// Fails once the pump found that the run cannot vouch for an image:
    /// [`CompletionsMissing`], or [`EventsLost`] once a health check of the
    /// source was not clean.
    fn check_events(&self) -> Result<(), ImageError> {
        let (completions_missing, unclean) = {
            let trouble = lock(&self.trouble);
            (trouble.completions_missing, trouble.unclean.clone())
        };
        if let Some(completions) = completions_missing {
            return Err(self.no_completions(completions).into());
        }
        let Some(health) = unclean else {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dirty_map_memory_of_zero_is_no_bound() {
        assert_eq!(DirtyMapMemory::from_flag(0), DirtyMapMemory::Unbounded);
        assert_eq!(
            DirtyMapMemory::from_flag(1 << 20),
            DirtyMapMemory::AtMost(1 << 20)
        );
        assert_eq!(DirtyMapMemory::default(), DirtyMapMemory::Unbounded);
    }
}
