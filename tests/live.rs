//! Live imaging through the real binary, as root: a random writer runs
//! through the main pass and into the catch-up; after it stops and the run
//! ends, the reassembled image must equal the device byte for byte.

use hc_test_kit::run::LiveRun;
use hc_test_kit::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// A running `hot-clone image` writing to a scratch directory, held in
/// its catch-up by a hold file until `release`.
struct Imaging {
    run: LiveRun,
    dir: tempfile::TempDir,
    hold: PathBuf,
}

impl Imaging {
    fn start(device: &Path, extra: &[&str]) -> Imaging {
        let dir = tempfile::tempdir().unwrap();
        let hold = dir.path().join("hold");
        fs::write(&hold, b"").unwrap();
        let mut cmd = hot_clone();
        cmd.args(["image", "--device"])
            .arg(device)
            .arg("-o")
            .arg(dir.path().join("image.hc"))
            .arg("--stats-json")
            .arg(dir.path().join("stats.json"))
            .arg("--hold-file")
            .arg(&hold)
            .args(extra)
            .stdout(Stdio::null());
        Imaging {
            run: LiveRun::spawn(cmd),
            dir,
            hold,
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image.hc")
    }

    /// Waits for a stderr line starting with `prefix`; false if the run
    /// ended first.
    fn wait_for(&mut self, prefix: &str) -> bool {
        self.run.wait_for(prefix, RUN_TIMEOUT)
    }

    fn release(&self) {
        let _ = fs::remove_file(&self.hold);
    }

    fn signal(&self, signal: libc::c_int) {
        self.run.signal(signal);
    }

    fn pid(&self) -> u32 {
        self.run.child.id()
    }

    fn finish(&mut self) -> ExitStatus {
        self.run.finish(RUN_TIMEOUT)
    }

    fn log(&self) -> String {
        self.run.log()
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.dir.path().join("stats.json")).unwrap()).unwrap()
    }
}

/// Restores `image` to a file and returns its bytes.
fn restored(image: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("restored.img");
    let mut cmd = hot_clone();
    cmd.arg("reassemble").arg(image).arg("-o").arg(&out);
    let result = run(cmd, None);
    assert!(result.status.success(), "reassemble: {}", stderr(&result));
    fs::read(&out).unwrap()
}

/// Images `device` while writers run through the main pass and into the
/// catch-up; then checks the restored image against the device.
fn image_under_writes(device: &Path, writers: Vec<(PathBuf, std::ops::Range<u64>)>, seed: u64) {
    image_under_writes_with(device, writers, seed, &[]);
}

/// A dirty map held below its need marks whole regions: it re-reads more
/// and misses nothing.
#[test]
fn dirty_map_at_its_memory_bound_misses_nothing() {
    let device = LoopDevice::new(96 << 20);
    fill_device(&device.path, 9);
    let size = device_size(&device.path);
    // One byte: less than the map's fixed tables, so no leaf at all.
    let stats = image_under_writes_with(
        &device.path,
        vec![(device.path.clone(), 0..size)],
        test_seed(),
        &["--dirty-map-memory", "1"],
    );
    let whole = stats["dirty_map_whole_region_marks"].as_u64().unwrap();
    let reread = stats["catch_up"]["bytes"].as_u64().unwrap();
    assert!(
        whole > 0 && reread >= 16 << 20,
        "{whole} whole-region marks, {reread} bytes re-read: {stats}"
    );
}

