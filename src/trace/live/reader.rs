//! Non-blocking reads of per-CPU trace files (`trace_pipe_raw` pages,
//! blktrace relay streams), with `read(2)` or through one io_uring.
//!
//! A turn reads, for every active slot (one per CPU), a chain of up to
//! `chain_len` chunks, in order, stopping at the first read that finds the
//! file empty or comes back short. With io_uring the chain is linked
//! (`IOSQE_IO_LINK`): the kernel cancels the rest of a chain after a short
//! read, and one `io_uring_enter` reads every CPU.
//!
//! io_uring and empty files, measured on 6.18: io_uring treats an
//! `O_NONBLOCK` file that has a `poll` method as able to read without
//! blocking, and when such a read finds nothing it arms a poll and *waits for
//! data* instead of completing with `EAGAIN`; a read of an empty
//! `trace_pipe_raw` never completed. `RWF_NOWAIT` is refused (`EOPNOTSUPP`:
//! no `FMODE_NOWAIT`). So every read carries a linked timeout of zero
//! (`IORING_OP_LINK_TIMEOUT`): a read that completes when issued is not
//! affected; one that would wait is cancelled at once (`ECANCELED`), which
//! means the file had nothing to return when the read was issued, and a
//! cancelled read consumes nothing. That timeout costs about 20 µs per read
//! (4096-byte pages: 20.6 µs per page against 0.7 µs with `read(2)`, and a
//! whole drain 6 times slower), so the tracefs source reads with `read(2)` by
//! default and io_uring on request; the blktrace source reads 256 KiB per
//! read, where the cost vanishes, and relay files return 0 when empty.
//!
//! Memory: the ring writes into `buffers`, a [`KernelBuffers`]: every turn
//! reaps every completion it submitted before it returns ([`uring::drain`],
//! bounded); if that fails with reads still in flight the reader is poisoned
//! and the buffers abandoned, so they are leaked rather than freed while the
//! kernel may still write them (the rule is `uring`'s).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, squeue, types};

use super::LiveError;
use crate::uring::{self, DrainError, KernelBuffers, Waiter};

/// Largest number of slots (CPUs) one reader serves.
pub const SLOTS_MAX: usize = 1024;
/// Largest chain of reads per slot and turn.
pub const CHAIN_LEN_MAX: usize = 64;
/// `user_data` bit of a linked timeout's completion.
const TIMEOUT_USER_DATA: u64 = 1 << 63;
/// Retries of a `read(2)` interrupted by signals before a turn gives up
/// (the ring's enters are bounded by [`uring::Waiter`]).
const READ_RETRIES_MAX: u32 = 10_000;

/// How one read of a chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadResult {
    /// The read returned this many bytes (0: nothing to read, for files that
    /// say so with a zero-length read, as relay files do).
    Bytes(usize),
    /// `EAGAIN` (`read(2)`): the file had nothing committed to return.
    Empty,
    /// io_uring: cancelled by its zero timeout because it would have waited
    /// for data (the file had nothing to return), or because an earlier read
    /// of the chain ended the chain.
    Cancelled,
    /// Any other error, as a positive errno.
    Failed(i32),
    /// Not submitted this turn (inactive slot or beyond the chain).
    NotRun,
}

/// How a [`PipeReader`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMethod {
    Syscall,
    IoUring,
}

enum Backend {
    Uring {
        ring: Box<IoUring>,
        waiter: Waiter,
        /// One turn's CQEs, collected before any is handled.
        completions: Box<[(u64, i32)]>,
    },
    Syscall,
}

/// Per-CPU files and their buffers.
pub struct PipeReader {
    // Field order matters for drop: the ring is closed before the buffers
    // are freed (and the buffers are leaked if the ring may still use them).
    backend: Backend,
    files: Vec<File>,
    /// One buffer per slot: `base_bytes` of caller data (e.g. a partial
    /// record kept from the last turn) then `chain_len` chunks.
    buffers: KernelBuffers<Vec<Box<[u8]>>>,
    results: Vec<ReadResult>,
    chunk_bytes: usize,
    chain_len: usize,
    base_bytes_max: usize,
    poisoned: bool,
    /// The zero timeout linked to every read; the kernel reads it when the
    /// timeout is submitted.
    timeout: Box<types::Timespec>,
    /// How the reader reads, and why if not as asked.
    method_note: String,
}

