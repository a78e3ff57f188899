//! The read engine: reads byte extents of the source device with O_DIRECT
//! through one io_uring per pinned worker thread, and hands every completed
//! read to a callback as soon as it completes.
//!
//! # Shape
//!
//! - [`Engine::new`] probes io_uring, sizes everything from the config and
//!   allocates it once: one aligned buffer pool (`threads x queue_depth`
//!   slots of `chunk_bytes`), and per worker a ring with its run of slots
//!   registered (`IORING_REGISTER_BUFFERS`, read with `ReadFixed`) and the
//!   device registered as a fixed file. Nothing is allocated per read.
//! - [`Engine::read_extents`] widens the extents to the logical block size,
//!   cuts them into reads of at most `chunk_bytes` and lets the workers take
//!   reads from one shared cursor. Each worker runs on a scoped thread pinned
//!   to its core, keeps up to `queue_depth` reads in flight on its ring, and
//!   calls `deliver` for each completed read on its own thread. The threads
//!   live for one call: spawning two threads costs tens of microseconds, and
//!   scoped threads let `deliver` borrow from the caller without any unsafe
//!   lifetime extension.
//! - `user_data` of every SQE is the slot index into the worker's fixed slot
//!   table; a slot's buffer belongs to the kernel from submission until its
//!   completion is reaped (see `worker.rs`), and no call returns with a read
//!   in flight.
//!
//! # What is delivered
//!
//! The widened range: each extent is rounded outward to whole logical blocks
//! and clamped to the device end, so deliveries are always a superset of what
//! was asked, block-aligned, in pieces of at most `chunk_bytes`, in any order.
//! Overlapping widened neighbours (sorted input, as the dirty map yields it)
//! are read once.
//!
//! # Unreadable ranges
//!
//! With a [`Salvage`] (`read_extents_salvaging`), a read that fails with an
//! error about its range (EIO, ENODATA, EILSEQ, EREMOTEIO; `salvage.rs`
//! says why these and no others) does not end the call: its worker re-reads
//! the chunk in pieces and then block by block, retrying each failing block
//! `retries` times, delivers every block that reads and reports each run
//! of blocks that stays unreadable ([`Unreadable`]). The main path stays as
//! it is (no allocation, no extra syscall); only a failed read pays.
//!
//! # Defaults
//!
//! [`Choice::Auto`] in an [`EngineConfig`] field means "the engine picks"
//! ([`tune::choose_geometry`], a pure function): threads = CPUs
//! in this process's affinity mask; queue depth and chunk size by device kind
//! ([`DeviceKind`], measured in PERF.md): 2 reads of 1 MiB per worker on
//! inline devices (zram); on queued devices (loop, NVMe) 1 MiB reads, as many
//! per worker as share an in-flight budget of 16 MiB (at most 1/32 of RAM),
//! 8 to 128 per worker: 8 with two workers. Paced reads (a rate limit, or
//! `paced`, for a caller that sets the rate while reads run) default to one worker with one read in flight,
//! sized by the rate ([`tune::paced_geometry`]), so that a live request
//! never queues behind more than one of our reads.

pub mod gait;
mod plan;
mod pool;
mod salvage;
mod tune;
mod worker;

pub use salvage::{RETRIES_MAX, is_range_error};
pub use tune::{Choice, DeviceKind, GeometryError};

use crate::geom::ByteExtent;
use crate::source::SourceDevice;
use crate::uring::KernelBuffers;
use hdrhistogram::Histogram;
use io_uring::{IoUring, opcode};
use plan::{Chunk, Cursor, Geometry};
use pool::BufferPool;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tune::{DeviceFacts, ReadGeometry};
use worker::{WorkerReport, WorkerRing};

/// Reader threads are named this and their index: what the foreground
/// sensor (`trace::live::foreground`) leaves out as ours.
pub const READ_THREAD_PREFIX: &str = "hc-read-";

/// Worker threads at most.
pub const THREADS_MAX: usize = 256;
/// Reads in flight per ring at most (and registered buffers per ring; the
/// kernel allows 16384).
pub const QUEUE_DEPTH_MAX: u32 = 4096;
/// Bytes per read at most. Larger reads gain nothing measurable and pin more
/// memory per slot.
pub const CHUNK_BYTES_MAX: u32 = 64 << 20;
/// Every buffer starts on a boundary of at least this (a page), more if the
/// logical block is larger.
pub const BUFFER_ALIGN_BYTES_MIN: u32 = 4096;

