//! Filesystems under churn, as root: ext4 and XFS on a loop device, mounted, with a
//! writer creating, appending, renaming, deleting and fsync'ing files whose
//! content checks itself. (a) The writer stops before the run ends: the
//! restored image mounts (journal replay allowed) and holds exactly the
//! files as the writer left them. (b) `--freeze` while the writer never
//! stops: the image passes `fsck -fn` and holds the filesystem as of one
//! moment of the writer's history. (c) A run interrupted while frozen
//! leaves the filesystem thawed.

use hc_test_kit::run::LiveRun;
use hc_test_kit::*;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RECORD_MAGIC: &[u8; 4] = b"HCF1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn device(self) -> LoopDevice {
        // mkfs.xfs wants at least 300 MiB.
        LoopDevice::new(if self == Fs::Xfs {
            320 << 20
        } else {
            128 << 20
        })
    }

    fn mount(self, device: &Path) -> Mounted {
        match self {
            Fs::Ext4 => Mounted::ext4(device),
            Fs::Xfs => Mounted::xfs(device),
        }
    }

    /// The read-only check of a clean filesystem image.
    fn check(self, image: &Path) -> Command {
        let mut cmd = match self {
            Fs::Ext4 => {
                let mut c = Command::new("e2fsck");
                c.arg("-fn");
                c
            }
            Fs::Xfs => {
                let mut c = Command::new("xfs_repair");
                c.args(["-n", "-f"]);
                c
            }
        };
        cmd.arg(image);
        cmd
    }

    /// XFS leaves its log dirty when frozen, on purpose (recovery then
    /// processes unlinked inodes): `dd` of a frozen XFS gives the same
    /// "metadata changes in a log" from `xfs_repair -n`. So its image is
    /// checked after a mount replayed the log; ext4's, as it is.
    fn freeze_leaves_log_dirty(self) -> bool {
        self == Fs::Xfs
    }

    /// Mount options for a restored copy while the original is mounted
    /// (XFS refuses a second filesystem with the same UUID).
    fn copy_mount_options(self) -> &'static [&'static str] {
        match self {
            Fs::Ext4 => &[],
            Fs::Xfs => &["-o", "nouuid"],
        }
    }
}

/// Files by name, content as bytes: the writer's model of the directory.
type Model = BTreeMap<String, Vec<u8>>;

/// One operation the writer completed (its fsyncs returned), and the file
/// names it touched.
#[derive(Clone, Debug)]
enum Op {
    Create(String, Vec<u8>),
    Append(String, Vec<u8>),
    Rename(String, String),
    Delete(String),
}

impl Op {
    fn apply(&self, model: &mut Model) {
        match self {
            Op::Create(name, record) => {
                model.insert(name.clone(), record.clone());
            }
            Op::Append(name, record) => model.get_mut(name).unwrap().extend_from_slice(record),
            Op::Rename(from, to) => {
                let content = model.remove(from).unwrap();
                model.insert(to.clone(), content);
            }
            Op::Delete(name) => {
                model.remove(name);
            }
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            Op::Create(name, _) | Op::Append(name, _) | Op::Delete(name) => vec![name],
            Op::Rename(from, to) => vec![from, to],
        }
    }
}

