//! Tracing integrity through the real binary, as root: a run whose trace is
//! switched off or narrowed from outside must end with status 4 and no END
//! trailer, naming what changed; and a run's stale-instance cleanup must not
//! touch an instance some process still reads.

use hc_test_kit::run::LiveRun;
use hc_test_kit::stale::held_stale_instance;
use hc_test_kit::*;
use hot_clone::trace::live::TRACEFS_ROOT;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A `hot-clone image` of `device` on the tracefs source, held in its
/// catch-up by a hold file until `release`.
struct Imaging {
    run: LiveRun,
    dir: tempfile::TempDir,
    hold: PathBuf,
}

impl Imaging {
    /// Starts a run of `device`, held in catch-up, and waits until its
    /// main pass is done.
    fn start(device: &Path) -> Imaging {
        let dir = tempfile::tempdir().unwrap();
        let hold = dir.path().join("hold");
        fs::write(&hold, b"").unwrap();
        let mut cmd = hot_clone();
        cmd.args(["image", "--event-source", "tracefs", "-d"])
            .arg(device)
            .arg("-o")
            .arg(dir.path().join("image.hc"))
            .arg("--hold-file")
            .arg(&hold)
            .stdout(Stdio::null());
        let mut run = LiveRun::spawn(cmd);
        assert!(run.wait_for("Main pass done", RUN_TIMEOUT), "{}", run.log());
        Imaging { run, dir, hold }
    }

    /// The run's tracefs instance of the write trace (named
    /// `hot-clone-<pid>-...`, with completion events on; the other one,
    /// with only `block_bio_queue`, counts other programs' I/O).
    fn instance(&self) -> PathBuf {
        let pid = self.run.child.id();
        let prefix = format!("hot-clone-{pid}-");
        let instances = Path::new(TRACEFS_ROOT).join("instances");
        let names: Vec<PathBuf> = fs::read_dir(&instances)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .filter(|path| {
                fs::read_to_string(path.join("events/block/block_bio_complete/enable"))
                    .is_ok_and(|enable| enable.trim() == "1")
            })
            .collect();
        assert_eq!(
            names.len(),
            1,
            "write-trace instances of pid {pid}: {names:?}"
        );
        names[0].clone()
    }

    fn image(&self) -> Vec<u8> {
        fs::read(self.dir.path().join("image.hc")).unwrap()
    }
}

/// Writes one 4 KiB block at `offset` with O_DIRECT, as a workload would.
fn write_block(device: &Path, offset: u64) {
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .unwrap();
    let mut buf = AlignedBuf::new(4096);
    buf.as_mut().fill(0xa5);
    file.write_all_at(buf.as_mut(), offset).unwrap();
}

/// Whether an image ends with the fork's END trailer line: the last
/// `END\tCRC:` is followed by nothing but its own line, and its `BYTES:`
/// is where it starts.
fn has_trailer(image: &[u8]) -> bool {
    let marker = b"END\tCRC:";
    let Some(at) = image.windows(marker.len()).rposition(|w| w == marker) else {
        return false;
    };
    let line = String::from_utf8_lossy(&image[at..]);
    let Some(line) = line.strip_suffix('\n') else {
        return false;
    };
    !line.contains('\n')
        && line
            .rsplit_once("\tBYTES:")
            .and_then(|(_, bytes)| bytes.parse::<usize>().ok())
            == Some(at)
}

