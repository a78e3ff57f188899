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
//!    becomes one self-addressed `S:` section, in completion order.
//! 4. Catch-up rounds: take-and-clear the dirty set, read it, emit it, until
//!    a round finds nothing new with no write in flight (converged), or the
//!    round limit is reached (unconverged: a `STATE:` record, exit 3).
//! 5. The END trailer, only for a run that can vouch for what it captured.
//!    Lost events, a signal, or an error end the stream without one.

use crate::adaptive::{self, Controller, LatencyProbe};
use crate::device::SourceDevice;
use crate::dirty::{self, DirtyMap};
use crate::engine::{Engine, EngineConfig, EngineSettings, ReadDone, ReadStats};
use crate::format::{
    Banner, ImageWriter, Meta, REVISION_EXTENDED, RunState, SECTOR_BYTES, crc32c_of,
};
use crate::freeze::{self, Frozen, Mount};
use crate::output;
use crate::signals::{self, Interrupted};
use crate::trace::live::{self, EventSource, SourceConfig, TraceTarget};
use crate::trace::{DevT, Phase, WriteEvent};
use crate::units::{Bytes, Rate};
use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Catch-up rounds at most before the run ends unconverged (`--max-rounds`).
pub const ROUNDS_MAX_DEFAULT: u32 = 32;

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

/// How long a catch-up round waits for no write in flight before it reads
/// anyway (and then reads its extents again in the next round).
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

/// The pump drains the trace at least this often.
const PUMP_INTERVAL: Duration = Duration::from_millis(2);

/// The pump asks the source for lost events at least this often.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Progress lines at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Extents handed to the engine at most this long (it splits them further).
const EXTENT_BYTES_MAX: u64 = 64 << 20;

/// Output buffer for record lines; data of a completed read goes straight
/// through (a buffer this small is flushed before a larger write).
const OUTPUT_BUFFER_BYTES: usize = 64 << 10;

/// Where the image goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    /// Written as a 0600 temporary beside it, renamed onto it when the
    /// image is complete ([`crate::output`]); a block device or character
    /// device is written in place.
    File(PathBuf),
}

/// Everything a run needs to know.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    pub device: PathBuf,
    pub output: Output,
    /// Turn every refusal of the output guard ([`crate::output`]) and of
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
    /// test can interrupt a run while the filesystem is frozen).
    pub hold_frozen_file: Option<PathBuf>,
    /// Pace reads by the workload's write latency (`crate::adaptive`).
    pub adaptive: bool,
    /// Bytes the dirty map may take at most; `None` = enough for every
    /// block (34.5 MiB per TiB at 4 KiB blocks, committed as written).
    /// Past the bound, a write that finds no room keeps its 16 MiB region whole
    /// ([`DirtyMap::with_memory_limit`]): the catch-up re-reads more, never
    /// less, than was written.
    pub dirty_map_memory_max: Option<u64>,
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
            adaptive: false,
            dirty_map_memory_max: None,
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

/// The event source lost events: the run cannot vouch for the image, which
/// was left without a trailer.
#[derive(Debug, thiserror::Error)]
#[error(
    "the {source_name} trace lost {lost} write events ({kept} seen): some writes may be missing, so the image was ended without its END trailer; give the trace more buffer (e.g. -blktrace.bufsize 1048576 -blktrace.bufcount 64, now {buffer} per CPU) or image while the disk is less busy"
)]
pub struct EventsLost {
    pub source_name: &'static str,
    pub lost: u64,
    pub kept: u64,
    pub buffer: Bytes,
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
    /// `--adaptive`: the lowest and highest read rate it set (bytes/s).
    pub adaptive_rate_range: Option<(u64, u64)>,
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
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EventStats {
    pub events_read: u64,
    pub writes_seen: u64,
    pub pages_read: u64,
    pub lost: u64,
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
    let writer = ImageWriter::new(
        BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, output),
        &banner,
    )
    .context("cannot write the image")?;

