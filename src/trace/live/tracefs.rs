//! The tracefs source: a private instance under
//! `/sys/kernel/tracing/instances/` with the block tracepoints filtered to the
//! disk, read page by page from `per_cpu/cpuN/trace_pipe_raw`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::integrity::{self, Watched};
use super::reader::{PipeReader, ReadMethod, ReadResult};
use super::sys::{self, io_error, read_text, write_text};
use super::{
    Clipped, DrainStats, EventSource, LiveError, SourceConfig, SourceCounters, TraceHealth,
    TraceTarget, Unplaceable, UnplaceableLog,
};
use crate::trace::WriteEvent;
use crate::trace::tracefs::{
    BlockDecoder, BlockEventType, MissedEvents, PageLayout, parse_event_format, parse_header_event,
    parse_header_page,
};

/// Where tracefs lives (and is mounted if it is not).
pub const TRACEFS_ROOT: &str = "/sys/kernel/tracing";

/// Instances are named `hot-clone-<pid>-<counter>-<boot>-<pidns>` (see
/// [`InstanceName`]); older runs named them `hot-clone-<pid>-<counter>`.
pub const INSTANCE_PREFIX: &str = "hot-clone-";

/// The tracepoints enabled: submission of every bio, and completion on
/// bio-based (`block_bio_complete`) and request-based (`block_rq_complete`)
/// devices, plus `block_rq_issue` of passthrough requests only (see
/// [`filter_expression`]). `block_bio_remap` and `block_split` report
/// ranges a queue event of the same bio already covers (a bio remapped from
/// a partition or a stacked device is queued again on the disk, with the
/// disk's dev and sectors).
///
/// Why `block_rq_issue` for passthrough: such a request has no queue event
/// (it never passes `submit_bio`), and its completion names nobody — it
/// runs in interrupt context, so its `common_pid` is whatever task was
/// running. The issue event fires in `blk_mq_start_request`, normally in
/// the submitter's context (`blk_execute_rq` for SG_IO and NVMe ioctls,
/// the io_uring submitter for `uring_cmd`; a kblockd worker when dispatch
/// was deferred), and records `comm`: the message can name the tool. It
/// also arrives before the completion, so the run stops sooner. Cost: the
/// kernel filter drops every non-`N` issue before it reaches the buffer.
const EVENTS: [BlockEventType; 4] = [
    BlockEventType::BioQueue,
    BlockEventType::BioComplete,
    BlockEventType::RqComplete,
    BlockEventType::RqIssue,
];

/// Pages read per CPU per `io_uring_enter`: a linked chain of reads.
const CHAIN_PAGES: usize = 8;
/// Attempts at finding an unused instance name.
const INSTANCE_NAME_ATTEMPTS_MAX: u32 = 64;
/// Smallest per-CPU buffer we ask for: one page.
const BUFFER_KB_MIN: u64 = 4;
/// Largest per-CPU buffer we ask for (1 GiB).
const BUFFER_KB_MAX: u64 = 1 << 20;
/// Bytes of a `per_cpu/cpuN/stats` file we read.
const STATS_BYTES_MAX: usize = 1024;
/// Attempts at `rmdir` of the instance while the kernel still holds it busy.
const RMDIR_ATTEMPTS_MAX: u32 = 50;

static INSTANCE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Who this process is, as far as instance names go: pids are only
/// comparable within one boot and one pid namespace, and the instances
/// directory is shared by every pid namespace (containers included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub pid: u32,
    /// First 8 hex digits of `/proc/sys/kernel/random/boot_id`.
    pub boot: String,
    /// Inode of `/proc/self/ns/pid`.
    pub pid_namespace: u64,
}

/// A parsed instance name of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceName {
    /// `hot-clone-<pid>-<counter>-<boot>-<pidns>`.
    Current {
        pid: u32,
        counter: u64,
        boot: String,
        pid_namespace: u64,
    },
    /// `hot-clone-<pid>-<counter>`, from runs before the boot and namespace
    /// were part of the name: the pid may belong to another namespace.
    Legacy { pid: u32, counter: u64 },
}

impl InstanceName {
    /// The name for `identity`'s `counter`-th instance. The pid comes
    /// first so the name still starts with `hot-clone-<pid>-`; older
    /// binaries' cleanup fails to parse the rest and leaves it alone.
    pub fn format(identity: &Identity, counter: u64) -> String {
        format!(
            "{INSTANCE_PREFIX}{}-{counter}-{}-{}",
            identity.pid, identity.boot, identity.pid_namespace
        )
    }

