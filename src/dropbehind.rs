//! Drop-behind: an image (or a restore) written through the page cache
//! leaves a few windows of it there, instead of the whole file evicting
//! the live system's cache.
//!
//! Every [`WINDOW_BYTES`] written, the window just written is handed to
//! writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), and the oldest
//! window in writeback, [`WINDOWS_IN_WRITEBACK`] rounds old, is waited on
//! and dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`):
//!
//! - **Why the wait.** `generic_fadvise` (mm/fadvise.c) answers DONTNEED
//!   with `__filemap_fdatawrite_range(WB_SYNC_NONE)` — it starts writeback
//!   but does not wait for it — and then `mapping_try_invalidate`, which
//!   skips every folio that is dirty, under writeback, locked or mapped.
//!   Advice on a window still being written back drops nothing; so the
//!   window is first synced with `SYNC_FILE_RANGE_WAIT_BEFORE | WRITE |
//!   WAIT_AFTER` (fs/sync.c `sync_file_range`: wait for writeback in
//!   flight, write what is still dirty with `WB_SYNC_ALL`, wait for that),
//!   after which its folios are clean and invalidation frees them.
//! - **Why a lag of several windows.** Waiting on the window just written
//!   would stall the writer for a full device round trip every window;
//!   waiting on an older one overlaps writeback with writing, and keeps
//!   several windows queued at the disk, which a whole-file `fsync` of
//!   an undropped image also does (measured in PERF.md).
//! - **Durability is unchanged.** `sync_file_range` writes data only, no
//!   metadata and no cache flush; the caller's `fsync` at the end is what
//!   makes the file durable. Its errors (EIO, ENOSPC on a thin or network
//!   filesystem) are write errors of the output all the same, reported when
//!   seen; the kernel's errseq (`file_check_and_advance_wb_err`) still
//!   reports them to the final `fsync` as well.
//! - **What it applies to.** A regular file, and a block device: its page
//!   cache is the bdev inode's mapping, which both calls accept
//!   (`sync_file_range` refuses with ESPIPE only what is neither a regular
//!   file, a directory, a link nor a block device). Nothing else (a pipe,
//!   /dev/null). On tmpfs both are no-ops: the page cache is the file.
//!
//! Measured against aligned `O_DIRECT` writes and without either in
//! PERF.md ("Page-cache hygiene").

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

/// Bytes written between two rounds of writeback and drop (measured
/// against 8 and 32 MiB in PERF.md).
pub const WINDOW_BYTES: u64 = 16 << 20;

/// Windows handed to writeback and not yet waited for: the disk's queue
/// is kept this deep, and at most this many windows plus the one being
/// written are in the page cache.
pub const WINDOWS_IN_WRITEBACK: usize = 8;

const PAGE_BYTES: u64 = 4096;
const _: () = assert!(WINDOW_BYTES.is_multiple_of(PAGE_BYTES) && WINDOW_BYTES >= 1 << 20);

/// A range of a file, whole pages: `[start_bytes, end_bytes)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start_bytes: u64,
    end_bytes: u64,
}

impl Span {
    /// The pages `[offset, offset + len)` touches.
    fn covering(offset_bytes: u64, len_bytes: u64) -> Span {
        let end = offset_bytes.saturating_add(len_bytes);
        Span {
            start_bytes: offset_bytes / PAGE_BYTES * PAGE_BYTES,
            end_bytes: end.div_ceil(PAGE_BYTES).saturating_mul(PAGE_BYTES),
        }
    }

    fn join(self, other: Span) -> Span {
        Span {
            start_bytes: self.start_bytes.min(other.start_bytes),
            end_bytes: self.end_bytes.max(other.end_bytes),
        }
    }

    fn len_bytes(self) -> u64 {
        self.end_bytes - self.start_bytes
    }
}

