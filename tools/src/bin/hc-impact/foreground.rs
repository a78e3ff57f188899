//! The foreground workload: 4 KiB requests at a fixed rate, one at a time,
//! every request's latency recorded, reads and writes apart.
//!
//! Open-loop: request k is due at start + k/rate, and its latency counts
//! from when it was due, so a request delayed behind a slow one is charged
//! for the wait (no coordinated omission).

use anyhow::Context;
use hdrhistogram::Histogram;
use hot_clone::demo::{aligned::AlignedBuf, prng::XorShift};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const BLOCK: usize = 4096;
/// Latencies past this (60 s) are clamped into the histogram's last bucket.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Random reads and writes on the device, O_DIRECT (--read-percent reads).
    Mix,
    /// Random reads only on the device, O_DIRECT.
    Read,
    /// Random writes only on the device, O_DIRECT.
    Write,
    /// Buffered random reads of a hot file kept in the page cache
    /// (--cached-size, in the system temp dir): what imaging does to the
    /// cache the live system relies on.
    Cached,
    /// No foreground: the imagers alone, for their throughput on an idle
    /// device.
    Idle,
}

/// What one foreground run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
    /// None when the foreground issued no reads (no writes).
    pub read_p99_us: Option<f64>,
    pub write_p99_us: Option<f64>,
    pub iops: f64,
    /// Bytes the foreground read from the device itself (not the cached
    /// file's): taken off the device's read counter to leave the imager's.
    pub device_read_bytes: u64,
}

/// Where the requests go.
pub struct Target {
    file: File,
    path: PathBuf,
    blocks: u64,
    read_percent: u32,
    on_device: bool,
    /// Cached: the hot file, removed on drop.
    hot: Option<tempfile::TempPath>,
}

impl Target {
    /// The device itself, O_DIRECT; opened for writing only when some
    /// requests write.
    pub fn device(device: &Path, read_percent: u32) -> anyhow::Result<Target> {
        assert!(read_percent <= 100);
        let file = OpenOptions::new()
            .read(true)
            .write(read_percent < 100)
            .custom_flags(libc::O_DIRECT)
            .open(device)
            .with_context(|| format!("cannot open {}", device.display()))?;
        let size = hot_clone::source::blockdev::size_bytes(&file)?;
        let blocks = size / BLOCK as u64;
        anyhow::ensure!(blocks > 0, "{} is smaller than 4 KiB", device.display());
        Ok(Target {
            file,
            path: device.to_path_buf(),
            blocks,
            read_percent,
            on_device: true,
            hot: None,
        })
    }

    /// A hot file of `size_bytes` of random data in the system temp dir,
    /// read through the page cache (no O_DIRECT).
    pub fn cached(size_bytes: u64, seed: u64) -> anyhow::Result<Target> {
        let blocks = size_bytes / BLOCK as u64;
        anyhow::ensure!(blocks > 0, "--cached-size must be at least 4 KiB");
        let mut hot = tempfile::Builder::new()
            .prefix("hc-impact-cached-")
            .tempfile()?;
        let mut rng = XorShift::from_state(seed ^ 0xCAC4E);
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = blocks * BLOCK as u64;
        while left > 0 {
            rng.fill(&mut chunk);
            let n = left.min(chunk.len() as u64) as usize;
            hot.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        // Written pages stay in the cache, clean once synced; warm() reads
        // them all again before every run anyway.
        hot.as_file().sync_all()?;
        let (file, path) = hot.into_parts();
        Ok(Target {
            path: path.to_path_buf(),
            file,
            blocks,
            read_percent: 100,
            on_device: false,
            hot: Some(path),
        })
    }

    /// Cached: reads the whole hot file, so that a run starts with all of
    /// it in the page cache whatever the run before evicted.
    pub fn warm(&self) -> anyhow::Result<()> {
        if self.on_device {
            return Ok(());
        }
        let mut file = File::open(&self.path)?;
        let mut chunk = vec![0u8; 1 << 20];
        while file.read(&mut chunk)? > 0 {}
        Ok(())
    }

    /// Cached: the hot file's path.
    pub fn hot_file(&self) -> Option<PathBuf> {
        self.hot.as_ref().map(|path| path.to_path_buf())
    }

    pub fn describe(&self) -> String {
        if self.on_device {
            format!(
                "4 KiB random, {}% reads, O_DIRECT on the device",
                self.read_percent
            )
        } else {
            format!(
                "4 KiB random buffered reads of a {} MiB hot file in the page cache ({})",
                (self.blocks * BLOCK as u64) >> 20,
                self.path.parent().unwrap_or(&self.path).display()
            )
        }
    }
}

/// One foreground run of `seconds` at `rate` requests per second.
pub fn run(target: &Target, rate: u32, seconds: f64, seed: u64) -> anyhow::Result<Stats> {
    let mut buffer = AlignedBuf::new(BLOCK);
    let new = || Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3);
    let (mut reads, mut writes) = (new()?, new()?);
    let mut rng = XorShift::new(seed);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = (seconds * f64::from(rate)).ceil() as u64;
    let started = Instant::now();
    for k in 0..total {
        let due = started + interval.mul_f64(k as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        hot_clone::signals::check()?;
        let random = rng.next_u64();
        let offset = (random % target.blocks) * BLOCK as u64;
        let is_read = (random >> 40) % 100 < u64::from(target.read_percent);
        if is_read {
            target.file.read_exact_at(&mut buffer, offset)
        } else {
            buffer[..8].copy_from_slice(&k.to_le_bytes());
            target.file.write_all_at(&buffer, offset)
        }
        .with_context(|| format!("{} at byte {offset}", target.path.display()))?;
        let latency_us = (due.elapsed().as_micros() as u64).clamp(1, LATENCY_US_MAX);
        if is_read { &mut reads } else { &mut writes }.record(latency_us)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let p99 = |h: &Histogram<u64>| (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64);
    let mut all = reads.clone();
    all.add(&writes)?;
    Ok(Stats {
        p50_us: all.value_at_quantile(0.5) as f64,
        p99_us: all.value_at_quantile(0.99) as f64,
        p99_9_us: all.value_at_quantile(0.999) as f64,
        max_us: all.max() as f64,
        read_p99_us: p99(&reads),
        write_p99_us: p99(&writes),
        iops: total as f64 / elapsed,
        device_read_bytes: if target.on_device {
            reads.len() * BLOCK as u64
        } else {
            0
        },
    })
}