const _: () = assert!(CHUNK_BYTES_MAX.is_multiple_of(BUFFER_ALIGN_BYTES_MIN));
const _: () = assert!(QUEUE_DEPTH_MAX <= u16::MAX as u32);
const _: () = assert!(tune::CHUNK_BYTES_INLINE.is_multiple_of(BUFFER_ALIGN_BYTES_MIN));
const _: () = assert!(tune::CHUNK_BYTES_QUEUED.is_multiple_of(BUFFER_ALIGN_BYTES_MIN));

/// How the engine reads. [`Choice::Auto`] in a field means "pick the
/// default" (see the module documentation); `Default` leaves everything to
/// the engine, unpaced, at the thread's own priority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineConfig {
    /// Worker threads, each with its own ring. Auto = the number of CPUs in
    /// this process's affinity mask.
    pub threads: Choice<usize>,
    /// Reads in flight per ring (`-queue-depth`). Auto = by device kind.
    pub queue_depth: Choice<u32>,
    /// Largest read in bytes (`--chunk`), rounded down to the logical block
    /// size (at least one block). Auto = by device kind. Not capped to the
    /// queue's `max_sectors_kb`: the kernel splits larger reads more cheaply
    /// than we can issue small ones.
    pub chunk_bytes: Choice<u32>,
    /// Bytes per second at most, all workers together (`--max-rate`);
    /// 0 = as fast as the device goes. Reads are spaced evenly, not sent
    /// in bursts.
    pub max_rate_bytes_per_second: u64,
    /// The I/O priority every read carries in its SQE (`--ioprio`), as
    /// `IOPRIO_PRIO_VALUE(class, level)`; 0 = the thread's own.
    pub ioprio: u16,
    /// Reads will be paced while they run (the caller sets the rate with
    /// [`Engine::set_rate_limit`]) even if `max_rate_bytes_per_second` is
    /// 0. A paced engine's defaults keep the device's queue short: see
    /// [`tune::paced_geometry`].
    pub paced: bool,
}

/// `IOPRIO_PRIO_VALUE`: an I/O priority class (1 realtime, 2 best-effort,
/// 3 idle) and level (0 highest .. 7) as an SQE's `ioprio`.
pub fn ioprio_value(class: u16, level: u16) -> u16 {
    (class << 13) | (level & 0x1fff)
}

/// Spaces reads so that all workers together stay under a rate: each read
/// reserves the next free interval of `len / rate` on one shared clock and
/// waits for its start. Idle time is not saved up, so there are no bursts.
#[derive(Debug)]
struct Pacer {
    epoch: Instant,
    /// When the next read may start, in nanoseconds since `epoch`.
    next_ns: AtomicU64,
    /// Nanoseconds per byte as f64 bits; 0.0 = no limit. Changed while
    /// reads run by [`Engine::set_rate_limit`].
    ns_per_byte_bits: AtomicU64,
}

impl Pacer {
    fn new(bytes_per_second: u64) -> Pacer {
        let pacer = Pacer {
            epoch: Instant::now(),
            next_ns: AtomicU64::new(0),
            ns_per_byte_bits: AtomicU64::new(0),
        };
        pacer.set_rate(bytes_per_second);
        pacer
    }

    /// 0 = no limit.
    fn set_rate(&self, bytes_per_second: u64) {
        let ns_per_byte = if bytes_per_second == 0 {
            0.0
        } else {
            1e9 / bytes_per_second as f64
        };
        self.ns_per_byte_bits
            .store(ns_per_byte.to_bits(), Ordering::Relaxed);
    }

    /// Reserves `len_bytes` of the rate and returns when the read may
    /// start; None without a limit (then nothing is reserved: no clock read
    /// or shared write per read).
    fn reserve(&self, len_bytes: u32) -> Option<Instant> {
        let ns_per_byte = f64::from_bits(self.ns_per_byte_bits.load(Ordering::Relaxed));
        if ns_per_byte == 0.0 {
            return None;
        }
        let cost_ns = (f64::from(len_bytes) * ns_per_byte) as u64;
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        let mut next = self.next_ns.load(Ordering::Relaxed);
        loop {
            let start = next.max(now_ns);
            match self.next_ns.compare_exchange_weak(
                next,
                start + cost_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.epoch + Duration::from_nanos(start)),
                Err(current) => next = current,
            }
        }
    }
}

