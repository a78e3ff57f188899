//! Block-by-block comparison of two disks' contents — raw files or block
//! devices — for `hc-compare` and the demo's final check.

use crate::demo::aligned::AlignedBuf;
use anyhow::Context;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Bytes read from each side at a time (rounded down to whole blocks).
const CHUNK_BYTES: usize = 4 << 20;

/// One side: a block device is read with O_DIRECT, so the page cache
/// cannot hide what is on it.
pub struct Side {
    pub file: File,
    pub name: String,
    pub len_bytes: u64,
}

impl Side {
    pub fn open(path: &Path) -> anyhow::Result<Side> {
        let name = path.display().to_string();
        let is_device = std::fs::metadata(path)
            .with_context(|| format!("cannot stat {name}"))?
            .file_type()
            .is_block_device();
        let mut options = OpenOptions::new();
        options.read(true);
        if is_device {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options
            .open(path)
            .with_context(|| format!("cannot open {name}"))?;
        let len_bytes = if is_device {
            crate::source::blockdev::size_bytes(&file)?
        } else {
            file.metadata()?.len()
        };
        Ok(Side {
            file,
            name,
            len_bytes,
        })
    }
}

/// Where two sides differ over their common length.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Differences {
    /// Runs of differing blocks: (first block, block count), in order.
    pub ranges: Vec<(u64, u64)>,
    pub blocks: u64,
}

/// Compares the first `min(a, b)` bytes of two sides in blocks of
/// `block_bytes` (a multiple of 512).
pub fn compare(a: &Side, b: &Side, block_bytes: u64) -> anyhow::Result<Differences> {
    anyhow::ensure!(
        block_bytes > 0 && block_bytes.is_multiple_of(512),
        "the block size must be a multiple of 512"
    );
    let block = block_bytes as usize;
    // Whole blocks, and whole 4 KiB units so O_DIRECT offsets stay aligned.
    let unit = block / gcd(block, 4096) * 4096;
    let chunk = (CHUNK_BYTES / unit).max(1) * unit;
    let mut buf_a = AlignedBuf::new(chunk.next_multiple_of(4096));
    let mut buf_b = AlignedBuf::new(chunk.next_multiple_of(4096));
    let common = a.len_bytes.min(b.len_bytes);
    let mut differences = Differences::default();
    let mut offset = 0u64;
    while offset < common {
        let want = ((common - offset) as usize).min(chunk);
        // O_DIRECT reads whole 4 KiB units; the device end cuts the last one.
        let ask = want.next_multiple_of(4096).min(buf_a.len());
        let got_a = read_full_at(&a.file, &mut buf_a[..ask], offset)
            .with_context(|| format!("reading {} at byte {offset}", a.name))?;
        let got_b = read_full_at(&b.file, &mut buf_b[..ask], offset)
            .with_context(|| format!("reading {} at byte {offset}", b.name))?;
        let n = got_a.min(got_b).min(want);
        anyhow::ensure!(n > 0, "short read at byte {offset}");
        for (i, (x, y)) in buf_a[..n]
            .chunks(block)
            .zip(buf_b[..n].chunks(block))
            .enumerate()
        {
            if x != y {
                let index = offset / block_bytes + i as u64;
                differences.blocks += 1;
                match differences.ranges.last_mut() {
                    Some((first, count)) if *first + *count == index => *count += 1,
                    _ => differences.ranges.push((index, 1)),
                }
            }
        }
        offset += n as u64;
    }
    Ok(differences)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Reads as much of `buf` as the file has from `offset`.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(dir: &Path, name: &str, data: &[u8]) -> Side {
        let path = dir.join(name);
        std::fs::write(&path, data).unwrap();
        Side::open(&path).unwrap()
    }

    #[test]
    fn lists_runs_of_differing_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..(9 << 20) + 100).map(|i: u32| (i % 251) as u8).collect();
        let mut b = a.clone();
        for at in [8192, 8192 + 4096, (5 << 20) + 3, a.len() - 1] {
            b[at] ^= 1;
        }
        let found = compare(&side(dir.path(), "a", &a), &side(dir.path(), "b", &b), 4096).unwrap();
        let last = (a.len() as u64 - 1) / 4096;
        assert_eq!(found.ranges, [(2, 2), ((5 << 20) / 4096, 1), (last, 1)]);
        assert_eq!(found.blocks, 4);
        let same = compare(&side(dir.path(), "c", &a), &side(dir.path(), "d", &a), 1536).unwrap();
        assert_eq!(same, Differences::default());
    }
}