    pub fn parse(name: &str) -> Option<InstanceName> {
        let rest = name.strip_prefix(INSTANCE_PREFIX)?;
        let parts: Vec<&str> = rest.split('-').collect();
        let pid: u32 = parts.first()?.parse().ok()?;
        let counter: u64 = parts.get(1)?.parse().ok()?;
        match parts.len() {
            2 => Some(InstanceName::Legacy { pid, counter }),
            4 => {
                let boot = sys::parse_boot_id(parts[2]).filter(|b| b.len() == parts[2].len())?;
                let pid_namespace = parts[3].parse().ok()?;
                Some(InstanceName::Current {
                    pid,
                    counter,
                    boot,
                    pid_namespace,
                })
            }
            _ => None,
        }
    }
}

/// What [`cleanup_stale_instances`] does with an instance it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleAction {
    /// Ours, or its owner is alive: leave it.
    Keep,
    /// Try `rmdir`; the kernel refuses (`EBUSY`) while any of its files is
    /// open, i.e. while a run still reads it.
    TryRemove,
}

/// Decides about an instance name: a pid says whether the owner lives only
/// for an instance from this boot and this pid namespace; any other
/// instance (another boot's cannot exist, tracefs is in memory; another
/// namespace's, or a legacy name) is only tried with `rmdir`, which a run
/// that reads it prevents.
pub fn stale_action(
    name: &InstanceName,
    me: &Identity,
    alive: impl Fn(u32) -> bool,
) -> StaleAction {
    match name {
        InstanceName::Current {
            pid,
            boot,
            pid_namespace,
            ..
        } if *boot == me.boot && *pid_namespace == me.pid_namespace => {
            if *pid == me.pid || alive(*pid) {
                StaleAction::Keep
            } else {
                StaleAction::TryRemove
            }
        }
        InstanceName::Current { .. } | InstanceName::Legacy { .. } => StaleAction::TryRemove,
    }
}

/// A tracefs instance owned by this process. Dropping it removes it; every
/// file of the instance must be closed by then, or the kernel refuses
/// (`EBUSY`).
pub(super) struct Instance {
    path: PathBuf,
    /// A second signal switches the instance off from the handler
    /// (`crate::signals`); the next run removes it.
    _emergency: crate::signals::Emergency,
}

impl Instance {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn create(root: &Path) -> Result<Instance, LiveError> {
        let identity = super::current_identity()?;
        for _ in 0..INSTANCE_NAME_ATTEMPTS_MAX {
            let counter = INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = root
                .join("instances")
                .join(InstanceName::format(&identity, counter));
            match fs::create_dir(&path) {
                Ok(()) => {
                    let emergency = crate::signals::Emergency::write_zero(&path.join("tracing_on"));
                    return Ok(Instance {
                        path,
                        _emergency: emergency,
                    });
                }
                // Left by an earlier process with our pid: not ours to use.
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(io_error("cannot create tracefs instance", &path, error)),
            }
        }
        Err(LiveError::Io {
            op: "cannot find an unused tracefs instance name",
            path: root.join("instances"),
            error: io::ErrorKind::AlreadyExists.into(),
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // No `tracing_on` = 0 first: `rmdir` (`__remove_instance`) disables
        // every event of the instance (`event_trace_del_tracer`) and frees
        // its buffers, so nothing is left running. Only if the kernel keeps
        // the instance (a file of it held open by someone else) is tracing
        // switched off, so a leftover costs memory, not a trace of every
        // block I/O.
        if let Err(error) = remove_instance(&self.path) {
            let _ = write_text(&self.path.join("tracing_on"), "0");
            tracing::warn!(
                "hot-clone: warning: {error}; tracing in it was switched off, and the next run removes it once nothing holds it open"
            );
        }
    }
}

/// `rmdir` of our own instance, retried briefly while the kernel reports it
/// busy (a file of it still being released).
fn remove_instance(path: &Path) -> Result<(), LiveError> {
    let mut attempt = 0;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_ATTEMPTS_MAX =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(error) => return Err(io_error("cannot remove tracefs instance", path, error)),
        }
    }
}

/// Makes sure tracefs is mounted at [`TRACEFS_ROOT`], mounting it if not.
pub(super) fn ensure_tracefs() -> Result<PathBuf, LiveError> {
    let root = PathBuf::from(TRACEFS_ROOT);
    if root.join("instances").is_dir() {
        return Ok(root);
    }
    sys::mount_pseudo("tracefs", &root).map_err(|error| LiveError::TracefsMissing {
        path: root.clone(),
        error,
    })?;
    if !root.join("instances").is_dir() {
        return Err(LiveError::TracefsMissing {
            path: root.clone(),
            error: io::Error::new(
                io::ErrorKind::NotFound,
                "mounted, but it has no instances directory",
            ),
        });
    }
    Ok(root)
}