/// What the engine resolved its config to, for logs and `--stats-json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    pub threads: usize,
    pub queue_depth: u32,
    pub chunk_bytes: u32,
    pub device_kind: DeviceKind,
    pub logical_block_bytes: u32,
    /// Buffers registered with every ring (reads use `ReadFixed`).
    pub registered_buffers: bool,
    /// Bytes of read buffers, allocated once.
    pub pool_bytes: usize,
    /// Anything that fell back (registration refused, pinning failed).
    pub notes: Vec<String>,
}

/// One completed read, lent to `deliver`: the buffer is reused once the call
/// returns.
#[derive(Debug)]
pub struct ReadDone<'a> {
    /// Where `data` starts on the device; a multiple of the logical block.
    pub offset_bytes: u64,
    /// A multiple of the logical block size, at most `chunk_bytes`.
    pub data: &'a [u8],
}

/// A run of logical blocks the device could not read, after retries:
/// reported to [`Salvage::report`] instead of failing the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// Block-aligned, inside what was asked for (widened).
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// The errno of the last failed read of it (a range error).
    pub errno: i32,
}

/// How a read that fails with a range error is salvaged
/// ([`Engine::read_extents_salvaging`]).
pub struct Salvage<'a> {
    /// Re-reads of each block that failed (`--read-retries`), capped at
    /// [`RETRIES_MAX`].
    pub retries: u32,
    /// Called on the worker thread for each unreadable run, merged per
    /// chunk, in any order; an error fails the call like a deliver error.
    pub report: &'a (dyn Fn(Unreadable) -> anyhow::Result<()> + Sync),
}

/// What one `read_extents` call did.
#[derive(Clone, Debug)]
pub struct ReadStats {
    /// Bytes delivered (the widened ranges, less what was unreadable).
    pub bytes_read: u64,
    /// Bytes reported unreadable.
    pub bytes_unreadable: u64,
    /// Chunks whose read failed and were salvaged.
    pub chunks_salvaged: u64,
    /// Reads the salvage issued, and of those the retries of a block.
    pub salvage_reads: u64,
    pub retry_reads: u64,
    /// Reads delivered (a read resubmitted after a short read counts once).
    pub reads: u64,
    /// Per read, first submission to final completion, microseconds;
    /// merged over the workers.
    pub latency_us: Histogram<u64>,
    pub elapsed: Duration,
}

/// Every way the engine itself fails: what [`Engine::new`] returns, and
/// the error object of a failed read call when the failure was the
/// engine's (not an error of `deliver` or `report`, which come back as
/// they were returned), so that the top level can find it with
/// `anyhow::Error::downcast_ref::<EngineError>()` and map it. Each variant
/// displays as the engine's errors always have.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Unavailable(#[from] IoUringUnavailable),
    /// The config asks for what the engine cannot do.
    #[error(transparent)]
    Config(GeometryError),
    /// The device cannot be read with O_DIRECT as it reports itself.
    #[error("{}: {error}", device.display())]
    Device {
        device: PathBuf,
        error: GeometryError,
    },
    #[error(
        "read buffers of {slot_count} x {slot_bytes} bytes exceed the limit of {limit_mib} MiB; \
         use a smaller chunk, queue depth or thread count"
    )]
    PoolTooLarge {
        slot_count: usize,
        slot_bytes: usize,
        limit_mib: u64,
    },
    #[error("cannot allocate {bytes} bytes of read buffers: {error}")]
    PoolAlloc { bytes: usize, error: io::Error },
    #[error("cannot duplicate the descriptor of {}: {error}", device.display())]
    Duplicate { device: PathBuf, error: io::Error },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Stopped(#[from] Stopped),
    #[error(
        "read of {len_bytes} bytes at byte offset {offset_bytes} of {} returned end of \
         device (planned for a device of {device_bytes} bytes; did it shrink?)",
        device.display()
    )]
    EndOfDevice {
        device: PathBuf,
        offset_bytes: u64,
        len_bytes: u64,
        device_bytes: u64,
    },
    #[error(
        "short read of {got_bytes} bytes at byte offset {offset_bytes} of {} is not a \
         whole number of {block_bytes}-byte blocks",
        device.display()
    )]
    ShortRead {
        device: PathBuf,
        got_bytes: u32,
        offset_bytes: u64,
        block_bytes: u64,
    },
    /// `io_uring_enter` failed ([`crate::uring::EnterError`], with the
    /// device); the ring is not entered again.
    #[error("{reason}")]
    Ring { reason: String },
    #[error("the read engine is unusable after an earlier io_uring failure: {reason}")]
    Unusable { reason: String },
    #[error("cannot start read worker {worker_index}: {error}")]
    WorkerStart {
        worker_index: usize,
        error: io::Error,
    },
}