/// A self-checking record: magic, body length, CRC-32C of the body, body.
fn record(seed: u64, len: usize) -> Vec<u8> {
    let body = patterned(len, seed);
    let mut out = Vec::with_capacity(len + 12);
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&hot_clone::format::crc32c_of(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Whether `content` is a run of whole, valid records.
fn records_valid(mut content: &[u8]) -> bool {
    while !content.is_empty() {
        if content.len() < 12 || &content[..4] != RECORD_MAGIC {
            return false;
        }
        let len = u32::from_le_bytes(content[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(content[8..12].try_into().unwrap());
        if content.len() < 12 + len || hot_clone::format::crc32c_of(&content[12..12 + len]) != crc {
            return false;
        }
        content = &content[12 + len..];
    }
    true
}

fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

/// The churn writer: runs until `stop`, every operation followed by fsync
/// of the file and of the directory; returns the completed operations.
fn churn(dir: PathBuf, seed: u64, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Op>>>) {
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut model = Model::new();
    let mut serial = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let names: Vec<String> = model.keys().cloned().collect();
        let pick = next() % 100;
        let op = if names.is_empty() || (pick < 35 && names.len() < 40) {
            serial += 1;
            let name = format!("f{serial}");
            let data = record(next(), 1 + (next() % 20_000) as usize);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(&name))
                .unwrap();
            file.write_all(&data).unwrap();
            file.sync_all().unwrap();
            Op::Create(name, data)
        } else {
            let name = names[(next() % names.len() as u64) as usize].clone();
            if pick < 75 {
                let data = record(next(), 1 + (next() % 30_000) as usize);
                let mut file = OpenOptions::new()
                    .append(true)
                    .open(dir.join(&name))
                    .unwrap();
                file.write_all(&data).unwrap();
                file.sync_all().unwrap();
                Op::Append(name, data)
            } else if pick < 90 {
                serial += 1;
                let to = format!("f{serial}");
                fs::rename(dir.join(&name), dir.join(&to)).unwrap();
                Op::Rename(name, to)
            } else {
                fs::remove_file(dir.join(&name)).unwrap();
                Op::Delete(name)
            }
        };
        fsync_dir(&dir);
        op.apply(&mut model);
        log.lock().unwrap().push(op);
    }
}

struct Churn {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Op>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start(dir: &Path, seed: u64) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (dir, stop, log) = (dir.to_path_buf(), Arc::clone(&stop), Arc::clone(&log));
            std::thread::spawn(move || churn(dir, seed, stop, log))
        };
        Churn {
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn ops(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn stop(mut self) -> Vec<Op> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("churn writer");
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Restores `image` to a file, checks it read-only (if `fsck`), mounts it
/// (journal replay allowed) and returns its files.
fn restored_files(fs_kind: Fs, image: &Path, fsck: bool) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("restored.img");
    let mut cmd = hot_clone();
    cmd.arg("reassemble").arg(image).arg("-o").arg(&raw);
    let result = run(cmd, None);
    assert!(result.status.success(), "reassemble: {}", stderr(&result));
    let check = |when: &str| {
        let check = fs_kind.check(&raw).output().unwrap();
        assert!(
            check.status.success(),
            "{fs_kind:?} check of the frozen image {when}: {}\n{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    };
    if fsck && !fs_kind.freeze_leaves_log_dirty() {
        check("as restored");
    }
    let device = LoopDevice::attach_with(
        &raw,
        &LoopOptions {
            direct_io: false,
            ..LoopOptions::default()
        },
    );
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let mounted = Command::new("mount")
        .args(fs_kind.copy_mount_options())
        .arg(&device.path)
        .arg(&mountpoint)
        .output()
        .unwrap();
    let mut files = Model::new();
    if mounted.status.success() {
        for entry in fs::read_dir(&mountpoint).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "lost+found" {
                files.insert(name, fs::read(entry.path()).unwrap());
            }
        }
        let _ = Command::new("umount").arg(&mountpoint).status();
    }
    drop(device);
    assert!(
        mounted.status.success(),
        "the restored image does not mount: {}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    if fsck && fs_kind.freeze_leaves_log_dirty() {
        check("after its log was replayed by mounting it");
    }
    files
}

fn describe(model: &Model) -> String {
    model
        .iter()
        .map(|(name, content)| format!("{name}:{}", content.len()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts `hot-clone image` of `device` into `image`.
fn start_imaging(device: &Path, image: &Path, extra: &[&str]) -> LiveRun {
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(device)
        .arg("-o")
        .arg(image)
        .args(extra)
        .stdout(Stdio::null());
    LiveRun::spawn(cmd)
}

fn wait_for_ops(churn: &Churn, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while churn.ops() < count {
        assert!(
            Instant::now() < deadline,
            "the churn writer made no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (a) The writer runs through the main pass and stops before the run
/// ends: the image holds exactly what it left.
#[test]
fn ext4_churn_stopped_before_the_end_is_captured_exactly() {
    churn_stopped_before_the_end_is_captured_exactly(Fs::Ext4);
}

#[test]
fn xfs_churn_stopped_before_the_end_is_captured_exactly() {
    churn_stopped_before_the_end_is_captured_exactly(Fs::Xfs);
}

fn churn_stopped_before_the_end_is_captured_exactly(fs_kind: Fs) {
    let device = fs_kind.device();
    let mounted = fs_kind.mount(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.hc");
    let hold = dir.path().join("hold");
    fs::write(&hold, b"").unwrap();
    let churn = Churn::start(mounted.path(), test_seed());
    wait_for_ops(&churn, 20);
    let mut imaging = start_imaging(
        &device.path,
        &image,
        &["--hold-file", hold.to_str().unwrap()],
    );
    assert!(
        imaging.wait_for("Main pass done", RUN_TIMEOUT),
        "{}",
        imaging.log()
    );
    std::thread::sleep(Duration::from_millis(300)); // into the catch-up
    let ops = churn.stop();
    fs::remove_file(&hold).unwrap();
    let status = imaging.finish(RUN_TIMEOUT);
    assert!(status.success(), "exit {status}: {}", imaging.log());
    let mut expected = Model::new();
    for op in &ops {
        op.apply(&mut expected);
    }
    assert!(!expected.is_empty(), "the writer left no files");
    let files = restored_files(fs_kind, &image, false);
    for (name, content) in &files {
        assert!(records_valid(content), "{name} holds a torn record");
    }
    assert!(
        files == expected,
        "{} ops; image: {}\nexpected: {}\n{}",
        ops.len(),
        describe(&files),
        describe(&expected),
        imaging.log()
    );
}

/// (b) `--freeze` while the writer never stops: a clean filesystem that is
/// the writer's state after some prefix of its operations (the operation
/// in progress at the freeze may be partly there), every record intact.
#[test]
fn ext4_churn_frozen_for_the_final_round_is_one_instant() {
    churn_frozen_for_the_final_round_is_one_instant(Fs::Ext4);
}

#[test]
fn xfs_churn_frozen_for_the_final_round_is_one_instant() {
    churn_frozen_for_the_final_round_is_one_instant(Fs::Xfs);
}

fn churn_frozen_for_the_final_round_is_one_instant(fs_kind: Fs) {
    let device = fs_kind.device();
    let mounted = fs_kind.mount(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.hc");
    let churn = Churn::start(mounted.path(), test_seed());
    wait_for_ops(&churn, 20);
    let ops_before_run = churn.ops();
    let mut imaging = start_imaging(&device.path, &image, &["--freeze"]);
    let status = imaging.finish(RUN_TIMEOUT);
    let log = imaging.log();
    assert!(status.success(), "exit {status}: {log}");
    assert!(log.contains("Frozen"), "{log}");
    assert!(log.contains("Thawed"), "{log}");
    // Thawed: the writer goes on.
    let ops_after_run = churn.ops();
    wait_for_ops(&churn, ops_after_run + 5);
    let ops = churn.stop();

    let files = restored_files(fs_kind, &image, true);
    for (name, content) in &files {
        assert!(records_valid(content), "{name} holds a torn record\n{log}");
    }
    let mut model = Model::new();
    let mut matched = None;
    for (done, op) in ops.iter().enumerate() {
        // State after `done` ops, with op `done` possibly in progress.
        if prefix_matches(&files, &model, op) {
            matched = Some(done);
        }
        op.apply(&mut model);
    }
    let matched = matched.unwrap_or_else(|| {
        panic!(
            "the image is no prefix of the writer's {} ops: {}\n{log}",
            ops.len(),
            describe(&files)
        )
    });
    // Every operation completed before the run started is in the image.
    assert!(
        matched >= ops_before_run,
        "the image is the state after {matched} ops, but {ops_before_run} had completed before imaging"
    );
    eprintln!("image = state after {matched} of {} ops", ops.len());
}

/// Whether `files` equals `model`, except that the files touched by `next`
/// (the operation in progress) may be as before or after it, or empty.
fn prefix_matches(files: &Model, model: &Model, next: &Op) -> bool {
    let touched = next.names();
    let mut after = model.clone();
    next.apply(&mut after);
    let names: std::collections::BTreeSet<&String> = files
        .keys()
        .chain(model.keys())
        .chain(after.keys())
        .collect();
    names.into_iter().all(|name| {
        let image = files.get(name);
        if touched.contains(&name.as_str()) {
            image == model.get(name)
                || image == after.get(name)
                || image.is_some_and(|c| c.is_empty())
        } else {
            image == model.get(name)
        }
    })
}

/// (c) Interrupted while frozen: the filesystem is thawed, the image has no
/// trailer.
#[test]
fn sigterm_while_frozen_thaws() {
    let device = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.hc");
    let hold = dir.path().join("hold-frozen");
    fs::write(&hold, b"").unwrap();
    let mut imaging = start_imaging(
        &device.path,
        &image,
        &["--freeze", "--hold-frozen-file", hold.to_str().unwrap()],
    );
    imaging.wait_for_file(
        &dir.path().join("hold-frozen.frozen"),
        RUN_TIMEOUT,
        "the run never held frozen",
    );
    // Frozen now: a write to the filesystem blocks.
    let probe = mounted.path().join("probe");
    let writer = {
        let probe = probe.clone();
        std::thread::spawn(move || {
            let mut file = File::create(&probe).unwrap();
            file.write_all(b"after the thaw").unwrap();
            file.sync_all().unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !writer.is_finished(),
        "a write went through a frozen filesystem"
    );
    imaging.signal(libc::SIGTERM);
    let status = imaging.finish(RUN_TIMEOUT);
    assert_eq!(status.code(), Some(130), "{}", imaging.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !writer.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the filesystem stayed frozen after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.join().unwrap();
    assert_eq!(fs::read(&probe).unwrap(), b"after the thaw");
    let mut cmd = hot_clone();
    cmd.arg("verify").arg(&image);
    assert_eq!(run(cmd, None).status.code(), Some(1));
}

/// `--freeze` on a device with nothing mounted says so.
#[test]
fn freeze_needs_a_mounted_filesystem() {
    let device = LoopDevice::new(8 << 20);
    let mut cmd = hot_clone();
    cmd.args(["image", "--freeze", "-o", "/dev/null", "--device"])
        .arg(&device.path);
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(1));
    assert!(
        stderr(&result).contains("no filesystem is mounted"),
        "{}",
        stderr(&result)
    );
}