/// Removes tracefs instances left by killed earlier runs and returns their
/// names. Never switches tracing off: it only calls `rmdir`, which the
/// kernel refuses with `EBUSY` for an instance that any process still has
/// a file of open (`__remove_instance` fails while `tr->ref > 1` or
/// `tr->trace_ref` is set; every open of an instance file takes a
/// reference through `tracing_check_open_get_tr`, and `trace_pipe_raw`
/// also `trace_ref` in `tracing_buffers_open`). Such an instance is in use
/// and left alone. Which instances are tried: see [`stale_action`].
pub fn cleanup_stale_instances() -> Result<Vec<String>, LiveError> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(LiveError::NotRoot { euid });
    }
    let root = ensure_tracefs()?;
    let me = super::current_identity()?;
    let instances = root.join("instances");
    let entries =
        fs::read_dir(&instances).map_err(|error| io_error("cannot list", &instances, error))?;
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| io_error("cannot list", &instances, error))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(parsed) = InstanceName::parse(&name) else {
            continue;
        };
        if stale_action(&parsed, &me, sys::pid_alive) == StaleAction::Keep {
            continue;
        }
        let path = entry.path();
        match fs::remove_dir(&path) {
            Ok(()) => removed.push(name),
            // In use (or removed by a concurrent cleanup): not ours to touch.
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY)
                    || error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("cannot remove tracefs instance", &path, error)),
        }
    }
    Ok(removed)
}

/// Loss counters of one CPU's buffer (`per_cpu/cpuN/stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Events overwritten before being read (overwrite mode).
    pub overrun: u64,
    /// Events lost because nested writers wrapped the buffer.
    pub commit_overrun: u64,
    /// Events dropped because the buffer was full (no-overwrite mode).
    pub dropped: u64,
}

impl CpuStats {
    pub fn lost(&self) -> u64 {
        self.overrun + self.commit_overrun + self.dropped
    }
}

/// Parses `per_cpu/cpuN/stats` (`key: value` lines).
pub fn parse_cpu_stats(text: &str) -> Result<CpuStats, String> {
    let mut stats = CpuStats::default();
    let mut seen_overrun = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "overrun" => {
                seen_overrun = true;
                &mut stats.overrun
            }
            "commit overrun" => &mut stats.commit_overrun,
            "dropped events" => &mut stats.dropped,
            _ => continue,
        };
        *slot = value
            .trim()
            .parse()
            .map_err(|_| format!("{key}: not a number: {value:?}"))?;
    }
    if !seen_overrun {
        return Err("no `overrun:` line".to_string());
    }
    Ok(stats)
}

/// The kernel filter of each event (grammar: kernel/trace/trace_events_filter.c;
/// `~` is a glob match on a string field, `||`, `&&`, `!` and parentheses
/// combine predicates).
///
/// Queue and completion events: the disk; no reads (`rwbs` of a read
/// starts with `R`; a preflush `F` only precedes writes); and sectors below
/// the range's end (a filter cannot add `nr_sector` to `sector`, so the
/// start is checked in user space; flush requests at sector `u64::MAX` fall
/// out here) — or any `N` operation whatever its sector, because a
/// passthrough command completes at sector `(sector_t)-1` (`block_rq_complete`
/// records `blk_rq_pos`) and must reach user space to be counted as a write
/// the trace cannot place.
///
/// `block_rq_issue`: only `N` operations of the disk (passthrough issues
/// at sector 0, `blk_rq_trace_sector`; a write-zeroes issue repeats its
/// queue event's range and is harmless).
fn filter_expression(target: &TraceTarget, event: BlockEventType) -> String {
    match event {
        BlockEventType::RqIssue => format!("dev == {} && rwbs ~ \"N*\"", target.disk.0),
        BlockEventType::BioQueue | BlockEventType::BioComplete | BlockEventType::RqComplete => {
            format!(
                "dev == {} && !(rwbs ~ \"R*\") && (sector < {} || rwbs ~ \"N*\")",
                target.disk.0,
                target.sector_end()
            )
        }
    }
}