/// Starts a run, waits for its main pass, changes `file` of its instance
/// to `text`, writes a block, releases the hold: the run must exit 4 with
/// no trailer and say what changed.
fn tampering_ends_in_status_4(file: &str, text: &str, expected_in_log: &str) {
    require_root("attach loop devices and read tracefs instances");
    let device = LoopDevice::new(32 << 20);
    let mut imaging = Imaging::start(&device.path);
    let instance = imaging.instance();
    fs::write(instance.join(file), text)
        .unwrap_or_else(|e| panic!("writing {text:?} to {file}: {e}"));
    write_block(&device.path, 1 << 20);
    let _ = fs::remove_file(&imaging.hold);
    let status = imaging.run.finish(RUN_TIMEOUT);
    let log = imaging.run.log();
    assert_eq!(status.code(), Some(4), "{log}");
    // `-o FILE` is renamed into place only after a trailer: a run that
    // cannot vouch for its image leaves none, and no temporary either.
    assert_eq!(listing(imaging.dir.path()), Vec::<String>::new(), "{log}");
    assert!(log.contains("tracing was changed from outside"), "{log}");
    assert!(log.contains(expected_in_log), "{log}");
    assert!(log.contains("without its END trailer"), "{log}");
    eprintln!("{log}"); // what an operator sees, for --nocapture
    // The run removed its instance on the way out.
    assert!(!instance.exists(), "{} left behind", instance.display());
}

#[test]
fn tracing_switched_off_mid_run_ends_in_status_4_and_no_trailer() {
    tampering_ends_in_status_4("tracing_on", "0", "tracing_on reads \"0\", it was \"1\"");
}

#[test]
fn a_filter_replaced_mid_run_ends_in_status_4_and_no_trailer() {
    tampering_ends_in_status_4(
        "events/block/block_bio_queue/filter",
        "dev == 1",
        "block_bio_queue/filter reads \"dev == 1\"",
    );
}

#[test]
fn an_event_disabled_mid_run_ends_in_status_4_and_no_trailer() {
    tampering_ends_in_status_4(
        "events/block/block_rq_complete/enable",
        "0",
        "block_rq_complete/enable reads \"0\", it was \"1\"",
    );
}

/// The control: the same run untouched ends converged, with a trailer.
#[test]
fn an_untouched_run_ends_cleanly() {
    require_root("attach loop devices");
    let device = LoopDevice::new(32 << 20);
    let mut imaging = Imaging::start(&device.path);
    write_block(&device.path, 1 << 20);
    std::thread::sleep(Duration::from_millis(300));
    let _ = fs::remove_file(&imaging.hold);
    let status = imaging.run.finish(RUN_TIMEOUT);
    let log = imaging.run.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(has_trailer(&imaging.image()), "{log}");
}

/// Runs `hot-clone image` of `device` to the end; its status and log.
fn image_once(device: &Path) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = hot_clone();
    cmd.args(["image", "--event-source", "tracefs", "-d"])
        .arg(device)
        .arg("-o")
        .arg(dir.path().join("image.hc"));
    let output = run(cmd, None);
    (output.status.code(), stderr(&output))
}

/// An instance that looks stale (new-format name, this boot and pid
/// namespace, a dead pid) but whose `trace_pipe_raw` is held open: a run's
/// cleanup leaves it and its tracing alone. Once the pipe is closed, the
/// next run removes it.
#[test]
fn a_run_leaves_a_stale_looking_instance_in_use_alone() {
    require_root("attach loop devices and create tracefs instances");
    let device = LoopDevice::new(16 << 20);
    let (instance, pipe) = held_stale_instance(2);
    let name = instance.name();
    let enable = instance.path.join("events/block/block_bio_queue/enable");

    let (status, log) = image_once(&device.path);
    assert_eq!(status, Some(0), "{log}");
    assert!(!log.contains(&name), "the run touched {name}: {log}");
    assert!(instance.path.is_dir(), "the run removed {name}: {log}");
    let tracing_on = fs::read_to_string(instance.path.join("tracing_on")).unwrap();
    assert_eq!(
        tracing_on.trim(),
        "1",
        "the run switched tracing off: {log}"
    );
    assert_eq!(fs::read_to_string(&enable).unwrap().trim(), "1", "{log}");

    drop(pipe);
    let (status, log) = image_once(&device.path);
    assert_eq!(status, Some(0), "{log}");
    // A concurrent test's cleanup may have removed it first; either way it
    // must be gone now.
    assert!(
        !instance.path.exists(),
        "{name} survived a run once nothing held it: {log}"
    );
}