impl PipeReader {
    /// Sets up a reader for `files` (opened `O_RDONLY | O_NONBLOCK`) that
    /// reads chunks of `chunk_bytes`, up to `chain_len` per slot and turn,
    /// after `base_bytes_max` bytes the caller may keep at the start of each
    /// slot's buffer. [`ReadMethod::IoUring`] falls back to `read(2)` if the
    /// ring cannot be set up (see [`PipeReader::method_note`]).
    pub fn new(
        files: Vec<File>,
        chunk_bytes: usize,
        chain_len: usize,
        base_bytes_max: usize,
        method: ReadMethod,
    ) -> PipeReader {
        assert!(!files.is_empty() && files.len() <= SLOTS_MAX);
        assert!((1..=CHAIN_LEN_MAX).contains(&chain_len));
        assert!(chunk_bytes > 0 && chunk_bytes <= u32::MAX as usize);
        let (backend, method_note) = Self::backend(files.len(), chain_len, method);
        let buffer_bytes = base_bytes_max + chunk_bytes * chain_len;
        let buffers = KernelBuffers::new(
            files
                .iter()
                .map(|_| vec![0u8; buffer_bytes].into_boxed_slice())
                .collect(),
        );
        PipeReader {
            backend,
            results: vec![ReadResult::NotRun; files.len() * chain_len],
            files,
            buffers,
            chunk_bytes,
            chain_len,
            base_bytes_max,
            poisoned: false,
            timeout: Box::new(types::Timespec::new()),
            method_note,
        }
    }

    fn backend(slots: usize, chain_len: usize, method: ReadMethod) -> (Backend, String) {
        if method == ReadMethod::Syscall {
            return (Backend::Syscall, "read(2)".to_string());
        }
        // A read and its linked timeout per chain element.
        let entries = (slots * chain_len * 2).next_power_of_two() as u32;
        match IoUring::builder().setup_cqsize(entries * 2).build(entries) {
            Ok(ring) => {
                let completion_count = ring.params().cq_entries() as usize;
                let backend = Backend::Uring {
                    ring: Box::new(ring),
                    waiter: Waiter::default(),
                    completions: vec![(0, 0); completion_count].into_boxed_slice(),
                };
                (backend, "io_uring".to_string())
            }
            Err(error) => (
                Backend::Syscall,
                format!("read(2), as io_uring_setup failed ({error})"),
            ),
        }
    }

    /// Switches how later turns read; nothing is in flight between turns.
    pub fn set_method(&mut self, method: ReadMethod) {
        assert!(!self.poisoned, "reader used after a failed turn");
        let (backend, method_note) = Self::backend(self.files.len(), self.chain_len, method);
        self.backend = backend;
        self.method_note = method_note;
    }

    /// How the reader reads (`read(2)` or `io_uring`), and why if not as asked.
    pub fn method_note(&self) -> &str {
        &self.method_note
    }

    pub fn slots(&self) -> usize {
        self.files.len()
    }

    pub fn chain_len(&self) -> usize {
        self.chain_len
    }

    /// The result of read `index` of `slot`'s chain in the last turn.
    pub fn result(&self, slot: usize, index: usize) -> ReadResult {
        self.results[slot * self.chain_len + index]
    }

    /// Read `index` of `slot`'s chain: its bytes after the turn.
    pub fn chunk(&self, slot: usize, base_bytes: usize, index: usize) -> &[u8] {
        let first = base_bytes + index * self.chunk_bytes;
        &self.buffers[slot][first..first + self.chunk_bytes]
    }

