//! The bundled tools, through their real binaries (root: loop devices).

use hc_test_kit::*;
use std::fs;
use std::process::Command;

fn tool(name: &str) -> Command {
    Command::new(match name {
        "sector-pinger" => env!("CARGO_BIN_EXE_sector-pinger"),
        "sector-sprinkler" => env!("CARGO_BIN_EXE_sector-sprinkler"),
        "hc-writer" => env!("CARGO_BIN_EXE_hc-writer"),
        "hc-compare" => env!("CARGO_BIN_EXE_hc-compare"),
        "hc-impact" => env!("CARGO_BIN_EXE_hc-impact"),
        other => panic!("no tool {other}"),
    })
}

fn block_at(device: &std::path::Path, offset: usize) -> Vec<u8> {
    read_device(device)[offset..offset + 512].to_vec()
}

#[test]
fn sector_pinger_writes_both_sectors_alternately() {
    let device = LoopDevice::new(4 << 20);
    let mut cmd = tool("sector-pinger");
    cmd.arg(&device.path)
        .args(["100", "5000", "--count", "4", "--interval-ms", "10"]);
    let result = run(cmd, None);
    assert!(result.status.success(), "{}", stderr(&result));
    let out = String::from_utf8_lossy(&result.stdout);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("wrote ping 3 to sector 5000"), "{out}");
    assert!(block_at(&device.path, 100 * 512).starts_with(b"hot-clone ping 2 to sector 100\n"));
    assert!(block_at(&device.path, 5000 * 512).starts_with(b"hot-clone ping 3 to sector 5000\n"));
}

#[test]
fn sector_sprinkler_marks_every_nth_sector() {
    let device = LoopDevice::new(8 << 20);
    let mut cmd = tool("sector-sprinkler");
    cmd.arg(&device.path);
    let result = run(cmd, None);
    assert!(result.status.success(), "{}", stderr(&result));
    let sectors = (8u64 << 20) / 512;
    let expected = sectors.div_ceil(7127);
    assert!(
        String::from_utf8_lossy(&result.stdout).contains(&format!("wrote {expected} markers")),
        "{}",
        String::from_utf8_lossy(&result.stdout)
    );
    let content = read_device(&device.path);
    for sector in (0..sectors).step_by(7127) {
        let at = sector as usize * 512;
        let marker = format!("hot-clone sprinkle {sector}\n");
        assert!(
            content[at..].starts_with(marker.as_bytes()),
            "sector {sector}"
        );
    }
}

#[test]
fn hc_writer_is_reproducible_per_seed_and_counts_what_it_did() {
    let a = LoopDevice::new(16 << 20);
    let b = LoopDevice::new(16 << 20);
    for device in [&a, &b] {
        let mut cmd = tool("hc-writer");
        cmd.arg(&device.path).args([
            "--count",
            "200",
            "--rate",
            "0",
            "--sizes",
            "4K,64K",
            "--discard-percent",
            "10",
            "--zeroout-percent",
            "10",
            "--hot-ends-percent",
            "10",
            "--seed",
            "5",
        ]);
        let result = run(cmd, None);
        let log = stderr(&result);
        assert!(result.status.success(), "{log}");
        assert!(log.contains("hc-writer: seed 5"), "{log}");
        assert!(log.contains("200 writes ("), "{log}");
    }
    assert!(
        read_device(&a.path) == read_device(&b.path),
        "same seed, different content"
    );
    let mut cmd = tool("hc-compare");
    cmd.arg(&a.path).arg(&b.path);
    let result = run(cmd, None);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(String::from_utf8_lossy(&result.stdout).starts_with("identical"));
}

#[test]
fn hc_compare_lists_differing_blocks_and_reads_images() {
    let dir = tempfile::tempdir().unwrap();
    let raw = patterned(1 << 20, 3);
    let mut changed = raw.clone();
    changed[8192] ^= 1;
    changed[8192 + 4096] ^= 1;
    changed[700_000] ^= 1;
    let (pa, pb) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    fs::write(&pa, &raw).unwrap();
    fs::write(&pb, &changed).unwrap();
    let mut cmd = tool("hc-compare");
    cmd.arg(&pa).arg(&pb);
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    let out = String::from_utf8_lossy(&result.stdout);
    assert!(
        out.contains("differ: 3 blocks of 4096 bytes in 2 ranges"),
        "{out}"
    );
    assert!(out.contains("byte 8192 (2 blocks)"), "{out}");
    assert!(out.contains("byte 696320 (1 blocks)"), "{out}");

    // An image of the raw file compares identical to it.
    let image = dir.path().join("a.hc");
    let made = run(
        {
            let mut c = hc_from_raw();
            c.arg(&pa);
            c
        },
        None,
    );
    assert!(made.status.success());
    fs::write(&image, &made.stdout).unwrap();
    let mut cmd = tool("hc-compare");
    cmd.arg(&image).arg(&pa);
    let result = run(cmd, None);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stdout)
    );

    // Sizes that differ are said.
    fs::write(&pb, &raw[..4096]).unwrap();
    let mut cmd = tool("hc-compare");
    cmd.arg(&pa).arg(&pb);
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&result.stdout).contains("sizes differ"));
}

