//! The blktrace source: `BLKTRACESETUP` on the whole disk, then the per-CPU
//! relay files `/sys/kernel/debug/block/<disk>/trace<cpu>`, as the original
//! tool did.
//!
//! Under kernel lockdown (integrity or confidentiality) debugfs refuses to
//! open the relay files (`EPERM`: they can be mmapped); the setup is then torn
//! down at once so the disk is free for a later run, and [`super::open_source`]
//! falls back to tracefs.
//!
//! Known weakness, shared with every relay reader: the kernel advances a relay
//! buffer's write offset when it *reserves* a record and fills the record
//! afterwards (with interrupts off, for a few hundred nanoseconds), so a read
//! racing with that window copies a record that is not written yet. The
//! per-CPU sequence check below turns most such records into a reported loss;
//! the tracefs ring buffer has no such window (readers only see committed
//! events).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::integrity::{self, Watched};
use super::reader::{PipeReader, ReadMethod, ReadResult};
use super::sys::{self, io_error};
use super::{
    Clipped, DrainStats, EventSource, LiveError, SourceConfig, SourceCounters, TraceHealth,
    TraceTarget, Unplaceable, UnplaceableLog,
};
use crate::trace::blktrace::{BlktraceError, HEADER_BYTES_V1, RECORD_BYTES_MAX, category, records};
use crate::trace::{Phase, WriteEvent};

/// Where debugfs is usually mounted (a private mount is used if it is not).
const DEBUGFS_ROOT: &str = "/sys/kernel/debug";
/// `/sys/kernel/security/lockdown`: `none [integrity] confidentiality`.
const LOCKDOWN_PATH: &str = "/sys/kernel/security/lockdown";

/// `struct blk_user_trace_setup` (include/uapi/linux/blktrace_api.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct BlkUserTraceSetup {
    /// Output: the name of the debugfs directory.
    name: [u8; 32],
    act_mask: u16,
    buf_size: u32,
    buf_nr: u32,
    start_lba: u64,
    end_lba: u64,
    pid: u32,
}

const _: () = assert!(std::mem::size_of::<BlkUserTraceSetup>() == 72);
const _: () = assert!(std::mem::offset_of!(BlkUserTraceSetup, act_mask) == 32);
const _: () = assert!(std::mem::offset_of!(BlkUserTraceSetup, buf_size) == 36);
const _: () = assert!(std::mem::offset_of!(BlkUserTraceSetup, buf_nr) == 40);
const _: () = assert!(std::mem::offset_of!(BlkUserTraceSetup, start_lba) == 48);
const _: () = assert!(std::mem::offset_of!(BlkUserTraceSetup, end_lba) == 56);
const _: () = assert!(std::mem::offset_of!(BlkUserTraceSetup, pid) == 64);

// `_IOWR(0x12, 115, struct blk_user_trace_setup)`; `_IO(0x12, 116)`,
// `_IO(0x12, 117)`, `_IO(0x12, 118)`.
nix::ioctl_readwrite!(blktrace_setup, 0x12, 115, BlkUserTraceSetup);
nix::ioctl_none!(blktrace_start, 0x12, 116);
nix::ioctl_none!(blktrace_stop, 0x12, 117);
nix::ioctl_none!(blktrace_teardown, 0x12, 118);
/// The requests a second signal's handler issues (`crate::signals`).
const BLKTRACESTOP: libc::c_ulong = nix::request_code_none!(0x12, 117) as libc::c_ulong;
const BLKTRACETEARDOWN: libc::c_ulong = nix::request_code_none!(0x12, 118) as libc::c_ulong;

/// The argument-less blktrace ioctls.
#[derive(Clone, Copy, Debug)]
enum Control {
    Start,
    Stop,
    Teardown,
}

