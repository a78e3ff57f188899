//! `hc-bench-catchup DEVICE`: a catch-up round of scattered dirty blocks,
//! read by the engine (coalesced extents through io_uring) against the
//! original tool's method (one 512-byte `pread` per dirty sector, on a
//! buffered descriptor), with the page cache dropped before each. Reads
//! only. PERF.md's catch-up table comes from this.

use anyhow::Context;
use clap::Parser;
use hot_clone::dirty::DirtyMap;
use hot_clone::engine::{Choice, Engine, EngineConfig, ReadDone};
use hot_clone::source::SourceDevice;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "hc-bench-catchup",
    about = "Time a catch-up round of scattered dirty 4 KiB blocks: engine vs one 512-byte pread per sector"
)]
struct Args {
    /// The device to read (only read).
    device: PathBuf,
    /// Dirty 4 KiB blocks, scattered at random.
    #[arg(long, default_value_t = 100_000)]
    blocks: u64,
    /// Paired runs; medians reported.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Clean gaps up to this long are read across (as hot-clone image does).
    #[arg(long, default_value_t = hot_clone::image::CATCH_UP_GAP_MERGE_BYTES)]
    gap_merge: u64,
    /// Engine reads in flight per worker (0 = as hot-clone image picks).
    #[arg(long, default_value_t = 0)]
    queue_depth: u32,
    /// Engine read size (0 = as hot-clone image picks).
    #[arg(long, default_value = "0", value_parser = hot_clone::cli::parse_bytes)]
    chunk: u64,
}

fn drop_caches() {
    // Best effort: needs root; without it the buffered method gains.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = SourceDevice::open(&args.device)?;
    let engine = Engine::new(
        &device,
        EngineConfig {
            queue_depth: Choice::zero_is_auto(args.queue_depth),
            chunk_bytes: Choice::zero_is_auto(u32::try_from(args.chunk)?),
            ..EngineConfig::default()
        },
    )?;
    let block_count = device.size_bytes / 4096;
    anyhow::ensure!(
        args.blocks <= block_count / 2,
        "{} blocks is more than half of the device",
        args.blocks
    );
    let map = DirtyMap::new(device.size_bytes, 4096);
    let mut rng = hot_clone::demo::prng::XorShift::from_state(args.seed);
    let mut chosen = std::collections::HashSet::new();
    while (chosen.len() as u64) < args.blocks {
        let block = rng.next_u64() % block_count;
        if chosen.insert(block) {
            map.mark_sectors(block * 8, 8);
        }
    }
    let dirty_blocks = map.count_dirty_blocks();
    let buffered = File::open(&args.device)
        .with_context(|| format!("cannot open {}", args.device.display()))?;
    let mut engine_times = Vec::new();
    let mut pread_times = Vec::new();
    let stop = AtomicBool::new(false);
    for _ in 0..args.runs {
        // The same dirty set each time: take it, then mark it again.
        let mut dirty = Vec::new();
        map.take_into(&mut dirty, 64 << 20);
        for e in &dirty {
            map.mark_sectors(e.offset_bytes / 512, e.len_bytes / 512);
        }
        // What `hot-clone image` reads for it.
        let mut extents = dirty.clone();
        hot_clone::dirty::merge_small_gaps(&mut extents, args.gap_merge);

        drop_caches();
        let delivered = AtomicU64::new(0);
        let deliver = |done: ReadDone<'_>| -> anyhow::Result<()> {
            delivered.fetch_add(done.data.len() as u64, Ordering::Relaxed);
            Ok(())
        };
        let started = Instant::now();
        engine.read_extents(&extents, &deliver, None, &stop)?;
        engine_times.push(started.elapsed().as_secs_f64());

        drop_caches();
        let mut sector = [0u8; 512];
        let started = Instant::now();
        for e in &dirty {
            let mut at = e.offset_bytes;
            while at < e.offset_bytes + e.len_bytes {
                buffered
                    .read_exact_at(&mut sector, at)
                    .with_context(|| format!("pread at {at}"))?;
                at += 512;
            }
        }
        pread_times.push(started.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (e, p) = (median(engine_times.clone()), median(pread_times.clone()));
    println!(
        "{}: {} dirty 4 KiB blocks ({} sectors), {} runs",
        args.device.display(),
        dirty_blocks,
        dirty_blocks * 8,
        args.runs
    );
    println!(
        "engine ({} threads, QD {}): median {:.3} s, runs {:?}",
        engine.settings().threads,
        engine.settings().queue_depth,
        e,
        engine_times
    );
    println!("512-byte pread per sector (buffered): median {p:.3} s, runs {pread_times:?}");
    println!("speed-up: {:.1}x", p / e);
    Ok(())
}
