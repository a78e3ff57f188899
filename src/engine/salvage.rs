//! Salvaging a read that failed because part of the device cannot be read:
//! which errors mean "this range is unreadable", and how a failed chunk is
//! split down to the logical block to keep every block that does read.
//!
//! Pure over an injected read function, so the split and the retry bounds
//! are unit-tested here without a faulty device; the worker runs it with
//! `pread` on its own thread (a rare path, allowed to block and allocate).
//!
//! # Which errors are about the range
//!
//! The block layer turns a request's status into an errno in one table
//! (`blk_errors` in block/blk-core.c). Four of them say that *these* sectors
//! could not be delivered, and another request elsewhere may well succeed:
//!
//! - `EIO` (`BLK_STS_IOERR`): the generic failure; what most drivers, loop
//!   over a failing file, FUSE and virtio return for an unreadable sector.
//! - `ENODATA` (`BLK_STS_MEDIUM`): an unrecovered medium error (SCSI sense
//!   MEDIUM ERROR, NVMe unrecovered read error).
//! - `EILSEQ` (`BLK_STS_PROTECTION`): the data failed its integrity check
//!   (T10 PI / NVMe end-to-end protection): these bytes are corrupt.
//! - `EREMOTEIO` (`BLK_STS_TARGET`): the target refused this command (NVMe
//!   LBA range errors, SCSI critical target errors for the request).
//!
//! Everything else ends the run, because it says nothing about the range and
//! marking readable data as lost would be a lie: `ENOMEDIUM` (the medium was
//! removed), `ENODEV`/`ENXIO` (device offline or gone), `ENOLINK`
//! (`BLK_STS_TRANSPORT`, a path failure), `ETIMEDOUT`, `EBADE` (a reservation
//! held by another host), `ENOMEM`/`EBUSY` (resources), `EINVAL`/`EOPNOTSUPP`
//! (a request the device cannot take: a bug or a changed device). A device
//! that fails everywhere with a range error (a dead disk answering EIO) is
//! stopped by the run's `--max-bad-bytes` bound instead.
//!
//! # Why pieces, then blocks
//!
//! A failed chunk (up to 1 MiB) is first re-read in pieces of
//! [`PIECE_BYTES`] (64 KiB, GNU ddrescue's default cluster), and only a
//! failing piece block by block. On a real failing disk a failing read is
//! the expensive one (the drive retries internally for up to seconds), so
//! the split should issue few of them: this costs two failing reads per
//! isolated bad block (its piece, then the block), against one for reading
//! the chunk block by block (but 256 reads of 4 KiB per MiB, 2048 at 512
//! bytes) and about log2(chunk / block) + 1 = 9 to 12 for bisection, which
//! is also the worst choice for a long bad run (two failing reads per block
//! of it). Retries ([`SalvagePlan::retries`]) are spent on single blocks
//! only: retrying a large read that already failed buys nothing.

use crate::geom::SECTOR_BYTES;

/// Pieces a failed chunk is re-read in before going block by block.
pub const PIECE_BYTES: u64 = 64 << 10;

/// Retries of a failing block at most, whatever `--read-retries` asks:
/// each one is a failing read that may take seconds on a dying disk.
pub const RETRIES_MAX: u32 = 64;

/// Does a read that failed with `errno` mean the range it covered cannot
/// be read (salvage it) rather than that the device or the request failed
/// (stop)? See the module documentation.
pub fn is_range_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::EIO | libc::ENODATA | libc::EILSEQ | libc::EREMOTEIO
    )
}

/// How to split and retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SalvagePlan {
    /// The logical block: every read is a multiple of it.
    pub block_bytes: u64,
    /// Re-reads of a block that failed, on top of its first read.
    pub retries: u32,
}

/// A byte range `[offset_bytes, end_bytes)` that stayed unreadable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadSpan {
    pub offset_bytes: u64,
    pub end_bytes: u64,
    /// The errno of its last failed read (of its last block).
    pub errno: i32,
}

/// What salvaging one range did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// The unreadable parts, sorted, adjacent blocks merged.
    pub bad: Vec<BadSpan>,
    /// Reads issued (pieces, blocks and retries).
    pub reads: u64,
    /// Of those, retries of a failed block.
    pub retry_reads: u64,
}

/// Why salvaging stopped before the whole range was tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SalvageStop {
    /// A read failed in a way that is not about the range.
    Fatal {
        offset_bytes: u64,
        len_bytes: u64,
        errno: i32,
    },
    /// A read returned 0 bytes inside the device: it shrank.
    EndOfDevice { offset_bytes: u64, len_bytes: u64 },
    /// The job was halted (stop flag, an error elsewhere).
    Halted,
}

