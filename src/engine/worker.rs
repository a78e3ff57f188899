//! One worker: an io_uring, its run of pool slots, and the loop that keeps
//! `queue_depth` reads in flight until the shared cursor runs dry.
//!
//! Ownership of a slot's buffer, the invariant everything here keeps:
//!
//! - `Slot::Free`: the worker owns the buffer; nothing reads or writes it.
//! - `Slot::InFlight`: the kernel owns it from the push of its SQE until its
//!   CQE is reaped. The user_data of the SQE is the slot index, nothing else.
//! - After the CQE is reaped the worker owns it again: it resubmits the rest
//!   (short read, EAGAIN) or lends it to `deliver` for the duration of one
//!   call, then frees the slot. A slot is never resubmitted while lent.
//!
//! The worker never leaves `run` with a read in flight, not on an error, a
//! stop or a panic (see [`WorkerRing::run`]): it drains its ring
//! ([`uring::drain`]), and if even that fails it marks its reads abandoned,
//! so that the engine leaks the pool ([`uring::KernelBuffers`]) rather than
//! free memory the kernel may still write (the rule is `uring`'s).

use super::gait::Admit;
use super::plan::Chunk;
use super::salvage::{self, BadSpan, SalvagePlan, SalvageStop, Salvaged};
use super::{EngineError, Job, ReadDone, ReadError, Salvage, Unreadable};
use crate::uring::{self, Entered, Kernel, Waiter};
use hdrhistogram::Histogram;
use io_uring::{IoUring, opcode, squeue, types};
use std::io;
use std::os::unix::io::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Retries of one read that failed with EAGAIN or EINTR (the kernel could
/// not take it right now) before it counts as failed; salvage's re-reads
/// keep the same bound.
pub(crate) const READ_RETRIES_MAX: u32 = 16;
/// Largest latency the histogram records exactly (an hour); longer reads
/// are recorded as this.
pub(crate) const LATENCY_US_MAX: u64 = 3_600_000_000;

#[derive(Clone, Copy, Debug)]
enum Slot {
    Free,
    InFlight(ReadInFlight),
}

#[derive(Clone, Copy, Debug)]
struct ReadInFlight {
    chunk: Chunk,
    /// Bytes of the chunk already read (a short read resubmits the rest).
    done_bytes: u32,
    retry_count: u32,
    /// First submission of the chunk: the latency covers retries.
    submitted_at: Instant,
}

/// Counters of one worker for one `read_extents` call.
#[derive(Default)]
pub(crate) struct WorkerReport {
    pub bytes_read: u64,
    pub reads: u64,
    /// Salvage (see `salvage.rs`): bytes reported unreadable, chunks that
    /// needed it, the reads it issued and how many of them were retries.
    pub bytes_unreadable: u64,
    pub chunks_salvaged: u64,
    pub salvage_reads: u64,
    pub retry_reads: u64,
}

/// What one `fill` ended on.
enum Fill {
    /// The cursor has no more reads.
    Dry,
    /// The gait holds the next read back for at most this long.
    Held(Duration),
    /// Every slot has a read in flight.
    Full,
}

pub(crate) struct WorkerRing {
    ring: IoUring,
    /// The device, as a registered file (index 0) when `fixed_file`.
    fd: RawFd,
    fixed_file: bool,
    /// Buffers registered: slot `i` is registered buffer `i`, read with
    /// `ReadFixed`; otherwise plain `Read` (the kernel pins pages per read).
    registered_buffers: bool,
    /// `slots[i]`'s buffer, `slot_bytes` long.
    slot_ptrs: Box<[*mut u8]>,
    slot_bytes: u32,
    slots: Box<[Slot]>,
    /// Stack of free slot indexes: `free_slots[..free_count]`.
    free_slots: Box<[u16]>,
    free_count: usize,
    /// SQEs pushed whose CQE has not been reaped yet.
    in_flight_count: usize,
    /// CQEs of one turn, collected before any is handled: (user_data, result).
    completions: Box<[(u64, i32)]>,
    /// The bounded submit-and-wait, with its count of refusals in a row.
    waiter: Waiter,
    /// Per-read latency of the current call, microseconds.
    pub latency_us: Histogram<u64>,
    /// Why buffers or the file could not be registered, if they could not.
    pub registration_note: Option<String>,
    /// Set when `io_uring_enter` failed in a way that leaves SQEs the kernel
    /// never took in the ring: the ring must not be entered again.
    pub broken: Option<String>,
    /// Reads the kernel may still write that could not be waited for: the
    /// engine must then leak its pool rather than free it.
    pub abandoned_reads: bool,
    /// The SQE `ioprio` of every read (0 = the thread's own).
    pub ioprio: u16,
}

// SAFETY: the raw slot pointers point into the engine's pool, which outlives
// the ring and is only touched through this worker's slots; the ring itself
// is Send. A `WorkerRing` is used by one thread at a time (behind a Mutex).
unsafe impl Send for WorkerRing {}

impl WorkerRing {
    /// A ring of `slot_ptrs.len()` entries (the queue depth) with the
    /// slots' buffers and the device registered where the kernel allows.
    ///
    /// # Safety
    ///
    /// Every pointer in `slot_ptrs` must point to `slot_bytes` of memory,
    /// aligned for O_DIRECT, used by nothing else, and valid until the
    /// returned ring is dropped (the kernel keeps the registration, and may
    /// write into a buffer until its read's completion is reaped).
    pub unsafe fn new(
        fd: RawFd,
        slot_ptrs: Box<[*mut u8]>,
        slot_bytes: u32,
    ) -> io::Result<WorkerRing> {
        let queue_depth = slot_ptrs.len();
        assert!(queue_depth > 0 && queue_depth <= usize::from(u16::MAX));
        // The CQ holds at least every read in flight, so it never overflows.
        let ring = IoUring::builder()
            .setup_cqsize(2 * queue_depth as u32)
            .build(queue_depth as u32)?;
        assert!(ring.params().cq_entries() as usize >= queue_depth);
        assert!(ring.params().sq_entries() as usize >= queue_depth);
        let mut notes = Vec::new();
        let iovecs: Vec<libc::iovec> = slot_ptrs
            .iter()
            .map(|&ptr| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: slot_bytes as usize,
            })
            .collect();
        // SAFETY: the caller guarantees the buffers stay valid and unused by
        // anything else until the ring (which holds the registration) drops.
        let registered_buffers = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(err) => {
                notes.push(format!(
                    "buffers not registered ({err}), reading without ReadFixed"
                ));
                false
            }
        };
        let fixed_file = match ring.submitter().register_files(&[fd]) {
            Ok(()) => true,
            Err(err) => {
                notes.push(format!("device file not registered ({err})"));
                false
            }
        };
        Ok(WorkerRing {
            ring,
            fd,
            fixed_file,
            registered_buffers,
            slot_ptrs,
            slot_bytes,
            slots: vec![Slot::Free; queue_depth].into_boxed_slice(),
            free_slots: (0..queue_depth as u16).rev().collect(),
            free_count: queue_depth,
            in_flight_count: 0,
            completions: vec![(0, 0); queue_depth].into_boxed_slice(),
            waiter: Waiter::default(),
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("constant histogram bounds are valid"),
            registration_note: (!notes.is_empty()).then(|| notes.join("; ")),
            ioprio: 0,
            broken: None,
            abandoned_reads: false,
        })
    }

    pub fn registered_buffers(&self) -> bool {
        self.registered_buffers
    }

    /// Reads chunks from the job's cursor until it runs dry or the job halts
    /// (an error anywhere, or the stop flag), and returns with no read in
    /// flight. A panic (a bug, or in `deliver`) halts the job, waits for
    /// this ring's reads to complete, and then continues unwinding.
    pub fn run(&mut self, job: &Job<'_>, worker_index: usize) -> WorkerReport {
        self.latency_us.reset();
        let mut report = WorkerReport::default();
        if let Some(reason) = &self.broken {
            job.fail_with(EngineError::Unusable {
                reason: reason.clone(),
            });
            return report;
        }
        assert_eq!(self.in_flight_count, 0);
        assert_eq!(self.free_count, self.slots.len());
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            self.run_turns(job, worker_index, &mut report)
        }));
        if let Err(payload) = outcome {
            job.halt();
            self.drain_after_panic();
            panic::resume_unwind(payload);
        }
        assert_eq!(
            self.in_flight_count, 0,
            "a worker returned with reads in flight"
        );
        report
    }

    fn run_turns(&mut self, job: &Job<'_>, worker_index: usize, report: &mut WorkerReport) {
        let mut cursor_dry = false;
        // Runs until the cursor is dry or the job halted, and nothing is in
        // flight: each turn submits, reaps, or waits one bounded slice (the
        // waiter bounds refusals in a row; a slow device is waited for, with
        // the stop flag polled every slice; a worker the gait holds back
        // with nothing in flight sleeps at most `gait::HOLD_SLICE`).
        loop {
            job.poll_stop();
            let halted = job.is_halted();
            let mut held = None;
            if !halted && !cursor_dry {
                match self.fill(job, worker_index) {
                    Fill::Dry => cursor_dry = true,
                    Fill::Held(wait) => held = Some(wait),
                    Fill::Full => {}
                }
            }
            if self.in_flight_count == 0 {
                if let Some(wait) = held {
                    std::thread::sleep(wait);
                    continue;
                }
                assert!(halted || cursor_dry, "idle with work left");
                break;
            }
            match self.waiter.enter(&mut self.ring, 1) {
                Ok(Entered::Ready | Entered::Early) => {}
                Err(err) => {
                    let reason = format!("{err} while reading {}", job.device.display());
                    self.give_up(job, reason);
                    return;
                }
            }
            let completion_count = self.collect_completions();
            if completion_count > 0 {
                self.waiter.progressed();
            }
            for completion_index in 0..completion_count {
                let (user_data, result) = self.completions[completion_index];
                self.handle_completion(job, report, user_data, result);
            }
        }
    }

    /// Submits a read into every free slot while the cursor has chunks and
    /// the gait admits them (`gait::admit`).
    fn fill(&mut self, job: &Job<'_>, worker_index: usize) -> Fill {
        while self.free_count > 0 {
            let chunk_bytes = job.geometry.chunk_bytes as u32;
            let len_bytes_max =
                match job
                    .gait
                    .admit(worker_index, self.in_flight_count, chunk_bytes)
                {
                    Admit::Go { len_bytes_max } => len_bytes_max,
                    // One the gentle gait holds back must still see the
                    // cursor run dry (worker 0 took the last read), or it
                    // would wait for a turn that never comes.
                    Admit::Hold(_) if !job.has_more() => return Fill::Dry,
                    Admit::Hold(wait) => return Fill::Held(wait),
                };
            let Some(chunk) = job.next_chunk(len_bytes_max) else {
                return Fill::Dry;
            };
            job.pace(chunk.len_bytes);
            self.free_count -= 1;
            let slot_index = usize::from(self.free_slots[self.free_count]);
            self.submit(
                slot_index,
                ReadInFlight {
                    chunk,
                    done_bytes: 0,
                    retry_count: 0,
                    submitted_at: Instant::now(),
                },
            );
        }
        Fill::Full
    }

    /// Pushes the SQE for the rest of `read` into slot `slot_index`.
    fn submit(&mut self, slot_index: usize, read: ReadInFlight) {
        match self.slots[slot_index] {
            Slot::Free => assert!(
                read.done_bytes == 0 && read.retry_count == 0,
                "a fresh read"
            ),
            Slot::InFlight(previous) => assert_eq!(previous.chunk, read.chunk, "a resubmission"),
        }
        let chunk = read.chunk;
        assert!(read.done_bytes < chunk.len_bytes);
        assert!(chunk.len_bytes <= self.slot_bytes);
        let offset_bytes = chunk.offset_bytes + u64::from(read.done_bytes);
        let len_bytes = chunk.len_bytes - read.done_bytes;
        // SAFETY: done_bytes < len_bytes <= slot_bytes, inside the slot.
        let buf = unsafe { self.slot_ptrs[slot_index].add(read.done_bytes as usize) };
        let entry = match (self.registered_buffers, self.fixed_file) {
            (true, true) => {
                opcode::ReadFixed::new(types::Fixed(0), buf, len_bytes, slot_index as u16)
                    .offset(offset_bytes)
                    .ioprio(self.ioprio)
                    .build()
            }
            (true, false) => {
                opcode::ReadFixed::new(types::Fd(self.fd), buf, len_bytes, slot_index as u16)
                    .offset(offset_bytes)
                    .ioprio(self.ioprio)
                    .build()
            }
            (false, true) => opcode::Read::new(types::Fixed(0), buf, len_bytes)
                .offset(offset_bytes)
                .ioprio(self.ioprio)
                .build(),
            (false, false) => opcode::Read::new(types::Fd(self.fd), buf, len_bytes)
                .offset(offset_bytes)
                .ioprio(self.ioprio)
                .build(),
        };
        let entry: squeue::Entry = entry.user_data(slot_index as u64);
        // SAFETY: the buffer is slot `slot_index`'s, which from here until
        // its completion is reaped belongs to the kernel alone (the slot is
        // InFlight, never lent or resubmitted meanwhile), and the pool
        // outlives the ring (see `new`). `run` waits for every completion.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        // The SQ has at least queue_depth entries and the loop submits each
        // turn, so at most queue_depth SQEs are ever queued: never full.
        pushed.expect("submission queue full with at most queue_depth reads");
        self.slots[slot_index] = Slot::InFlight(read);
        self.in_flight_count += 1;
    }

    /// Moves available CQEs into `completions` (it holds one per slot, so
    /// every CQE there is); returns how many.
    fn collect_completions(&mut self) -> usize {
        let completion_count = self.ring.reap(&mut self.completions);
        assert!(
            completion_count <= self.in_flight_count,
            "more completions than reads in flight"
        );
        self.in_flight_count -= completion_count;
        completion_count
    }

    /// One reaped CQE: its slot's read failed (`result` < 0, an errno) or
    /// read `result` bytes.
    fn handle_completion(
        &mut self,
        job: &Job<'_>,
        report: &mut WorkerReport,
        user_data: u64,
        result: i32,
    ) {
        let slot_index = usize::try_from(user_data)
            .ok()
            .filter(|&index| index < self.slots.len())
            .unwrap_or_else(|| unreachable!("completion with user_data {user_data}: not a slot"));
        let Slot::InFlight(read) = self.slots[slot_index] else {
            unreachable!("completion for slot {slot_index}, which has no read in flight")
        };
        match u32::try_from(result) {
            Ok(got_bytes) => self.handle_read(job, report, slot_index, read, got_bytes),
            Err(_) => self.handle_failure(job, report, slot_index, read, -result),
        }
    }

    /// The read failed with `errno`: retry it (EAGAIN, EINTR), salvage its
    /// chunk (a range error, when salvaging), or fail the job.
    fn handle_failure(
        &mut self,
        job: &Job<'_>,
        report: &mut WorkerReport,
        slot_index: usize,
        mut read: ReadInFlight,
        errno: i32,
    ) {
        let retryable = errno == libc::EAGAIN || errno == libc::EINTR;
        if retryable && read.retry_count < READ_RETRIES_MAX && !job.is_halted() {
            read.retry_count += 1;
            self.submit(slot_index, read);
            return;
        }
        if errno == libc::EFAULT || errno == libc::EBADF {
            unreachable!(
                "read of slot {slot_index} failed with errno {errno}: the engine passed a bad buffer or file"
            );
        }
        if let Some(salvage) = job.salvage
            && salvage::is_range_error(errno)
            && !job.is_halted()
        {
            self.salvage_chunk(job, report, slot_index, read, salvage);
            return;
        }
        job.fail_with(EngineError::Read(ReadError {
            device: job.device.to_path_buf(),
            offset_bytes: read.chunk.offset_bytes + u64::from(read.done_bytes),
            len_bytes: read.chunk.len_bytes - read.done_bytes,
            retry_count: read.retry_count,
            source: io::Error::from_raw_os_error(errno),
        }));
        self.free(slot_index);
    }

    /// The read returned `got_bytes`: the end of the device (0), a short
    /// read to resubmit the rest of, or the whole chunk to deliver.
    fn handle_read(
        &mut self,
        job: &Job<'_>,
        report: &mut WorkerReport,
        slot_index: usize,
        mut read: ReadInFlight,
        got_bytes: u32,
    ) {
        let chunk = read.chunk;
        let offset_bytes = chunk.offset_bytes + u64::from(read.done_bytes);
        let len_bytes = chunk.len_bytes - read.done_bytes;
        if got_bytes == 0 {
            job.fail_at_end_of_device(offset_bytes, u64::from(len_bytes));
            self.free(slot_index);
            return;
        }
        assert!(
            got_bytes <= len_bytes,
            "the kernel read {got_bytes} bytes into a {len_bytes}-byte read"
        );
        read.done_bytes += got_bytes;
        if read.done_bytes < chunk.len_bytes {
            // A short read: resubmit the rest. Each makes progress, so a read
            // is resubmitted at most len_bytes / block_bytes times.
            if job.is_halted() {
                self.free(slot_index);
            } else if !u64::from(read.done_bytes).is_multiple_of(job.geometry.block_bytes) {
                job.fail_with(EngineError::ShortRead {
                    device: job.device.to_path_buf(),
                    got_bytes,
                    offset_bytes,
                    block_bytes: job.geometry.block_bytes,
                });
                self.free(slot_index);
            } else {
                self.submit(slot_index, read);
            }
            return;
        }
        self.record_latency(&read);
        job.gait.completed(read.submitted_at.elapsed());
        job.poll_stop();
        if self.deliver(
            job,
            report,
            slot_index,
            chunk,
            chunk.offset_bytes,
            chunk.len_bytes,
        ) {
            report.reads += 1;
        }
        self.free(slot_index);
    }

    fn record_latency(&mut self, read: &ReadInFlight) {
        let latency_us = read
            .submitted_at
            .elapsed()
            .as_micros()
            .min(u128::from(LATENCY_US_MAX)) as u64;
        self.latency_us.saturating_record(latency_us.max(1));
    }

    /// Lends `len_bytes` of slot `slot_index` from device byte `offset_bytes`
    /// (inside `chunk`, whose bytes the slot holds) to `deliver`, unless the
    /// job is halted; true if delivered. The caller frees the slot after.
    fn deliver(
        &mut self,
        job: &Job<'_>,
        report: &mut WorkerReport,
        slot_index: usize,
        chunk: Chunk,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> bool {
        if job.is_halted() {
            return false;
        }
        assert!(
            offset_bytes >= chunk.offset_bytes
                && offset_bytes + u64::from(len_bytes)
                    <= chunk.offset_bytes + u64::from(chunk.len_bytes),
            "a delivery inside its chunk"
        );
        let at = (offset_bytes - chunk.offset_bytes) as usize;
        // SAFETY: the completion is reaped, so the kernel is done with the
        // slot; it holds the chunk's bytes in [at, at + len) (the read, or
        // its salvage, filled them); and the slot is neither resubmitted nor
        // freed until deliver returns, after which the slice is gone.
        let data = unsafe {
            std::slice::from_raw_parts(
                self.slot_ptrs[slot_index].cast_const().add(at),
                len_bytes as usize,
            )
        };
        match (job.deliver)(ReadDone { offset_bytes, data }) {
            Ok(()) => {
                report.bytes_read += u64::from(len_bytes);
                if let Some(progress) = job.progress {
                    progress.fetch_add(u64::from(len_bytes), std::sync::atomic::Ordering::Relaxed);
                }
                true
            }
            Err(err) => {
                job.fail(err.context(format!(
                    "delivering {len_bytes} bytes read at byte offset {offset_bytes} of {}",
                    job.device.display()
                )));
                false
            }
        }
    }

    /// The rare path: `read` failed with a range error. Re-reads the rest of
    /// its chunk synchronously on this thread (`pread` into the same slot,
    /// split as `salvage.rs` explains), delivers every run of blocks that
    /// read and reports every run that did not, then frees the slot. The
    /// ring's other reads stay in flight meanwhile and are reaped after.
    fn salvage_chunk(
        &mut self,
        job: &Job<'_>,
        report: &mut WorkerReport,
        slot_index: usize,
        read: ReadInFlight,
        salvage: &Salvage<'_>,
    ) {
        if let Some(salvaged) = self.reread_rest(job, slot_index, read, salvage) {
            self.record_latency(&read);
            report.chunks_salvaged += 1;
            report.salvage_reads += salvaged.reads;
            report.retry_reads += salvaged.retry_reads;
            self.deliver_salvaged(job, report, slot_index, read.chunk, &salvaged.bad, salvage);
            if !job.is_halted() {
                report.reads += 1;
            }
        }
        self.free(slot_index);
    }

    /// Re-reads what `read` had left of its chunk into its slot; `None`
    /// when the salvage stopped (the job halted, or failed here).
    fn reread_rest(
        &mut self,
        job: &Job<'_>,
        slot_index: usize,
        read: ReadInFlight,
        salvage: &Salvage<'_>,
    ) -> Option<Salvaged> {
        let chunk = read.chunk;
        let from_bytes = read.done_bytes;
        let plan = SalvagePlan {
            block_bytes: job.geometry.block_bytes,
            retries: salvage.retries,
        };
        let fd = self.fd;
        // SAFETY: the failed read's completion is reaped, so the slot is the
        // worker's; [from_bytes, len_bytes) lies inside it; nothing else
        // refers to the slot until the caller frees it.
        let rest = unsafe {
            std::slice::from_raw_parts_mut(
                self.slot_ptrs[slot_index].add(from_bytes as usize),
                (chunk.len_bytes - from_bytes) as usize,
            )
        };
        let outcome = salvage::salvage(
            plan,
            chunk.offset_bytes + u64::from(from_bytes),
            rest,
            &mut |offset_bytes, buf| pread(fd, buf, offset_bytes),
            &|| {
                job.poll_stop();
                job.is_halted()
            },
        );
        match outcome {
            Ok(salvaged) => return Some(salvaged),
            Err(SalvageStop::Halted) => {}
            Err(SalvageStop::Fatal {
                offset_bytes,
                len_bytes,
                errno,
            }) => job.fail_with(EngineError::Read(ReadError {
                device: job.device.to_path_buf(),
                offset_bytes,
                len_bytes: len_bytes as u32,
                retry_count: 0,
                source: io::Error::from_raw_os_error(errno),
            })),
            Err(SalvageStop::EndOfDevice {
                offset_bytes,
                len_bytes,
            }) => job.fail_at_end_of_device(offset_bytes, len_bytes),
        }
        None
    }

    /// Delivers the runs of `chunk` between the `bad` spans (sorted) and
    /// reports each bad span, until the job halts.
    fn deliver_salvaged(
        &mut self,
        job: &Job<'_>,
        report: &mut WorkerReport,
        slot_index: usize,
        chunk: Chunk,
        bad: &[BadSpan],
        salvage: &Salvage<'_>,
    ) {
        let chunk_end_bytes = chunk.offset_bytes + u64::from(chunk.len_bytes);
        let mut at_bytes = chunk.offset_bytes;
        for bad in bad {
            if at_bytes < bad.offset_bytes {
                let len = (bad.offset_bytes - at_bytes) as u32;
                self.deliver(job, report, slot_index, chunk, at_bytes, len);
            }
            if job.is_halted() {
                return;
            }
            let len_bytes = bad.end_bytes - bad.offset_bytes;
            let reported = (salvage.report)(Unreadable {
                offset_bytes: bad.offset_bytes,
                len_bytes,
                errno: bad.errno,
            });
            match reported {
                Ok(()) => {
                    report.bytes_unreadable += len_bytes;
                    if let Some(progress) = job.progress {
                        progress.fetch_add(len_bytes, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(err) => job.fail(err),
            }
            at_bytes = bad.end_bytes;
        }
        if at_bytes < chunk_end_bytes {
            let len = (chunk_end_bytes - at_bytes) as u32;
            self.deliver(job, report, slot_index, chunk, at_bytes, len);
        }
    }

    fn free(&mut self, slot_index: usize) {
        assert!(matches!(self.slots[slot_index], Slot::InFlight(_)));
        self.slots[slot_index] = Slot::Free;
        assert!(self.free_count < self.free_slots.len());
        self.free_slots[self.free_count] = slot_index as u16;
        self.free_count += 1;
    }

    /// The ring cannot submit: fail the job and mark the ring broken (SQEs
    /// it never took may be left in it), then drain it.
    fn give_up(&mut self, job: &Job<'_>, reason: String) {
        job.fail_with(EngineError::Ring {
            reason: reason.clone(),
        });
        self.broken = Some(reason);
        if self.in_flight_count == self.queued_count() {
            // The kernel took none of them: every buffer is ours already.
            self.in_flight_count = 0;
        }
        self.drain();
    }

    /// SQEs pushed but not yet taken by the kernel.
    fn queued_count(&mut self) -> usize {
        let mut submission_queue = self.ring.submission();
        submission_queue.sync();
        submission_queue.len()
    }

    /// After a panic: wait until every read of this ring has completed, so
    /// no buffer is written after the worker unwinds.
    fn drain_after_panic(&mut self) {
        self.drain();
    }

    /// Waits, bounded ([`uring::drain`]), for every read in flight and
    /// frees every slot; the completions are dropped (the job is halted).
    /// If the wait fails the reads are abandoned: their buffers are never
    /// freed (the engine leaks the pool).
    fn drain(&mut self) {
        let drained = uring::drain(
            &mut self.ring,
            &mut self.waiter,
            self.in_flight_count,
            &mut self.completions,
            uring::DRAIN_WAIT_MAX,
            &mut |_, _| {},
        );
        if let Err(err) = drained {
            self.broken.get_or_insert_with(|| {
                format!("the reads in flight could not be waited for: {err}")
            });
            self.abandoned_reads = true;
        }
        self.in_flight_count = 0;
        self.slots.fill(Slot::Free);
        for (free_index, slot_index) in (0..self.slots.len()).rev().enumerate() {
            self.free_slots[free_index] = slot_index as u16;
        }
        self.free_count = self.slots.len();
    }
}

/// One `pread(2)` on the device: bytes read, or the errno. The rare
/// salvage path only; the main path reads through the ring.
fn pread(fd: RawFd, buf: &mut [u8], offset_bytes: u64) -> salvage::ReadResult {
    let offset = libc::off_t::try_from(offset_bytes).expect("device offsets fit off_t");
    // SAFETY: buf is valid for buf.len() bytes of writes for the call.
    let rc = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) };
    if rc < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gait::{GENTLE_CHUNK_BYTES, Gait};
    use crate::engine::plan::{Cursor, Geometry};
    use crate::engine::pool::BufferPool;
    use crate::geom::ByteExtent;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    /// A worker reading a regular file with O_DIRECT (no root, no block
    /// device): every fallback of the SQE kinds delivers the file's bytes.
    fn read_file_with(registered_buffers: bool, fixed_file: bool) {
        let gait = Gait::new(GENTLE_CHUNK_BYTES);
        let reads = read_file_in_gait(registered_buffers, fixed_file, &gait);
        assert_eq!(reads, (FILE_BYTES as u64).div_ceil(u64::from(SLOT_BYTES)));
    }

    const SLOT_BYTES: u32 = 64 * 1024;
    const FILE_BYTES: usize = 1024 * 1024 + 8192;

    /// Reads the whole file in `gait`; every byte arrives. Returns the
    /// number of reads.
    fn read_file_in_gait(registered_buffers: bool, fixed_file: bool, gait: &Gait) -> u64 {
        let content: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut scratch = tempfile::NamedTempFile::new().unwrap();
        scratch.write_all(&content).unwrap();
        scratch.as_file().sync_all().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(scratch.path())
            .unwrap();
        let pool = BufferPool::new(4, SLOT_BYTES as usize, 4096).unwrap();
        let slot_ptrs: Box<[*mut u8]> = (0..4).map(|i| pool.slot_ptr(i)).collect();
        // SAFETY: the slots are this ring's alone and the pool outlives it
        // (declared before it, dropped after it).
        let mut ring = unsafe { WorkerRing::new(file.as_raw_fd(), slot_ptrs, SLOT_BYTES) }.unwrap();
        ring.registered_buffers &= registered_buffers;
        ring.fixed_file &= fixed_file;

        let geometry = Geometry::new(FILE_BYTES as u64, 4096, u64::from(SLOT_BYTES));
        let extents = [ByteExtent {
            offset_bytes: 0,
            len_bytes: FILE_BYTES as u64,
        }];
        let read_back = Mutex::new(vec![0u8; FILE_BYTES]);
        let deliver = |done: ReadDone<'_>| -> anyhow::Result<()> {
            let at = done.offset_bytes as usize;
            read_back.lock().unwrap()[at..at + done.data.len()].copy_from_slice(done.data);
            Ok(())
        };
        let progress = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let job = Job {
            device: scratch.path(),
            geometry,
            cursor: Mutex::new(Cursor::new(geometry, &extents)),
            deliver: &deliver,
            progress: Some(&progress),
            stop: &stop,
            halted: AtomicBool::new(false),
            first_error: Mutex::new(None),
            pacer: None,
            gait,
            salvage: None,
        };
        let report = ring.run(&job, 0);
        assert!(job.first_error.lock().unwrap().is_none());
        assert_eq!(report.bytes_read, FILE_BYTES as u64);
        assert_eq!(progress.into_inner(), FILE_BYTES as u64);
        assert_eq!(ring.latency_us.len(), report.reads);
        assert!(*read_back.lock().unwrap() == content);
        drop(ring);
        drop(pool);
        report.reads
    }

    /// A worker the gentle gait holds (index 1) returns once worker 0 has
    /// taken the last read: found by torture_zram, where it waited forever.
    #[test]
    fn a_held_worker_returns_when_the_cursor_runs_dry() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(256 * 1024).unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(file.path())
            .unwrap();
        let pool = BufferPool::new(2, SLOT_BYTES as usize, 4096).unwrap();
        let ring_of = |slot: usize| {
            let slot_ptrs: Box<[*mut u8]> = Box::new([pool.slot_ptr(slot)]);
            // SAFETY: one slot per ring, the pool outlives both rings.
            unsafe { WorkerRing::new(direct.as_raw_fd(), slot_ptrs, SLOT_BYTES) }.unwrap()
        };
        let (mut first, mut second) = (ring_of(0), ring_of(1));
        let geometry = Geometry::new(256 * 1024, 4096, u64::from(SLOT_BYTES));
        let extents = [ByteExtent {
            offset_bytes: 0,
            len_bytes: 256 * 1024,
        }];
        let gait = Gait::new(SLOT_BYTES);
        gait.set_gentle(true);
        let deliver = |_: ReadDone<'_>| -> anyhow::Result<()> { Ok(()) };
        let stop = AtomicBool::new(false);
        let job = Job {
            device: file.path(),
            geometry,
            cursor: Mutex::new(Cursor::new(geometry, &extents)),
            deliver: &deliver,
            progress: None,
            stop: &stop,
            halted: AtomicBool::new(false),
            first_error: Mutex::new(None),
            pacer: None,
            gait: &gait,
            salvage: None,
        };
        let (reads_0, reads_1) = std::thread::scope(|scope| {
            let held = scope.spawn(|| second.run(&job, 1).reads);
            let reads_0 = first.run(&job, 0).reads;
            (reads_0, held.join().unwrap())
        });
        assert!(job.first_error.lock().unwrap().is_none());
        assert_eq!((reads_0, reads_1), (4, 0));
        drop((first, second));
        drop(pool);
    }

    #[test]
    fn the_gentle_gait_reads_everything_in_its_smaller_reads() {
        let gait = Gait::new(16 * 1024);
        gait.set_gentle(true);
        let reads = read_file_in_gait(true, true, &gait);
        assert_eq!(reads, (FILE_BYTES as u64).div_ceil(16 * 1024));
    }

    #[test]
    fn reads_with_registered_buffers_and_file() {
        read_file_with(true, true);
    }

    #[test]
    fn reads_with_registered_buffers_only() {
        read_file_with(true, false);
    }

    #[test]
    fn reads_with_registered_file_only() {
        read_file_with(false, true);
    }

    #[test]
    fn reads_with_nothing_registered() {
        read_file_with(false, false);
    }
}
