//! `hc-compare A B`: compares two disks' contents block by block. Each side
//! is a raw file, a block device (read with O_DIRECT, so the page cache
//! cannot hide what is on it), or a .hc image (restored first into a sparse
//! file in the temp directory). Lists the differing block ranges.
//! Exit 0 when identical, 1 when they differ, 2 on an error.

use anyhow::Context;
use clap::Parser;
use hot_clone::demo::compare::{Side, compare};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileTypeExt;
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

/// A side of the comparison; holds the temporary restore of an image alive.
struct Opened {
    side: Side,
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

fn open(path: &Path) -> anyhow::Result<Opened> {
    if !is_image(path)? {
        return Ok(Opened {
            side: Side::open(path)?,
            _restored: None,
        });
    }
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("restored.img");
    hot_clone::restore::reassemble(
        &hot_clone::restore::ImageSource::File(path.to_path_buf()),
        &out,
        hot_clone::restore::Options { allow_legacy: true },
    )
    .with_context(|| format!("cannot restore the image {}", path.display()))?;
    let mut side = Side::open(&out)?;
    side.name = path.display().to_string();
    Ok(Opened {
        side,
        _restored: Some(dir),
    })
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let a = open(&args.a)?;
    let b = open(&args.b)?;
    let (a, b) = (&a.side, &b.side);
    let (size_a, size_b) = (a.len_bytes, b.len_bytes);
    let found = compare(a, b, args.block)?;
    let (ranges, differing) = (found.ranges, found.blocks);
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