/// One read call's result: bytes read (possibly short) or an errno.
pub type ReadResult = Result<usize, i32>;

/// Fills `buf` (the device bytes from `offset_bytes`, a block multiple)
/// with every block that reads, trying `plan.retries` more times for each
/// block that does not, and returns the blocks that stayed unreadable.
/// Bytes of those blocks in `buf` are unspecified.
///
/// `read(offset, buf)` is one read call (a `pread`); short reads are
/// continued here. `halted` is polled between reads.
pub fn salvage(
    plan: SalvagePlan,
    offset_bytes: u64,
    buf: &mut [u8],
    read: &mut dyn FnMut(u64, &mut [u8]) -> ReadResult,
    halted: &dyn Fn() -> bool,
) -> Result<Salvaged, SalvageStop> {
    let block_bytes = plan.block_bytes;
    assert!(block_bytes.is_power_of_two() && block_bytes >= SECTOR_BYTES);
    assert!(offset_bytes.is_multiple_of(block_bytes));
    assert!((buf.len() as u64).is_multiple_of(block_bytes));
    let piece_bytes = PIECE_BYTES.max(block_bytes);
    let retries = plan.retries.min(RETRIES_MAX);
    let mut salvaged = Salvaged::default();
    let len_bytes = buf.len() as u64;
    let mut piece_at = 0u64;
    // Bounded: each turn advances by one piece.
    while piece_at < len_bytes {
        if halted() {
            return Err(SalvageStop::Halted);
        }
        let piece_len = piece_bytes.min(len_bytes - piece_at);
        let piece = &mut buf[piece_at as usize..(piece_at + piece_len) as usize];
        salvaged.reads += 1;
        if read_full(read, offset_bytes + piece_at, piece, block_bytes)?.is_some() {
            block_by_block(
                block_bytes,
                retries,
                offset_bytes + piece_at,
                piece,
                read,
                halted,
                &mut salvaged,
            )?;
        }
        piece_at += piece_len;
    }
    Ok(salvaged)
}

fn block_by_block(
    block_bytes: u64,
    retries: u32,
    offset_bytes: u64,
    piece: &mut [u8],
    read: &mut dyn FnMut(u64, &mut [u8]) -> ReadResult,
    halted: &dyn Fn() -> bool,
    salvaged: &mut Salvaged,
) -> Result<(), SalvageStop> {
    for (block_index, block) in piece.chunks_exact_mut(block_bytes as usize).enumerate() {
        let block_offset = offset_bytes + block_index as u64 * block_bytes;
        let mut failed = None;
        // Bounded: 1 + retries reads.
        for attempt in 0..=retries {
            if halted() {
                return Err(SalvageStop::Halted);
            }
            salvaged.reads += 1;
            if attempt > 0 {
                salvaged.retry_reads += 1;
            }
            failed = read_full(read, block_offset, block, block_bytes)?;
            if failed.is_none() {
                break;
            }
        }
        let Some(errno) = failed else {
            continue;
        };
        let end_bytes = block_offset + block_bytes;
        match salvaged.bad.last_mut() {
            Some(last) if last.end_bytes == block_offset => {
                last.end_bytes = end_bytes;
                last.errno = errno;
            }
            _ => salvaged.bad.push(BadSpan {
                offset_bytes: block_offset,
                end_bytes,
                errno,
            }),
        }
    }
    Ok(())
}

/// Reads all of `buf` from `offset_bytes`, continuing short reads (each
/// returns at least a block, or the device is broken). `Ok(None)`: read;
/// `Ok(Some(errno))`: a range error; `Err`: stop.
fn read_full(
    read: &mut dyn FnMut(u64, &mut [u8]) -> ReadResult,
    offset_bytes: u64,
    buf: &mut [u8],
    block_bytes: u64,
) -> Result<Option<i32>, SalvageStop> {
    let mut done = 0usize;
    let mut eintr_count = 0u32;
    // Bounded: every successful turn reads at least one byte; EINTR and
    // EAGAIN at most INTERRUPTIONS_MAX times in a row.
    while done < buf.len() {
        let at = offset_bytes + done as u64;
        match read(at, &mut buf[done..]) {
            Ok(0) => {
                return Err(SalvageStop::EndOfDevice {
                    offset_bytes: at,
                    len_bytes: (buf.len() - done) as u64,
                });
            }
            Ok(n) => {
                assert!(n <= buf.len() - done, "read more than asked");
                done += n;
                eintr_count = 0;
                if done < buf.len() && !(done as u64).is_multiple_of(block_bytes) {
                    // O_DIRECT reads end on block boundaries; anything else
                    // is a device we do not understand.
                    return Err(SalvageStop::Fatal {
                        offset_bytes: at,
                        len_bytes: (buf.len() - done) as u64,
                        errno: libc::EINVAL,
                    });
                }
            }
            Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => {
                eintr_count += 1;
                if eintr_count > INTERRUPTIONS_MAX {
                    return Err(SalvageStop::Fatal {
                        offset_bytes: at,
                        len_bytes: (buf.len() - done) as u64,
                        errno,
                    });
                }
            }
            Err(errno) if is_range_error(errno) => return Ok(Some(errno)),
            Err(errno) => {
                return Err(SalvageStop::Fatal {
                    offset_bytes: at,
                    len_bytes: (buf.len() - done) as u64,
                    errno,
                });
            }
        }
    }
    Ok(None)
}

