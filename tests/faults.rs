//! Faults around a run, as root, through the real binary: the imager killed
//! or hung up while frozen, its stderr or its pipe's consumer writing into
//! the filesystem it froze, a freeze that times out, an output that fills
//! up, and readers or writers that stall.
//!
//! Every test that freezes thaws (`fsfreeze -u`, also in `Mounted`'s drop)
//! before it waits for a process writing into the frozen filesystem.

use hc_test_kit::run::LiveRun;
use hc_test_kit::*;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Thaws `mountpoint` (a no-op unless frozen).
fn thaw(mountpoint: &Path) {
    let _ = Command::new("fsfreeze")
        .arg("-u")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
}

/// A child killed, thawing `mountpoint` first, on drop.
struct Guarded {
    child: Child,
    mountpoint: PathBuf,
}

impl Guarded {
    fn wait(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                thaw(&self.mountpoint);
                panic!("{what} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        thaw(&self.mountpoint);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hot-clone image --freeze` of `device` held frozen, waits until it
/// holds, and returns the run and the hold file.
fn start_held(device: &Path, dir: &Path, extra: &[&str]) -> (LiveRun, PathBuf) {
    let hold = dir.join("hold-frozen");
    fs::write(&hold, b"").unwrap();
    let mut cmd = hot_clone();
    cmd.args(["image", "--freeze", "--device"])
        .arg(device)
        .arg("-o")
        .arg(dir.join("fs.hc"))
        .arg("--hold-frozen-file")
        .arg(&hold)
        .args(extra)
        .stdout(Stdio::null());
    let mut imaging = LiveRun::spawn(cmd);
    imaging.wait_for_file(
        &dir.join("hold-frozen.frozen"),
        RUN_TIMEOUT,
        "the run never held frozen",
    );
    (imaging, hold)
}

/// A writer into `mountpoint`, in a thread: done once the write (and its
/// fsync) returned.
fn probe_write(mountpoint: &Path) -> std::thread::JoinHandle<()> {
    let probe = mountpoint.join("probe");
    std::thread::spawn(move || {
        let mut file = File::create(&probe).unwrap();
        file.write_all(b"after the thaw").unwrap();
        file.sync_all().unwrap();
    })
}

/// Asserts the probe is blocked now (the filesystem is frozen), then
/// returns it.
fn blocked_probe(mountpoint: &Path) -> std::thread::JoinHandle<()> {
    let writer = probe_write(mountpoint);
    std::thread::sleep(Duration::from_millis(200));
    if writer.is_finished() {
        thaw(mountpoint);
        panic!("a write went through the filesystem the run holds frozen");
    }
    writer
}

/// Waits up to `within` for the probe; on timeout thaws (so the probe can
/// end) and fails.
fn expect_thawed(
    mountpoint: &Path,
    writer: std::thread::JoinHandle<()>,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    while !writer.is_finished() {
        if Instant::now() > deadline {
            thaw(mountpoint);
            let _ = writer.join();
            panic!("the filesystem was still frozen {within:?} after {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.join().unwrap();
    assert_eq!(
        fs::read(mountpoint.join("probe")).unwrap(),
        b"after the thaw"
    );
}

/// Tracing instances of hot-clone runs still present.
fn instances_of(pid: u32) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/sys/kernel/tracing/instances") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("hot-clone-{pid}-")))
        .collect()
}

/// The imager SIGKILLed while frozen: its guardian thaws within a second.
#[test]
fn sigkill_while_frozen_is_thawed_by_the_guardian() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let (mut imaging, _hold) = start_held(&device.path, dir.path(), &[]);
    let writer = blocked_probe(mounted.path());
    imaging.signal(libc::SIGKILL);
    let killed_at = Instant::now();
    let status = imaging.finish(RUN_TIMEOUT);
    assert_eq!(status.code(), None, "killed: {status}");
    expect_thawed(
        mounted.path(),
        writer,
        Duration::from_secs(1).saturating_sub(killed_at.elapsed()) + Duration::from_millis(50),
        "SIGKILL",
    );
}

/// SIGHUP is handled like SIGTERM: exit 130, thawed, no trailer.
#[test]
fn sighup_while_frozen_exits_130_and_thaws() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let (mut imaging, _hold) = start_held(&device.path, dir.path(), &[]);
    let pid = imaging.child.id();
    let writer = blocked_probe(mounted.path());
    imaging.signal(libc::SIGHUP);
    let status = imaging.finish(RUN_TIMEOUT);
    let log = imaging.log();
    expect_thawed(mounted.path(), writer, Duration::from_secs(5), "SIGHUP");
    assert_eq!(status.code(), Some(130), "{log}");
    // The lines held while frozen came out after the thaw.
    assert!(log.contains("Frozen"), "{log}");
    assert!(log.contains("Thawed"), "{log}");
    assert!(instances_of(pid).is_empty(), "tracing left behind: {log}");
    assert!(listing(dir.path()).iter().all(|n| !n.ends_with(".hc")));
}

/// A second signal while the first one's clean-up runs thaws at once.
#[test]
fn second_signal_while_frozen_thaws_and_exits() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let (mut imaging, _hold) = start_held(&device.path, dir.path(), &[]);
    let writer = blocked_probe(mounted.path());
    // Both before the run can act on the first.
    imaging.signal(libc::SIGQUIT);
    imaging.signal(libc::SIGINT);
    let status = imaging.finish(RUN_TIMEOUT);
    expect_thawed(
        mounted.path(),
        writer,
        Duration::from_secs(5),
        "two signals",
    );
    assert_eq!(status.code(), Some(130), "{}", imaging.log());
}

/// `--freeze-timeout 1s` with the run held frozen: thawed after about a
/// second, the run goes on and says the image is not point-in-time.
#[test]
fn freeze_timeout_thaws_and_says_not_point_in_time() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let (mut imaging, _hold) = start_held(
        &device.path,
        dir.path(),
        &[
            "--freeze-timeout",
            "1s",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
    );
    let writer = probe_write(mounted.path());
    // Held since the marker appeared; the timeout counts from the freeze.
    expect_thawed(
        mounted.path(),
        writer,
        Duration::from_secs(3),
        "--freeze-timeout 1s",
    );
    let status = imaging.finish(RUN_TIMEOUT);
    let log = imaging.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("--freeze-timeout"), "{log}");
    assert!(log.contains("NOT point-in-time"), "{log}");
    let stats: serde_json::Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    let frozen_s = stats["freeze_seconds"].as_f64().unwrap();
    assert!((1.0..3.0).contains(&frozen_s), "frozen for {frozen_s} s");
    assert!(stats["freeze_ended_early"].is_string(), "{stats}");
    let mut cmd = hot_clone();
    cmd.arg("verify").arg(dir.path().join("fs.hc"));
    assert!(run(cmd, None).status.success());
}

/// Stderr goes into the filesystem the run freezes: the run's log lines
/// while frozen are held, and it completes unfrozen-on-time.
#[test]
fn stderr_into_the_frozen_filesystem_completes() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.hc");
    let log_path = mounted.path().join("hot-clone.log");
    let mut cmd = hot_clone();
    cmd.args(["image", "--freeze", "--freeze-timeout", "60s", "--device"])
        .arg(&device.path)
        .arg("-o")
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log_path).unwrap());
    let started = Instant::now();
    let mut child = Guarded {
        child: cmd.spawn().unwrap(),
        mountpoint: mounted.path().to_path_buf(),
    };
    let status = child.wait(
        Duration::from_secs(30),
        "a run logging into its frozen filesystem",
    );
    let log = fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("Frozen") && log.contains("Thawed"), "{log}");
    assert!(!log.contains("NOT point-in-time"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let mut cmd = hot_clone();
    cmd.arg("verify").arg(&image);
    assert!(run(cmd, None).status.success());
}

/// The image goes to a pipe whose consumer writes into the frozen
/// filesystem (its progress log): nothing is written to the pipe while
/// frozen, so the consumer never blocks the run.
#[test]
fn pipe_consumer_writing_into_the_frozen_filesystem_completes() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.hc");
    let script = format!(
        "{} image --freeze --freeze-timeout 60s --device {} | dd of={} bs=64k status=progress 2>{}/dd.log",
        workspace_bin("hot-clone").display(),
        device.path.display(),
        image.display(),
        mounted.path().display()
    );
    let mut child = Guarded {
        child: Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        mountpoint: mounted.path().to_path_buf(),
    };
    let status = child.wait(Duration::from_secs(30), "the pipeline");
    let mut log = String::new();
    use std::io::Read;
    child
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("Thawed") && !log.contains("NOT point-in-time"),
        "{log}"
    );
    let mut cmd = hot_clone();
    cmd.arg("verify").arg(&image);
    let verified = run(cmd, None);
    assert!(verified.status.success(), "{}", stderr(&verified));
}