/// The stop flag was set: the call returned early, with no read in flight.
#[derive(Debug, thiserror::Error)]
#[error("stopped before every read was done")]
pub struct Stopped;

/// io_uring cannot be used on this kernel or in this process.
#[derive(Debug, thiserror::Error)]
#[error("io_uring unavailable: {reason}")]
pub struct IoUringUnavailable {
    pub reason: String,
}

/// A read of the device failed (after retries, for EAGAIN/EINTR) with an
/// error that is not about its range, or with any error when not salvaging.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read {len_bytes} bytes at byte offset {offset_bytes} of {}: {source}; {}",
    device.display(),
    read_error_advice(source.raw_os_error())
)]
pub struct ReadError {
    pub device: PathBuf,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// EAGAIN/EINTR retries before the read was given up.
    pub retry_count: u32,
    #[source]
    pub source: io::Error,
}

impl ReadError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// What a user can do about a failed read, by errno.
fn read_error_advice(errno: Option<i32>) -> &'static str {
    match errno {
        Some(errno) if is_range_error(errno) => {
            "the device cannot read there (a bad sector or a failing disk)"
        }
        Some(libc::ENOMEDIUM) => {
            "the medium was removed; put it back and image again (this is not a bad range, so the run stopped)"
        }
        Some(libc::ENODEV | libc::ENXIO) => {
            "the device went offline or away; check its connection and dmesg, and image again"
        }
        _ => {
            "this error says nothing about these bytes, so the run stopped rather than record readable data as lost; check dmesg and image again"
        }
    }
}

pub struct Engine {
    // Field order matters for drop: the rings (holding the registration)
    // before the pool, and the pool not at all if a read was abandoned
    // (`Drop` marks it; the rule is `uring`'s).
    workers: Box<[Mutex<WorkerRing>]>,
    pool: KernelBuffers<BufferPool>,
    /// Our own descriptor of the device (a dup: the engine does not borrow
    /// the `SourceDevice`).
    _file: File,
    device_path: PathBuf,
    device_bytes: u64,
    /// Where each worker is pinned; `None` when the mask was unreadable.
    cores: Box<[Option<core_affinity::CoreId>]>,
    settings: EngineSettings,
    /// One `read_extents` at a time: the workers' rings are not shared.
    run_lock: Mutex<()>,
    /// The rate limit, across every call (no limit when 0).
    pacer: Pacer,
    gait: gait::Gait,
}

