//! A slow disk for the torture tests: a loop device (direct I/O) over the
//! file that `hc-slowdisk` serves over FUSE, whose writes complete (and
//! land) only after a delay while reads of the same blocks return the old
//! data at once. Everything is undone on drop, failure included.

use super::require_root;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SlowDisk {
    /// The loop device.
    pub path: PathBuf,
    server: Child,
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl SlowDisk {
    pub fn new(size_bytes: u64, write_delay: Duration) -> SlowDisk {
        SlowDisk::with_faults(size_bytes, write_delay, &[])
    }

    /// Also fails reads and writes touching each byte range (start, end)
    /// with EIO.
    pub fn with_faults(size_bytes: u64, write_delay: Duration, eio: &[(u64, u64)]) -> SlowDisk {
        require_root("mount FUSE and attach loop devices");
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size_bytes)
            .unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let mut server = Command::new(env!("CARGO_BIN_EXE_hc-slowdisk"))
            .arg(&mountpoint)
            .arg("--backing")
            .arg(&backing)
            .arg("--write-delay-ms")
            .arg(write_delay.as_millis().to_string())
            .args(
                eio.iter()
                    .flat_map(|r| ["--eio".to_string(), format!("{}..{}", r.0, r.1)]),
            )
            .args(if eio.is_empty() {
                None
            } else {
                Some("--eio-writes")
            })
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
        let output = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(mountpoint.join("disk"))
            .output()
            .unwrap();
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        let disk = SlowDisk {
            path,
            server,
            mountpoint,
            _dir: dir,
        };
        assert!(
            output.status.success(),
            "losetup over the FUSE disk: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        disk
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
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
