//! The torture matrix, as root: devices {loop 512, loop 4Kn, a BLKPG
//! partition at an odd offset whose length is not a multiple of 1 MiB,
//! zram, a slow FUSE-backed loop whose writes complete 50 ms late} x writes
//! {random small, large multi-block, discards, write-zeroes, first/last
//! blocks} x timing {writes only during a slowed main pass, writes running
//! into the catch-up}, two seeds each. After the writers
//! stop and the run ends, the restored image must equal the device byte
//! for byte, and the run must say it converged. Every failure names its
//! case and seed; `HOT_CLONE_TEST_SEED=N` replays a run's seeds.

use hc_test_kit::run::LiveRun;
use hc_test_kit::slowdisk::SlowDisk;
use hc_test_kit::*;
use hot_clone::demo::writer::{Counts, Mix, run_writer};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

impl Writes {
    fn mix(self) -> Mix {
        let mix = |sizes: &[u64], discard_percent, zeroout_percent, ends_percent| Mix {
            sizes: sizes.to_vec(),
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

/// A seeded writer thread (`hot_clone::demo::writer`, as `hc-writer` runs it)
/// on one target; `stop` returns how many operations it made, or its error.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<Counts>>>,
}

impl Writer {
    fn start(target: &Target, writes: Writes, seed: u64, rate: u32) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (stop, device, range) = (
                Arc::clone(&stop),
                target.device.clone(),
                target.range.clone(),
            );
            std::thread::spawn(move || {
                run_writer(&device, range, &writes.mix(), seed, rate, None, &stop)
            })
        };
        Writer {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().unwrap().join() {
            Ok(Ok(counts)) => Ok(counts.operations()),
            Ok(Err(error)) => Err(format!("writer: {error:#}")),
            Err(_) => Err("writer panicked".into()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
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
    // Shown if the case panics (a timeout), so its seed is never lost.
    eprintln!("case {writes:?} {timing:?} seed {seed}");
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
        .arg(&hold)
        // The matrix is about capture across event orders, with the reads'
        // timing these cases were tuned for; yielding to the writers has
        // its own tests (tests/yielding.rs, and every live test without
        // this flag). Under the gentle default, with five of these tests
        // in parallel on two cores, one case of 20 ended in status 5 (a
        // write's completion never matched: a completion drained before
        // an older one, across CPUs; the closing note of issue 12 has the
        // event order), which is the tracker's to fix, not this matrix's
        // to hide: see the note.
        .arg("--full-speed");
    if timing == Timing::MainPassOnly {
        // A slow main pass, so that the writes land inside it.
        cmd.args(["--threads", "1", "--queue-depth", "1", "--chunk", "64K"]);
    }
    let mut imaging = LiveRun::spawn({
        cmd.stdout(Stdio::null());
        cmd
    });
    if !imaging.wait_for("Main pass done", Duration::from_secs(120)) {
        return Err(format!("no main pass:\n{}", imaging.log()));
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
    let status = imaging.finish(Duration::from_secs(300));
    let log = format!("{}\nwriters: {}", imaging.log(), summaries.join("; "));
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

/// Runs every write mix x both timings x seeds on one device, writing to
/// `targets` at `rate` writes/s; fails listing every failed case with its
/// seed.
fn matrix(name: &str, imaged: &Path, targets: &[Target], rate: u32) {
    let base = test_seed();
    let mut failures = Vec::new();
    let mut cases = 0;
    for w in ALL_WRITES {
        for timing in TIMINGS {
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

/// [`matrix`] with the writes spread over the whole imaged device.
fn whole_device_matrix(name: &str, device: &Path, rate: u32) {
    let targets = [Target {
        device: device.to_path_buf(),
        range: 0..device_size(device),
    }];
    matrix(name, device, &targets, rate);
}

#[test]
fn torture_loop_512() {
    let device = LoopDevice::new(48 << 20);
    fill_device(&device.path, 11);
    whole_device_matrix("loop 512", &device.path, 2000);
}

#[test]
fn torture_loop_4kn() {
    let device = LoopDevice::with_sector_size(48 << 20, 4096);
    fill_device(&device.path, 12);
    whole_device_matrix("loop 4Kn", &device.path, 2000);
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
    matrix("partition", &partition, &targets, 1000);
}

#[test]
fn torture_zram() {
    let zram = Zram::new(64 << 20);
    fill_device(&zram.path, 14);
    whole_device_matrix("zram", &zram.path, 2000);
}

/// Writes complete (and land) 50 ms after they are issued, while reads of
/// the same blocks return the old data at once: catch-up reads race writes
/// still in flight.
#[test]
fn torture_slow_completing_writes() {
    let disk = SlowDisk::new(32 << 20, Duration::from_millis(50));
    fill_device(&disk.path, 15);
    whole_device_matrix(
        "slow FUSE loop",
        &disk.path,
        // Each write takes 50 ms; at 10 a second the disk has pauses with
        // no write in flight, as the settle before the main pass needs (a
        // disk that never pauses is refused after 30 s, by design).
        10,
    );
}
