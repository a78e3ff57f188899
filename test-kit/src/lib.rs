//! The fixtures of hot-clone's tests, benches and tools: the workspace's
//! binaries, runs whose stderr a test can wait on, images built byte by
//! byte, and root-only block devices (loop, zram, partitions, the slow
//! disk, mounts) that clean up after themselves on every path (Drop),
//! failure included.
//!
//! The seeded writer, the comparer, the aligned buffer and the PRNG are
//! the product demo's own (`hot_clone::demo`), re-exported here: one copy
//! of each.

pub mod bins;
pub mod loopdev;
pub mod run;
pub mod slowdisk;
pub mod stale;

pub use bins::{hc_from_raw, hot_clone, workspace_bin, workspace_command};
pub use hot_clone::demo::aligned::AlignedBuf;
pub use hot_clone::demo::prng::XorShift;
pub use hot_clone::demo::{compare, writer};
pub use loopdev::{LoopDevice, LoopOptions};

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// How long a test gives one `hot-clone image` run before it fails it.
pub const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub const BANNER: &str = "This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone\n";

/// Runs a command to completion, feeding `stdin` if given.
pub fn run(mut command: Command, stdin: Option<&[u8]>) -> Output {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    child.wait_with_output().expect("wait")
}

/// Runs the product binary with `args` to completion ([`run`]).
pub fn run_hot_clone<I, S>(args: I, stdin: Option<&[u8]>) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = hot_clone();
    command.args(args);
    run(command, stdin)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Deterministic bytes: runs of pseudo-random data and of zeros; every
/// byte is odd or zero.
pub fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let state = rng.next_u64();
        let run = ((state >> 40) as usize % 20_000).min(len - out.len());
        if state & 3 == 0 {
            out.extend(std::iter::repeat_n(0u8, run));
        } else {
            out.extend((0..run).map(|i| (state >> (i % 56)) as u8 | 1));
        }
    }
    out
}

/// An image written byte by byte the way the original tool writes one
/// (banner, then `S:`/`L:` sections), optionally with the fork's trailer.
/// Independent of the crate's writer on purpose.
pub fn raw_image(sections: &[(u64, &[u8])], trailer: bool) -> Vec<u8> {
    let mut image = BANNER.as_bytes().to_vec();
    for (sector, data) in sections {
        image.extend_from_slice(format!("S:{sector}\tL:{}\n", data.len()).as_bytes());
        image.extend_from_slice(data);
    }
    if trailer {
        let crc = crc32c::crc32c(&image);
        let len = image.len();
        image.extend_from_slice(format!("END\tCRC:{crc:08x}\tBYTES:{len}\n").as_bytes());
    }
    image
}

/// An image, parsed byte by byte (shares no code with the crate).
#[derive(Debug, Default)]
pub struct ParsedImage {
    /// (device offset, image offset of the data, length), in image order.
    pub sections: Vec<(u64, usize, usize)>,
    /// (device offset, length) of each B: record, in image order.
    pub bad: Vec<(u64, u64)>,
    pub trailer: bool,
}

/// A naive, independent reader of an image's records (`S:` sections,
/// `B:` bad ranges, `STATE:` lines, the trailer). Shares no code with the
/// crate.
pub fn independent_parse(image: &[u8]) -> ParsedImage {
    let mut at = image.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut parsed = ParsedImage::default();
    while at < image.len() {
        let eol = at + image[at..].iter().position(|&b| b == b'\n').unwrap();
        let line = std::str::from_utf8(&image[at..eol]).unwrap();
        at = eol + 1;
        if line.starts_with("END\t") {
            parsed.trailer = true;
            assert_eq!(at, image.len(), "bytes after the trailer");
            break;
        }
        if line.starts_with("STATE:") {
            continue;
        }
        let (kind, rest) = line.split_at(2);
        let (s, l) = rest.split_once('\t').unwrap();
        let sector: u64 = s.parse().unwrap();
        let len: u64 = l.strip_prefix("L:").unwrap().parse().unwrap();
        match kind {
            "S:" => {
                parsed.sections.push((sector * 512, at, len as usize));
                at += len as usize;
            }
            "B:" => parsed.bad.push((sector * 512, len)),
            _ => panic!("unexpected record {line:?}"),
        }
    }
    parsed
}

/// Applies the sections of an image, in order, to a byte vector as long
/// as the last one reaches ([`independent_parse`]; B: records aside).
pub fn independent_restore(image: &[u8]) -> Vec<u8> {
    let mut device = Vec::new();
    for (offset, data_at, len) in independent_parse(image).sections {
        let start = offset as usize;
        if device.len() < start + len {
            device.resize(start + len, 0);
        }
        device[start..start + len].copy_from_slice(&image[data_at..data_at + len]);
    }
    device
}

/// Names in `dir`, sorted (to see what a failed restore left behind).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Fails (never skips) a test that needs root, naming why.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root to {what}; CI runs as root. Run the suite with sudo."
    );
}

pub(crate) fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A filesystem on a device, mounted on a scratch directory until drop.
pub struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    pub fn ext4(device: &Path) -> Mounted {
        let dev = device.to_str().unwrap();
        sh("mkfs.ext4", &["-q", "-F", dev]);
        let dir = tempfile::tempdir().unwrap();
        sh("mount", &[dev, dir.path().to_str().unwrap()]);
        Mounted { dir }
    }

    /// XFS (xfsprogs; .ci/run installs it). The device needs 300 MiB.
    pub fn xfs(device: &Path) -> Mounted {
        let dev = device.to_str().unwrap();
        sh("mkfs.xfs", &["-q", "-f", dev]);
        let dir = tempfile::tempdir().unwrap();
        sh("mount", &[dev, dir.path().to_str().unwrap()]);
        Mounted { dir }
    }
}