/// Relay sub-buffer size, the original's `-blktrace.bufsize` default.
const SUBBUF_BYTES: u64 = 65_536;
/// Fewest and most relay sub-buffers per CPU.
const SUBBUF_COUNT_MIN: u64 = 2;
const SUBBUF_COUNT_MAX: u64 = 16_384;
/// Bytes asked for by one relay read.
const READ_BYTES: usize = 256 << 10;

static NODE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `BLKTRACESETUP` done on `disk`: dropping it stops and tears down the trace.
struct Session {
    /// A second signal stops and tears the trace down from the handler
    /// (`crate::signals`); dropped before `disk` closes.
    _emergency: [crate::signals::Emergency; 2],
    disk: File,
    started: bool,
}

impl Session {
    fn control(&self, control: Control) -> io::Result<()> {
        let fd = self.disk.as_raw_fd();
        // SAFETY: these ioctls take no argument and touch no user memory.
        unsafe {
            match control {
                Control::Start => blktrace_start(fd),
                Control::Stop => blktrace_stop(fd),
                Control::Teardown => blktrace_teardown(fd),
            }
        }?;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.started {
            let _ = self.control(Control::Stop);
        }
        if let Err(error) = self.control(Control::Teardown) {
            tracing::warn!("hot-clone: warning: BLKTRACETEARDOWN failed: {error}");
        }
    }
}

/// A running blktrace trace.
pub struct BlktraceSource {
    // Drop order: the relay files close before the session is torn down.
    reader: PipeReader,
    dropped_file: File,
    dropped_path: PathBuf,
    cpus: Vec<u32>,
    target: TraceTarget,
    disk_name: String,
    relay_bytes_per_cpu: u64,
    /// Bytes of an incomplete record kept at the start of each slot's buffer.
    carry_bytes: Vec<usize>,
    /// Last record sequence number seen per slot.
    last_sequence: Vec<Option<u32>>,
    /// Records out of sequence and unparsable streams: events lost.
    stream_breaks: u64,
    unplaceable: UnplaceableLog,
    /// `/sys/block/DISK/trace/*` as read back after `BLKTRACESTART`.
    watched: Vec<Watched>,
    watch_buf: Vec<u8>,
    counters: SourceCounters,
    active: Vec<Option<usize>>,
    text_buf: Box<[u8]>,
    _session: Session,
}

/// The kernel name of a whole disk, from sysfs.
fn disk_name(target: &TraceTarget) -> Result<String, LiveError> {
    let link = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        target.disk.major(),
        target.disk.minor()
    ));
    let dir =
        fs::canonicalize(&link).map_err(|error| io_error("no such block device", &link, error))?;
    if dir.join("partition").exists() {
        return Err(LiveError::InvalidTarget(format!(
            "{} is a partition; trace its whole disk",
            target.disk
        )));
    }
    dir.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| LiveError::Parse {
            path: dir.clone(),
            message: "no device name".to_string(),
        })
}

/// Opens the disk read-only: `/dev/<name>` if it is that device, otherwise a
/// private device node made for the purpose and removed at once.
fn open_disk(target: &TraceTarget, name: &str) -> Result<File, LiveError> {
    let rdev = libc::makedev(target.disk.major(), target.disk.minor());
    let dev_path = PathBuf::from(format!("/dev/{name}"));
    if let Ok(meta) = fs::metadata(&dev_path)
        && meta.file_type().is_block_device()
        && meta.rdev() == rdev
    {
        return File::open(&dev_path).map_err(|error| io_error("cannot open", &dev_path, error));
    }
    let dir = std::env::temp_dir().join(format!(
        "hot-clone-node-{}-{}",
        std::process::id(),
        NODE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).map_err(|error| io_error("cannot create", &dir, error))?;
    let node = dir.join(name);
    use nix::sys::stat::{Mode, SFlag, mknod};
    let result = match mknod(&node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), rdev) {
        Err(errno) => Err(io_error("cannot create device node", &node, errno.into())),
        Ok(()) => File::open(&node).map_err(|error| io_error("cannot open", &node, error)),
    };
    let _ = fs::remove_file(&node);
    let _ = fs::remove_dir(&dir);
    result
}