/// The drop-behind state of one output descriptor.
#[derive(Debug)]
pub struct DropBehind {
    /// Pages written since the last round (None: nothing yet).
    dirty: Option<Span>,
    /// Bytes written since the last round (not the span's length: a
    /// restore's writes may overlap or leave holes).
    dirty_bytes: u64,
    /// Windows handed to writeback, a ring: the slot at `next_slot` holds
    /// the oldest, waited for and dropped at the next round.
    in_writeback: [Option<Span>; WINDOWS_IN_WRITEBACK],
    next_slot: usize,
}

/// What failed, for the caller's message.
#[derive(Debug)]
pub struct DropFailed {
    pub call: &'static str,
    pub offset_bytes: u64,
    pub error: io::Error,
}

impl DropBehind {
    /// Drop-behind for `file` if its data goes through a page cache it can
    /// be dropped from: a regular file or a block device.
    pub fn for_file(file: &File) -> Option<DropBehind> {
        let kind = file.metadata().ok()?.file_type();
        (kind.is_file() || kind.is_block_device()).then_some(DropBehind {
            dirty: None,
            dirty_bytes: 0,
            in_writeback: [None; WINDOWS_IN_WRITEBACK],
            next_slot: 0,
        })
    }

    /// `len_bytes` were written at `offset_bytes`; every [`WINDOW_BYTES`]
    /// runs a round of writeback and drop.
    pub fn wrote_at(
        &mut self,
        file: &File,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), DropFailed> {
        if len_bytes == 0 {
            return Ok(());
        }
        let span = Span::covering(offset_bytes, len_bytes);
        self.dirty = Some(self.dirty.map_or(span, |dirty| dirty.join(span)));
        self.dirty_bytes += len_bytes;
        if self.dirty_bytes >= WINDOW_BYTES {
            self.round(file)?;
        }
        Ok(())
    }

    /// `len_bytes` were written at the file position (`write(2)`, the
    /// position after it ending them); the position is asked for only when
    /// a window is full, so `O_APPEND` and a shell's offset are followed.
    pub fn wrote(&mut self, file: &File, len_bytes: u64) -> Result<(), DropFailed> {
        self.dirty_bytes += len_bytes;
        if self.dirty_bytes < WINDOW_BYTES {
            return Ok(());
        }
        let end_bytes = match nix::unistd::lseek(file, 0, nix::unistd::Whence::SeekCur) {
            Ok(end) => end as u64,
            // A descriptor without a position has no page cache to drop.
            Err(_) => {
                self.dirty_bytes = 0;
                return Ok(());
            }
        };
        let start_bytes = end_bytes.saturating_sub(self.dirty_bytes);
        let span = Span::covering(start_bytes, end_bytes - start_bytes);
        self.dirty = Some(self.dirty.map_or(span, |dirty| dirty.join(span)));
        self.round(file)
    }

    /// Starts writeback of what was written since the last round, waits
    /// for the oldest window in writeback and drops it.
    fn round(&mut self, file: &File) -> Result<(), DropFailed> {
        let dirty = self.dirty.take().expect("a round has written pages");
        self.dirty_bytes = 0;
        sync_range(file, dirty, libc::SYNC_FILE_RANGE_WRITE)?;
        let oldest = self.in_writeback[self.next_slot].replace(dirty);
        self.next_slot = (self.next_slot + 1) % WINDOWS_IN_WRITEBACK;
        if let Some(oldest) = oldest {
            drop_span(file, oldest)?;
        }
        Ok(())
    }

    /// Drops every page of the file from the cache once the caller has
    /// synced it (clean pages are all that DONTNEED frees; anything still
    /// dirty stays). For the end of a successful run.
    pub fn drop_synced(file: &File) -> Result<(), DropFailed> {
        fadvise_dontneed(file, Span::covering(0, 0), 0)
    }
}

/// Waits for the span's writeback, writes what is dirty in it, waits for
/// that, and drops it.
fn drop_span(file: &File, span: Span) -> Result<(), DropFailed> {
    sync_range(
        file,
        span,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )?;
    fadvise_dontneed(file, span, span.len_bytes())
}