    let run = Run {
        options,
        device: &device,
        engine,
        dirty,
        source: Mutex::new(source),
        writer: Mutex::new(Some(writer)),
        stop: AtomicBool::new(false),
        lost: AtomicU64::new(0),
        started: Instant::now(),
        mounts,
        freeze_seconds: Mutex::new(None),
        probe: Mutex::new(LatencyProbe::default()),
        rates: Mutex::new((u64::MAX, 0)),
    };
    let result = run.image();
    let writer = lock(&run.writer).take();
    match result {
        Ok((verdict, mut stats)) => {
            let Some(writer) = writer else {
                bail!("the image output failed earlier");
            };
            let (mut out, trailer) = writer.finish().context("cannot write the image trailer")?;
            out.get_mut()
                .sync_data()
                .or_else(ignore_unsyncable)
                .context("cannot flush the image to its file")?;
            stats.image_bytes = trailer.bytes;
            drop(run);
            write_stats(options, &stats)?;
            // Last: FILE appears only for a run that wrote its trailer.
            placement.commit(out.get_ref())?;
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
    devs.extend(crate::blockdev::partitions_of(device.dev));
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
    /// The pump drains under this lock and marks before releasing it.
    source: Mutex<Box<dyn EventSource>>,
    writer: Mutex<Option<ImageWriter<BufWriter<File>>>>,
    /// Set on loss, signal or a pump error: the engine stops reading.
    stop: AtomicBool,
    lost: AtomicU64,
    started: Instant,
    /// `--freeze`: what to freeze for the final round.
    mounts: Vec<Mount>,
    freeze_seconds: Mutex<Option<f64>>,
    /// `--adaptive`: the workload's write latencies, fed by every drain.
    probe: Mutex<LatencyProbe>,
    /// `--adaptive`: the lowest and highest rate set.
    rates: Mutex<(u64, u64)>,
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
        let whole = [dirty::Extent {
            offset_bytes: 0,
            len_bytes: self.device.size_bytes,
        }];
        let main = self.read_with_progress(&whole)?;
        if let Some(done) = &self.options.main_pass_done {
            done.store(true, Ordering::SeqCst);
        }
        eprintln!(
            "Main pass done: {} in {:.1}s ({}) -- {} dirty sectors",
            Bytes(main.bytes_read),
            main.elapsed.as_secs_f64(),
            Rate(main.bytes_read as f64 / main.elapsed.as_secs_f64().max(1e-9)),
            self.dirty_sectors()
        );

        let mut rounds = Vec::new();
        let mut catch_up_latency = Histogram::<u64>::new(3).expect("histogram");
        let mut catch_up = PassStats::default();
        let (verdict, changed_bytes) = self.catch_up(&mut rounds, &mut catch_up_latency)?;
        for round in &rounds {
            catch_up.bytes += round.bytes_read;
            catch_up.seconds += round.seconds;
        }
        catch_up.reads = catch_up_latency.len();
        catch_up.bytes_per_second = catch_up.bytes as f64 / catch_up.seconds.max(1e-9);
        catch_up.latency_us = Latency::of(&catch_up_latency);

        let counters = lock(&self.source).counters();
        let stats = RunStats {
            device: self.device.path.clone(),
            device_bytes: self.device.size_bytes,
            logical_block_bytes: self.device.logical_block_bytes,
            dirty_block_bytes: self.dirty.block_bytes(),
            event_source: lock(&self.source).name().to_string(),
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
            adaptive_rate_range: self.options.adaptive.then(|| *lock(&self.rates)),
            seconds: self.started.elapsed().as_secs_f64(),
        };
        Ok((verdict, stats))
    }

    /// The catch-up rounds; returns the verdict and, when unconverged, the
    /// bytes that changed during the last round.
    fn catch_up(
        &self,
        rounds: &mut Vec<RoundStats>,
        latency: &mut Histogram<u64>,
    ) -> anyhow::Result<(Verdict, u64)> {
        let mut counted: u32 = 0;
        let mut extents = Vec::new();
        let mut held_since: Option<Instant> = None;
        let mut last_hold_note = Instant::now();
        // `--freeze`: thawed when dropped, on every way out of this function.
        let mut frozen: Option<Frozen> = None;
        loop {
            signals::check()?;
            self.check_events()?;
            let settled = self.settle(ROUND_SETTLE_WAIT_MAX)?;
            extents.clear();
            let dirty_bytes = self.dirty.take_into(&mut extents, EXTENT_BYTES_MAX);
            dirty::merge_small_gaps(&mut extents, CATCH_UP_GAP_MERGE_BYTES);
            let held = frozen.is_none() && self.held();
            let would_converge = extents.is_empty() && settled == Settled::Quiet;
            if !self.mounts.is_empty()
                && frozen.is_none()
                && !held
                && (would_converge
                    || dirty_bytes <= FREEZE_DIRTY_BYTES_MAX
                    || counted >= self.options.rounds_max)
            {
                // Converged as far as the live filesystem lets us: freeze it
                // (which writes back its dirty data and journal, all traced)
                // and read what is left while nothing can write.
                for extent in &extents {
                    self.mark_bytes(extent.offset_bytes, extent.len_bytes);
                }
                let now_frozen = Frozen::freeze(&self.mounts)?;
                eprintln!(
                    "Frozen {} for the final round (after {} rounds)",
                    now_frozen.describe(),
                    rounds.len()
                );
                frozen = Some(now_frozen);
                counted = 0; // the frozen rounds have a limit of their own
                continue;
            }
            if frozen.is_some()
                && self
                    .options
                    .hold_frozen_file
                    .as_deref()
                    .is_some_and(Path::exists)
            {
                for extent in &extents {
                    self.mark_bytes(extent.offset_bytes, extent.len_bytes);
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if would_converge && !held {
                self.thaw(&mut frozen)?;
                // Why no write can be missed. Let W be a write to block B that
                // completed before this round's drain, and R the last read of
                // B that went into the image.
                // - W completed before R was submitted: R returned W's data
                //   (a read submitted after a write completed sees it).
                // - W was submitted after R was submitted: its queue event
                //   was emitted after R and before this drain, so it was
                //   drained by some round after R; that round found B dirty
                //   and read B again after R, contradicting R being last.
                // - W was submitted before R and completed after R was
                //   submitted: W's queue event was drained before R (else
                //   the case above). Every round's reads start only after a
                //   drain followed by a look at the disk that found no write
                //   in flight (`settle`); a round that read while writes were
                //   in flight re-marks what it read, and the main pass began
                //   only after such a quiet look. So W, drained before that
                //   look, had completed before R was submitted: the first
                //   case. On devices that report completions (request-based
                //   ones such as loop, and partitions), W's completion event
                //   marks B again as well.
                // Hence every write completed before this drain is in the
                // image. This drain found nothing new and `settle` saw no
                // write in flight after it: the image is the device as of
                // this drain. (`sync_drain` makes "before this drain" exact:
                // it waits until every event emitted before it is readable.)
                eprintln!(
                    "Converged after {} round{}: nothing changed and no write in flight",
                    rounds.len(),
                    if rounds.len() == 1 { "" } else { "s" }
                );
                return Ok((Verdict::Converged, 0));
            }
            if !held && counted >= self.options.rounds_max {
                self.thaw(&mut frozen)?;
                // Put back what was taken so the count below includes it.
                for extent in &extents {
                    self.mark_bytes(extent.offset_bytes, extent.len_bytes);
                }
                let changed_bytes =
                    self.dirty.count_dirty_blocks() * u64::from(self.dirty.block_bytes());
                let changed_bytes = changed_bytes.min(self.device.size_bytes);
                eprintln!(
                    "WARNING: writes did not quiesce within {} catch-up rounds: {} blocks ({}) changed during the last round and may be older in the image than on the device; the image is marked NOT converged",
                    self.options.rounds_max,
                    changed_bytes.div_ceil(u64::from(self.dirty.block_bytes())),
                    Bytes(changed_bytes)
                );
                self.write_state(RunState::Unconverged { changed_bytes })?;
                return Ok((Verdict::Unconverged { changed_bytes }, changed_bytes));
            }
            if held {
                let since = *held_since.get_or_insert_with(Instant::now);
                if last_hold_note.elapsed() >= PROGRESS_INTERVAL {
                    last_hold_note = Instant::now();
                    eprintln!(
                        "Holding for {:.0}s while {} exists -- {} dirty sectors",
                        since.elapsed().as_secs_f64(),
                        self.options
                            .hold_file
                            .as_deref()
                            .unwrap_or(Path::new("?"))
                            .display(),
                        dirty_bytes / SECTOR_BYTES
                    );
                }
            } else {
                held_since = None;
            }
            if extents.is_empty() {
                if held || settled == Settled::Busy {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if !held {
                    counted += 1;
                }
                continue;
            }
            let round_number = rounds.len() as u32 + 1;
            let stats = self.read(&extents, None)?;
            latency.add(&stats.latency_us).expect("histograms agree");
            if settled == Settled::Busy {
                // A write in flight during these reads may land after them
                // without a new event (bio-based devices report no
                // completion): read the same extents again next round.
                for extent in &extents {
                    self.mark_bytes(extent.offset_bytes, extent.len_bytes);
                }
            }
            if !held {
                counted += 1;
            }
            let round = RoundStats {
                round: round_number,
                dirty_bytes,
                extents: extents.len(),
                bytes_read: stats.bytes_read,
                seconds: stats.elapsed.as_secs_f64(),
                unsettled: settled == Settled::Busy,
                held,
            };
            if !held || self.options.verbose {
                eprintln!(
                    "Round {}: {} in {} extents read in {:.0} ms{}{}",
                    round.round,
                    Bytes(round.bytes_read),
                    round.extents,
                    round.seconds * 1000.0,
                    if round.unsettled {
                        " (writes in flight: will read again)"
                    } else {
                        ""
                    },
                    if held { " (held)" } else { "" }
                );
            }
            rounds.push(round);
        }
    }

    /// Thaws what `--freeze` froze, if anything, and records for how long.
    fn thaw(&self, frozen: &mut Option<Frozen>) -> anyhow::Result<()> {
        if let Some(now_frozen) = frozen.take() {
            let what = now_frozen.describe();
            let held = now_frozen.thaw()?;
            eprintln!(
                "Thawed {what}: writes were blocked for {:.0} ms",
                held.as_secs_f64() * 1000.0
            );
            *lock(&self.freeze_seconds) = Some(held.as_secs_f64());
        }
        Ok(())
    }

    fn held(&self) -> bool {
        self.options.hold_file.as_deref().is_some_and(Path::exists)
    }

    /// Drains the trace (waiting until every event emitted before the call
    /// is readable) and then looks at the disk's in-flight writes, until
    /// none is in flight or `wait_max` has passed. The look comes after the
    /// drain: a write whose queue event the drain returned is then known to
    /// be complete.
    fn settle(&self, wait_max: Duration) -> anyhow::Result<Settled> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(50);
        let mut events = Vec::new();
        loop {
            signals::check()?;
            self.drain(true, &mut events)?;
            let (_, writes) = self.device.inflight()?;
            if writes == 0 {
                return Ok(Settled::Quiet);
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
        extents: &[dirty::Extent],
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
            let written =
                writer.write_section_checksummed(done.offset_bytes / SECTOR_BYTES, done.data, crc);
            if written.is_err() {
                // The stream is broken mid-section: nothing more may be
                // written to it, by this read or one completing later.
                *guard = None;
            }
            written.context("cannot write the image")
        };
        match self
            .engine
            .read_extents(extents, &deliver, progress, &self.stop)
        {
            Ok(stats) => Ok(stats),
            Err(error) => {
                // A stop has a cause; report the cause, not the stop.
                signals::check()?;
                self.check_events()?;
                Err(error)
            }
        }
    }

    /// The main pass, with a progress line every second.
    fn read_with_progress(&self, extents: &[dirty::Extent]) -> anyhow::Result<ReadStats> {
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

    /// Fails with [`EventsLost`] once the source has lost an event.
    fn check_events(&self) -> anyhow::Result<()> {
        let lost = self.lost.load(Ordering::SeqCst);
        if lost == 0 {
            return Ok(());
        }
        let source = lock(&self.source);
        Err(EventsLost {
            source_name: source.name(),
            lost,
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
        let mut source = lock(&self.source);
        if sync {
            source.sync_drain(events)
        } else {
            source.drain(events)
        }
        .context("cannot read the trace")?;
        for event in events.iter() {
            self.mark(event);
        }
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
        drop(source);
        Ok(events.len())
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

    fn set_rate(&self, bytes_per_second: u64) {
        self.engine.set_rate_limit(bytes_per_second);
        let mut rates = lock(&self.rates);
        rates.0 = rates.0.min(bytes_per_second);
        rates.1 = rates.1.max(bytes_per_second);
    }

    fn update_lost(&self) -> anyhow::Result<()> {
        let lost = lock(&self.source)
            .lost_events()
            .context("cannot read the trace's loss counters")?;
        if lost > 0 {
            self.lost.store(lost, Ordering::SeqCst);
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(())
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
            "Summary: froze {} for {:.0} ms",
            stats
                .frozen
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            seconds * 1000.0
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
