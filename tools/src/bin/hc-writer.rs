//! `hc-writer DEVICE`: a seeded random writer for live-imaging tests (see
//! `hot_clone::demo::writer`). It overwrites data on DEVICE.

use clap::Parser;
use hot_clone::cli::parse_bytes;
use hot_clone::demo::writer::{Mix, run_writer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "hc-writer",
    about = "Write to a block device at random, seeded and paced, for imaging tests (destroys its data)"
)]
struct Args {
    /// The device to write to. Its data is overwritten.
    device: PathBuf,
    /// Seed of the operations and the data (printed at the start).
    #[arg(long)]
    seed: Option<u64>,
    /// Operations per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop after this many operations.
    #[arg(long)]
    count: Option<u64>,
    /// Stop when this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Byte range START..END of the device (default: all of it).
    #[arg(long, value_name = "START..END")]
    range: Option<String>,
    /// Write sizes to pick from, e.g. 4K,64K,1M.
    #[arg(long, default_value = "4K", value_delimiter = ',', value_parser = parse_bytes)]
    sizes: Vec<u64>,
    /// Share of operations that are discards (BLKDISCARD).
    #[arg(long, default_value_t = 0)]
    discard_percent: u64,
    /// Share of operations that are write-zeroes (BLKZEROOUT).
    #[arg(long, default_value_t = 0)]
    zeroout_percent: u64,
    /// Share of operations aimed at the first or the last block.
    #[arg(long, default_value_t = 0)]
    hot_ends_percent: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    hot_clone::signals::install();
    hot_clone::exit::tool_exit("hc-writer", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.discard_percent + args.zeroout_percent <= 100 && args.hot_ends_percent <= 100,
        "percentages must add up to at most 100"
    );
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("hc-writer: seed {seed}");
    let size = hot_clone::source::blockdev::size_bytes(&std::fs::File::open(&args.device)?)?;
    let range = match &args.range {
        None => 0..size,
        Some(text) => {
            let (a, b) = text
                .split_once("..")
                .ok_or_else(|| anyhow::anyhow!("--range {text}: expected START..END"))?;
            let (a, b) = (
                parse_bytes(a).map_err(anyhow::Error::msg)?,
                parse_bytes(b).map_err(anyhow::Error::msg)?,
            );
            anyhow::ensure!(
                a < b && b <= size,
                "--range {text}: must lie inside 0..{size}"
            );
            a..b
        }
    };
    let mix = Mix {
        sizes: args.sizes.clone(),
        discard_percent: args.discard_percent,
        zeroout_percent: args.zeroout_percent,
        ends_percent: args.hot_ends_percent,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        let stop_file = args.stop_file.clone();
        let deadline = args
            .seconds
            .map(|s| Instant::now() + Duration::from_secs_f64(s));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if hot_clone::signals::interrupted()
                    || stop_file.as_ref().is_some_and(|f| f.exists())
                    || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    stop.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let result = run_writer(
        &args.device,
        range,
        &mix,
        seed,
        args.rate,
        args.count,
        &stop,
    );
    stop.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let counts = result?;
    eprintln!(
        "hc-writer: {} writes ({} data, {} discards, {} zeroouts), {} bytes, seed {seed}",
        counts.operations(),
        counts.writes,
        counts.discards,
        counts.zeroouts,
        counts.bytes
    );
    Ok(())
}