fn image_under_writes_with(
    device: &Path,
    writers: Vec<(PathBuf, std::ops::Range<u64>)>,
    seed: u64,
    extra: &[&str],
) -> serde_json::Value {
    let running: Vec<RandomWriter> = writers
        .iter()
        .enumerate()
        .map(|(i, (path, range))| RandomWriter::start(path, range.clone(), seed + i as u64, 50))
        .collect();
    let mut imaging = Imaging::start(device, extra);
    assert!(
        imaging.wait_for("Main pass:"),
        "seed {seed}: {}",
        imaging.log()
    );
    std::thread::sleep(Duration::from_millis(300)); // writes into the catch-up
    let writes: u64 = running.into_iter().map(RandomWriter::stop).sum();
    imaging.release();
    let status = imaging.finish();
    let log = imaging.log();
    assert!(status.success(), "seed {seed}: exit {status}\n{log}");
    assert!(log.contains("Done"), "seed {seed}: {log}");
    let stats = imaging.stats();
    let rounds = stats["rounds"].as_array().unwrap().len();
    assert!(
        writes > 0 && rounds >= 1,
        "seed {seed}: {writes} writes, {rounds} rounds\n{log}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(imaging.image()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "seed {seed}: image mode {mode:o}");
    let image = restored(&imaging.image());
    let now = read_device(device);
    assert_eq!(image.len(), now.len(), "seed {seed}: size");
    if let Some(at) = image.iter().zip(&now).position(|(a, b)| a != b) {
        panic!(
            "seed {seed}: restored image differs from {} at byte {at} (block {})\n{log}",
            device.display(),
            at / 4096
        );
    }
    stats
}

#[test]
fn loop_512_under_writes() {
    let device = LoopDevice::new(96 << 20);
    fill_device(&device.path, 1);
    let size = device_size(&device.path);
    image_under_writes(
        &device.path,
        vec![(device.path.clone(), 0..size)],
        test_seed(),
    );
}

#[test]
fn loop_4k_under_writes() {
    let device = LoopDevice::with_sector_size(96 << 20, 4096);
    fill_device(&device.path, 2);
    let size = device_size(&device.path);
    image_under_writes(
        &device.path,
        vec![(device.path.clone(), 0..size)],
        test_seed(),
    );
}

/// The gentle modes change only the pace: the image is as complete.
#[test]
fn loop_under_writes_adaptive_and_idle_priority() {
    let device = LoopDevice::new(64 << 20);
    fill_device(&device.path, 8);
    let size = device_size(&device.path);
    let stats = image_under_writes_with(
        &device.path,
        vec![(device.path.clone(), 0..size)],
        test_seed(),
        &["--adaptive", "--ioprio", "idle", "--max-rate", "200M"],
    );
    // Paced: one worker, one read in flight, 0.5 ms of 200 MB/s (64 KiB).
    let engine = &stats["engine"];
    assert_eq!(
        (
            &engine["threads"],
            &engine["queue_depth"],
            &engine["chunk_bytes"]
        ),
        (&1.into(), &1.into(), &(64 << 10).into()),
        "{engine}"
    );
}

#[test]
fn zram_under_writes() {
    let zram = Zram::new(256 << 20);
    fill_device(&zram.path, 3);
    let size = device_size(&zram.path);
    image_under_writes(&zram.path, vec![(zram.path.clone(), 0..size)], test_seed());
}

#[test]
fn odd_sized_device_under_writes() {
    // Not a multiple of the read size (nor of 64 KiB).
    let device = LoopDevice::new((40 << 20) + 12 * 1024);
    fill_device(&device.path, 4);
    let size = device_size(&device.path);
    assert_eq!(size % (1 << 20), 12 * 1024);
    image_under_writes(
        &device.path,
        vec![(device.path.clone(), 0..size)],
        test_seed(),
    );
}

#[test]
fn partition_at_odd_offset_with_writes_inside_and_outside() {
    let mut disk = LoopDevice::new(64 << 20);
    fill_device(&disk.path, 5);
    let (start, len) = (2049u64, 100_001u64);
    let partition = disk.add_partition(1, start, len);
    let disk_size = device_size(&disk.path);
    let outside = (start + len) * 512..disk_size;
    image_under_writes(
        &partition,
        vec![
            (partition.clone(), 0..len * 512),
            (disk.path.clone(), outside),
            (disk.path.clone(), 0..start * 512 - 512),
        ],
        test_seed(),
    );
}

/// The trace stops being read for a while (SIGSTOP) while a writer floods a
/// tiny trace buffer: events are lost, the run exits 4, and the image it was
/// writing (without a trailer) is removed: -o FILE appears only complete.
#[test]
fn lost_events_end_in_status_4_and_no_trailer() {
    let device = LoopDevice::new(64 << 20);
    let size = device_size(&device.path);
    let mut imaging = Imaging::start(
        &device.path,
        &[
            "--event-source",
            "tracefs",
            "-blktrace.bufsize",
            "4096",
            "-blktrace.bufcount",
            "1",
        ],
    );
    assert!(imaging.wait_for("Main pass:"), "{}", imaging.log());
    imaging.signal(libc::SIGSTOP);
    let writer = RandomWriter::start(&device.path, 0..size, test_seed(), 0);
    std::thread::sleep(Duration::from_millis(500));
    writer.stop();
    imaging.signal(libc::SIGCONT);
    imaging.release();
    let status = imaging.finish();
    let log = imaging.log();
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(log.contains("lost"), "{log}");
    assert!(!imaging.image().exists(), "{log}");
    let partials: Vec<_> = listing(imaging.dir.path())
        .into_iter()
        .filter(|name| name.contains("hc-partial"))
        .collect();
    assert!(partials.is_empty(), "left behind: {partials:?}");
}

fn our_instances(pid: u32) -> Vec<String> {
    let prefix = format!("hot-clone-{pid}-");
    fs::read_dir("/sys/kernel/tracing/instances")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_cleans_up_and_sigkill_leftovers_are_removed_by_the_next_run() {
    let device = LoopDevice::new(32 << 20);
    fill_device(&device.path, 6);

    let mut imaging = Imaging::start(&device.path, &[]);
    assert!(imaging.wait_for("Main pass:"), "{}", imaging.log());
    let pid = imaging.pid();
    assert!(
        !our_instances(pid).is_empty(),
        "no tracefs instance while running"
    );
    imaging.signal(libc::SIGTERM);
    let status = imaging.finish();
    assert_eq!(status.code(), Some(130), "{}", imaging.log());
    assert!(
        our_instances(pid).is_empty(),
        "SIGTERM left {:?}",
        our_instances(pid)
    );

    let mut killed = Imaging::start(&device.path, &[]);
    assert!(killed.wait_for("Main pass:"), "{}", killed.log());
    let killed_pid = killed.pid();
    killed.signal(libc::SIGKILL);
    let _ = killed.finish();
    assert!(
        !our_instances(killed_pid).is_empty(),
        "SIGKILL should leave the instance behind"
    );

    let mut next = Imaging::start(&device.path, &[]);
    next.release();
    let status = next.finish();
    assert!(status.success(), "{}", next.log());
    assert!(
        next.log().contains("Removed tracing left behind"),
        "{}",
        next.log()
    );
    assert!(our_instances(killed_pid).is_empty());
    assert_eq!(restored(&next.image()), read_device(&device.path));
}

#[test]
fn writes_that_never_stop_end_unconverged_with_status_3() {
    let device = LoopDevice::new(32 << 20);
    let size = device_size(&device.path);
    let writer = RandomWriter::start(&device.path, 0..size, test_seed(), 0);
    let mut imaging = Imaging::start(&device.path, &["--max-rounds", "2"]);
    imaging.release();
    let status = imaging.finish();
    writer.stop();
    let log = imaging.log();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("did not quiesce"), "{log}");
    let mut cmd = hot_clone();
    cmd.arg("verify").arg(imaging.image());
    let verify = run(cmd, None);
    assert_eq!(verify.status.code(), Some(3), "{}", stderr(&verify));
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("NOT converged"),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn refuses_to_write_the_image_onto_the_imaged_device() {
    let device = LoopDevice::new(32 << 20);
    let mounted = Mounted::ext4(&device.path);
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(&device.path)
        .arg("-o")
        .arg(mounted.path().join("self.hc"));
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    assert!(stderr(&result).contains("itself"), "{}", stderr(&result));
}

#[test]
fn demo_runs_and_cleans_up() {
    let result = run_hot_clone(["demo", "--size", "64M"], None);
    let log = stderr(&result);
    assert!(result.status.success(), "{log}");
    assert!(log.contains("equals the device byte for byte"), "{log}");
    let leftovers: Vec<_> = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("hot-clone-demo-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Without root, imaging stops at once with one line saying so.
#[test]
fn without_root_one_clear_line() {
    use std::os::unix::process::CommandExt;
    require_root("run hot-clone as another user");
    let device = LoopDevice::new(4 << 20);
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(&device.path)
        .args(["-o", "/dev/null"])
        .uid(65534)
        .gid(65534);
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    let message = stderr(&result);
    assert!(message.contains("needs root"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}

/// Standard output on a terminal is refused: an image is binary.
#[test]
fn a_terminal_is_not_an_output() {
    let mut cmd = hot_clone();
    cmd.args(["image", "--device", "/dev/null"]);
    // A pseudo-terminal as standard output.
    let mut master = 0;
    let mut slave = 0;
    // SAFETY: openpty fills two descriptors we own; no name or settings.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    use std::os::fd::FromRawFd;
    // SAFETY: fresh descriptors from openpty, owned here.
    let (master, slave) = unsafe { (fs::File::from_raw_fd(master), fs::File::from_raw_fd(slave)) };
    cmd.stdout(slave)
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let output = cmd.output().unwrap();
    drop(master);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("terminal"), "{message}");
}

/// A consumer that goes away (EPIPE) stops the run cleanly: status 1, the
/// reason named, no tracing left behind.
#[test]
fn a_closed_pipe_stops_the_run_cleanly() {
    let device = LoopDevice::new(64 << 20);
    fill_device(&device.path, 7);
    let mut child = hot_clone()
        .args(["image", "--device"])
        .arg(&device.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 4096];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert!(first.starts_with(b"This-Is-A-Hot-Clone-Image"));
    drop(stdout);
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("Broken pipe"), "{message}");
    assert!(our_instances(pid).is_empty(), "{:?}", our_instances(pid));
}