/// Where the debugfs files are reached: the system's mount, or a private
/// one made for the moment of opening them (see [`sys::PrivateMount`]), so a
/// run leaves no debugfs mount behind.
enum Debugfs {
    System(PathBuf),
    Private(sys::PrivateMount),
}

impl Debugfs {
    fn find() -> Result<Debugfs, LiveError> {
        let root = PathBuf::from(DEBUGFS_ROOT);
        if root.join("block").is_dir() {
            return Ok(Debugfs::System(root));
        }
        tracing::debug!("blktrace: debugfs is not mounted; mounting it privately");
        sys::PrivateMount::new("debugfs")
            .map(Debugfs::Private)
            .map_err(|error| LiveError::DebugfsMissing { error })
    }

    fn root(&self) -> &Path {
        match self {
            Debugfs::System(root) => root,
            Debugfs::Private(mount) => mount.path(),
        }
    }
}

/// The active lockdown mode (`none [integrity] confidentiality`), from
/// securityfs, mounted privately for the moment if it is not mounted.
fn lockdown_mode() -> Option<String> {
    let text = match fs::read_to_string(LOCKDOWN_PATH) {
        Ok(text) => text,
        Err(_) => {
            let mount = sys::PrivateMount::new("securityfs").ok()?;
            fs::read_to_string(mount.path().join("lockdown")).ok()?
        }
    };
    let mode = text.split_once('[')?.1.split_once(']')?.0;
    (mode != "none").then(|| mode.to_string())
}

fn lockdown_reason() -> String {
    match lockdown_mode() {
        Some(mode) => format!("kernel lockdown: {mode}"),
        None => "EPERM: debugfs access is restricted, as under kernel lockdown".to_string(),
    }
}

/// Opens a blktrace source for `target` (see [`super::open_source`]):
/// `BLKTRACESETUP`, the relay files opened, then `BLKTRACESTART`.
pub fn open_blktrace(
    target: &TraceTarget,
    config: &SourceConfig,
) -> Result<BlktraceSource, LiveError> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(LiveError::NotRoot { euid });
    }
    target.check()?;
    let name = disk_name(target)?;
    // Under lockdown, opening the relay files fails with EPERM after the
    // setup; that path is taken (and the setup torn down) rather than
    // guessing from the lockdown mode up front, which needs securityfs.
    let debugfs = Debugfs::find()?;
    let disk = open_disk(target, &name)?;
    let subbuf_count = subbuf_count(config.buffer_bytes_per_cpu);
    // From here on, dropping `session` tears the trace down.
    let (mut session, trace_name) = Session::set_up(disk, &name, subbuf_count)?;
    let dir = debugfs.root().join("block").join(&trace_name);
    // Paths as the operator knows them, for messages.
    let display_dir = PathBuf::from(DEBUGFS_ROOT).join("block").join(&trace_name);

    let cpus = sys::online_cpus()?;
    let files = open_relay_files(&dir, &display_dir, &cpus)?;
    let dropped_path = display_dir.join("dropped");
    let dropped_file = File::open(dir.join("dropped"))
        .map_err(|error| io_error("cannot open", &dropped_path, error))?;
    // Open files keep working after a private mount is detached.
    drop(debugfs);
    let reader = PipeReader::new(files, READ_BYTES, 1, RECORD_BYTES_MAX, ReadMethod::IoUring);
    let slots = cpus.len();

    session.control(Control::Start).map_err(|error| {
        io_error(
            "BLKTRACESTART failed on",
            Path::new(&format!("/dev/{name}")),
            error,
        )
    })?;
    session.started = true;
    let watched = watch_session(&name)?;
    tracing::debug!(
        "blktrace: /dev/{name} as {}, {subbuf_count} x {SUBBUF_BYTES} bytes of relay per CPU on {slots} CPUs",
        display_dir.display()
    );

    Ok(BlktraceSource {
        reader,
        dropped_file,
        dropped_path,
        cpus,
        target: *target,
        disk_name: name,
        relay_bytes_per_cpu: SUBBUF_BYTES * subbuf_count,
        carry_bytes: vec![0; slots],
        last_sequence: vec![None; slots],
        stream_breaks: 0,
        unplaceable: UnplaceableLog::default(),
        watched,
        watch_buf: Vec::with_capacity(256),
        counters: SourceCounters::default(),
        active: vec![None; slots],
        text_buf: vec![0; 64].into_boxed_slice(),
        _session: session,
    })
}

