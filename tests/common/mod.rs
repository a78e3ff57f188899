//! Shared fixtures for the integration tests: the real binaries, scratch
//! directories, images built byte by byte, and root-only block devices that
//! clean up after themselves on every path (Drop), failure included.

#![allow(dead_code)] // each test binary uses a different part of this file

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BANNER: &str = "This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone\n";

pub fn hot_clone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hot-clone"))
}

pub fn hc_from_raw() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hc-from-raw"))
}

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

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Deterministic bytes: runs of pseudo-random data and of zeros.
pub fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
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

/// A naive, independent reader: applies the sections of an image to a
/// byte vector (ignores the trailer). Shares no code with the crate.
pub fn independent_restore(image: &[u8]) -> Vec<u8> {
    let mut at = image.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut device = Vec::new();
    while at < image.len() {
        let eol = at + image[at..].iter().position(|&b| b == b'\n').unwrap();
        let line = std::str::from_utf8(&image[at..eol]).unwrap();
        at = eol + 1;
        if line.starts_with("END\t") {
            break;
        }
        let (s, l) = line.split_once('\t').unwrap();
        let sector: usize = s.strip_prefix("S:").unwrap().parse().unwrap();
        let len: usize = l.strip_prefix("L:").unwrap().parse().unwrap();
        let start = sector * 512;
        if device.len() < start + len {
            device.resize(start + len, 0);
        }
        device[start..start + len].copy_from_slice(&image[at..at + len]);
        at += len;
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

fn sh(program: &str, args: &[&str]) -> String {
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

/// A loop device over a sparse scratch file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    _backing: tempfile::NamedTempFile,
    partitions: Vec<u32>,
}

impl LoopDevice {
    pub fn new(size_bytes: u64) -> LoopDevice {
        Self::with_sector_size(size_bytes, 512)
    }

    pub fn with_sector_size(size_bytes: u64, sector_bytes: u32) -> LoopDevice {
        require_root("attach loop devices");
        let backing = tempfile::NamedTempFile::new().unwrap();
        backing.as_file().set_len(size_bytes).unwrap();
        let file = backing.path().to_str().unwrap();
        let sector = sector_bytes.to_string();
        let path = sh(
            "losetup",
            &[
                "-f",
                "--show",
                "--direct-io=on",
                "--sector-size",
                &sector,
                file,
            ],
        );
        LoopDevice {
            path: PathBuf::from(path),
            _backing: backing,
            partitions: Vec::new(),
        }
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

    /// Adds partition `number` (BLKPG) at 512-byte sector `start`, `len` sectors.
    pub fn add_partition(&mut self, number: u32, start: u64, len: u64) -> PathBuf {
        let dev = self.path.to_str().unwrap();
        sh(
            "addpart",
            &[
                dev,
                &number.to_string(),
                &start.to_string(),
                &len.to_string(),
            ],
        );
        self.partitions.push(number);
        let node = PathBuf::from(format!("{dev}p{number}"));
        for _ in 0..100 {
            if node.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(node.exists(), "{} did not appear", node.display());
        node
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let dev = self.path.to_string_lossy().into_owned();
        for number in self.partitions.drain(..) {
            let _ = Command::new("delpart")
                .args([&dev, &number.to_string()])
                .status();
        }
        let _ = Command::new("losetup").args(["-d", &dev]).status();
    }
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
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