impl Engine {
    pub fn new(device: &SourceDevice, config: EngineConfig) -> Result<Engine, EngineError> {
        probe_io_uring()?;
        let core_ids = core_affinity::get_core_ids().filter(|ids| !ids.is_empty());
        let facts = DeviceFacts {
            kind: DeviceKind::detect(&device.disk_name),
            device_bytes: device.size_bytes,
            logical_block_bytes: device.logical_block_bytes,
            cpu_count: core_ids.as_ref().map(Vec::len),
            in_flight_budget_bytes: tune::in_flight_bytes_budget(),
        };
        let geometry = tune::choose_geometry(&facts, &config).map_err(|error| {
            if error.is_about_the_device() {
                EngineError::Device {
                    device: device.path.clone(),
                    error,
                }
            } else {
                EngineError::Config(error)
            }
        })?;
        let pool = BufferPool::new(
            geometry.threads * geometry.queue_depth as usize,
            geometry.slot_bytes as usize,
            geometry.align_bytes as usize,
        )?;
        let file = device
            .file
            .try_clone()
            .map_err(|error| EngineError::Duplicate {
                device: device.path.clone(),
                error,
            })?;
        let mut notes = Vec::new();
        let workers = Self::rings(&pool, &file, geometry, config.ioprio, &mut notes)?;
        let cores: Box<[Option<core_affinity::CoreId>]> = (0..geometry.threads)
            .map(|i| core_ids.as_ref().map(|ids| ids[i % ids.len()]))
            .collect();
        if core_ids.is_none() {
            notes.push("cannot read the CPU affinity mask: workers are not pinned".to_string());
        }
        let settings = EngineSettings {
            threads: geometry.threads,
            queue_depth: geometry.queue_depth,
            chunk_bytes: geometry.chunk_bytes,
            device_kind: facts.kind,
            logical_block_bytes: facts.logical_block_bytes,
            registered_buffers: workers.iter().all(|w| lock(w).registered_buffers()),
            pool_bytes: pool.total_bytes(),
            notes,
        };
        Ok(Engine {
            workers,
            pool: KernelBuffers::new(pool),
            _file: file,
            device_path: device.path.clone(),
            device_bytes: device.size_bytes,
            cores,
            settings,
            run_lock: Mutex::new(()),
            pacer: Pacer::new(config.max_rate_bytes_per_second),
            gait: gait::Gait::new(match facts.kind {
                // Inline reads are copies on the submitting CPU, not a queue
                // at the device: a smaller read only costs more syscalls.
                DeviceKind::Inline => geometry.chunk_bytes,
                DeviceKind::Queued => geometry.chunk_bytes.min(gait::GENTLE_CHUNK_BYTES),
            }),
        })
    }

    /// One ring per worker, each with its own run of `queue_depth` slots of
    /// the pool registered; why any registration fell back goes to `notes`.
    fn rings(
        pool: &BufferPool,
        file: &File,
        geometry: ReadGeometry,
        ioprio: u16,
        notes: &mut Vec<String>,
    ) -> Result<Box<[Mutex<WorkerRing>]>, EngineError> {
        let queue_depth = geometry.queue_depth as usize;
        let mut workers = Vec::with_capacity(geometry.threads);
        for worker_index in 0..geometry.threads {
            let slot_ptrs: Box<[*mut u8]> = (0..queue_depth)
                .map(|i| pool.slot_ptr(worker_index * queue_depth + i))
                .collect();
            // SAFETY: these slots are this worker's alone, slot_bytes long and
            // aligned; the pool outlives the ring (dropped after it in Drop,
            // or leaked if a read was abandoned).
            let mut ring =
                unsafe { WorkerRing::new(file.as_raw_fd(), slot_ptrs, geometry.slot_bytes) }
                    .map_err(|err| io_uring_error("cannot create a ring", err))?;
            if let Some(note) = &ring.registration_note {
                notes.push(format!("worker {worker_index}: {note}"));
            }
            ring.ioprio = ioprio;
            workers.push(Mutex::new(ring));
        }
        Ok(workers.into_boxed_slice())
    }

    /// Changes the rate limit, also while reads run; 0 = no limit.
    pub fn set_rate_limit(&self, bytes_per_second: u64) {
        self.pacer.set_rate(bytes_per_second);
    }

    /// Reads gently (one small read at a time, spaced; `gait.rs`) or at
    /// full speed from the next submission on, also while reads run.
    pub fn set_gentle(&self, gentle: bool) {
        self.gait.set_gentle(gentle);
    }