/// What one read of a `trace_pipe_raw` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PipeRead {
    Page,
    /// Nothing committed: `EAGAIN`, io_uring's zero-timeout cancel, or 0
    /// bytes (the reader page was empty when read, and events arrived before
    /// the kernel's emptiness check).
    Empty,
    /// `ENODEV`: the CPU has no buffer yet. The instance's ring buffer gets
    /// a CPU's buffer when that CPU first comes online
    /// (`trace_rb_cpu_prepare`, the `CPUHP_TRACE_RB_PREPARE` callback) and
    /// keeps it when the CPU goes offline (there is no teardown callback);
    /// until then `ring_buffer_alloc_read_page` refuses the read with
    /// `-ENODEV` (`!cpumask_test_cpu(cpu, buffer->cpumask)`), and
    /// `tracing_buffers_read` retries the allocation on every read. So a
    /// pipe opened at start for a possible-but-offline CPU starts working by
    /// itself when the CPU comes up, and a CPU that went offline keeps its
    /// unread events readable: reading every possible CPU on every drain
    /// misses nothing.
    NoBufferYet,
    Short(usize),
    Failed(i32),
}

fn classify_read(result: ReadResult, page_bytes: usize) -> PipeRead {
    match result {
        ReadResult::Bytes(bytes) if bytes == page_bytes => PipeRead::Page,
        ReadResult::Empty | ReadResult::Cancelled | ReadResult::Bytes(0) => PipeRead::Empty,
        ReadResult::Bytes(bytes) => PipeRead::Short(bytes),
        ReadResult::Failed(libc::ENODEV) => PipeRead::NoBufferYet,
        ReadResult::Failed(errno) => PipeRead::Failed(errno),
        ReadResult::NotRun => {
            unreachable!("a chain ends at its first short read, which is handled")
        }
    }
}

/// `buffer_size_kb` reads `1024`, or `7 (expanded: 1408)` before first use.
fn parse_buffer_kb(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A running tracefs trace. See the module documentation of
/// [`crate::trace::live`].
pub struct TracefsSource {
    // Declared first so it drops first: its trace_pipe_raw files must be
    // closed before the instance can be removed.
    reader: PipeReader,
    stats_files: Vec<(File, PathBuf)>,
    /// CPU of each reader slot: every possible CPU (see [`PipeRead::NoBufferYet`]).
    cpus: Vec<u32>,
    decoder: BlockDecoder,
    layout: PageLayout,
    target: TraceTarget,
    buffer_kb_per_cpu: u64,
    /// Pages per CPU after which a drain stops reading that CPU even without
    /// `EAGAIN`: more than the buffer holds, so everything committed before
    /// the drain has been read (the buffer is FIFO).
    pages_per_drain_max: u64,
    counters: SourceCounters,
    /// Events the pages' `RB_MISSED_EVENTS` flags reported (1 per flagged
    /// page without a stored count).
    pages_missed_events: u64,
    /// Pages that could not be parsed: their events are lost.
    pages_corrupt: u64,
    unplaceable: UnplaceableLog,
    /// The control files set up, as read back after tracing started.
    watched: Vec<Watched>,
    watch_buf: Vec<u8>,
    /// Scratch of the drain loop: the chain base of each active slot.
    active: Vec<Option<usize>>,
    pages_this_drain: Vec<u64>,
    stats_buf: Box<[u8]>,
    instance: Instance,
}

/// Opens a tracefs source for `target` (see [`super::open_source`]): an
/// instance of our own, set up, its per-CPU pipes opened, then tracing on.
pub fn open_tracefs(
    target: &TraceTarget,
    config: &SourceConfig,
) -> Result<TracefsSource, LiveError> {
    let root = check_prerequisites(target)?;
    // From here on, `instance` removes the instance on every error path.
    let instance = Instance::create(&root)?;
    let dir = instance.path.clone();
    let buffer_kb_per_cpu = configure_instance(&dir, config)?;
    let layout = read_page_layout(&dir)?;
    let decoder = read_decoder(&dir)?;
    enable_events(&dir, target)?;

    let cpus = sys::possible_cpus()?;
    let (pipes, stats_files) = open_cpu_files(&dir, &cpus)?;
    let page_bytes = layout.page_bytes();
    let reader = PipeReader::new(pipes, page_bytes, CHAIN_PAGES, 0, ReadMethod::Syscall);
    let ring_pages = (buffer_kb_per_cpu * 1024)
        .div_ceil(page_bytes as u64)
        .max(2);
    let slots = cpus.len();

    // Tracing starts here: every write submitted after this returns is seen.
    write_text(&dir.join("tracing_on"), "1")?;
    let watched = watch_instance(&dir)?;
    tracing::debug!(
        "tracefs: instance {}, {buffer_kb_per_cpu} KiB per CPU on {slots} CPUs, {page_bytes}-byte pages",
        dir.display()
    );

    Ok(TracefsSource {
        reader,
        stats_files,
        cpus,
        decoder,
        layout,
        target: *target,
        buffer_kb_per_cpu,
        pages_per_drain_max: 2 * (ring_pages + 2),
        counters: SourceCounters::default(),
        pages_missed_events: 0,
        pages_corrupt: 0,
        unplaceable: UnplaceableLog::default(),
        watched,
        watch_buf: Vec::with_capacity(1024),
        active: vec![None; slots],
        pages_this_drain: vec![0; slots],
        stats_buf: vec![0; STATS_BYTES_MAX].into_boxed_slice(),
        instance,
    })
}

/// Root, a valid target, tracefs mounted (see [`ensure_tracefs`]) with the
/// block events: the tracefs root.
fn check_prerequisites(target: &TraceTarget) -> Result<PathBuf, LiveError> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(LiveError::NotRoot { euid });
    }
    target.check()?;
    let root = ensure_tracefs()?;
    let block_events = root.join("events/block");
    for event in EVENTS {
        let path = block_events.join(event.name());
        if !path.is_dir() {
            return Err(LiveError::BlockEventsMissing { path });
        }
    }
    Ok(root)
}

