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
//! Memory: the ring writes into `buffers`. Every turn reaps every completion
//! it submitted before it returns; if waiting fails with reads still in flight
//! the reader is poisoned and, on drop, leaks the buffers rather than free
//! memory the kernel may still write.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, squeue, types};

use super::LiveError;

/// Largest number of slots (CPUs) one reader serves.
pub const SLOTS_MAX: usize = 1024;
/// Largest chain of reads per slot and turn.
pub const CHAIN_LEN_MAX: usize = 64;
/// `user_data` bit of a linked timeout's completion.
const TIMEOUT_USER_DATA: u64 = 1 << 63;
/// Retries of a read or `io_uring_enter` interrupted by signals (or
/// back-pressure) before a turn gives up.
const ENTER_RETRIES_MAX: u32 = 10_000;

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
    Uring(Box<IoUring>),
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
    buffers: Vec<Box<[u8]>>,
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
        let buffers = files
            .iter()
            .map(|_| vec![0u8; buffer_bytes].into_boxed_slice())
            .collect();
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
            Ok(ring) => (Backend::Uring(Box::new(ring)), "io_uring".to_string()),
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
        match &mut self.backend {
            Backend::Syscall => {
                for (slot, base_bytes) in active.iter().enumerate() {
                    let Some(base_bytes) = *base_bytes else {
                        continue;
                    };
                    for index in 0..self.chain_len {
                        let first = base_bytes + index * self.chunk_bytes;
                        let buf = &mut self.buffers[slot][first..first + self.chunk_bytes];
                        let mut interrupted = 0u32;
                        let result = loop {
                            match (&self.files[slot]).read(buf) {
                                Ok(bytes) => break ReadResult::Bytes(bytes),
                                Err(error)
                                    if error.kind() == io::ErrorKind::Interrupted
                                        && interrupted < ENTER_RETRIES_MAX =>
                                {
                                    interrupted += 1;
                                }
                                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                                    break ReadResult::Empty;
                                }
                                Err(error) => {
                                    break ReadResult::Failed(error.raw_os_error().unwrap_or(0));
                                }
                            }
                        };
                        self.results[slot * self.chain_len + index] = result;
                        if result != ReadResult::Bytes(self.chunk_bytes) {
                            break; // as a linked chain would
                        }
                    }
                }
                Ok(())
            }
            Backend::Uring(ring) => {
                let mut submitted = 0usize;
                {
                    let mut queue = ring.submission();
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
                            // SAFETY: the buffer is owned by `self.buffers`, is
                            // not touched until its completion is reaped below,
                            // and outlives the ring (see the drop order and
                            // `poisoned`); the timespec lives in `self.timeout`.
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
                }
                let mut reaped = 0usize;
                let mut retries = 0u32;
                while reaped < submitted {
                    match ring.submit_and_wait(submitted - reaped) {
                        Ok(_) => {}
                        Err(error)
                            if matches!(
                                error.raw_os_error(),
                                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                            ) && retries < ENTER_RETRIES_MAX =>
                        {
                            retries += 1;
                        }
                        Err(error) => {
                            self.poisoned = true;
                            return Err(LiveError::Uring {
                                op: "io_uring_enter",
                                error,
                            });
                        }
                    }
                    for cqe in ring.completion() {
                        reaped += 1;
                        if cqe.user_data() & TIMEOUT_USER_DATA != 0 {
                            continue; // -ETIME (fired), -ENOENT/-EALREADY (read done), -ECANCELED
                        }
                        let index = cqe.user_data() as usize;
                        assert!(index < self.results.len(), "completion for an unknown read");
                        assert_eq!(
                            self.results[index],
                            ReadResult::NotRun,
                            "read completed twice"
                        );
                        let res = cqe.result();
                        self.results[index] = if res >= 0 {
                            ReadResult::Bytes(res as usize)
                        } else if res == -libc::EAGAIN {
                            ReadResult::Empty
                        } else if res == -libc::ECANCELED {
                            ReadResult::Cancelled
                        } else {
                            ReadResult::Failed(-res)
                        };
                    }
                }
                Ok(())
            }
        }
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        if self.poisoned {
            // Reads may still be in flight in io-wq: never free their memory.
            std::mem::forget(std::mem::take(&mut self.buffers));
        }
    }
}