/// Relay sub-buffers per CPU for `buffer_bytes_per_cpu`, within bounds.
fn subbuf_count(buffer_bytes_per_cpu: u64) -> u64 {
    (buffer_bytes_per_cpu / SUBBUF_BYTES).clamp(SUBBUF_COUNT_MIN, SUBBUF_COUNT_MAX)
}

/// What `BLKTRACESETUP` asks for: every write of the whole disk, in
/// `subbuf_count` relay sub-buffers per CPU.
fn setup_request(subbuf_count: u64) -> BlkUserTraceSetup {
    BlkUserTraceSetup {
        name: [0; 32],
        // Every operation the kernel counts as a write (op number odd):
        // writes, discards, secure erases, write-zeroes, zone appends and
        // resets; and every passthrough command, whatever its direction
        // (`act_log_check` keeps a record if any of its categories is in
        // the mask; `blk_add_trace_rq` adds `BLK_TC_PC` to passthrough
        // requests, and a `REQ_OP_DRV_IN` one such as NVMe Write Zeroes
        // carries `READ`, not `WRITE`), so they are counted as unplaceable.
        act_mask: (category::WRITE | category::PC) as u16,
        buf_size: SUBBUF_BYTES as u32,
        buf_nr: subbuf_count as u32,
        // 0..0 is the whole disk. The kernel filters on a record's first
        // sector only, so a narrower range would lose writes straddling its
        // start; the range is clipped here instead.
        start_lba: 0,
        end_lba: 0,
        pid: 0,
    }
}

impl Session {
    /// `BLKTRACESETUP` on `disk` (kernel name `name`): the session, and
    /// the name of its debugfs directory.
    fn set_up(disk: File, name: &str, subbuf_count: u64) -> Result<(Session, String), LiveError> {
        let mut setup = setup_request(subbuf_count);
        // SAFETY: BLKTRACESETUP reads and writes one blk_user_trace_setup
        // through the pointer, which points at a live local for the call.
        match unsafe { blktrace_setup(disk.as_raw_fd(), &mut setup) } {
            Ok(_) => {}
            Err(nix::errno::Errno::EBUSY) => {
                return Err(LiveError::BlktraceBusy {
                    disk: name.to_string(),
                });
            }
            Err(errno) => {
                return Err(io_error(
                    "BLKTRACESETUP failed on",
                    Path::new(&format!("/dev/{name}")),
                    errno.into(),
                ));
            }
        }
        let session = Session {
            _emergency: [
                crate::signals::Emergency::ioctl(disk.as_raw_fd(), BLKTRACESTOP),
                crate::signals::Emergency::ioctl(disk.as_raw_fd(), BLKTRACETEARDOWN),
            ],
            disk,
            started: false,
        };
        let length = setup
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(setup.name.len());
        let trace_name = String::from_utf8_lossy(&setup.name[..length]).into_owned();
        Ok((session, trace_name))
    }
}

/// Opens `traceN` in `dir` for each of `cpus`, non-blocking; `display_dir`
/// names them in messages. EPERM is lockdown's refusal.
fn open_relay_files(dir: &Path, display_dir: &Path, cpus: &[u32]) -> Result<Vec<File>, LiveError> {
    let mut files = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let file_name = format!("trace{cpu}");
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(dir.join(&file_name))
            .map_err(|error| match error.raw_os_error() {
                Some(libc::EPERM) => LiveError::Lockdown {
                    path: display_dir.join(&file_name),
                    reason: lockdown_reason(),
                },
                _ => io_error("cannot open", &display_dir.join(&file_name), error),
            })?;
        files.push(file);
    }
    Ok(files)
}