impl Mounted {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A test that failed while its filesystem was frozen must not leave
        // it frozen (umount would wait on it).
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(self.dir.path())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The whole content of a block device, read with O_DIRECT (so no stale
/// page cache can hide what is on it).
pub fn read_device(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let size = device_size(path);
    let mut out = Vec::with_capacity(size as usize);
    let mut buf = AlignedBuf::new(1 << 20);
    while (out.len() as u64) < size {
        let n = file.read_at(buf.as_mut(), out.len() as u64).unwrap();
        assert!(n > 0, "short device read at {}", out.len());
        out.extend_from_slice(&buf.as_mut()[..n]);
    }
    out
}

/// A device opened for reading and writing with O_DIRECT.
pub fn open_direct(path: &Path) -> fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

pub fn device_size(path: &Path) -> u64 {
    sh("blockdev", &["--getsize64", path.to_str().unwrap()])
        .parse()
        .unwrap()
}

pub fn logical_block_size(path: &Path) -> u64 {
    sh("blockdev", &["--getss", path.to_str().unwrap()])
        .parse()
        .unwrap()
}

/// An exclusive lock, held until the file is dropped, that every thread,
/// process and worktree on the machine shares: `flock` on
/// `hot-clone-tests-NAME.lock` in the system temp dir. Each call opens the
/// file anew, so threads of one process exclude each other too.
pub fn machine_lock(name: &str) -> fs::File {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("hot-clone-tests-{name}.lock"));
    let lock =
        fs::File::create(&path).unwrap_or_else(|err| panic!("create {}: {err}", path.display()));
    // SAFETY: flock on a descriptor we own and keep open for the lock's life.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    lock
}

/// zram0 sized for one test at a time: a lock file serialises its users
/// across test processes; reset on drop.
pub struct Zram {
    pub path: PathBuf,
    _lock: fs::File,
}

impl Zram {
    pub fn new(size_bytes: u64) -> Zram {
        require_root("size zram0");
        let lock = machine_lock("zram");
        assert!(
            Path::new("/sys/block/zram0").exists(),
            "zram0 is missing: this test needs the zram module (modprobe zram)"
        );
        let _ = fs::write("/sys/block/zram0/reset", "1");
        fs::write("/sys/block/zram0/disksize", size_bytes.to_string()).unwrap();
        Zram {
            path: PathBuf::from("/dev/zram0"),
            _lock: lock,
        }
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = fs::write("/sys/block/zram0/reset", "1");
    }
}

/// Fills a device with pseudo-random data (O_DIRECT).
pub fn fill_device(path: &Path, seed: u64) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let size = device_size(path);
    let mut buf = AlignedBuf::new(1 << 20);
    let mut at = 0u64;
    let lbs = logical_block_size(path);
    while at < size {
        let n = ((size - at).min(1 << 20) / lbs * lbs) as usize;
        let data = patterned(n, seed ^ at);
        buf.as_mut()[..n].copy_from_slice(&data);
        file.write_all_at(&buf.as_mut()[..n], at).unwrap();
        at += n as u64;
    }
}

/// A random writer on a device: O_DIRECT writes of 1 to 16 logical blocks
/// at random places (every 8th at the first or last block), until stopped.
pub struct RandomWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
    pub seed: u64,
}

impl RandomWriter {
    /// `range` is a byte range of the device (e.g. a partition on a disk).
    pub fn start(
        path: &Path,
        range: std::ops::Range<u64>,
        seed: u64,
        pause_us: u64,
    ) -> RandomWriter {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lbs = logical_block_size(path);
        let file = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rng = XorShift::from_state(seed);
            let mut next = move || rng.next_u64();
            let blocks = (range.end - range.start) / lbs;
            let mut buf = AlignedBuf::new(16 * lbs as usize);
            let mut count = 0u64;
            while !flag.load(Ordering::SeqCst) {
                let len = (1 + next() % 16).min(blocks);
                let first = match count % 8 {
                    0 => 0,
                    1 => blocks - len,
                    _ => next() % (blocks - len + 1),
                };
                let bytes = (len * lbs) as usize;
                let fill = next();
                for (i, b) in buf.as_mut()[..bytes].iter_mut().enumerate() {
                    *b = (fill >> (i % 57)) as u8 ^ count as u8;
                }
                file.write_all_at(&buf.as_mut()[..bytes], range.start + first * lbs)
                    .unwrap();
                count += 1;
                if pause_us > 0 {
                    std::thread::sleep(std::time::Duration::from_micros(pause_us));
                }
            }
            count
        });
        RandomWriter {
            stop,
            handle: Some(handle),
            seed,
        }
    }

    /// Stops the writer; returns the number of writes it made (all complete).
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.take().unwrap().join().expect("writer panicked")
    }
}

impl Drop for RandomWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The seed of a randomized test: `HOT_CLONE_TEST_SEED` to replay one,
/// else from the clock (kept below 2^30 so derived seeds never overflow).
/// Printed, so that a failure's output names it.
pub fn test_seed() -> u64 {
    let seed = std::env::var("HOT_CLONE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % (1 << 30)
        });
    eprintln!("seed {seed} (replay with HOT_CLONE_TEST_SEED={seed})");
    seed
}
