//! The default run yields to other programs through the real binary, as
//! root: it reads at full speed on an idle device, falls to its gentle gait
//! when a foreground starts reading the disk, and goes back to full speed
//! once the foreground has stopped. Rates are compared only coarsely
//! (gentle below 0.7x the full speed before it, full speed after it above
//! 1.2x gentle: this debug build's full speed is bound by its CPU, which
//! other tests share); no timing is asserted beyond the order of the
//! switches and the one-second hold.

use hc_test_kit::run::LiveRun;
use hc_test_kit::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Sparse, so reading it is fast and needs no disk space: the main pass
/// must outlast a full-speed spell, the foreground, the hold and another
/// full-speed spell.
const DEVICE_BYTES: u64 = 8 << 30;
const FOREGROUND_FOR: Duration = Duration::from_millis(1500);

/// 4 KiB O_DIRECT reads of `device` at scattered offsets, one every 5 ms,
/// for `FOREGROUND_FOR`: a foreground the trace of writes would never see.
fn read_foreground(device: &Path) -> u64 {
    let file = open_direct(device);
    let mut buf = AlignedBuf::new(4096);
    let mut rng = XorShift::new(test_seed());
    let blocks = DEVICE_BYTES / 4096;
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < FOREGROUND_FOR {
        let block = rng.next_u64() % blocks;
        file.read_exact_at(&mut buf, block * 4096)
            .expect("foreground read");
        reads += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    reads
}

#[derive(Debug)]
struct Change {
    at: f64,
    gentle: bool,
    read_bytes: u64,
}

#[test]
fn the_default_backs_off_for_a_reader_and_recovers_after_it() {
    let device = LoopDevice::scratch(
        DEVICE_BYTES,
        LoopOptions {
            settle: true,
            ..LoopOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let stats_path = dir.path().join("stats.json");
    let mut cmd = hot_clone();
    cmd.args(["image", "-v", "--device"])
        .arg(&device.path)
        .arg("--stats-json")
        .arg(&stats_path)
        .stdout(Stdio::null());
    let mut run = LiveRun::spawn(cmd);
    let full_speed = format!("{}: no I/O of other programs", device.path.display());
    assert!(run.wait_for(&full_speed, RUN_TIMEOUT), "{}", run.log());
    // Some full speed first, to compare with.
    std::thread::sleep(Duration::from_millis(300));
    let reads = read_foreground(&device.path);
    assert!(reads > 100, "the foreground made {reads} reads");
    let status = run.finish(RUN_TIMEOUT);
    assert!(status.success(), "{status}: {}", run.log());

    let stats: serde_json::Value = serde_json::from_slice(&fs::read(&stats_path).unwrap()).unwrap();
    let yielding = &stats["yielding"];
    assert_eq!(yielding["blind_to_reads"], false, "{yielding}");
    let changes: Vec<Change> = yielding["gait_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Change {
            at: c["at_seconds"].as_f64().unwrap(),
            gentle: c["gentle"].as_bool().unwrap(),
            read_bytes: c["read_bytes"].as_u64().unwrap(),
        })
        .collect();
    // Started gentle, full speed at the first idle sample, gentle for the
    // foreground, full speed again after it: nothing else used the disk.
    assert!(changes.len() >= 3, "{changes:#?}\n{}", run.log());
    assert_eq!(
        changes.iter().map(|c| c.gentle).take(3).collect::<Vec<_>>(),
        [false, true, false],
        "{changes:#?}"
    );
    let (first_full, gentle, second_full) = (&changes[0], &changes[1], &changes[2]);
    assert!(
        second_full.at - gentle.at >= FOREGROUND_FOR.as_secs_f64() * 0.5 + 1.0,
        "full speed came back before the foreground had stopped for a second: {changes:#?}"
    );
    let rate = |from: &Change, to: &Change| {
        (to.read_bytes - from.read_bytes) as f64 / (to.at - from.at).max(1e-3)
    };
    let full_rate = rate(first_full, gentle);
    let gentle_rate = rate(gentle, second_full);
    assert!(
        gentle_rate < 0.7 * full_rate,
        "gentle {gentle_rate:.0} B/s is not well below full speed {full_rate:.0} B/s: {changes:#?}"
    );
    // Recovered: the main pass ran on at full speed to its end.
    let main_end = stats["quiesce_wait_seconds"].as_f64().unwrap()
        + stats["main_pass"]["seconds"].as_f64().unwrap();
    assert!(
        second_full.read_bytes < DEVICE_BYTES,
        "the main pass ended before full speed came back: {changes:#?}"
    );
    let recovered_rate =
        (DEVICE_BYTES - second_full.read_bytes) as f64 / (main_end - second_full.at).max(1e-3);
    assert!(
        recovered_rate > 1.2 * gentle_rate,
        "after the foreground: {recovered_rate:.0} B/s, gentle {gentle_rate:.0} B/s: {changes:#?}"
    );
    eprintln!(
        "full {full_rate:.0} B/s, gentle {gentle_rate:.0} B/s, recovered {recovered_rate:.0} B/s: {changes:?}"
    );
    let log = run.log();
    assert!(
        log.contains("Summary: read gently for"),
        "no yield summary: {log}"
    );
}
