//! The one loop-device guard of the tests, benches and tools: attached
//! under a lock that every process and worktree on the machine shares,
//! detached (partitions first) on drop, panic included.
//!
//! The product's demo attaches its own scratch device with its own few
//! lines (`src/demo/mod.rs`): it reports failures to a user as errors and
//! has none of the partitions, scratch files and watchdog here, so the
//! product does not carry test fixtures.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a loop device is attached.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// `--sector-size`: the device's logical block size.
    pub sector_bytes: u32,
    /// `--direct-io=on`: the loop driver reads and writes its file with
    /// O_DIRECT (no page cache between the device and the file).
    pub direct_io: bool,
    /// `--partscan`: BLKRRPART re-reads a partition table (this kernel has
    /// no parsers, so a re-read drops every partition).
    pub partition_scan: bool,
    /// Wait for udev's probe of the new device (`udevadm settle`), so that
    /// its reads are over before a test traces the device.
    pub settle: bool,
}

impl Default for LoopOptions {
    fn default() -> LoopOptions {
        LoopOptions {
            sector_bytes: 512,
            direct_io: true,
            partition_scan: false,
            settle: false,
        }
    }
}

/// A loop device, detached on drop. Over a scratch file of its own
/// ([`LoopDevice::new`] and friends, removed after the detach) or over a
/// file the caller owns ([`LoopDevice::attach`], left in place).
pub struct LoopDevice {
    pub path: PathBuf,
    backing_path: PathBuf,
    partitions: Vec<u32>,
    /// The scratch file's directory. A path, not an open descriptor: a
    /// test process holding the backing file open for writing is an alias
    /// `hot-clone image` refuses. Declared last: dropped after the detach.
    _scratch: Option<tempfile::TempDir>,
}

/// Loop devices this process attached and has not detached, with their
/// partitions, for [`detach_all_after`].
static ATTACHED: Mutex<Vec<(PathBuf, Vec<u32>)>> = Mutex::new(Vec::new());

/// Held while `losetup -f` picks a free device and attaches it (and while
/// one is detached), so that tests in other threads, processes and
/// worktrees do not race for the same device.
pub fn losetup_lock() -> File {
    crate::machine_lock("losetup")
}

impl LoopDevice {
    /// A sparse scratch device of `size_bytes`, direct I/O, 512-byte blocks.
    pub fn new(size_bytes: u64) -> LoopDevice {
        LoopDevice::scratch(size_bytes, LoopOptions::default())
    }

    pub fn with_sector_size(size_bytes: u64, sector_bytes: u32) -> LoopDevice {
        LoopDevice::scratch(
            size_bytes,
            LoopOptions {
                sector_bytes,
                ..LoopOptions::default()
            },
        )
    }

    /// With partition scanning (`losetup -P`): BLKRRPART re-reads its table.
    pub fn with_partition_scan(size_bytes: u64) -> LoopDevice {
        LoopDevice::scratch(
            size_bytes,
            LoopOptions {
                partition_scan: true,
                ..LoopOptions::default()
            },
        )
    }

    /// A sparse scratch file in the system temp dir under a new device.
    pub fn scratch(size_bytes: u64, options: LoopOptions) -> LoopDevice {
        LoopDevice::scratch_in(&std::env::temp_dir(), size_bytes, options)
    }

    /// A sparse scratch file in `parent` under a new device (e.g. /dev/shm
    /// for a fast one; tmpfs has no direct I/O, so with `direct_io` off).
    pub fn scratch_in(parent: &Path, size_bytes: u64, options: LoopOptions) -> LoopDevice {
        crate::require_root("attach loop devices");
        let dir = tempfile::Builder::new()
            .prefix("hc-loop-")
            .tempdir_in(parent)
            .expect("scratch dir for a loop device");
        let backing = dir.path().join("disk.img");
        File::create(&backing)
            .and_then(|file| file.set_len(size_bytes))
            .expect("scratch file for a loop device");
        let mut device =
            LoopDevice::try_attach(&backing, &options).unwrap_or_else(|err| panic!("{err}"));
        device._scratch = Some(dir);
        device
    }

    /// A device over `file`, which the caller owns (left in place).
    pub fn attach(file: &Path) -> LoopDevice {
        LoopDevice::attach_with(file, &LoopOptions::default())
    }

