//! `sector-sprinkler DEVICE`: the original tool's other test utility.
//! Writes a marker block at every Nth sector (7127, as the original) across
//! a range, so that an image can be checked for all of them. It overwrites
//! those blocks.

use anyhow::Context;
use clap::Parser;
use hot_clone::demo::aligned::AlignedBuf;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "sector-sprinkler",
    about = "Write a marker at every Nth sector of a device (overwrites those blocks)"
)]
struct Args {
    device: PathBuf,
    /// Write at every Nth 512-byte sector.
    #[arg(long, default_value_t = 7127)]
    every: u64,
    /// First sector of the range.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// End sector of the range (default: the device end).
    #[arg(long)]
    end: Option<u64>,
    /// Text of the marker (the sector number is appended).
    #[arg(long, default_value = "hot-clone sprinkle")]
    marker: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(count) => {
            println!("wrote {count} markers every {} sectors", args.every);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sector-sprinkler: error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<u64> {
    anyhow::ensure!(args.every > 0, "--every must be positive");
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&args.device)
        .with_context(|| format!("cannot open {}", args.device.display()))?;
    let lbs = u64::from(hot_clone::source::blockdev::logical_block_bytes(&file)?);
    let size = hot_clone::source::blockdev::size_bytes(&file)?;
    let end = args.end.unwrap_or(size / 512).min(size / 512);
    let mut block = AlignedBuf::new(lbs as usize);
    let mut count = 0;
    let mut sector = args.start;
    while sector < end {
        let offset = sector * 512 / lbs * lbs;
        if offset + lbs > size {
            break;
        }
        let marker = format!("{} {sector}\n", args.marker);
        block.fill(0);
        block[..marker.len()].copy_from_slice(marker.as_bytes());
        file.write_all_at(&block, offset)
            .with_context(|| format!("write to {} at byte {offset}", args.device.display()))?;
        count += 1;
        sector += args.every;
    }
    file.sync_all()?;
    Ok(count)
}
