//! `sector-pinger DEVICE SECTOR_A SECTOR_B`: the original tool's test
//! utility. Alternately writes a short marker to two sectors every
//! interval, printing each write, so that a live image can be checked for
//! the last marker of each. It overwrites those two blocks.

use anyhow::Context;
use clap::Parser;
use hot_clone::demo::aligned::AlignedBuf;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "sector-pinger",
    about = "Alternately write a marker to two sectors of a device every interval (overwrites them)"
)]
struct Args {
    device: PathBuf,
    /// First 512-byte sector (rounded down to the logical block).
    sector_a: u64,
    /// Second 512-byte sector.
    sector_b: u64,
    /// Milliseconds between writes.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Stop after this many writes (default: until SIGINT/SIGTERM).
    #[arg(long)]
    count: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    hot_clone::signals::install();
    hot_clone::exit::tool_exit("sector-pinger", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(&args.device)
        .with_context(|| format!("cannot open {}", args.device.display()))?;
    let lbs = u64::from(hot_clone::source::blockdev::logical_block_bytes(&file)?);
    let size = hot_clone::source::blockdev::size_bytes(&file)?;
    let mut block = AlignedBuf::new(lbs as usize);
    let mut n = 0u64;
    while args.count.is_none_or(|c| n < c) && !hot_clone::signals::interrupted() {
        let sector = if n.is_multiple_of(2) {
            args.sector_a
        } else {
            args.sector_b
        };
        let offset = sector * 512 / lbs * lbs;
        anyhow::ensure!(
            offset + lbs <= size,
            "sector {sector} is past the end of {}",
            args.device.display()
        );
        let marker = format!("hot-clone ping {n} to sector {sector}\n");
        block.fill(0);
        block[..marker.len()].copy_from_slice(marker.as_bytes());
        file.write_all_at(&block, offset)
            .with_context(|| format!("write to {} at byte {offset}", args.device.display()))?;
        println!("wrote ping {n} to sector {sector}");
        n += 1;
        if args.count.is_none_or(|c| n < c) {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    Ok(())
}