/// Sets up the instance at `dir`, tracing still off: no overwriting, wake
/// on any event, the monotonic clock, the buffer size. Returns the buffer
/// size per CPU in KiB as the kernel rounded it.
fn configure_instance(dir: &Path, config: &SourceConfig) -> Result<u64, LiveError> {
    write_text(&dir.join("tracing_on"), "0")?;
    // Keep old events, drop and count new ones when full (see the module doc).
    write_text(&dir.join("options/overwrite"), "0")?;
    // poll() reports the pipes readable as soon as they hold any event, not
    // when half full (the default 50): io_uring consults poll before reading.
    write_text(&dir.join("buffer_percent"), "0")?;
    // CLOCK_MONOTONIC time stamps, comparable with blktrace's and with
    // clock_gettime in user space; the default `local` clock is per CPU.
    let clocks = read_text(&dir.join("trace_clock"))?;
    if clocks
        .split_whitespace()
        .any(|clock| clock.trim_matches(['[', ']']) == "mono")
    {
        write_text(&dir.join("trace_clock"), "mono")?;
    }
    let buffer_kb = config
        .buffer_bytes_per_cpu
        .div_ceil(1024)
        .clamp(BUFFER_KB_MIN, BUFFER_KB_MAX);
    let buffer_kb_path = dir.join("buffer_size_kb");
    write_text(&buffer_kb_path, &buffer_kb.to_string())?;
    parse_buffer_kb(&read_text(&buffer_kb_path)?)
        .ok_or_else(|| parse_error(buffer_kb_path, "not a size in KiB"))
}

/// A [`LiveError::Parse`] of the file at `path`.
fn parse_error(path: PathBuf, error: impl std::fmt::Display) -> LiveError {
    LiveError::Parse {
        path,
        message: error.to_string(),
    }
}

/// The ring buffer's page and event headers, from `events/header_*`.
fn read_page_layout(dir: &Path) -> Result<PageLayout, LiveError> {
    let page_path = dir.join("events/header_page");
    let event_path = dir.join("events/header_event");
    let page = parse_header_page(&read_text(&page_path)?)
        .map_err(|error| parse_error(page_path.clone(), error))?;
    let event = parse_header_event(&read_text(&event_path)?)
        .map_err(|error| parse_error(event_path, error))?;
    PageLayout::new(&page, &event).map_err(|error| parse_error(page_path, error))
}

/// The decoder of the block events, from their `format` files.
fn read_decoder(dir: &Path) -> Result<BlockDecoder, LiveError> {
    let mut formats = Vec::with_capacity(EVENTS.len());
    for event in EVENTS {
        let path = dir.join("events/block").join(event.name()).join("format");
        let format = parse_event_format(&read_text(&path)?)
            .map_err(|error| parse_error(path.clone(), error))?;
        formats.push(format);
    }
    BlockDecoder::new(&formats).map_err(|error| parse_error(dir.join("events/block"), error))
}

/// Each block event filtered to `target` and enabled (in the instance only).
fn enable_events(dir: &Path, target: &TraceTarget) -> Result<(), LiveError> {
    for event in EVENTS {
        let event_dir = dir.join("events/block").join(event.name());
        write_text(&event_dir.join("filter"), &filter_expression(target, event))?;
        write_text(&event_dir.join("enable"), "1")?;
    }
    Ok(())
}

/// Per-CPU pipe and stats file of each of `cpus`, in order.
type CpuFiles = (Vec<File>, Vec<(File, PathBuf)>);

