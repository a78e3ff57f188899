//! `hc-compare A B`: compares two disks' contents block by block. Each side
//! is a raw file, a block device (read with O_DIRECT, so the page cache
//! cannot hide what is on it), or a .hc image (restored first into a sparse
//! file in the temp directory). Lists the differing block ranges.
//! Exit 0 when identical, 1 when they differ, 2 on an error.

use anyhow::Context;
use clap::Parser;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "hc-compare",
    about = "Compare two disks (raw file, block device or .hc image) block by block"
)]
struct Args {
    a: PathBuf,
    b: PathBuf,
    /// Block size of the comparison and of the listing.
    #[arg(long, default_value_t = 4096)]
    block: u64,
    /// List at most this many differing ranges.
    #[arg(long, default_value_t = 20)]
    max_list: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("hc-compare: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// A side of the comparison, opened for reading; holds the temporary
/// restore of an image alive.
struct Side {
    file: File,
    name: String,
    _restored: Option<tempfile::TempDir>,
}

fn is_image(path: &Path) -> anyhow::Result<bool> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if file.metadata()?.file_type().is_block_device() {
        return Ok(false);
    }
    let mut first = Vec::new();
    BufReader::new(file.take(4096)).read_until(b'\n', &mut first)?;
    Ok(first.windows(9).any(|w| w == b"Hot-Clone"))
}

fn open(path: &Path) -> anyhow::Result<Side> {
    let name = path.display().to_string();
    if is_image(path)? {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("restored.img");
        hot_clone::restore::reassemble(
            &hot_clone::restore::ImageSource::File(path.to_path_buf()),
            &out,
            hot_clone::restore::Options { allow_legacy: true },
        )
        .with_context(|| format!("cannot restore the image {name}"))?;
        return Ok(Side {
            file: File::open(&out)?,
            name,
            _restored: Some(dir),
        });
    }
    let meta = std::fs::metadata(path)?;
    let file = if meta.file_type().is_block_device() {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    } else {
        File::open(path)
    }
    .with_context(|| format!("cannot open {name}"))?;
    Ok(Side {
        file,
        name,
        _restored: None,
    })
}

fn size_of(side: &Side) -> anyhow::Result<u64> {
    let meta = side.file.metadata()?;
    if meta.file_type().is_block_device() {
        Ok(hot_clone::blockdev::size_bytes(&side.file)?)
    } else {
        Ok(meta.len())
    }
}

/// Reads as much of `buf` as the side has.
fn fill(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn run(args: &Args) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.block > 0 && args.block.is_multiple_of(512),
        "--block must be a multiple of 512"
    );
    let mut a = open(&args.a)?;
    let mut b = open(&args.b)?;
    let (size_a, size_b) = (size_of(&a)?, size_of(&b)?);
    const CHUNK: usize = 4 << 20;
    let mut buf_a = AlignedChunk::new(CHUNK);
    let mut buf_b = AlignedChunk::new(CHUNK);
    let mut ranges: Vec<(u64, u64)> = Vec::new(); // (first block, count)
    let mut differing = 0u64;
    let mut offset = 0u64;
    let common = size_a.min(size_b);
    while offset < common {
        let want = ((common - offset) as usize).min(CHUNK);
        let want_aligned = want.next_multiple_of(4096).min(CHUNK);
        let got_a = fill(&mut a.file, &mut buf_a.as_mut()[..want_aligned])
            .with_context(|| format!("reading {} at byte {offset}", a.name))?;
        let got_b = fill(&mut b.file, &mut buf_b.as_mut()[..want_aligned])
            .with_context(|| format!("reading {} at byte {offset}", b.name))?;
        let n = got_a.min(got_b).min(want);
        anyhow::ensure!(n > 0, "short read at byte {offset}");
        for (i, (x, y)) in buf_a.as_mut()[..n]
            .chunks(args.block as usize)
            .zip(buf_b.as_mut()[..n].chunks(args.block as usize))
            .enumerate()
        {
            if x != y {
                let block = offset / args.block + i as u64;
                differing += 1;
                match ranges.last_mut() {
                    Some((first, count)) if *first + *count == block => *count += 1,
                    _ => ranges.push((block, 1)),
                }
            }
        }
        offset += n as u64;
    }
    if size_a != size_b {
        println!(
            "sizes differ: {} is {size_a} bytes, {} is {size_b} bytes",
            a.name, b.name
        );
    }
    if differing == 0 && size_a == size_b {
        println!("identical ({size_a} bytes)");
        return Ok(true);
    }
    println!(
        "differ: {differing} blocks of {} bytes in {} ranges",
        args.block,
        ranges.len()
    );
    for (first, count) in ranges.iter().take(args.max_list) {
        println!("  byte {} ({} blocks)", first * args.block, count);
    }
    if ranges.len() > args.max_list {
        println!("  ... {} more ranges", ranges.len() - args.max_list);
    }
    Ok(false)
}

/// A page-aligned buffer for O_DIRECT reads.
struct AlignedChunk(Vec<u8>, usize, usize);

impl AlignedChunk {
    fn new(len: usize) -> AlignedChunk {
        let buf = vec![0u8; len + 4096];
        let skip = buf.as_ptr().align_offset(4096);
        AlignedChunk(buf, skip, len)
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0[self.1..self.1 + self.2]
    }
}