    /// The whole buffer of a slot, for callers that keep data at its start.
    pub fn buffer_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.buffers[slot]
    }

    pub fn buffer(&self, slot: usize) -> &[u8] {
        &self.buffers[slot]
    }

    /// Runs one turn: for each slot with `active(slot)` some, a chain of
    /// `chain_len` reads into its buffer after the given number of kept bytes.
    /// Every read submitted is reaped before this returns.
    pub fn read_turn(&mut self, active: &[Option<usize>]) -> Result<(), LiveError> {
        assert_eq!(active.len(), self.files.len());
        assert!(!self.poisoned, "reader used after a failed turn");
        self.results.fill(ReadResult::NotRun);
        for base_bytes in active.iter().flatten() {
            assert!(*base_bytes <= self.base_bytes_max);
        }
        if matches!(self.backend, Backend::Syscall) {
            self.read_with_syscalls(active);
            return Ok(());
        }
        let submitted = self.queue_chains(active);
        let Backend::Uring {
            ring,
            waiter,
            completions,
        } = &mut self.backend
        else {
            unreachable!("checked above")
        };
        let results = &mut self.results;
        let drained = uring::drain(
            &mut **ring,
            waiter,
            submitted,
            completions,
            uring::DRAIN_WAIT_MAX,
            &mut |user_data, result| record_completion(results, user_data, result),
        );
        drained.map_err(|err| {
            self.poisoned = true;
            self.buffers.abandon();
            match err {
                DrainError::Enter(err) => LiveError::Uring {
                    op: "io_uring_enter",
                    error: err.source,
                },
                err @ DrainError::TimedOut { .. } => LiveError::Uring {
                    op: "waiting for trace reads",
                    error: io::Error::new(io::ErrorKind::TimedOut, err.to_string()),
                },
            }
        })
    }

    /// The turn with `read(2)`: each chain in order, stopped as a linked
    /// chain would be.
    fn read_with_syscalls(&mut self, active: &[Option<usize>]) {
        for (slot, base_bytes) in active.iter().enumerate() {
            let Some(base_bytes) = *base_bytes else {
                continue;
            };
            for index in 0..self.chain_len {
                let first = base_bytes + index * self.chunk_bytes;
                let buf = &mut self.buffers[slot][first..first + self.chunk_bytes];
                let result = read_nonblocking(&self.files[slot], buf);
                self.results[slot * self.chain_len + index] = result;
                if result != ReadResult::Bytes(self.chunk_bytes) {
                    break; // as a linked chain would
                }
            }
        }
    }

    /// Pushes every active slot's chain (each read linked to a zero
    /// timeout) into the ring; returns the SQEs pushed.
    fn queue_chains(&mut self, active: &[Option<usize>]) -> usize {
        let Backend::Uring { ring, .. } = &mut self.backend else {
            unreachable!("only with io_uring")
        };
        let mut queue = ring.submission();
        let mut submitted = 0usize;
        for (slot, base_bytes) in active.iter().enumerate() {
            let Some(base_bytes) = *base_bytes else {
                continue;
            };
            let fd = types::Fd(self.files[slot].as_raw_fd());
            for index in 0..self.chain_len {
                let first = base_bytes + index * self.chunk_bytes;
                let buf = &mut self.buffers[slot][first..first + self.chunk_bytes];
                let user_data = (slot * self.chain_len + index) as u64;
                let read = opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                    // -1: the file position; these files are not seekable.
                    .offset(u64::MAX)
                    .build()
                    .user_data(user_data)
                    .flags(squeue::Flags::IO_LINK);
                let mut timeout = opcode::LinkTimeout::new(&*self.timeout)
                    .build()
                    .user_data(user_data | TIMEOUT_USER_DATA);
                if index + 1 < self.chain_len {
                    timeout = timeout.flags(squeue::Flags::IO_LINK);
                }
                // SAFETY: the buffer is owned by `self.buffers`, is not
                // touched until its completion is reaped (`read_turn` drains
                // every SQE pushed here), and outlives the ring (the drop
                // order, and `KernelBuffers::abandon` when a drain fails);
                // the timespec lives in `self.timeout`.
                unsafe {
                    queue
                        .push(&read)
                        .expect("the ring is sized for every slot's chain");
                    queue
                        .push(&timeout)
                        .expect("the ring is sized for every slot's chain");
                }
                submitted += 2;
            }
        }
        submitted
    }
}

/// One `read(2)` of a non-blocking file, retrying interrupts (bounded).
fn read_nonblocking(mut file: &File, buf: &mut [u8]) -> ReadResult {
    let mut interrupted = 0u32;
    loop {
        match file.read(buf) {
            Ok(bytes) => return ReadResult::Bytes(bytes),
            Err(error)
                if error.kind() == io::ErrorKind::Interrupted && interrupted < READ_RETRIES_MAX =>
            {
                interrupted += 1;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return ReadResult::Empty,
            Err(error) => return ReadResult::Failed(error.raw_os_error().unwrap_or(0)),
        }
    }
}

/// Records the completion of a read (a linked timeout's says nothing).
fn record_completion(results: &mut [ReadResult], user_data: u64, res: i32) {
    if user_data & TIMEOUT_USER_DATA != 0 {
        return; // -ETIME (fired), -ENOENT/-EALREADY (read done), -ECANCELED
    }
    let index = user_data as usize;
    assert!(index < results.len(), "completion for an unknown read");
    assert_eq!(results[index], ReadResult::NotRun, "read completed twice");
    results[index] = if res >= 0 {
        ReadResult::Bytes(res as usize)
    } else if res == -libc::EAGAIN {
        ReadResult::Empty
    } else if res == -libc::ECANCELED {
        ReadResult::Cancelled
    } else {
        ReadResult::Failed(-res)
    };
}