/// Opens `per_cpu/cpuN/trace_pipe_raw` (non-blocking) and `stats` for each
/// of `cpus`.
fn open_cpu_files(dir: &Path, cpus: &[u32]) -> Result<CpuFiles, LiveError> {
    let mut pipes = Vec::with_capacity(cpus.len());
    let mut stats_files = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let cpu_dir = dir.join(format!("per_cpu/cpu{cpu}"));
        let pipe_path = cpu_dir.join("trace_pipe_raw");
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&pipe_path)
            .map_err(|error| io_error("cannot open", &pipe_path, error))?;
        pipes.push(pipe);
        let stats_path = cpu_dir.join("stats");
        let stats =
            File::open(&stats_path).map_err(|error| io_error("cannot open", &stats_path, error))?;
        stats_files.push((stats, stats_path));
    }
    Ok((pipes, stats_files))
}

/// The files whose text must stay as setup left it (read back now, so the
/// kernel's normalized form is the baseline): tracing on; the events
/// enabled with their filters; the buffer size, sub-buffer size and
/// overwrite mode (a change resizes or reformats the buffers under the
/// reader); the CPU mask and event pid filters (either would drop events
/// silently); the clock.
fn watch_instance(dir: &Path) -> Result<Vec<Watched>, LiveError> {
    let mut watched = vec![
        Watched::expect(dir.join("tracing_on"), "1")?,
        Watched::expect(dir.join("options/overwrite"), "0")?,
    ];
    for file in [
        "buffer_size_kb",
        "buffer_subbuf_size_kb",
        "tracing_cpumask",
        "set_event_pid",
        "set_event_notrace_pid",
        "trace_clock",
    ] {
        let path = dir.join(file);
        // Older kernels lack some (buffer_subbuf_size_kb is 6.8+).
        if path.exists() {
            watched.push(Watched::record(path)?);
        }
    }
    for event in EVENTS {
        let event_dir = dir.join("events/block").join(event.name());
        watched.push(Watched::expect(event_dir.join("enable"), "1")?);
        watched.push(Watched::record(event_dir.join("filter"))?);
    }
    Ok(watched)
}

impl TracefsSource {
    /// The instance directory (removed when the source is dropped).
    pub fn instance_path(&self) -> &Path {
        &self.instance.path
    }

    /// `buffer_size_kb` as the kernel set it.
    pub fn buffer_kb_per_cpu(&self) -> u64 {
        self.buffer_kb_per_cpu
    }

    /// Reads the per-CPU pipes through io_uring instead of `read(2)` (the
    /// default; see `reader.rs` for why and the numbers).
    pub fn use_io_uring(&mut self) {
        self.reader.set_method(ReadMethod::IoUring);
    }

    /// How the per-CPU pipes are read: `read(2)` or `io_uring`.
    pub fn read_method(&self) -> &str {
        self.reader.method_note()
    }

    /// Decodes one page of `slot` into `out`, keeping only the target's writes.
    fn take_page(
        &mut self,
        slot: usize,
        index: usize,
        out: &mut Vec<WriteEvent>,
        stats: &mut DrainStats,
    ) -> Result<(), LiveError> {
        let cpu = self.cpus[slot];
        let page = self.reader.chunk(slot, 0, index);
        out.reserve(self.layout.events_per_page_max());
        let first_new = out.len();
        let summary = match self.decoder.decode_page(&self.layout, cpu, page, out) {
            Ok(summary) => summary,
            Err(error) => {
                self.pages_corrupt += 1;
                return Err(LiveError::Page { cpu, error });
            }
        };
        match summary.header.missed {
            MissedEvents::None => {}
            MissedEvents::Unknown => self.pages_missed_events += 1,
            MissedEvents::Count(count) => self.pages_missed_events += count.max(1),
        }
        // Translate and clip in place.
        let mut kept = first_new;
        let mut unplaceable = 0;
        for index in first_new..out.len() {
            match self.target.clip(&out[index]) {
                Clipped::Write(event) => {
                    out[kept] = event;
                    kept += 1;
                }
                Clipped::Unplaceable => unplaceable += 1,
                Clipped::Outside => {}
            }
        }
        out.truncate(kept);
        if unplaceable > 0 {
            // The page's best-named passthrough event stands for all of them.
            let best = summary
                .first_passthrough
                .filter(|block| block.dev == self.target.disk)
                .and_then(|block| {
                    let write = block.write_event(cpu)?;
                    Some(Unplaceable::from_event(
                        &write,
                        block.rwbs.to_string(),
                        block.comm.map(|comm| comm.to_string()),
                    ))
                });
            self.unplaceable.note(unplaceable, best);
        }
        stats.events_read += summary.events_total as u64;
        stats.writes_kept += (kept - first_new) as u64;
        stats.pages_read += 1;
        Ok(())
    }
}

