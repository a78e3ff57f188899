//! A slow disk for the torture tests: a loop device (direct I/O) over the
//! file that `hc-slowdisk` serves over FUSE, whose writes complete (and
//! land) only after a delay while reads of the same blocks return the old
//! data at once. Everything is undone on drop, failure included.

use crate::loopdev::LoopDevice;
use crate::require_root;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SlowDisk {
    /// The loop device's node.
    pub path: PathBuf,
    /// Detached first on drop, while the server still serves its file.
    device: Option<LoopDevice>,
    server: Child,
    mountpoint: PathBuf,
    /// hc-slowdisk's --eio-file: [`SlowDisk::set_eio`] rewrites it.
    eio_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// What [`SlowDisk::start`] sets up.
pub struct SlowDiskOptions<'a> {
    pub size_bytes: u64,
    pub write_delay: Duration,
    /// Byte ranges (start, end) whose reads fail with EIO from the start.
    pub eio: &'a [(u64, u64)],
    /// Writes there fail too (hc-slowdisk --eio-writes).
    pub eio_writes: bool,
    /// The disk's initial content (else zeros), written to the backing
    /// file before the server starts, so bad ranges hold known bytes.
    pub content: Option<&'a [u8]>,
}

impl SlowDisk {
    pub fn new(size_bytes: u64, write_delay: Duration) -> SlowDisk {
        SlowDisk::with_faults(size_bytes, write_delay, &[])
    }

    /// Also fails reads and writes touching each byte range (start, end)
    /// with EIO.
    pub fn with_faults(size_bytes: u64, write_delay: Duration, eio: &[(u64, u64)]) -> SlowDisk {
        SlowDisk::start(SlowDiskOptions {
            size_bytes,
            write_delay,
            eio,
            eio_writes: !eio.is_empty(),
            content: None,
        })
    }

    pub fn start(options: SlowDiskOptions<'_>) -> SlowDisk {
        let SlowDiskOptions {
            size_bytes,
            write_delay,
            eio,
            eio_writes,
            content,
        } = options;
        require_root("mount FUSE and attach loop devices");
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let file = std::fs::File::create(&backing).unwrap();
        file.set_len(size_bytes).unwrap();
        if let Some(content) = content {
            assert_eq!(
                content.len() as u64,
                size_bytes,
                "content of the disk's size"
            );
            std::os::unix::fs::FileExt::write_all_at(&file, content, 0).unwrap();
            file.sync_all().unwrap();
        }
        drop(file);
        let eio_file = dir.path().join("eio");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let mut server = crate::workspace_command("hc-slowdisk")
            .arg(&mountpoint)
            .arg("--backing")
            .arg(&backing)
            .arg("--write-delay-ms")
            .arg(write_delay.as_millis().to_string())
            .args(
                eio.iter()
                    .flat_map(|r| ["--eio".to_string(), format!("{}..{}", r.0, r.1)]),
            )
            .args(eio_writes.then_some("--eio-writes"))
            .arg("--eio-file")
            .arg(&eio_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hc-slowdisk");
        let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("serving") => break,
                Some(Ok(line)) => seen.push(line),
                _ => {
                    let _ = server.kill();
                    let _ = server.wait();
                    panic!("hc-slowdisk did not start: {seen:?}");
                }
            }
            assert!(Instant::now() < deadline, "hc-slowdisk: {seen:?}");
        }
        let mut disk = SlowDisk {
            path: PathBuf::new(),
            device: None,
            server,
            mountpoint,
            eio_file,
            _dir: dir,
        };
        let device = LoopDevice::attach(&disk.mountpoint.join("disk"));
        disk.path = device.path.clone();
        disk.device = Some(device);
        disk
    }
}

impl SlowDisk {
    /// Makes exactly these ranges (besides the --eio ones given at start)
    /// fail from now on, and returns once a direct read of the loop device
    /// shows it: the first range fails with EIO, or (for none) block 0 of
    /// the old ranges reads again. Panics after 10 s.
    pub fn set_eio(&self, ranges: &[(u64, u64)], probe: (u64, u64)) {
        let text: String = ranges.iter().map(|(a, b)| format!("{a}..{b}\n")).collect();
        let temp = self.eio_file.with_extension("new");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(&temp, &self.eio_file).unwrap();
        let want_failure = ranges
            .iter()
            .any(|&(a, b)| probe.0 < b && a < probe.0 + probe.1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let failed = read_direct(&self.path, probe.0, probe.1 as usize).is_err();
            if failed == want_failure {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hc-slowdisk did not take up the EIO ranges {ranges:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One O_DIRECT read of `len` bytes at `offset` of a device.
pub fn read_direct(path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut buf = crate::AlignedBuf::new(len);
    file.read_exact_at(buf.as_mut(), offset)?;
    Ok(buf.as_mut().to_vec())
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        drop(self.device.take());
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.server.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        // If the server could not unmount (still busy), detach it lazily.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
    }
}