/// hc-slowdisk: a write completes only after the delay, a read of the same
/// block meanwhile returns the old data at once, a write is counted in
/// flight, and the --eio range fails reads and writes with EIO.
#[test]
fn hc_slowdisk_delays_writes_and_fails_chosen_ranges() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::time::{Duration, Instant};
    let disk = hc_test_kit::slowdisk::SlowDisk::with_faults(
        8 << 20,
        Duration::from_millis(300),
        &[(4 << 20, (4 << 20) + 4096)],
    );
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&disk.path)
        .unwrap();
    let file = std::sync::Arc::new(file);
    let writer = {
        let file = std::sync::Arc::clone(&file);
        std::thread::spawn(move || {
            let mut block = AlignedBuf::new(4096);
            block.as_mut().fill(0xAB);
            let started = Instant::now();
            file.write_all_at(block.as_mut(), 0).unwrap();
            started.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let name = disk
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let inflight = fs::read_to_string(format!("/sys/block/{name}/inflight")).unwrap();
    let writes_in_flight: u64 = inflight.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut block = AlignedBuf::new(4096);
    let started = Instant::now();
    file.read_exact_at(block.as_mut(), 0).unwrap();
    let read_took = started.elapsed();
    let old = block.as_mut()[0];
    let write_took = writer.join().unwrap();
    assert!(
        write_took >= Duration::from_millis(290),
        "write took {write_took:?}"
    );
    assert!(
        read_took < Duration::from_millis(150),
        "read took {read_took:?}"
    );
    assert_eq!(old, 0, "the read during the write saw its data");
    assert_eq!(writes_in_flight, 1, "inflight: {inflight}");
    file.read_exact_at(block.as_mut(), 0).unwrap();
    assert_eq!(block.as_mut()[0], 0xAB);
    let error = file.read_exact_at(block.as_mut(), 4 << 20).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    let error = file.write_all_at(block.as_mut(), 4 << 20).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    file.read_exact_at(block.as_mut(), 5 << 20).unwrap();
}

/// hc-impact, as documented, on a small scratch device: both columns, the
/// imaging figures, the scheduler it was asked for, and no device left.
#[test]
fn hc_impact_prints_both_columns_and_removes_its_device() {
    let mut cmd = tool("hc-impact");
    cmd.args([
        "--scratch",
        "64M",
        "--seconds",
        "0.5",
        "--runs",
        "1",
        "--rate",
        "500",
        "--scheduler",
        "mq-deadline",
        "--json",
        "--",
        "--max-rate",
        "200M",
    ]);
    let result = run(cmd, None);
    assert!(result.status.success(), "{}", stderr(&result));
    let report: serde_json::Value = serde_json::from_slice(&result.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&result.stdout)));
    for column in ["alone", "with_imaging"] {
        let iops = report[column]["iops"].as_f64().unwrap();
        let p99 = report[column]["p99_us"].as_f64().unwrap();
        let max = report[column]["max_us"].as_f64().unwrap();
        // Some foreground I/O ran and was measured; how fast depends on
        // the host (a busy host disk once gave 355 of the 500 IOPS asked).
        assert!(iops > 0.0 && p99 > 0.0 && max >= p99, "{column}: {report}");
    }
    let imaging = &report["imaging"];
    assert!(
        imaging["main_pass_bytes_per_second"].as_f64().unwrap() > 0.0
            && imaging["main_pass_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["scheduler"], "mq-deadline", "{report}");
    assert_eq!(
        report["image_args"],
        serde_json::json!(["--max-rate", "200M"])
    );
    let device = report["device"].as_str().unwrap();
    let name = device.trim_start_matches("/dev/");
    let backing =
        fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
    assert!(
        !backing.contains("hc-impact-"),
        "{device} still attached to {backing}"
    );
    // A loop device keeps its scheduler after it is detached: put back.
    let scheduler = fs::read_to_string(format!("/sys/block/{name}/queue/scheduler")).unwrap();
    assert!(
        !scheduler.contains("[mq-deadline]"),
        "{device} left with {scheduler}"
    );
}

#[test]
fn hc_impact_will_not_write_to_a_named_device_unasked() {
    let device = LoopDevice::new(4 << 20);
    let mut cmd = tool("hc-impact");
    cmd.arg(&device.path)
        .args(["--seconds", "0.1", "--runs", "1"]);
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("--allow-writes"),
        "{}",
        stderr(&result)
    );
}
