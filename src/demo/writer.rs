//! A seeded random writer for live-imaging tests and the `hc-writer` tool:
//! O_DIRECT writes of a chosen size mix, discards (BLKDISCARD), write-zeroes
//! (BLKZEROOUT) and writes aimed at the range's first and last blocks, paced
//! at a fixed rate, until told to stop. It writes to the device it is given:
//! never point it at data you want to keep.

use crate::demo::aligned::AlignedBuf;
use crate::demo::prng::XorShift;
use anyhow::Context;
use std::fs::OpenOptions;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// From <linux/fs.h>: _IO(0x12, 119) and _IO(0x12, 127), each reading a
// `u64[2]` range (offset, length in bytes).
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// What the writer makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    /// Sizes of writes in bytes; each write picks one. Rounded to whole
    /// blocks of at least 4 KiB (and the device's logical block).
    pub sizes: Vec<u64>,
    pub discard_percent: u64,
    pub zeroout_percent: u64,
    /// Share of operations aimed at the first or the last block.
    pub ends_percent: u64,
}

impl Default for Mix {
    fn default() -> Mix {
        Mix {
            sizes: vec![4096],
            discard_percent: 0,
            zeroout_percent: 0,
            ends_percent: 0,
        }
    }
}

/// One operation: where, how long, what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub kind: OperationKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationKind {
    Write,
    Discard,
    ZeroOut,
}

/// The deterministic sequence of operations for a seed, a range and a mix.
pub struct Plan {
    rng: XorShift,
    mix: Mix,
    block_bytes: u64,
    first_block: u64,
    block_count: u64,
}

impl Plan {
    /// `range`: bytes of the device; operations stay inside it, aligned to
    /// `block_bytes`. None if the range holds no whole block.
    pub fn new(seed: u64, range: Range<u64>, mix: Mix, block_bytes: u64) -> Option<Plan> {
        let first_block = range.start.div_ceil(block_bytes);
        let end_block = range.end / block_bytes;
        (end_block > first_block && !mix.sizes.is_empty()).then(|| Plan {
            rng: XorShift::new(seed),
            mix,
            block_bytes,
            first_block,
            block_count: end_block - first_block,
        })
    }

    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    pub fn next_operation(&mut self) -> Operation {
        let pick = self.next_u64() % self.mix.sizes.len() as u64;
        let size = self.mix.sizes[pick as usize];
        let blocks = (size / self.block_bytes).clamp(1, self.block_count);
        let block = if self.next_u64() % 100 < self.mix.ends_percent {
            if self.next_u64().is_multiple_of(2) {
                0
            } else {
                self.block_count - blocks
            }
        } else {
            self.next_u64() % (self.block_count - blocks + 1)
        };
        let pick = self.next_u64() % 100;
        let kind = if pick < self.mix.discard_percent {
            OperationKind::Discard
        } else if pick < self.mix.discard_percent + self.mix.zeroout_percent {
            OperationKind::ZeroOut
        } else {
            OperationKind::Write
        };
        Operation {
            offset_bytes: (self.first_block + block) * self.block_bytes,
            len_bytes: blocks * self.block_bytes,
            kind,
        }
    }
}

/// What a writer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub writes: u64,
    pub discards: u64,
    pub zeroouts: u64,
    pub bytes: u64,
}

impl Counts {
    pub fn operations(&self) -> u64 {
        self.writes + self.discards + self.zeroouts
    }
}

