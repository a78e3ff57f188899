//! The torture matrix, as root: devices {loop 512, loop 4Kn, a BLKPG
//! partition at an odd offset whose length is not a multiple of 1 MiB,
//! zram, a slow FUSE-backed loop whose writes complete 50 ms late} x writes
//! {random small, large multi-block, discards, write-zeroes, first/last
//! blocks} x timing {writes only during a slowed main pass, writes running
//! into the catch-up}, two seeds each. After the writers
//! stop and the run ends, the restored image must equal the device byte
//! for byte, and the run must say it converged. Every failure names its
//! case and seed; `HOT_CLONE_TEST_SEED=N` replays a run's seeds.

mod common;

use common::slowdisk::SlowDisk;
use common::*;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SEEDS_PER_CASE: u64 = 2;

#[derive(Clone, Copy, Debug)]
enum Writes {
    RandomSmall,
    LargeMultiBlock,
    Discards,
    WriteZeroes,
    FirstAndLastBlocks,
}

const ALL_WRITES: [Writes; 5] = [
    Writes::RandomSmall,
    Writes::LargeMultiBlock,
    Writes::Discards,
    Writes::WriteZeroes,
    Writes::FirstAndLastBlocks,
];

impl Writes {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timing {
    /// The writer runs through a slowed main pass and stops when it ends.
    MainPassOnly,
    /// The writer goes on 300 ms into the catch-up rounds.
    IntoCatchUp,
}

/// One writer: a device (or partition) and the byte range it writes.
struct Target {
    device: PathBuf,
    range: std::ops::Range<u64>,
}

/// The mix a writer makes: sizes in bytes (rounded to the logical block),
/// and the shares of discards, write-zeroes and first/last-block writes.
struct Mix {
    sizes: &'static [u64],
    discard_percent: u64,
    zeroout_percent: u64,
    ends_percent: u64,
}

impl Writes {
    fn mix(self) -> Mix {
        let mix = |sizes, discard_percent, zeroout_percent, ends_percent| Mix {
            sizes,
            discard_percent,
            zeroout_percent,
            ends_percent,
        };
        match self {
            Writes::RandomSmall => mix(&[4096], 0, 0, 0),
            Writes::LargeMultiBlock => mix(&[64 << 10, 256 << 10, 1 << 20], 0, 0, 0),
            Writes::Discards => mix(&[4096, 64 << 10], 50, 0, 0),
            Writes::WriteZeroes => mix(&[4096, 64 << 10], 0, 50, 0),
            Writes::FirstAndLastBlocks => mix(&[4096], 0, 0, 60),
        }
    }
}

// From <linux/fs.h>: _IO(0x12, 119) and _IO(0x12, 127).
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A seeded writer thread on one target, paced at `rate` operations per
/// second; stopped by `stop`, which returns its count or its error.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Writer {
    fn start(target: &Target, writes: Writes, seed: u64, rate: u32) -> Writer {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        use std::os::unix::io::AsRawFd;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let device = target.device.clone();
        let range = target.range.clone();
        let mix = writes.mix();
        let handle = std::thread::spawn(move || -> Result<u64, String> {
            let lbs = logical_block_size(&device).max(4096);
            let file = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&device)
                .map_err(|e| format!("open {}: {e}", device.display()))?;
            let mut state = seed | 1;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let first_block = range.start.div_ceil(lbs);
            let end_block = range.end / lbs;
            let blocks = end_block - first_block;
            let largest = *mix.sizes.iter().max().unwrap();
            let mut buf = AlignedBuf::new(largest as usize);
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
            let started = Instant::now();
            let mut count = 0u64;
            while !flag.load(Ordering::SeqCst) {
                let size = mix.sizes[(next() % mix.sizes.len() as u64) as usize];
                let len = (size / lbs).clamp(1, blocks);
                let pick = next() % 100;
                let block = if pick < mix.ends_percent {
                    if next() % 2 == 0 { 0 } else { blocks - len }
                } else {
                    next() % (blocks - len + 1)
                };
                let offset = (first_block + block) * lbs;
                let bytes = len * lbs;
                let kind = next() % 100;
                if kind < mix.discard_percent || kind < mix.discard_percent + mix.zeroout_percent {
                    let request = if kind < mix.discard_percent {
                        BLKDISCARD
                    } else {
                        BLKZEROOUT
                    };
                    let span: [u64; 2] = [offset, bytes];
                    // SAFETY: the ioctl reads two u64 from `span`, which lives
                    // across the call; the fd is ours.
                    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, span.as_ptr()) };
                    if rc != 0 {
                        return Err(format!(
                            "{} {}: {} at byte {offset}+{bytes}",
                            if request == BLKDISCARD {
                                "BLKDISCARD"
                            } else {
                                "BLKZEROOUT"
                            },
                            device.display(),
                            std::io::Error::last_os_error()
                        ));
                    }
                } else {
                    let fill = next();
                    for (i, b) in buf.as_mut()[..bytes as usize].iter_mut().enumerate() {
                        *b = (fill >> (i % 57)) as u8 ^ count as u8;
                    }
                    file.write_all_at(&buf.as_mut()[..bytes as usize], offset)
                        .map_err(|e| format!("write {} at {offset}: {e}", device.display()))?;
                }
                count += 1;
                let due = started + interval.mul_f64(count as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            Ok(count)
        });
        Writer {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> Result<u64, String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle
            .take()
            .unwrap()
            .join()
            .map_err(|_| "writer panicked".to_string())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A child process killed (if still running) and waited for on drop, so
/// that every early return reaps it.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one case; Err describes what went wrong.
fn case(
    imaged: &Path,
    targets: &[Target],
    writes: Writes,
    timing: Timing,
    seed: u64,
    rate: u32,
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let hold = dir.path().join("hold");
    fs::write(&hold, b"").unwrap();
    let image = dir.path().join("image.hc");
    let writers: Vec<Writer> = targets
        .iter()
        .enumerate()
        .map(|(n, t)| Writer::start(t, writes, seed + n as u64 * 1000, rate))
        .collect();
    std::thread::sleep(Duration::from_millis(30)); // writes before the start too
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(imaged)
        .arg("-o")
        .arg(&image)
        .arg("--hold-file")
        .arg(&hold);
    if timing == Timing::MainPassOnly {
        // A slow main pass, so that the writes land inside it.
        cmd.args(["--threads", "1", "--queue-depth", "1", "--chunk", "64K"]);
    }
    let mut child = Reaped(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::channel();
    let child_stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(child_stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut main_pass_done = false;
    while !main_pass_done && Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => {
                main_pass_done = line.starts_with("Main pass done");
                log.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if !main_pass_done {
        return Err(format!("no main pass:\n{}", log.join("\n")));
    }
    if timing == Timing::IntoCatchUp {
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut summaries = Vec::new();
    for writer in writers {
        let ops = writer.stop()?;
        if ops == 0 {
            return Err("a writer made no writes".into());
        }
        summaries.push(format!("{ops} ops"));
    }
    fs::remove_file(&hold).unwrap();
    let status = child.0.wait().unwrap();
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
        log.push(line);
    }
    let log = format!("{}\nwriters: {}", log.join("\n"), summaries.join("; "));
    if !status.success() {
        return Err(format!("hot-clone exit {status}\n{log}"));
    }
    if !log.contains("Converged") || !log.contains("\nDone") {
        return Err(format!("no 'Converged' and 'Done' in the log\n{log}"));
    }
    let restored_dir = tempfile::tempdir().unwrap();
    let restored = restored_dir.path().join("restored.img");
    let mut cmd = hot_clone();
    cmd.arg("reassemble").arg(&image).arg("-o").arg(&restored);
    let result = run(cmd, None);
    if !result.status.success() {
        return Err(format!("reassemble: {}\n{log}", stderr(&result)));
    }
    let restored = fs::read(&restored).unwrap();
    let now = read_device(imaged);
    if restored.len() != now.len() {
        return Err(format!(
            "restored {} bytes, device {}\n{log}",
            restored.len(),
            now.len()
        ));
    }
    let differing: Vec<usize> = restored
        .chunks(4096)
        .zip(now.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(block, _)| block)
        .collect();
    if !differing.is_empty() {
        return Err(format!(
            "{} blocks of 4 KiB differ from the device, first {:?}\n{log}",
            differing.len(),
            &differing[..differing.len().min(8)]
        ));
    }
    Ok(())
}

fn base_seed() -> u64 {
    std::env::var("HOT_CLONE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

/// Runs writes x timings x seeds on one device; fails listing every
/// failed case with its seed.
fn matrix(
    name: &str,
    imaged: &Path,
    targets: &[Target],
    writes: &[Writes],
    timings: &[Timing],
    rate: u32,
) {
    let base = base_seed();
    let mut failures = Vec::new();
    let mut cases = 0;
    for &w in writes {
        for &timing in timings {
            for n in 0..SEEDS_PER_CASE {
                let seed = base + n;
                cases += 1;
                if let Err(message) = case(imaged, targets, w, timing, seed, rate) {
                    failures.push(format!(
                        "{name} {w:?} {timing:?} seed {seed} (HOT_CLONE_TEST_SEED={base}): {message}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    eprintln!("{name}: {cases} cases passed (HOT_CLONE_TEST_SEED={base})");
}

const TIMINGS: [Timing; 2] = [Timing::MainPassOnly, Timing::IntoCatchUp];

fn whole(device: &Path) -> Vec<Target> {
    vec![Target {
        device: device.to_path_buf(),
        range: 0..device_size(device),
    }]
}

#[test]
fn torture_loop_512() {
    let device = LoopDevice::new(48 << 20);
    fill_device(&device.path, 11);
    matrix(
        "loop 512",
        &device.path,
        &whole(&device.path),
        &ALL_WRITES,
        &TIMINGS,
        2000,
    );
}

#[test]
fn torture_loop_4kn() {
    let device = LoopDevice::with_sector_size(48 << 20, 4096);
    fill_device(&device.path, 12);
    matrix(
        "loop 4Kn",
        &device.path,
        &whole(&device.path),
        &ALL_WRITES,
        &TIMINGS,
        2000,
    );
}

#[test]
fn torture_partition_at_an_odd_offset() {
    let mut disk = LoopDevice::new(64 << 20);
    fill_device(&disk.path, 13);
    // Starts at sector 2049; 60001 sectors = 30,720,512 bytes, not a
    // multiple of 1 MiB.
    let (start, len) = (2049u64, 60_001u64);
    let partition = disk.add_partition(1, start, len);
    let disk_size = device_size(&disk.path);
    let targets = vec![
        Target {
            device: partition.clone(),
            range: 0..len * 512 / 4096 * 4096,
        },
        Target {
            device: disk.path.clone(),
            range: (start + len).div_ceil(8) * 4096..disk_size,
        },
        Target {
            device: disk.path.clone(),
            range: 0..start / 8 * 4096,
        },
    ];
    matrix(
        "partition",
        &partition,
        &targets,
        &ALL_WRITES,
        &TIMINGS,
        1000,
    );
}

#[test]
fn torture_zram() {
    let zram = Zram::new(64 << 20);
    fill_device(&zram.path, 14);
    matrix(
        "zram",
        &zram.path,
        &whole(&zram.path),
        &ALL_WRITES,
        &TIMINGS,
        2000,
    );
}

/// Writes complete (and land) 50 ms after they are issued, while reads of
/// the same blocks return the old data at once: catch-up reads race writes
/// still in flight.
#[test]
fn torture_slow_completing_writes() {
    let disk = SlowDisk::new(32 << 20, Duration::from_millis(50));
    fill_device(&disk.path, 15);
    matrix(
        "slow FUSE loop",
        &disk.path,
        &whole(&disk.path),
        &ALL_WRITES,
        &TIMINGS,
        400,
    );
}