/// `/sys/block/NAME/trace/*` as set up, to notice a change from outside.
fn watch_session(name: &str) -> Result<Vec<Watched>, LiveError> {
    // sysfs shows the session while it exists (`sysfs_blk_trace_attr_show`:
    // `enable` is 1 while the queue has a blk_trace, `act_mask` and the LBA
    // range as set up); a teardown by another tool (`blktrace -k`) or a
    // write to these files changes them. A bare BLKTRACESTOP by another
    // process leaves them as they are: not detectable here.
    let sysfs_dir = PathBuf::from(format!("/sys/block/{name}/trace"));
    let mut watched = vec![Watched::expect(sysfs_dir.join("enable"), "1")?];
    for file in ["act_mask", "start_lba", "end_lba", "pid"] {
        watched.push(Watched::record(sysfs_dir.join(file))?);
    }
    Ok(watched)
}

impl BlktraceSource {
    /// Parses the bytes of `slot` (kept carry plus `new_bytes` just read),
    /// appends the target's writes to `out` and keeps any incomplete record.
    fn take_bytes(
        &mut self,
        slot: usize,
        new_bytes: usize,
        out: &mut Vec<WriteEvent>,
        stats: &mut DrainStats,
    ) -> Result<(), LiveError> {
        let cpu = self.cpus[slot];
        let total = self.carry_bytes[slot] + new_bytes;
        let buf = &self.reader.buffer(slot)[..total];
        let decoded = decode_relay(buf, &self.target, &mut self.last_sequence[slot], out);
        if decoded.unplaceable > 0 {
            let seen = decoded.first_unplaceable.map(|event| {
                // The record has no task name; the issuing task may still
                // run (a daemon such as smartd does).
                let comm = (event.phase != Phase::Complete)
                    .then(|| fs::read_to_string(format!("/proc/{}/comm", event.pid)).ok())
                    .flatten()
                    .map(|comm| format!("{}, as named now", comm.trim()));
                Unplaceable::from_event(&event, "PC".to_string(), comm)
            });
            self.unplaceable.note(decoded.unplaceable, seen);
        }
        stats.events_read += decoded.records;
        stats.writes_kept += decoded.writes_kept;
        stats.pages_read += 1;
        self.stream_breaks += decoded.sequence_breaks;
        if let Some(error) = decoded.error {
            // The stream cannot be resynchronised: drop what is left.
            self.stream_breaks += 1;
            self.carry_bytes[slot] = 0;
            return Err(LiveError::Relay { cpu, error });
        }
        let rest = total - decoded.consumed;
        assert!(
            rest < RECORD_BYTES_MAX,
            "an incomplete record is shorter than the largest one"
        );
        self.reader
            .buffer_mut(slot)
            .copy_within(decoded.consumed..total, 0);
        self.carry_bytes[slot] = rest;
        Ok(())
    }
}

/// What [`decode_relay`] got through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RelayDecode {
    /// Bytes of whole records; the rest starts an incomplete record.
    consumed: usize,
    records: u64,
    writes_kept: u64,
    /// Records whose sequence number did not follow the previous one's.
    sequence_breaks: u64,
    /// Passthrough (`PC`) records of the disk: writes with no usable range.
    unplaceable: u64,
    /// The first of them, preferring an issue (whose pid is the submitter)
    /// over a completion.
    first_unplaceable: Option<WriteEvent>,
    /// Where parsing stopped on garbage, if it did.
    error: Option<BlktraceError>,
}