/// Writes to `device` within `range` as `mix` says, `rate` operations per
/// second (0: as fast as it can), until `stop` is set or `limit`
/// operations are done. Each write's data starts with its sequence number
/// and the seed, so a stray block can be traced to the write that made it.
pub fn run_writer(
    device: &Path,
    range: Range<u64>,
    mix: &Mix,
    seed: u64,
    rate: u32,
    limit: Option<u64>,
    stop: &AtomicBool,
) -> anyhow::Result<Counts> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("cannot open {} for writing", device.display()))?;
    let logical = u64::from(crate::source::blockdev::logical_block_bytes(&file)?);
    let block_bytes = logical.max(4096);
    let mut plan = Plan::new(seed, range.clone(), mix.clone(), block_bytes).with_context(|| {
        format!(
            "the range {}..{} of {} holds no whole {block_bytes}-byte block",
            range.start,
            range.end,
            device.display()
        )
    })?;
    let largest = mix
        .sizes
        .iter()
        .max()
        .copied()
        .unwrap_or(4096)
        .max(block_bytes);
    let mut buffer = AlignedBuf::new(largest.next_multiple_of(block_bytes) as usize);
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(rate)));
    let started = Instant::now();
    let mut counts = Counts::default();
    while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| counts.operations() < l) {
        let op = plan.next_operation();
        match op.kind {
            OperationKind::Write => {
                let data = &mut buffer[..op.len_bytes as usize];
                let fill = plan.next_u64();
                for (i, word) in data.chunks_exact_mut(8).enumerate() {
                    word.copy_from_slice(
                        &(fill.rotate_left(i as u32 % 64) ^ i as u64).to_le_bytes(),
                    );
                }
                data[..8].copy_from_slice(&counts.operations().to_le_bytes());
                data[8..16].copy_from_slice(&seed.to_le_bytes());
                file.write_all_at(data, op.offset_bytes).with_context(|| {
                    format!(
                        "write of {} bytes at byte {} of {}",
                        op.len_bytes,
                        op.offset_bytes,
                        device.display()
                    )
                })?;
                counts.writes += 1;
            }
            OperationKind::Discard | OperationKind::ZeroOut => {
                let discard = op.kind == OperationKind::Discard;
                let name = if discard { "BLKDISCARD" } else { "BLKZEROOUT" };
                let span: [u64; 2] = [op.offset_bytes, op.len_bytes];
                let fd = file.as_raw_fd();
                // SAFETY: the ioctl reads two u64 from `span`, alive across
                // the call; the descriptor is ours.
                let done = unsafe {
                    if discard {
                        blkdiscard(fd, &span)
                    } else {
                        blkzeroout(fd, &span)
                    }
                };
                if let Err(errno) = done {
                    return Err(std::io::Error::from(errno)).with_context(|| {
                        format!(
                            "{name} of {} bytes at byte {} of {}",
                            op.len_bytes,
                            op.offset_bytes,
                            device.display()
                        )
                    });
                }
                if op.kind == OperationKind::Discard {
                    counts.discards += 1;
                } else {
                    counts.zeroouts += 1;
                }
            }
        }
        counts.bytes += op.len_bytes;
        if let Some(interval) = interval {
            let due = started + interval.mul_f64(counts.operations() as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(seed: u64, mix: Mix, n: usize) -> Vec<Operation> {
        let mut plan = Plan::new(seed, 8192..(1 << 20) + 100, mix, 4096).unwrap();
        (0..n).map(|_| plan.next_operation()).collect()
    }

    #[test]
    fn a_seed_gives_the_same_operations() {
        let mix = Mix {
            sizes: vec![4096, 65536],
            discard_percent: 10,
            zeroout_percent: 10,
            ends_percent: 10,
        };
        assert_eq!(ops(5, mix.clone(), 500), ops(5, mix.clone(), 500));
        assert_ne!(ops(5, mix.clone(), 500), ops(6, mix, 500));
    }

    #[test]
    fn operations_stay_aligned_inside_the_range() {
        let mix = Mix {
            sizes: vec![4096, 65536, 1 << 20, 1 << 22],
            discard_percent: 20,
            zeroout_percent: 20,
            ends_percent: 30,
        };
        let all = ops(9, mix, 5000);
        for op in &all {
            assert_eq!(op.offset_bytes % 4096, 0);
            assert_eq!(op.len_bytes % 4096, 0);
            assert!(
                op.offset_bytes >= 8192 && op.offset_bytes + op.len_bytes <= 1 << 20,
                "{op:?}"
            );
        }
        let kinds = |k| all.iter().filter(|o| o.kind == k).count();
        assert!(kinds(OperationKind::Discard) > 500 && kinds(OperationKind::ZeroOut) > 500);
        // The first and the last block are both hit.
        assert!(all.iter().any(|o| o.offset_bytes == 8192));
        assert!(all.iter().any(|o| o.offset_bytes + o.len_bytes == 1 << 20));
    }

    #[test]
    fn a_range_without_a_whole_block_has_no_plan() {
        assert!(Plan::new(1, 100..4000, Mix::default(), 4096).is_none());
        assert!(Plan::new(1, 0..4096, Mix::default(), 4096).is_some());
    }
}