/// EINTR/EAGAIN in a row before a salvage read counts as failed.
const INTERRUPTIONS_MAX: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A fake device whose byte i holds i / 512 as u8. A read touching a
    /// bad range (start, end, errno, fail_count) fails with errno the first
    /// fail_count times it is issued at the same offset (u32::MAX: always).
    /// With `short_reads`, reads return at most 4 KiB.
    struct Fake {
        bad: Vec<(u64, u64, i32, u32)>,
        reads: RefCell<Vec<(u64, usize)>>,
        failures: RefCell<std::collections::HashMap<u64, u32>>,
        short_reads: bool,
    }

    impl Fake {
        fn new(bad: &[(u64, u64, i32, u32)]) -> Fake {
            Fake {
                bad: bad.to_vec(),
                reads: RefCell::new(Vec::new()),
                failures: RefCell::new(Default::default()),
                short_reads: false,
            }
        }

        fn read(&self, offset: u64, buf: &mut [u8]) -> ReadResult {
            self.reads.borrow_mut().push((offset, buf.len()));
            let end = offset + buf.len() as u64;
            for &(start, stop, errno, fail_count) in &self.bad {
                if offset < stop && start < end {
                    let mut failures = self.failures.borrow_mut();
                    let seen = failures.entry(offset).or_insert(0);
                    if *seen < fail_count {
                        *seen += 1;
                        return Err(errno);
                    }
                }
            }
            let n = if self.short_reads && buf.len() > 4096 {
                4096
            } else {
                buf.len()
            };
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((offset + i as u64) / 512) as u8;
            }
            Ok(n)
        }
    }

    fn run(fake: &Fake, plan: SalvagePlan, offset: u64, len: usize) -> (Salvaged, Vec<u8>) {
        let mut buf = vec![0xeeu8; len];
        let salvaged = salvage(
            plan,
            offset,
            &mut buf,
            &mut |at, b| fake.read(at, b),
            &|| false,
        )
        .expect("salvaged");
        (salvaged, buf)
    }

    fn expect_good(buf: &[u8], offset: u64, bad: &[BadSpan]) {
        for (i, &b) in buf.iter().enumerate() {
            let at = offset + i as u64;
            if bad.iter().any(|s| s.offset_bytes <= at && at < s.end_bytes) {
                continue;
            }
            assert_eq!(b, (at / 512) as u8, "byte {at}");
        }
    }

    const PLAN_4K: SalvagePlan = SalvagePlan {
        block_bytes: 4096,
        retries: 2,
    };

    #[test]
    fn range_errors_are_the_media_ones() {
        for errno in [libc::EIO, libc::ENODATA, libc::EILSEQ, libc::EREMOTEIO] {
            assert!(is_range_error(errno), "{errno}");
        }
        for errno in [
            libc::ENOMEDIUM,
            libc::ENODEV,
            libc::ENXIO,
            libc::ENOLINK,
            libc::ETIMEDOUT,
            libc::EINVAL,
            libc::ENOMEM,
            libc::EBADE,
        ] {
            assert!(!is_range_error(errno), "{errno}");
        }
    }

    #[test]
    fn one_bad_block_costs_its_piece_its_blocks_and_its_retries() {
        // 1 MiB chunk at 8 MiB; the block at +100 KiB is bad for good.
        let bad_at = (8 << 20) + (100 << 10);
        let fake = Fake::new(&[(bad_at, bad_at + 4096, libc::EIO, u32::MAX)]);
        let (salvaged, buf) = run(&fake, PLAN_4K, 8 << 20, 1 << 20);
        assert_eq!(
            salvaged.bad,
            [BadSpan {
                offset_bytes: bad_at,
                end_bytes: bad_at + 4096,
                errno: libc::EIO
            }]
        );
        // 16 pieces, the failing one's 16 blocks, 2 retries of the bad one.
        assert_eq!(salvaged.reads, 16 + 16 + 2);
        assert_eq!(salvaged.retry_reads, 2);
        expect_good(&buf, 8 << 20, &salvaged.bad);
        // The retries are of the bad block alone, at 4 KiB.
        let reads = fake.reads.borrow();
        assert_eq!(
            reads.iter().filter(|r| **r == (bad_at, 4096)).count(),
            3,
            "{reads:?}"
        );
    }

    #[test]
    fn adjacent_bad_blocks_merge_across_pieces_and_an_unaligned_fault_widens_to_blocks() {
        // Bad bytes 60K+100 .. 68K+1: blocks 60K..72K, over two pieces.
        let fake = Fake::new(&[((60 << 10) + 100, (68 << 10) + 1, libc::ENODATA, u32::MAX)]);
        let (salvaged, buf) = run(&fake, PLAN_4K, 0, 128 << 10);
        assert_eq!(
            salvaged.bad,
            [BadSpan {
                offset_bytes: 60 << 10,
                end_bytes: 72 << 10,
                errno: libc::ENODATA
            }]
        );
        expect_good(&buf, 0, &salvaged.bad);
    }

    #[test]
    fn a_block_that_reads_on_a_retry_is_kept() {
        // Fails twice, then reads: with 2 retries it is saved, with 1 not.
        let bad = [(4096, 8192, libc::EIO, 2)];
        let fake = Fake::new(&bad);
        let (salvaged, buf) = run(&fake, PLAN_4K, 0, 64 << 10);
        assert!(salvaged.bad.is_empty(), "{salvaged:?}");
        // The piece's failure counts too: the block's own reads are the
        // first failure at offset 4096.
        expect_good(&buf, 0, &[]);
        let fake = Fake::new(&bad);
        let plan = SalvagePlan {
            retries: 0,
            ..PLAN_4K
        };
        let (salvaged, _) = run(&fake, plan, 0, 64 << 10);
        assert_eq!(salvaged.bad.len(), 1);
        assert_eq!(salvaged.retry_reads, 0);
    }

    #[test]
    fn retries_are_capped() {
        let fake = Fake::new(&[(0, 512, libc::EIO, u32::MAX)]);
        let plan = SalvagePlan {
            block_bytes: 512,
            retries: u32::MAX,
        };
        let (salvaged, _) = run(&fake, plan, 0, 512);
        assert_eq!(salvaged.retry_reads, u64::from(RETRIES_MAX));
    }

    #[test]
    fn a_wholly_bad_range_is_one_span_and_short_reads_are_continued() {
        let mut fake = Fake::new(&[(0, 1 << 20, libc::EIO, u32::MAX)]);
        fake.short_reads = true;
        let (salvaged, _) = run(&fake, PLAN_4K, 0, 256 << 10);
        assert_eq!(
            salvaged.bad,
            [BadSpan {
                offset_bytes: 0,
                end_bytes: 256 << 10,
                errno: libc::EIO
            }]
        );
        let mut fake = Fake::new(&[]);
        fake.short_reads = true;
        let (salvaged, buf) = run(&fake, PLAN_4K, 4096, 64 << 10);
        assert!(salvaged.bad.is_empty());
        expect_good(&buf, 4096, &[]);
    }

    #[test]
    fn a_fatal_error_stops_with_its_offset_and_a_halt_stops() {
        let fake = Fake::new(&[(8192, 12288, libc::ENOMEDIUM, u32::MAX)]);
        let mut buf = vec![0u8; 64 << 10];
        let stop = salvage(PLAN_4K, 0, &mut buf, &mut |at, b| fake.read(at, b), &|| {
            false
        })
        .unwrap_err();
        assert_eq!(
            stop,
            SalvageStop::Fatal {
                offset_bytes: 0,
                len_bytes: 64 << 10,
                errno: libc::ENOMEDIUM
            }
        );
        let stop = salvage(PLAN_4K, 0, &mut buf, &mut |_, _| Err(libc::EIO), &|| true).unwrap_err();
        assert_eq!(stop, SalvageStop::Halted);
        let stop = salvage(PLAN_4K, 0, &mut buf, &mut |_, _| Ok(0), &|| false).unwrap_err();
        assert_eq!(
            stop,
            SalvageStop::EndOfDevice {
                offset_bytes: 0,
                len_bytes: 64 << 10
            }
        );
    }
}