    pub fn is_gentle(&self) -> bool {
        self.gait.is_gentle()
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Reads every byte of `extents` (byte offsets and lengths on the device,
    /// whole 512-byte sectors, none starting past the device end; sorted and
    /// disjoint reads best) and calls `deliver` with each completed read, on
    /// the worker thread, as soon as it completes, in any order. What is
    /// delivered is each extent widened to whole logical blocks and clamped
    /// to the device end (module documentation).
    ///
    /// Returns when everything is read and delivered, or on the first error:
    /// a [`ReadError`] (device, offset, length, errno), an error of `deliver`
    /// (with context), or [`Stopped`] once `stop` is seen set. The other
    /// workers then stop taking reads; nothing is delivered after the first
    /// error; the call returns only when no read is in flight. A panic in
    /// `deliver` is re-raised here, also after every read has completed.
    ///
    /// `progress` is increased by each delivered read's length.
    ///
    /// Any failed read is a [`ReadError`]; [`Engine::read_extents_salvaging`]
    /// keeps what reads around an unreadable range instead.
    pub fn read_extents(
        &self,
        extents: &[ByteExtent],
        deliver: &(dyn Fn(ReadDone<'_>) -> anyhow::Result<()> + Sync),
        progress: Option<&AtomicU64>,
        stop: &AtomicBool,
    ) -> anyhow::Result<ReadStats> {
        self.read_extents_salvaging(extents, deliver, None, progress, stop)
    }

    /// [`Engine::read_extents`], and with `salvage` a read that fails with a
    /// range error is split down to the logical block: every block that
    /// reads is delivered, each run that stays unreadable after the retries
    /// is reported to `salvage.report` (module documentation). `progress`
    /// then counts unreadable bytes too, so that it reaches the total.
    pub fn read_extents_salvaging(
        &self,
        extents: &[ByteExtent],
        deliver: &(dyn Fn(ReadDone<'_>) -> anyhow::Result<()> + Sync),
        salvage: Option<&Salvage<'_>>,
        progress: Option<&AtomicU64>,
        stop: &AtomicBool,
    ) -> anyhow::Result<ReadStats> {
        let started = Instant::now();
        let _one_at_a_time = lock(&self.run_lock);
        let geometry = Geometry::new(
            self.device_bytes,
            u64::from(self.settings.logical_block_bytes),
            u64::from(self.settings.chunk_bytes),
        );
        for extent in extents {
            geometry.check_extent(extent);
        }
        if stop.load(Ordering::Relaxed) {
            return Err(EngineError::Stopped(Stopped).into());
        }
        let job = Job {
            device: &self.device_path,
            geometry,
            cursor: Mutex::new(Cursor::new(geometry, extents)),
            deliver,
            progress,
            stop,
            halted: AtomicBool::new(false),
            first_error: Mutex::new(None),
            pacer: Some(&self.pacer),
            gait: &self.gait,
            salvage,
        };
        // No more workers than reads: a catch-up of one block uses one.
        let crew = (geometry
            .read_count_max(extents)
            .min(self.workers.len() as u64)) as usize;
        let reports = self.run_crew(&job, crew);
        if let Some(err) = job
            .first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(err);
        }
        Ok(self.merge_stats(&reports, started.elapsed()))
    }

    /// Runs the first `crew` workers on `job`, each on a scoped thread
    /// pinned to its core, until they are done; re-raises a worker's panic
    /// once all have returned.
    fn run_crew(&self, job: &Job<'_>, crew: usize) -> Vec<WorkerReport> {
        let mut reports: Vec<WorkerReport> = Vec::with_capacity(crew);
        let mut panic_payload = None;
        std::thread::scope(|scope| {
            let mut handles = Vec::with_capacity(crew);
            for (worker_index, worker) in self.workers.iter().enumerate().take(crew) {
                let core = self.cores[worker_index];
                let spawned = std::thread::Builder::new()
                    .name(format!("{READ_THREAD_PREFIX}{worker_index}"))
                    .spawn_scoped(scope, move || {
                        if let Some(core) = core {
                            // Best effort: an unpinned worker reads as well.
                            core_affinity::set_for_current(core);
                        }
                        lock(worker).run(job, worker_index)
                    });
                match spawned {
                    Ok(handle) => handles.push(handle),
                    Err(error) => {
                        job.fail_with(EngineError::WorkerStart {
                            worker_index,
                            error,
                        });
                        break;
                    }
                }
            }
            for handle in handles {
                match handle.join() {
                    Ok(report) => reports.push(report),
                    Err(payload) => panic_payload = Some(payload),
                }
            }
        });
        if let Some(payload) = panic_payload {
            std::panic::resume_unwind(payload);
        }
        reports
    }

    /// One call's stats from its workers' reports and latency histograms.
    fn merge_stats(&self, reports: &[WorkerReport], elapsed: Duration) -> ReadStats {
        let mut latency_us = Histogram::new_with_bounds(1, worker::LATENCY_US_MAX, 3)
            .expect("constant histogram bounds are valid");
        for worker in self.workers.iter().take(reports.len()) {
            latency_us
                .add(&lock(worker).latency_us)
                .expect("histograms of the same bounds merge");
        }
        ReadStats {
            bytes_read: reports.iter().map(|r| r.bytes_read).sum(),
            bytes_unreadable: reports.iter().map(|r| r.bytes_unreadable).sum(),
            chunks_salvaged: reports.iter().map(|r| r.chunks_salvaged).sum(),
            salvage_reads: reports.iter().map(|r| r.salvage_reads).sum(),
            retry_reads: reports.iter().map(|r| r.retry_reads).sum(),
            reads: reports.iter().map(|r| r.reads).sum(),
            latency_us,
            elapsed,
        }
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[test]
    fn reservations_are_spaced_by_their_cost_without_saving_idle_time() {
        let pacer = Pacer::new(1_000_000); // 1 byte per microsecond
        let first = pacer.reserve(1000).unwrap();
        let second = pacer.reserve(1000).unwrap();
        let third = pacer.reserve(500).unwrap();
        assert_eq!(second - first, Duration::from_millis(1));
        assert_eq!(third - second, Duration::from_millis(1));
        // After an idle spell the next read starts now, not in the past:
        // no burst makes up for the pause.
        let before_sleep = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let after_idle = pacer.reserve(1000).unwrap();
        assert!(after_idle >= before_sleep + Duration::from_millis(20));
        let fourth = pacer.reserve(1000).unwrap();
        assert_eq!(fourth - after_idle, Duration::from_millis(1));
        // No limit: nothing reserved.
        assert!(Pacer::new(0).reserve(1000).is_none());
    }

    #[test]
    fn io_priority_values() {
        assert_eq!(ioprio_value(3, 0), 0x6000);
        assert_eq!(ioprio_value(2, 7), 0x4007);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let abandoned_reads = self.workers.iter_mut().any(|w| {
            w.get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .abandoned_reads
        });
        if abandoned_reads {
            // The kernel may still write into these buffers: never free them.
            self.pool.abandon();
        }
        // Then the fields drop in order: the rings, then the pool.
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device_path)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One `read_extents` call, shared by its workers.
pub(crate) struct Job<'a> {
    pub device: &'a Path,
    pub geometry: Geometry,
    cursor: Mutex<Cursor<'a>>,
    pub deliver: &'a (dyn Fn(ReadDone<'_>) -> anyhow::Result<()> + Sync),
    pub progress: Option<&'a AtomicU64>,
    stop: &'a AtomicBool,
    /// Set on the first error or stop: workers take no more reads and
    /// deliver nothing more.
    halted: AtomicBool,
    first_error: Mutex<Option<anyhow::Error>>,
    pacer: Option<&'a Pacer>,
    /// Full speed or gentle, read before every submission.
    pub gait: &'a gait::Gait,
    /// Salvage reads that fail with a range error instead of failing.
    pub salvage: Option<&'a Salvage<'a>>,
}

impl Job<'_> {
    /// Whether the cursor has a read left.
    pub fn has_more(&self) -> bool {
        lock(&self.cursor).has_more()
    }

    /// The next read, of at most `len_bytes_max`.
    pub fn next_chunk(&self, len_bytes_max: u32) -> Option<Chunk> {
        lock(&self.cursor).next_chunk_at_most(len_bytes_max)
    }

    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::Relaxed)
    }

    pub fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
    }