/// A tmpfs of `size`, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        require_root("mount a tmpfs");
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount a tmpfs");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// ENOSPC on `-o FILE`: exit 1, the message names the output and the
/// byte, no temporary left, the earlier FILE untouched, tracing removed.
#[test]
fn output_filesystem_full_stops_cleanly_naming_the_offset() {
    let device = LoopDevice::new(64 << 20);
    fill_device(&device.path, 7);
    let out = Tmpfs::new("16m");
    let image = out.dir.path().join("x.hc");
    fs::write(&image, b"earlier").unwrap();
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(&device.path)
        .arg("-o")
        .arg(&image);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let result = child.wait_with_output().unwrap();
    let message = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{message}");
    assert!(message.contains(&image.display().to_string()), "{message}");
    assert!(message.contains("No space left on device"), "{message}");
    let offset: u64 = message
        .split("stopped at byte ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte offset in: {message}"));
    assert!(
        offset > 8 << 20 && offset <= 16 << 20,
        "offset {offset}: {message}"
    );
    assert_eq!(listing(out.dir.path()), ["x.hc"], "{message}");
    assert_eq!(fs::read(&image).unwrap(), b"earlier");
    assert!(instances_of(pid).is_empty(), "tracing left behind");
}

/// The pipe's reader stops reading: SIGINT still ends the run within a
/// second, exit 130, tracing removed.
#[test]
fn stalled_pipe_reader_does_not_keep_sigint_from_ending_the_run() {
    let device = LoopDevice::new(64 << 20);
    fill_device(&device.path, 3);
    let (reader, writer) = std::io::pipe().unwrap();
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(&device.path)
        .stdout(writer);
    let mut imaging = LiveRun::spawn(cmd);
    let pid = imaging.child.id();
    // Let the pipe fill: the main pass starts, then stalls on it.
    assert!(
        imaging.wait_for("Main pass:", RUN_TIMEOUT),
        "{}",
        imaging.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        imaging.child.try_wait().unwrap().is_none(),
        "{}",
        imaging.log()
    );
    imaging.signal(libc::SIGINT);
    let signalled = Instant::now();
    let status = imaging.finish(RUN_TIMEOUT);
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(130), "{}", imaging.log());
    assert!(took < Duration::from_secs(1), "took {took:?} after SIGINT");
    assert!(instances_of(pid).is_empty(), "tracing left behind");
    drop(reader);
}

/// `reassemble -` with a producer that sends nothing: SIGINT ends it
/// within a second, exit 130, nothing left.
#[test]
fn stalled_stdin_does_not_keep_sigint_from_ending_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.img");
    let (reader, mut writer) = std::io::pipe().unwrap();
    for (what, prefix) in [
        ("nothing", &b""[..]),
        ("half a banner", &BANNER.as_bytes()[..20]),
    ] {
        writer.write_all(prefix).unwrap();
        let mut cmd = hot_clone();
        cmd.args(["reassemble", "-", "-o"])
            .arg(&out)
            .stdin(reader.try_clone().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        std::thread::sleep(Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "{what}: ended early");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let signalled = Instant::now();
        let deadline = signalled + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what}: SIGINT did not end the restore");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = signalled.elapsed();
        assert_eq!(status.code(), Some(130), "{what}");
        assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
        assert!(
            listing(dir.path()).is_empty(),
            "{what}: left {:?}",
            listing(dir.path())
        );
    }
    drop(writer);
}