fn sync_range(file: &File, span: Span, flags: libc::c_uint) -> Result<(), DropFailed> {
    assert!(span.start_bytes <= span.end_bytes);
    loop {
        // SAFETY: sync_file_range takes no memory; an fd we own, a range
        // within off_t (offsets of bytes we wrote).
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                span.start_bytes as libc::off64_t,
                span.len_bytes() as libc::off64_t,
                flags,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => {}
            // A filesystem or device without the call (ESPIPE: not a file;
            // EINVAL/ENOSYS: a kernel or seccomp filter without it): the
            // page cache is simply kept, as before.
            Some(libc::ESPIPE) | Some(libc::EINVAL) | Some(libc::ENOSYS) => return Ok(()),
            _ => {
                return Err(DropFailed {
                    call: "sync_file_range",
                    offset_bytes: span.start_bytes,
                    error,
                });
            }
        }
    }
}

/// `len_bytes` 0 means to the end of the file.
fn fadvise_dontneed(file: &File, span: Span, len_bytes: u64) -> Result<(), DropFailed> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    match posix_fadvise(
        file,
        span.start_bytes as libc::off_t,
        len_bytes as libc::off_t,
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    ) {
        // Advice only: a kind of file that takes none keeps its cache.
        Ok(()) | Err(nix::errno::Errno::ESPIPE) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(errno) => Err(DropFailed {
            call: "posix_fadvise(DONTNEED)",
            offset_bytes: span.start_bytes,
            error: errno.into(),
        }),
    }
}

impl std::fmt::Display for DropFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writing back the data written from byte {} ({})",
            self.offset_bytes, self.call
        )
    }
}

impl std::error::Error for DropFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<DropFailed> for io::Error {
    fn from(failed: DropFailed) -> io::Error {
        io::Error::new(failed.error.kind(), failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn spans_cover_whole_pages() {
        assert_eq!(
            Span::covering(4095, 2),
            Span {
                start_bytes: 0,
                end_bytes: 8192
            }
        );
        assert_eq!(Span::covering(8192, 4096).len_bytes(), 4096);
        assert_eq!(
            Span::covering(0, 1).join(Span::covering(40960, 1)),
            Span {
                start_bytes: 0,
                end_bytes: 45056
            }
        );
    }

    #[test]
    fn only_files_and_block_devices_drop_behind() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        assert!(DropBehind::for_file(&file).is_some());
        let null = File::options().write(true).open("/dev/null").unwrap();
        assert!(DropBehind::for_file(&null).is_none());
        let (_read, write) = nix::unistd::pipe().unwrap();
        assert!(DropBehind::for_file(&File::from(write)).is_none());
    }

    /// Rounds run every window, in both kinds of bookkeeping, and the file
    /// holds what was written (drop-behind never loses a byte).
    #[test]
    fn rounds_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let chunk: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let mut sequential = DropBehind::for_file(&file).unwrap();
        let mut written = 0u64;
        while written < (WINDOWS_IN_WRITEBACK as u64 + 2) * WINDOW_BYTES {
            file.write_all(&chunk).unwrap();
            sequential.wrote(&file, chunk.len() as u64).unwrap();
            written += chunk.len() as u64;
        }
        assert!(sequential.in_writeback.iter().all(Option::is_some));
        // Out of order, as a restore's catch-up copies come: the window is
        // the pages between the lowest and the highest byte written.
        let mut positioned = DropBehind::for_file(&file).unwrap();
        let chunks = WINDOW_BYTES.div_ceil(chunk.len() as u64);
        for index in (0..chunks).rev() {
            let at = written + index * chunk.len() as u64;
            file.write_all_at(&chunk, at).unwrap();
            positioned.wrote_at(&file, at, chunk.len() as u64).unwrap();
        }
        assert_eq!(positioned.dirty, None, "a full window ran a round");
        assert_eq!(
            positioned.in_writeback[0].map(|span| span.start_bytes),
            Some(written / PAGE_BYTES * PAGE_BYTES)
        );
        file.sync_all().unwrap();
        DropBehind::drop_synced(&file).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len() as u64, written + chunks * chunk.len() as u64);
        for (index, piece) in back.chunks(chunk.len()).enumerate() {
            assert_eq!(piece, &chunk[..piece.len()], "chunk {index}");
        }
    }
}
