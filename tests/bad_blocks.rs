//! Unreadable source blocks, through the real binary, as root: a loop
//! device over `hc-slowdisk` whose `--eio` ranges fail reads. Each case
//! checks the exit status (6: complete except for unreadable ranges), the
//! `B:` records (parsed here, independently of the crate), that every byte
//! outside them equals the device, and what `verify` and `reassemble` say
//! and exit with (3) and restore there (zeros).

use hc_test_kit::run::LiveRun;
use hc_test_kit::slowdisk::{SlowDisk, SlowDiskOptions, read_direct};
use hc_test_kit::*;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// The device as the image restores it: sections in order, then zeros
/// where B: records say (the format's "later wins", B: records last).
fn restored(image: &[u8], parsed: &ParsedImage, size: usize) -> Vec<u8> {
    let mut device = vec![0u8; size];
    for &(offset, data_at, len) in &parsed.sections {
        device[offset as usize..offset as usize + len]
            .copy_from_slice(&image[data_at..data_at + len]);
    }
    for &(offset, len) in &parsed.bad {
        device[offset as usize..(offset + len) as usize].fill(0);
    }
    device
}

fn is_bad(at: u64, bad: &[(u64, u64)]) -> bool {
    bad.iter().any(|&(o, l)| o <= at && at < o + l)
}

/// Every byte outside `bad` equals `expected`; every byte inside is zero.
fn assert_matches_outside(restored: &[u8], expected: &[u8], bad: &[(u64, u64)]) {
    assert_eq!(restored.len(), expected.len());
    for (at, (&got, &want)) in restored.iter().zip(expected).enumerate() {
        if is_bad(at as u64, bad) {
            assert_eq!(got, 0, "byte {at} in a bad range is restored as zero");
        } else {
            assert_eq!(got, want, "byte {at}, outside the bad ranges");
        }
    }
}

/// The range [start, end) widened to whole logical blocks.
fn widened(start: u64, end: u64, lbs: u64) -> (u64, u64) {
    let first = start / lbs * lbs;
    (first, end.div_ceil(lbs) * lbs - first)
}

struct Imaged {
    status: std::process::ExitStatus,
    log: String,
    image: Vec<u8>,
    stats: Option<serde_json::Value>,
}

fn image(device: &Path, dir: &Path, args: &[&str]) -> Imaged {
    let out = dir.join("out.hc");
    let stats = dir.join("stats.json");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&stats);
    let mut command = hot_clone();
    command
        .args(["image", "-d"])
        .arg(device)
        .arg("-o")
        .arg(&out)
        .arg("--stats-json")
        .arg(&stats)
        .args(args);
    let output = run(command, None);
    Imaged {
        status: output.status,
        log: stderr(&output),
        image: std::fs::read(&out).unwrap_or_default(),
        stats: std::fs::read(&stats)
            .ok()
            .map(|text| serde_json::from_slice(&text).unwrap()),
    }
}

/// verify and reassemble (to a file, and onto a device filled with 0xff)
/// exit 3, name the bad ranges as byte ranges, say they hold zeros, and
/// restore the image with zeros there.
fn check_restores(dir: &Path, expected: &[u8], bad: &[(u64, u64)]) {
    let image_path = dir.join("out.hc");
    let total: u64 = bad.iter().map(|b| b.1).sum();
    let mut verify = hot_clone();
    verify.arg("verify").arg(&image_path);
    let output = run(verify, None);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "verify: {stdout}\n{err}");
    assert!(
        stdout.contains(&format!(
            "unreadable: {} ranges, {total} bytes (restored as zeros)",
            bad.len()
        )),
        "{stdout}"
    );
    for &(offset, len) in bad.iter().take(16) {
        assert!(
            err.contains(&format!("bytes {offset}..{}", offset + len)),
            "verify names {offset}+{len}: {err}"
        );
    }
    assert!(
        err.contains(&format!("{} range(s)", bad.len()))
            && err.contains(&format!("({total} bytes)"))
            && err.contains("restored bytes there are zeros"),
        "{err}"
    );

    let restored_path = dir.join("restored.img");
    let mut reassemble = hot_clone();
    reassemble
        .arg("reassemble")
        .arg(&image_path)
        .arg("-o")
        .arg(&restored_path);
    let output = run(reassemble, None);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("restored bytes there are zeros"),
        "{}",
        stderr(&output)
    );
    assert_matches_outside(&std::fs::read(&restored_path).unwrap(), expected, bad);

    let target = LoopDevice::new(expected.len() as u64);
    target.write_at(0, &vec![0xffu8; expected.len()]);
    let mut reassemble = hot_clone();
    reassemble
        .arg("reassemble")
        .arg(&image_path)
        .arg("-o")
        .arg(&target.path);
    let output = run(reassemble, None);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_matches_outside(&read_device(&target.path), expected, bad);
}

