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

/// hc-impact's JSON report of `args`, run to success.
fn hc_impact_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = tool("hc-impact");
    cmd.arg("--json").args(args);
    let result = run(cmd, None);
    assert!(result.status.success(), "{args:?}: {}", stderr(&result));
    serde_json::from_slice(&result.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&result.stdout)))
}

/// The scratch loop device of a report is detached from its backing file
/// and the file removed. Detaching can lag: LOOP_CLR_FD on a device still
/// open (udev probes it after a close of a writer) only sets autoclear
/// (drivers/block/loop.c, loop_clr_fd), so this waits a little; and it
/// checks for this run's file, as a parallel test may have the same
/// device number by now.
fn assert_scratch_gone(report: &serde_json::Value) {
    let device = report["device"].as_str().unwrap();
    let backing = report["scratch_file"].as_str().unwrap();
    let name = device.trim_start_matches("/dev/");
    let started = std::time::Instant::now();
    loop {
        let now =
            fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
        if !now.starts_with(backing) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{device} still attached to {now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !std::path::Path::new(backing).exists(),
        "{backing} left behind"
    );
}

/// Some foreground I/O ran and was measured; how fast depends on the host
/// (a busy host disk once gave 355 of the 500 IOPS asked).
fn assert_measured(stats: &serde_json::Value, reads: bool, writes: bool, what: &str) {
    let iops = stats["iops"].as_f64().unwrap();
    let p99 = stats["p99_us"].as_f64().unwrap();
    let max = stats["max_us"].as_f64().unwrap();
    assert!(iops > 0.0 && p99 > 0.0 && max >= p99, "{what}: {stats}");
    assert_eq!(stats["read_p99_us"].is_number(), reads, "{what}: {stats}");
    assert_eq!(stats["write_p99_us"].is_number(), writes, "{what}: {stats}");
}

/// hc-impact, as documented, on a small scratch device: the default row
/// (hot-clone with the arguments after --), both columns, the imaging
/// figures, the scheduler it was asked for, and no device left.
#[test]
fn hc_impact_prints_both_columns_and_removes_its_device() {
    let report = hc_impact_json(&[
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
        "--",
        "--max-rate",
        "200M",
    ]);
    assert_measured(&report["alone"], true, true, "alone");
    let row = &report["rows"][0];
    assert_eq!(row["name"], "hot-clone --max-rate 200M", "{report}");
    assert_eq!(row["hot_clone"], true, "{report}");
    assert_measured(&row["with"], true, true, "with");
    assert!(
        row["imaging_bytes_per_second"].as_f64().unwrap() > 0.0
            && row["instances"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(
        row["read_p99_inflation"].as_f64().unwrap() > 0.0
            && row["write_p99_inflation"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["scheduler"], "mq-deadline", "{report}");
    assert_scratch_gone(&report);
    // A loop device keeps its scheduler after it is detached: put back.
    let name = report["device"]
        .as_str()
        .unwrap()
        .trim_start_matches("/dev/");
    let scheduler = fs::read_to_string(format!("/sys/block/{name}/queue/scheduler")).unwrap();
    assert!(
        !scheduler.contains("[mq-deadline]"),
        "{name} left with {scheduler}"
    );
}

/// Every foreground against a command imager (dd, writing the image to
/// {out}): the read and write columns each foreground has, a positive
/// imaging throughput, dd restarted when it finished before the window
/// ended, and the scratch device and the hot file gone afterwards.
#[test]
fn hc_impact_runs_each_foreground_against_a_command_imager() {
    for (foreground, reads, writes) in [
        ("mix", true, true),
        ("read", true, false),
        ("write", false, true),
        ("cached", true, false),
    ] {
        let report = hc_impact_json(&[
            "--scratch",
            "16M",
            "--cached-size",
            "8M",
            "--seconds",
            "1",
            "--runs",
            "1",
            "--rate",
            "500",
            "--foreground",
            foreground,
            "--imager",
            "dd=dd if={dev} of={out} iflag=direct bs=1M status=none",
        ]);
        assert_eq!(report["foreground"], foreground, "{report}");
        assert_measured(&report["alone"], reads, writes, foreground);
        let row = &report["rows"][0];
        assert_eq!(row["name"], "dd", "{report}");
        assert_eq!(row["hot_clone"], false, "{report}");
        assert_measured(&row["with"], reads, writes, foreground);
        let imaging = row["imaging_bytes_per_second"].as_f64().unwrap();
        // dd reads all 16 MiB in well under the window and starts again.
        assert!(
            imaging > 0.0 && row["instances"].as_u64().unwrap() >= 2,
            "{foreground}: {report}"
        );
        assert_scratch_gone(&report);
        match report["cached_file"].as_str() {
            Some(hot) => {
                assert_eq!(foreground, "cached");
                assert!(!std::path::Path::new(hot).exists(), "{hot} left behind");
            }
            None => assert_ne!(foreground, "cached", "{report}"),
        }
    }
}

/// A pipeline imager that outlives the window (its last stage sleeps) is
/// killed with its whole process group, its {out} file removed, and the
/// text table has its row.
#[test]
fn hc_impact_kills_a_pipeline_imager_and_prints_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let (pids, outs) = (dir.path().join("pids"), dir.path().join("outs"));
    let imager = format!(
        "slow=echo {{out}} >> {outs}; dd if={{dev}} iflag=direct bs=1M status=none | sh -c 'echo $$ >> {pids}; cat > {{out}}; exec sleep 60'",
        outs = outs.display(),
        pids = pids.display()
    );
    let mut cmd = tool("hc-impact");
    cmd.args([
        "--scratch",
        "16M",
        "--seconds",
        "0.5",
        "--runs",
        "1",
        "--rate",
        "500",
        "--foreground",
        "read",
        "--imager",
        &imager,
    ]);
    let result = run(cmd, None);
    assert!(result.status.success(), "{}", stderr(&result));
    let table = String::from_utf8_lossy(&result.stdout);
    assert!(
        table.contains("| imager | read p99 alone (us) |"),
        "{table}"
    );
    assert!(
        table.lines().any(|line| line.starts_with("| slow | ")),
        "{table}"
    );
    let pids = fs::read_to_string(&pids).unwrap();
    assert_eq!(pids.lines().count(), 1, "restarted: {pids}");
    for pid in pids.lines() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the pipeline's last stage {pid} is still running"
        );
    }
    for out in fs::read_to_string(&outs).unwrap().lines() {
        assert!(!std::path::Path::new(out).exists(), "{out} left behind");
    }
}

/// No foreground: two built-in rows side by side, the full-speed one
/// with main passes of its own (restarted once each main pass ends).
#[test]
fn hc_impact_compares_hot_clone_settings_on_an_idle_device() {
    let report = hc_impact_json(&[
        "--scratch",
        "16M",
        "--seconds",
        "1",
        "--runs",
        "1",
        "--foreground",
        "idle",
        "--device-speed",
        "400M",
        "--imager",
        "default=hot-clone",
        "--imager",
        "quarter=hot-clone --max-rate {rate:25%}",
    ]);
    assert!(report["alone"].is_null(), "{report}");
    assert_eq!(
        report["rows"][1]["command_resolved"],
        format!("hot-clone --max-rate {}", 100u64 << 20),
        "{report}"
    );
    for row in report["rows"].as_array().unwrap() {
        assert!(row["with"].is_null(), "{report}");
        assert!(
            row["imaging_bytes_per_second"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
    // At full speed 16 MiB take well under the window; paced, on a busy
    // host, maybe not (a run stopped in its main pass reports none).
    let default = &report["rows"][0];
    assert!(
        default["main_passes"].as_u64().unwrap() >= 1
            && default["main_pass_bytes_per_second"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_scratch_gone(&report);
}

/// A signal in the middle of a window ends the run through the clean-up:
/// the held hot-clone (in a process group of its own, which a terminal's
/// Ctrl-C does not reach) is stopped and the scratch device detached.
#[test]
fn hc_impact_interrupted_leaves_no_imager_running() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = tool("hc-impact")
        .args([
            "--scratch",
            "64M",
            "--seconds",
            "60",
            "--runs",
            "1",
            "--foreground",
            "idle",
            "--",
            "--max-rate",
            "8M",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let text = loop {
        let text = fs::read_to_string(&log).unwrap();
        if text.contains("run 1 of 1: with") {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60) && child.try_wait().unwrap().is_none(),
            "{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // "hc-impact: scratch device DEVICE (64 MiB over FILE)"
    let words: Vec<&str> = text
        .split_whitespace()
        .skip_while(|word| *word != "device")
        .collect();
    let device = words[1].to_string();
    let backing = words[5].trim_end_matches(')').to_string();
    // Into the window, hot-clone reading.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) of our own child, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let text = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("interrupted"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the window was not cut short: {text}"
    );
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !(cmdline.contains("hc-impact-run-") && cmdline.contains(&device)),
            "still running: {cmdline}"
        );
    }
    let report = serde_json::json!({ "device": device, "scratch_file": backing });
    assert_scratch_gone(&report);
}

#[test]
fn hc_impact_refuses_options_that_do_not_fit() {
    for (args, said) in [
        (
            &["--foreground", "read", "--read-percent", "50"][..],
            "--read-percent is for --foreground mix",
        ),
        (
            &[
                "--imager",
                "dd=dd if={dev} of=/dev/null",
                "--",
                "--max-rate",
                "1M",
            ][..],
            "with --imager give them in it",
        ),
        (
            &[
                "--imager",
                "a=hot-clone",
                "--imager",
                "a=hot-clone --max-rate 1M",
            ][..],
            "two imagers named \"a\"",
        ),
    ] {
        let mut cmd = tool("hc-impact");
        cmd.args(args);
        let result = run(cmd, None);
        assert_eq!(
            result.status.code(),
            Some(1),
            "{args:?}: {}",
            stderr(&result)
        );
        assert!(
            stderr(&result).contains(said),
            "{args:?}: {}",
            stderr(&result)
        );
    }
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
