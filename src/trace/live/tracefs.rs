//! The tracefs source: a private instance under
//! `/sys/kernel/tracing/instances/` with the block tracepoints filtered to the
//! disk, read page by page from `per_cpu/cpuN/trace_pipe_raw`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::reader::{PipeReader, ReadMethod, ReadResult};
use super::sys::{self, io_error, read_text, write_text};
use super::{DrainStats, EventSource, LiveError, SourceConfig, SourceCounters, TraceTarget};
use crate::trace::WriteEvent;
use crate::trace::tracefs::{
    BlockDecoder, BlockEventType, MissedEvents, PageLayout, parse_event_format, parse_header_event,
    parse_header_page,
};

/// Where tracefs lives (and is mounted if it is not).
pub const TRACEFS_ROOT: &str = "/sys/kernel/tracing";

/// Instances are named `hot-clone-<pid>-<counter>`; the pid tells
/// [`cleanup_stale_instances`] whether the owner is still alive.
pub const INSTANCE_PREFIX: &str = "hot-clone-";

/// The tracepoints enabled: submission of every bio, and completion on
/// bio-based (`block_bio_complete`) and request-based (`block_rq_complete`)
/// devices. `block_rq_issue` adds nothing a queue event has not reported;
/// `block_bio_remap` and `block_split` report ranges a queue event of the
/// same bio already covers (a bio remapped from a partition or a stacked
/// device is queued again on the disk, with the disk's dev and sectors).
const EVENTS: [BlockEventType; 3] = [
    BlockEventType::BioQueue,
    BlockEventType::BioComplete,
    BlockEventType::RqComplete,
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

/// A tracefs instance owned by this process. Dropping it turns tracing off
/// and removes it; every file of the instance must be closed by then, or the
/// kernel refuses (`EBUSY`).
struct Instance {
    path: PathBuf,
}

impl Instance {
    fn create(root: &Path) -> Result<Instance, LiveError> {
        let pid = std::process::id();
        for _ in 0..INSTANCE_NAME_ATTEMPTS_MAX {
            let counter = INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = root
                .join("instances")
                .join(format!("{INSTANCE_PREFIX}{pid}-{counter}"));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Instance { path }),
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
        let _ = write_text(&self.path.join("tracing_on"), "0");
        if let Err(error) = remove_instance(&self.path) {
            eprintln!("hot-clone: warning: {error}");
        }
    }
}

/// `rmdir` of an instance, retried briefly while the kernel reports it busy
/// (a file of it still being released).
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
fn ensure_tracefs() -> Result<PathBuf, LiveError> {
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

/// The pid in an instance name of ours, `hot-clone-<pid>-<counter>`.
fn instance_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(INSTANCE_PREFIX)?;
    let (pid, counter) = rest.split_once('-')?;
    counter.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes tracefs instances left by killed earlier runs: named
/// `hot-clone-<pid>-<counter>` with no process `<pid>` alive. Returns their
/// names. Instances of live processes are left alone.
pub fn cleanup_stale_instances() -> Result<Vec<String>, LiveError> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(LiveError::NotRoot { euid });
    }
    let root = ensure_tracefs()?;
    let instances = root.join("instances");
    let entries =
        fs::read_dir(&instances).map_err(|error| io_error("cannot list", &instances, error))?;
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| io_error("cannot list", &instances, error))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = instance_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || sys::pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        let _ = write_text(&path.join("tracing_on"), "0");
        remove_instance(&path)?;
        removed.push(name);
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

/// The kernel filter: the disk, sectors below the range's end (a filter
/// cannot add `nr_sector` to `sector`, so the start is checked in user space;
/// flush requests at sector `u64::MAX` fall out here too), and no reads
/// (`rwbs` of a read starts with `R`; a preflush `F` only precedes writes).
fn filter_expression(target: &TraceTarget) -> String {
    format!(
        "dev == {} && sector < {} && !(rwbs ~ \"R*\")",
        target.disk.0,
        target.sector_end()
    )
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
    /// CPU of each reader slot.
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
    /// Scratch of the drain loop: the chain base of each active slot.
    active: Vec<Option<usize>>,
    pages_this_drain: Vec<u64>,
    stats_buf: Box<[u8]>,
    instance: Instance,
}