/// Parses the whole records of one CPU's relay bytes and appends the
/// target's writes, clipped, to `out`.
fn decode_relay(
    buf: &[u8],
    target: &TraceTarget,
    last_sequence: &mut Option<u32>,
    out: &mut Vec<WriteEvent>,
) -> RelayDecode {
    out.reserve(buf.len() / HEADER_BYTES_V1 + 1);
    let mut decoded = RelayDecode {
        consumed: 0,
        records: 0,
        writes_kept: 0,
        sequence_breaks: 0,
        unplaceable: 0,
        first_unplaceable: None,
        error: None,
    };
    let mut iter = records(buf);
    for record in iter.by_ref() {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                decoded.error = Some(error);
                break;
            }
        };
        decoded.records += 1;
        // Notes carry no sequence number (the kernel leaves the field as the
        // buffer held it).
        if !record.is_notify() {
            // The sequence numbers of one CPU's records are consecutive: the
            // kernel numbers only the records it reserved. A break means a
            // record was copied before the kernel finished writing it, or a
            // stale one was read.
            if let Some(last) = *last_sequence
                && record.sequence != last.wrapping_add(1)
            {
                decoded.sequence_breaks += 1;
            }
            *last_sequence = Some(record.sequence);
        }
        let Some(event) = record.write_event() else {
            continue;
        };
        match target.clip(&event) {
            Clipped::Write(event) => {
                out.push(event);
                decoded.writes_kept += 1;
            }
            Clipped::Unplaceable => {
                decoded.unplaceable += 1;
                let better = match &decoded.first_unplaceable {
                    None => true,
                    Some(first) => first.phase == Phase::Complete && event.phase != Phase::Complete,
                };
                if better {
                    decoded.first_unplaceable = Some(event);
                }
            }
            Clipped::Outside => {}
        }
    }
    decoded.consumed = iter.bytes_consumed();
    decoded
}