    pub fn attach_with(file: &Path, options: &LoopOptions) -> LoopDevice {
        crate::require_root("attach loop devices");
        LoopDevice::try_attach(file, options).unwrap_or_else(|err| panic!("{err}"))
    }

    /// [`LoopDevice::attach_with`] for a tool: a failure is an error.
    pub fn try_attach(file: &Path, options: &LoopOptions) -> io::Result<LoopDevice> {
        let sector = options.sector_bytes.to_string();
        let direct_io = if options.direct_io {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let mut args = vec!["-f", "--show", direct_io, "--sector-size", &sector];
        if options.partition_scan {
            args.push("--partscan");
        }
        let output = {
            let _lock = losetup_lock();
            Command::new("losetup")
                .args(&args)
                .arg(file)
                .output()
                .map_err(|err| io::Error::new(err.kind(), format!("cannot run losetup: {err}")))?
        };
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "losetup {}: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        ATTACHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.clone(), Vec::new()));
        // The guard exists before any check can fail, so the device is
        // detached on every path.
        let device = LoopDevice {
            path,
            backing_path: file.to_path_buf(),
            partitions: Vec::new(),
            _scratch: None,
        };
        if !device.path.to_string_lossy().starts_with("/dev/loop") {
            return Err(io::Error::other(format!("losetup said {:?}", device.path)));
        }
        if options.settle {
            let _ = Command::new("udevadm").arg("settle").status();
        }
        Ok(device)
    }

    /// The file behind the device.
    pub fn backing(&self) -> &Path {
        &self.backing_path
    }

    /// The device's size in 512-byte sectors, from sysfs.
    pub fn sectors(&self) -> u64 {
        let name = self.path.file_name().unwrap().to_string_lossy();
        fs::read_to_string(format!("/sys/block/{name}/size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let file = fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        file.write_all_at(data, offset).unwrap();
        file.sync_all().unwrap();
    }

    pub fn contents(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }

    /// Adds partition `number` (BLKPG) at 512-byte sector `start`, `len`
    /// sectors; returns its node once it exists.
    pub fn add_partition(&mut self, number: u32, start: u64, len: u64) -> PathBuf {
        let dev = self.path.to_str().unwrap();
        crate::sh(
            "addpart",
            &[
                dev,
                &number.to_string(),
                &start.to_string(),
                &len.to_string(),
            ],
        );
        self.partitions.push(number);
        for (path, partitions) in ATTACHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            if *path == self.path {
                partitions.push(number);
            }
        }
        let node = PathBuf::from(format!("{dev}p{number}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not appear",
                node.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        node
    }
}

/// Removes partition `number` of `device` if it is still there (a
/// partition-table re-read may have removed it already).
fn delete_partition(device: &Path, number: u32) {
    let name = format!(
        "{}p{number}",
        device.file_name().unwrap_or_default().to_string_lossy()
    );
    if !Path::new("/sys/class/block").join(name).exists() {
        return;
    }
    let _ = Command::new("delpart")
        .arg(device)
        .arg(number.to_string())
        .status();
}

/// Detaches `device`, retrying for up to 5 s while it is busy (a udev
/// probe or a closing trace may still hold it).
fn detach(device: &Path) -> bool {
    let _lock = losetup_lock();
    for _ in 0..50 {
        match Command::new("losetup").arg("-d").arg(device).status() {
            Ok(status) if status.success() => return true,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    false
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Partitions survive detaching: remove them first.
        for number in self.partitions.drain(..) {
            delete_partition(&self.path, number);
        }
        ATTACHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(path, _)| *path != self.path);
        if !detach(&self.path) {
            eprintln!("WARNING: could not detach {}", self.path.display());
        }
    }
}

/// A hung test must not leave loop devices behind when the harness or CI
/// kills the process (Drop does not run then): after `limit`, detaches
/// every device this process still holds and exits with 101. Once per
/// process; later calls do nothing.
pub fn detach_all_after(limit: Duration, what: &'static str) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            eprintln!("{what}: still running after {limit:?}; detaching loop devices and exiting");
            let attached = ATTACHED.lock().unwrap_or_else(|e| e.into_inner());
            for (path, partitions) in attached.iter() {
                for &number in partitions {
                    delete_partition(path, number);
                }
                let _ = Command::new("losetup").arg("-d").arg(path).status();
            }
            std::process::exit(101);
        });
    });
}