    /// With a rate limit, waits until a read of `len_bytes` may start
    /// (in slices, so that a stop is still seen promptly).
    pub fn pace(&self, len_bytes: u32) {
        let Some(start) = self.pacer.and_then(|pacer| pacer.reserve(len_bytes)) else {
            return;
        };
        while let Some(wait) = start.checked_duration_since(Instant::now()) {
            self.poll_stop();
            if self.is_halted() {
                return;
            }
            std::thread::sleep(wait.min(Duration::from_millis(50)));
        }
    }

    /// Halts the job if the caller set the stop flag.
    pub fn poll_stop(&self) {
        if !self.is_halted() && self.stop.load(Ordering::Relaxed) {
            self.fail_with(EngineError::Stopped(Stopped));
        }
    }

    /// Fails the job for a read that found the device shorter than planned.
    pub fn fail_at_end_of_device(&self, offset_bytes: u64, len_bytes: u64) {
        self.fail_with(EngineError::EndOfDevice {
            device: self.device.to_path_buf(),
            offset_bytes,
            len_bytes,
            device_bytes: self.geometry.device_bytes,
        });
    }

    /// Fails the job with an error of the engine's own.
    pub fn fail_with(&self, err: EngineError) {
        self.fail(anyhow::Error::new(err));
    }