impl EventSource for TracefsSource {
    fn name(&self) -> &'static str {
        "tracefs"
    }

    fn describe(&self) -> String {
        format!(
            "tracefs instance {} ({} CPUs, {} KiB per CPU, {}-byte pages, read with {})",
            self.instance.path.display(),
            self.cpus.len(),
            self.buffer_kb_per_cpu,
            self.layout.page_bytes(),
            self.reader.method_note(),
        )
    }

    fn drain(&mut self, out: &mut Vec<WriteEvent>) -> Result<DrainStats, LiveError> {
        let mut stats = DrainStats::default();
        let page_bytes = self.layout.page_bytes();
        self.active.fill(Some(0));
        self.pages_this_drain.fill(0);
        let chain_len = self.reader.chain_len();
        let turns_max = self.pages_per_drain_max.div_ceil(chain_len as u64) + 1;
        for _turn in 0..turns_max {
            if self.active.iter().all(Option::is_none) {
                break;
            }
            self.reader.read_turn(&self.active)?;
            for slot in 0..self.reader.slots() {
                if self.active[slot].is_none() {
                    continue;
                }
                let mut more = true;
                for index in 0..chain_len {
                    match classify_read(self.reader.result(slot, index), page_bytes) {
                        PipeRead::Page => {
                            self.take_page(slot, index, out, &mut stats)?;
                            self.pages_this_drain[slot] += 1;
                        }
                        PipeRead::Empty | PipeRead::NoBufferYet => {
                            more = false;
                            break;
                        }
                        PipeRead::Short(bytes) => {
                            return Err(LiveError::Parse {
                                path: self.pipe_path(slot),
                                message: format!(
                                    "read returned {bytes} bytes, not a whole {page_bytes}-byte page"
                                ),
                            });
                        }
                        PipeRead::Failed(errno) => {
                            return Err(io_error(
                                "cannot read",
                                &self.pipe_path(slot),
                                io::Error::from_raw_os_error(errno),
                            ));
                        }
                    }
                }
                if !more || self.pages_this_drain[slot] >= self.pages_per_drain_max {
                    self.active[slot] = None;
                }
            }
        }
        debug_assert!(self.active.iter().all(Option::is_none));
        self.counters.add(&stats);
        Ok(stats)
    }

    /// Loss: the per-CPU `stats` counters and the pages' missed-events
    /// flags. Unplaceable: passthrough events drained so far. Tampering:
    /// the instance directory and every `watch_instance` file, compared
    /// with their text right after setup.
    fn health(&mut self) -> Result<TraceHealth, LiveError> {
        let mut lost_stats = 0u64;
        for (file, path) in &self.stats_files {
            let text = sys::pread_text(file, path, &mut self.stats_buf)?;
            let stats = parse_cpu_stats(text).map_err(|message| LiveError::Parse {
                path: path.clone(),
                message,
            })?;
            lost_stats += stats.lost();
        }
        // The page flags and the counters report the same losses: take the
        // larger, so nothing is counted twice and nothing is missed.
        let lost = lost_stats.max(self.pages_missed_events) + self.pages_corrupt;
        self.counters.lost_events = lost;
        let tampered = integrity::check_dir(&self.instance.path)
            .or_else(|| integrity::check_all(&self.watched, &mut self.watch_buf));
        Ok(TraceHealth {
            lost,
            unplaceable: self.unplaceable.count,
            first_unplaceable: self.unplaceable.first.clone(),
            tampered,
        })
    }

    fn counters(&self) -> SourceCounters {
        self.counters
    }
}