/// Opens a tracefs source for `target` (see [`super::open_source`]).
pub fn open_tracefs(
    target: &TraceTarget,
    config: &SourceConfig,
) -> Result<TracefsSource, LiveError> {
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
    // From here on, `instance` removes the instance on every error path.
    let instance = Instance::create(&root)?;
    let dir = instance.path.clone();
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
    write_text(&dir.join("buffer_size_kb"), &buffer_kb.to_string())?;
    let buffer_kb_path = dir.join("buffer_size_kb");
    let buffer_kb_per_cpu =
        parse_buffer_kb(&read_text(&buffer_kb_path)?).ok_or_else(|| LiveError::Parse {
            path: buffer_kb_path.clone(),
            message: "not a size in KiB".to_string(),
        })?;

    let layout = {
        let page_path = dir.join("events/header_page");
        let event_path = dir.join("events/header_event");
        let page =
            parse_header_page(&read_text(&page_path)?).map_err(|error| LiveError::Parse {
                path: page_path.clone(),
                message: error.to_string(),
            })?;
        let event =
            parse_header_event(&read_text(&event_path)?).map_err(|error| LiveError::Parse {
                path: event_path.clone(),
                message: error.to_string(),
            })?;
        PageLayout::new(&page, &event).map_err(|error| LiveError::Parse {
            path: page_path,
            message: error.to_string(),
        })?
    };
    let mut formats = Vec::with_capacity(EVENTS.len());
    for event in EVENTS {
        let path = dir.join("events/block").join(event.name()).join("format");
        let format = parse_event_format(&read_text(&path)?).map_err(|error| LiveError::Parse {
            path: path.clone(),
            message: error.to_string(),
        })?;
        formats.push(format);
    }
    let decoder = BlockDecoder::new(&formats).map_err(|error| LiveError::Parse {
        path: dir.join("events/block"),
        message: error.to_string(),
    })?;

    let filter = filter_expression(target);
    for event in EVENTS {
        let event_dir = dir.join("events/block").join(event.name());
        write_text(&event_dir.join("filter"), &filter)?;
        write_text(&event_dir.join("enable"), "1")?;
    }

    let cpus = sys::online_cpus()?;
    let mut pipes = Vec::with_capacity(cpus.len());
    let mut stats_files = Vec::with_capacity(cpus.len());
    for &cpu in &cpus {
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
    let page_bytes = layout.page_bytes();
    let reader = PipeReader::new(pipes, page_bytes, CHAIN_PAGES, 0, ReadMethod::Syscall);
    let ring_pages = (buffer_kb_per_cpu * 1024)
        .div_ceil(page_bytes as u64)
        .max(2);
    let slots = cpus.len();

    // Tracing starts here: every write submitted after this returns is seen.
    write_text(&dir.join("tracing_on"), "1")?;

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
        active: vec![None; slots],
        pages_this_drain: vec![0; slots],
        stats_buf: vec![0; STATS_BYTES_MAX].into_boxed_slice(),
        instance,
    })
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
        for index in first_new..out.len() {
            if let Some(event) = self.target.clip(&out[index]) {
                out[kept] = event;
                kept += 1;
            }
        }
        out.truncate(kept);
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
                    match self.reader.result(slot, index) {
                        ReadResult::Bytes(bytes) if bytes == page_bytes => {
                            self.take_page(slot, index, out, &mut stats)?;
                            self.pages_this_drain[slot] += 1;
                        }
                        // Empty when read: EAGAIN from read(2), cancelled by
                        // the zero timeout in io_uring (see reader.rs), or 0
                        // (the reader page was empty when read, and events
                        // arrived before the kernel's emptiness check).
                        ReadResult::Empty | ReadResult::Cancelled | ReadResult::Bytes(0) => {
                            more = false;
                            break;
                        }
                        ReadResult::Bytes(bytes) => {
                            return Err(LiveError::Parse {
                                path: self.pipe_path(slot),
                                message: format!(
                                    "read returned {bytes} bytes, not a whole {page_bytes}-byte page"
                                ),
                            });
                        }
                        ReadResult::Failed(errno) => {
                            return Err(io_error(
                                "cannot read",
                                &self.pipe_path(slot),
                                io::Error::from_raw_os_error(errno),
                            ));
                        }
                        ReadResult::NotRun => {
                            unreachable!("a chain ends at its first short read, which is handled")
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

    fn lost_events(&mut self) -> Result<u64, LiveError> {
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
        sys::check_no_cpu_came_online(&self.cpus)?;
        Ok(lost)
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

    #[test]
    fn instance_names() {
        assert_eq!(instance_owner("hot-clone-1234-0"), Some(1234));
        assert_eq!(instance_owner("hot-clone-1-17"), Some(1));
        assert_eq!(instance_owner("hot-clone-1234"), None);
        assert_eq!(instance_owner("hot-clone-x-0"), None);
        assert_eq!(instance_owner("hot-clone-12-y"), None);
        assert_eq!(instance_owner("hc-fixture-1234"), None);
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
            filter_expression(&target),
            "dev == 7340035 && sector < 12049 && !(rwbs ~ \"R*\")"
        );
    }

    #[test]
    fn buffer_kb() {
        assert_eq!(parse_buffer_kb("1024\n"), Some(1024));
        assert_eq!(parse_buffer_kb("7 (expanded: 1408)\n"), Some(7));
        assert_eq!(parse_buffer_kb(""), None);
    }
}