    /// Records `err` unless an error came first, and halts the job.
    pub fn fail(&self, err: anyhow::Error) {
        let mut first_error = lock(&self.first_error);
        if first_error.is_none() {
            *first_error = Some(err);
        }
        self.halt();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked left its ring drained and consistent (see
    // `WorkerRing::run`), so a poisoned lock holds nothing broken.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_uring_error(what: &str, err: io::Error) -> IoUringUnavailable {
    let reason = match err.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (ENOSYS)".to_string(),
        Some(libc::EPERM) => format!(
            "{what}: not permitted ({err}); see sysctl kernel.io_uring_disabled and any seccomp or \
             container policy"
        ),
        _ => format!("{what}: {err}"),
    };
    IoUringUnavailable { reason }
}

/// Checks that io_uring exists, may be used, and can read (`READ`,
/// `READ_FIXED`), and says which of these fails.
pub fn probe_io_uring() -> Result<(), IoUringUnavailable> {
    let ring: IoUring = IoUring::new(2).map_err(|err| io_uring_error("io_uring_setup", err))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|err| IoUringUnavailable {
            reason: format!(
                "cannot probe its operations (IORING_REGISTER_PROBE needs Linux 5.6): {err}"
            ),
        })?;
    for (code, name) in [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED"),
    ] {
        if !probe.is_supported(code) {
            return Err(IoUringUnavailable {
                reason: format!("the kernel does not support {name}"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_read_as_they_did_before_they_were_typed() {
        let end = EngineError::EndOfDevice {
            device: PathBuf::from("/dev/loop7"),
            offset_bytes: 4096,
            len_bytes: 512,
            device_bytes: 8192,
        };
        assert_eq!(
            end.to_string(),
            "read of 512 bytes at byte offset 4096 of /dev/loop7 returned end of device \
             (planned for a device of 8192 bytes; did it shrink?)"
        );
        let stopped = anyhow::Error::new(EngineError::Stopped(Stopped));
        assert_eq!(stopped.to_string(), "stopped before every read was done");
        assert_eq!(stopped.chain().count(), 1);
        // Transparent: the causes printed under it are the read error's.
        let read = anyhow::Error::new(EngineError::Read(ReadError {
            device: PathBuf::from("/dev/loop7"),
            offset_bytes: 0,
            len_bytes: 512,
            retry_count: 0,
            source: io::Error::from_raw_os_error(libc::EIO),
        }));
        let causes: Vec<String> = read.chain().map(|c| c.to_string()).collect();
        assert_eq!(causes.len(), 2, "{causes:?}");
        assert_eq!(
            causes[1],
            io::Error::from_raw_os_error(libc::EIO).to_string()
        );
        assert!(matches!(read.downcast_ref(), Some(EngineError::Read(_))));
        let device = EngineError::Device {
            device: PathBuf::from("/dev/sdz"),
            error: GeometryError::LogicalBlock(1000),
        };
        assert_eq!(
            device.to_string(),
            "/dev/sdz: logical block size 1000 is not a power of two of at least 512"
        );
    }

    #[test]
    fn io_uring_is_available_here() {
        // The machines this is built for run Linux 6.x with io_uring.
        probe_io_uring().unwrap();
    }

    #[test]
    fn errors_name_the_device_offset_and_errno() {
        let err = ReadError {
            device: PathBuf::from("/dev/loop7"),
            offset_bytes: 4096,
            len_bytes: 512,
            retry_count: 0,
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        let text = err.to_string();
        assert!(
            text.contains("/dev/loop7") && text.contains("4096") && text.contains("os error 5"),
            "{text}"
        );
        assert_eq!(err.errno(), Some(libc::EIO));
        let err = io_uring_error("io_uring_setup", io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(
            err.to_string().starts_with("io_uring unavailable: "),
            "{err}"
        );
    }
}