impl TracefsSource {
    fn pipe_path(&self, slot: usize) -> PathBuf {
        self.instance
            .path
            .join(format!("per_cpu/cpu{}/trace_pipe_raw", self.cpus[slot]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::DevT;

    fn me() -> Identity {
        Identity {
            pid: 100,
            boot: "84022ec3".to_string(),
            pid_namespace: 4_026_531_836,
        }
    }

    #[test]
    fn instance_names() {
        let name = InstanceName::format(&me(), 7);
        assert_eq!(name, "hot-clone-100-7-84022ec3-4026531836");
        assert_eq!(
            InstanceName::parse(&name),
            Some(InstanceName::Current {
                pid: 100,
                counter: 7,
                boot: "84022ec3".to_string(),
                pid_namespace: 4_026_531_836
            })
        );
        assert_eq!(
            InstanceName::parse("hot-clone-1234-0"),
            Some(InstanceName::Legacy {
                pid: 1234,
                counter: 0
            })
        );
        for bad in [
            "hot-clone-1234",
            "hot-clone-x-0",
            "hot-clone-12-y",
            "hc-fixture-1234",
            "hot-clone-1-2-84022ec3",
            "hot-clone-1-2-8402zec3-5",
            "hot-clone-1-2-84022ec3-x",
            "hot-clone-1-2-84022ec3ff-5",
            "hot-clone-1-2-84022ec3-5-6",
        ] {
            assert_eq!(InstanceName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_same_boot_and_namespace_pids_are_checked_for_liveness() {
        let me = me();
        let named = |pid, boot: &str, pid_namespace| InstanceName::Current {
            pid,
            counter: 0,
            boot: boot.to_string(),
            pid_namespace,
        };
        let alive = |pid: u32| pid == 200;
        let same = |pid| named(pid, "84022ec3", 4_026_531_836);
        assert_eq!(stale_action(&same(100), &me, alive), StaleAction::Keep);
        assert_eq!(stale_action(&same(200), &me, alive), StaleAction::Keep);
        assert_eq!(stale_action(&same(300), &me, alive), StaleAction::TryRemove);
        // Another namespace's pid 200 says nothing about its owner here,
        // nor does a legacy name's: only rmdir, which a reader prevents.
        for name in [
            named(200, "84022ec3", 4_026_532_000),
            named(200, "deadbeef", 4_026_531_836),
            named(100, "84022ec3", 4_026_532_000),
            InstanceName::Legacy {
                pid: 200,
                counter: 0,
            },
        ] {
            assert_eq!(
                stale_action(&name, &me, alive),
                StaleAction::TryRemove,
                "{name:?}"
            );
        }
    }

    #[test]
    fn pipe_reads() {
        assert_eq!(classify_read(ReadResult::Bytes(4096), 4096), PipeRead::Page);
        assert_eq!(classify_read(ReadResult::Bytes(0), 4096), PipeRead::Empty);
        assert_eq!(classify_read(ReadResult::Empty, 4096), PipeRead::Empty);
        assert_eq!(classify_read(ReadResult::Cancelled, 4096), PipeRead::Empty);
        assert_eq!(
            classify_read(ReadResult::Bytes(100), 4096),
            PipeRead::Short(100)
        );
        // A possible CPU that has never been online: no buffer yet, retried
        // on every drain, never an error.
        assert_eq!(
            classify_read(ReadResult::Failed(libc::ENODEV), 4096),
            PipeRead::NoBufferYet
        );
        assert_eq!(
            classify_read(ReadResult::Failed(libc::EIO), 4096),
            PipeRead::Failed(libc::EIO)
        );
    }

    #[test]
    fn cpu_stats_fixture() {
        let text = include_str!("../../../tests/fixtures/trace/overrun.cpu1.stats.txt");
        let stats = parse_cpu_stats(text).unwrap();
        assert_eq!(stats.overrun, 3850);
        assert_eq!(stats.lost(), 3850 + stats.commit_overrun + stats.dropped);
        let text = "entries: 0\noverrun: 0\ncommit overrun: 2\nbytes: 0\noldest event ts:     0.000000\nnow ts:  1678.192746\ndropped events: 7\nread events: 0\n";
        assert_eq!(
            parse_cpu_stats(text).unwrap(),
            CpuStats {
                overrun: 0,
                commit_overrun: 2,
                dropped: 7
            }
        );
        assert!(parse_cpu_stats("entries: 0\n").is_err());
        assert!(parse_cpu_stats("overrun: x\n").is_err());
    }

    #[test]
    fn filter_covers_the_range_end() {
        let target = TraceTarget {
            disk: DevT(7 << 20 | 3),
            sector_first: 2049,
            sector_count: 10_000,
        };
        assert_eq!(
            filter_expression(&target, BlockEventType::BioQueue),
            "dev == 7340035 && !(rwbs ~ \"R*\") && (sector < 12049 || rwbs ~ \"N*\")"
        );
        assert_eq!(
            filter_expression(&target, BlockEventType::RqComplete),
            filter_expression(&target, BlockEventType::BioQueue)
        );
        assert_eq!(
            filter_expression(&target, BlockEventType::RqIssue),
            "dev == 7340035 && rwbs ~ \"N*\""
        );
    }

    #[test]
    fn buffer_kb() {
        assert_eq!(parse_buffer_kb("1024\n"), Some(1024));
        assert_eq!(parse_buffer_kb("7 (expanded: 1408)\n"), Some(7));
        assert_eq!(parse_buffer_kb(""), None);
    }
}