impl EventSource for BlktraceSource {
    fn name(&self) -> &'static str {
        "blktrace"
    }

    fn describe(&self) -> String {
        format!(
            "blktrace on {} ({} CPUs, {} KiB relay buffer per CPU, read with {})",
            self.disk_name,
            self.cpus.len(),
            self.relay_bytes_per_cpu / 1024,
            self.reader.method_note(),
        )
    }

    fn drain(&mut self, out: &mut Vec<WriteEvent>) -> Result<DrainStats, LiveError> {
        let mut stats = DrainStats::default();
        for slot in 0..self.active.len() {
            self.active[slot] = Some(self.carry_bytes[slot]);
        }
        // A read shorter than asked for means the relay buffer was empty at
        // that moment; the bound covers a full buffer twice over.
        let turns_max = 2 * (self.relay_bytes_per_cpu as usize).div_ceil(READ_BYTES) + 2;
        for _turn in 0..turns_max {
            if self.active.iter().all(Option::is_none) {
                break;
            }
            self.reader.read_turn(&self.active)?;
            for slot in 0..self.active.len() {
                if self.active[slot].is_none() {
                    continue;
                }
                match self.reader.result(slot, 0) {
                    ReadResult::Bytes(0) | ReadResult::Empty | ReadResult::Cancelled => {
                        self.active[slot] = None
                    }
                    ReadResult::Bytes(bytes) => {
                        self.take_bytes(slot, bytes, out, &mut stats)?;
                        self.active[slot] = (bytes == READ_BYTES).then_some(self.carry_bytes[slot]);
                    }
                    ReadResult::Failed(errno) => {
                        let path = PathBuf::from(format!(
                            "{DEBUGFS_ROOT}/block/{}/trace{}",
                            self.disk_name, self.cpus[slot]
                        ));
                        return Err(io_error(
                            "cannot read",
                            &path,
                            io::Error::from_raw_os_error(errno),
                        ));
                    }
                    ReadResult::NotRun => unreachable!("a chain of one read always runs"),
                }
            }
        }
        self.counters.add(&stats);
        Ok(stats)
    }

    /// Loss: the relay's `dropped` counter and broken record sequences.
    /// Unplaceable: passthrough (`PC`) records. Tampering: the disk's
    /// `trace/` sysfs files. A CPU that came online after the start has a
    /// relay file this source does not read (relay creates it then,
    /// `relay_prepare_cpu`): an error, not a loss count.
    fn health(&mut self) -> Result<TraceHealth, LiveError> {
        let text = sys::pread_text(&self.dropped_file, &self.dropped_path, &mut self.text_buf)?;
        let dropped: u64 = text.trim().parse().map_err(|_| LiveError::Parse {
            path: self.dropped_path.clone(),
            message: format!("not a number: {text:?}"),
        })?;
        let lost = dropped + self.stream_breaks;
        self.counters.lost_events = lost;
        if let Some(cpu) = sys::cpu_not_read(&sys::online_cpus()?, &self.cpus) {
            return Err(LiveError::CpuOnline { cpu });
        }
        Ok(TraceHealth {
            lost,
            unplaceable: self.unplaceable.count,
            first_unplaceable: self.unplaceable.first.clone(),
            tampered: integrity::check_all(&self.watched, &mut self.watch_buf),
        })
    }

    fn counters(&self) -> SourceCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::blktrace::{CATEGORY_SHIFT, MAGIC, VERSION_1, action};
    use crate::trace::{DevT, Phase, WriteKind};

    const DISK: DevT = DevT(7 << 20);

    #[test]
    fn ioctl_numbers() {
        // The numbers <linux/fs.h> gives, against what nix computes.
        let setup_bytes = std::mem::size_of::<BlkUserTraceSetup>();
        assert_eq!(
            nix::request_code_readwrite!(0x12, 115, setup_bytes),
            0xc048_1273
        );
        assert_eq!(nix::request_code_none!(0x12, 116), 0x1274);
        assert_eq!(BLKTRACESTOP, 0x1275);
        assert_eq!(BLKTRACETEARDOWN, 0x1276);
    }

    #[test]
    fn setup_asks_for_every_write_of_the_whole_disk() {
        assert_eq!(subbuf_count(0), SUBBUF_COUNT_MIN);
        assert_eq!(subbuf_count(4 << 20), 64);
        assert_eq!(subbuf_count(u64::MAX), SUBBUF_COUNT_MAX);
        let setup = setup_request(64);
        assert_eq!(u64::from(setup.act_mask), category::WRITE | category::PC);
        assert_eq!((setup.buf_size, setup.buf_nr), (65_536, 64));
        assert_eq!((setup.start_lba, setup.end_lba, setup.pid), (0, 0, 0));
    }

    /// A version 7 record from the documented layout.
    fn record(sequence: u32, sector: u64, bytes: u32, code: u16, categories: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(MAGIC | u32::from(VERSION_1)).to_ne_bytes());
        out.extend_from_slice(&sequence.to_ne_bytes());
        out.extend_from_slice(&1000u64.to_ne_bytes()); // time
        out.extend_from_slice(&sector.to_ne_bytes());
        out.extend_from_slice(&bytes.to_ne_bytes());
        let act = (u64::from(code) | (categories << CATEGORY_SHIFT)) as u32;
        out.extend_from_slice(&act.to_ne_bytes());
        out.extend_from_slice(&42u32.to_ne_bytes()); // pid
        out.extend_from_slice(&DISK.0.to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes()); // cpu
        out.extend_from_slice(&0u16.to_ne_bytes()); // error
        out.extend_from_slice(&0u16.to_ne_bytes()); // pdu_len
        assert_eq!(out.len(), HEADER_BYTES_V1);
        out
    }

    fn queue_write(sequence: u32, sector: u64, sectors: u32) -> Vec<u8> {
        record(
            sequence,
            sector,
            sectors * 512,
            action::QUEUE,
            category::WRITE | category::QUEUE,
        )
    }

    fn partition() -> TraceTarget {
        TraceTarget {
            disk: DISK,
            sector_first: 2049,
            sector_count: 10_000,
        }
    }

    #[test]
    fn relay_bytes_are_clipped_and_incomplete_records_kept() {
        let mut buf = queue_write(1, 2049, 8);
        buf.extend(queue_write(2, 0, 8)); // outside
        buf.extend(record(
            3,
            2049 + 16,
            4096,
            action::COMPLETE,
            category::WRITE | category::COMPLETE,
        ));
        buf.extend(record(
            4,
            2049 + 64,
            4096,
            action::QUEUE,
            category::READ | category::QUEUE,
        ));
        buf.extend(queue_write(5, 2040, 16)); // straddles the start
        let whole = buf.len();
        buf.extend(&queue_write(6, 3000, 8)[..20]); // cut by the read
        let mut last = None;
        let mut out = Vec::new();
        let decoded = decode_relay(&buf, &partition(), &mut last, &mut out);
        assert_eq!(decoded.consumed, whole);
        assert_eq!(decoded.records, 5);
        assert_eq!(decoded.writes_kept, 3);
        assert_eq!(decoded.sequence_breaks, 0);
        assert_eq!(decoded.error, None);
        assert_eq!(last, Some(5));
        let ranges: Vec<(u64, u64, Phase, WriteKind)> = out
            .iter()
            .map(|e| (e.sector_first, e.sector_count, e.phase, e.kind))
            .collect();
        assert_eq!(
            ranges,
            [
                (0, 8, Phase::Queue, WriteKind::Write),
                (16, 8, Phase::Complete, WriteKind::Write),
                (0, 7, Phase::Queue, WriteKind::Write),
            ]
        );
    }

    #[test]
    fn relay_sequence_breaks_are_counted_and_notes_ignored() {
        let mut buf = queue_write(7, 2049, 8);
        // A note: its sequence field is whatever the buffer held.
        buf.extend(record(0xdead, 0, 0, 0, category::NOTIFY));
        buf.extend(queue_write(8, 2049, 8));
        buf.extend(queue_write(3, 2049, 8)); // stale or torn
        let mut last = Some(6);
        let mut out = Vec::new();
        let decoded = decode_relay(&buf, &partition(), &mut last, &mut out);
        assert_eq!(decoded.records, 4);
        assert_eq!(decoded.sequence_breaks, 1);
        assert_eq!(last, Some(3));
    }

    #[test]
    fn relay_passthrough_records_are_unplaceable_not_widened() {
        // PC completion first (pid meaningless), then its issue (the
        // submitter's pid), then an ordinary write in the partition.
        let mut buf = record(
            1,
            0,
            4096,
            action::COMPLETE,
            category::WRITE | category::PC | category::COMPLETE,
        );
        buf.extend(record(
            2,
            0,
            4096,
            action::ISSUE,
            category::READ | category::PC | category::ISSUE,
        ));
        buf.extend(queue_write(3, 2049 + 8, 8));
        let mut last = None;
        let mut out = Vec::new();
        let decoded = decode_relay(&buf, &partition(), &mut last, &mut out);
        assert_eq!(decoded.records, 3);
        assert_eq!(decoded.unplaceable, 2);
        let first = decoded.first_unplaceable.unwrap();
        assert_eq!((first.phase, first.pid), (Phase::Issue, 42));
        assert_eq!(decoded.writes_kept, 1);
        assert_eq!((out[0].sector_first, out[0].sector_count), (8, 8));
    }

    #[test]
    fn relay_garbage_stops_parsing() {
        let mut buf = queue_write(1, 2049, 8);
        buf.extend([0u8; 48]);
        let mut last = None;
        let mut out = Vec::new();
        let decoded = decode_relay(&buf, &partition(), &mut last, &mut out);
        assert_eq!(decoded.records, 1);
        assert_eq!(decoded.consumed, HEADER_BYTES_V1);
        assert!(matches!(
            decoded.error,
            Some(BlktraceError::BadMagic { .. })
        ));
        assert_eq!(out.len(), 1);
    }
}