fn slow_disk(content: &[u8], eio: &[(u64, u64)], eio_writes: bool) -> SlowDisk {
    SlowDisk::start(SlowDiskOptions {
        size_bytes: content.len() as u64,
        write_delay: Duration::from_millis(1),
        eio,
        eio_writes,
        content: Some(content),
    })
}

fn stats_ranges(stats: &serde_json::Value) -> Vec<(u64, u64)> {
    stats["unreadable"]["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().unwrap(),
                r["len_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_bad_range_inside_a_chunk_of_the_main_pass_is_one_b_record_and_exit_6() {
    let size = 8 * MIB;
    let content = patterned(size as usize, 11);
    // Unaligned, in the middle of the main pass's fourth 1 MiB chunk.
    let fault = (3 * MIB + 1000, 3 * MIB + 5000);
    let disk = slow_disk(&content, &[fault], true);
    let lbs = logical_block_size(&disk.path);
    let expected_bad = [widened(fault.0, fault.1, lbs)];
    let dir = tempfile::tempdir().unwrap();

    let run = image(&disk.path, dir.path(), &[]);
    assert_eq!(run.status.code(), Some(6), "{}", run.log);
    assert!(
        run.log.contains(&format!(
            "Unreadable: bytes {}..{} of {}",
            expected_bad[0].0,
            expected_bad[0].0 + expected_bad[0].1,
            disk.path.display()
        )),
        "{}",
        run.log
    );
    assert!(run.log.contains("1 unreadable range,"), "{}", run.log);
    let parsed = independent_parse(&run.image);
    assert!(parsed.trailer, "exit 6 ends the image with its trailer");
    assert_eq!(parsed.bad, expected_bad);
    // The rest of the chunk around the bad blocks was kept.
    let device = restored(&run.image, &parsed, size as usize);
    assert_matches_outside(&device, &content, &expected_bad);
    let stats = run.stats.expect("stats");
    assert_eq!(stats["unreadable"]["range_count"], 1);
    assert_eq!(stats["unreadable"]["bytes"], expected_bad[0].1);
    assert_eq!(stats_ranges(&stats), expected_bad);
    let bad_blocks = expected_bad[0].1 / lbs;
    assert_eq!(
        stats["unreadable"]["retry_reads"].as_u64(),
        Some(2 * bad_blocks),
        "the default --read-retries 2, per bad block"
    );
    // The readable bytes also equal what the device itself returns.
    let around = read_direct(&disk.path, 3 * MIB, 512).unwrap();
    assert_eq!(
        &device[3 * MIB as usize..3 * MIB as usize + 512],
        &around[..]
    );
    check_restores(dir.path(), &content, &expected_bad);
}

#[test]
fn ranges_across_a_chunk_boundary_merge_and_the_last_block_is_reported() {
    let size = 4 * MIB;
    let content = patterned(size as usize, 12);
    let across = (MIB - 512, MIB + 512);
    let last = (size - 4 * KIB, size);
    let disk = slow_disk(&content, &[across, last], true);
    let lbs = logical_block_size(&disk.path);
    let expected_bad = [
        widened(across.0, across.1, lbs),
        widened(last.0, last.1, lbs),
    ];
    let dir = tempfile::tempdir().unwrap();

    let run = image(&disk.path, dir.path(), &["--read-retries", "0"]);
    assert_eq!(run.status.code(), Some(6), "{}", run.log);
    let parsed = independent_parse(&run.image);
    assert!(parsed.trailer);
    // Two chunks each found half of the first range: one record.
    assert_eq!(parsed.bad, expected_bad);
    let device = restored(&run.image, &parsed, size as usize);
    assert_matches_outside(&device, &content, &expected_bad);
    let stats = run.stats.expect("stats");
    assert_eq!(stats["unreadable"]["range_count"], 2);
    assert_eq!(stats["unreadable"]["retry_reads"], 0);
    assert_eq!(stats_ranges(&stats), expected_bad);
    check_restores(dir.path(), &content, &expected_bad);
}

#[test]
fn a_wholly_unreadable_device_is_one_b_record_or_past_max_bad_bytes_no_image() {
    let size = 2 * MIB;
    let content = patterned(size as usize, 13);
    let disk = slow_disk(&content, &[(0, size)], true);
    let dir = tempfile::tempdir().unwrap();

    let run = image(&disk.path, dir.path(), &["--read-retries", "1"]);
    assert_eq!(run.status.code(), Some(6), "{}", run.log);
    let parsed = independent_parse(&run.image);
    assert!(parsed.trailer);
    assert!(parsed.sections.is_empty(), "{:?}", parsed.sections);
    assert_eq!(parsed.bad, [(0, size)]);
    check_restores(dir.path(), &content, &[(0, size)]);

    // Past --max-bad-bytes: no trailer, no file, exit 1, a sentence that
    // names the device, the offset and what to do.
    let run = image(&disk.path, dir.path(), &["--max-bad-bytes", "64K"]);
    assert_eq!(run.status.code(), Some(1), "{}", run.log);
    assert!(run.image.is_empty(), "no image file is left");
    assert!(
        run.log
            .contains(&format!("{} could not be read in", disk.path.display()))
            && run.log.contains("more than 64.0 KiB")
            && run.log.contains("the first at byte offset 0")
            && run.log.contains("--max-bad-bytes"),
        "{}",
        run.log
    );
    assert!(
        listing(dir.path()).iter().all(|n| !n.contains("out.hc")),
        "{:?}",
        listing(dir.path())
    );
}

#[test]
fn catch_up_rereads_a_block_that_turned_bad_as_bad_and_one_that_healed_as_data() {
    let size = 8 * MIB;
    let content = patterned(size as usize, 14);
    // Bad in the main pass, then healed and rewritten.
    let healed = (5 * MIB, 5 * MIB + 4 * KIB);
    // Good in the main pass, then rewritten and bad.
    let turned = (2 * MIB, 2 * MIB + 4 * KIB);
    // Writes land even where reads fail (a disk remaps on write).
    let disk = slow_disk(&content, &[], false);
    disk.set_eio(&[healed], (healed.0, 4096));
    let dir = tempfile::tempdir().unwrap();
    let hold = dir.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let out = dir.path().join("out.hc");
    let mut command = hot_clone();
    command
        .args(["image", "-d"])
        .arg(&disk.path)
        .arg("-o")
        .arg(&out)
        .arg("--hold-file")
        .arg(&hold)
        .stdout(Stdio::null());
    let mut live = LiveRun::spawn(command);
    assert!(
        live.wait_for("Main pass done", Duration::from_secs(60)),
        "{}",
        live.log()
    );
    disk.set_eio(&[turned], (turned.0, 4096));
    let new_healed = patterned(4096, 15);
    let new_turned = patterned(4096, 16);
    let writer = LoopWriter(&disk.path);
    writer.write(healed.0, &new_healed);
    writer.write(turned.0, &new_turned);
    std::fs::remove_file(&hold).unwrap();
    let status = live.finish(Duration::from_secs(60));
    let log = live.log();
    assert_eq!(status.code(), Some(6), "{log}");
    assert!(
        log.contains(&format!("Unreadable: bytes {}..{}", healed.0, healed.1))
            && log.contains(&format!("Unreadable: bytes {}..{}", turned.0, turned.1)),
        "both were found bad once: {log}"
    );
    let image = std::fs::read(&out).unwrap();
    let parsed = independent_parse(&image);
    assert!(parsed.trailer);
    let turned_bad = [(turned.0, turned.1 - turned.0)];
    assert_eq!(
        parsed.bad, turned_bad,
        "only the block whose last read failed"
    );
    let mut expected = content.clone();
    expected[healed.0 as usize..healed.1 as usize].copy_from_slice(&new_healed);
    let device = restored(&image, &parsed, size as usize);
    assert_matches_outside(&device, &expected, &turned_bad);
    check_restores(dir.path(), &expected, &turned_bad);
}

/// Writes to a device with O_DIRECT (through the loop device, so the trace
/// sees them), each complete when `write` returns.
struct LoopWriter<'a>(&'a Path);

impl LoopWriter<'_> {
    fn write(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.0)
            .unwrap();
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut().copy_from_slice(data);
        file.write_all_at(buf.as_mut(), offset).unwrap();
    }
}

#[test]
fn hc_slowdisk_eio_file_makes_a_range_fail_later_and_heal() {
    let content = patterned(MIB as usize, 17);
    let disk = slow_disk(&content, &[], false);
    assert_eq!(
        read_direct(&disk.path, 8192, 4096).unwrap(),
        &content[8192..12288]
    );
    disk.set_eio(&[(8192, 12288)], (8192, 4096));
    let error = read_direct(&disk.path, 8192, 4096).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(
        read_direct(&disk.path, 0, 8192).is_ok(),
        "only the range fails"
    );
    disk.set_eio(&[], (8192, 4096));
    assert_eq!(
        read_direct(&disk.path, 8192, 4096).unwrap(),
        &content[8192..12288]
    );
}
