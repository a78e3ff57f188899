//! `--freeze`: the filesystems on the imaged device, frozen (FIFREEZE) for
//! the final catch-up round and thawed (FITHAW) on every way out of it.
//!
//! A frozen filesystem has flushed its dirty data and journal to the device
//! and blocks new writes until thawed, so the final round reads a clean
//! filesystem at one instant. The freeze is held by a guard: dropping it
//! thaws, which covers success, errors, signals (they become errors) and
//! unwinding. Only SIGKILL can leave a filesystem frozen; `fsfreeze -u
//! MOUNTPOINT` thaws it.

use crate::blockdev::DevNum;
use anyhow::Context;
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A mounted filesystem: its device and where it is mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub dev: DevNum,
    pub mountpoint: PathBuf,
    pub fs_type: String,
}

/// The mounts of any of `devs`, from `/proc/self/mountinfo`, each
/// filesystem once (a bind mount shows the same filesystem again).
pub fn mounts_of(devs: &[DevNum]) -> anyhow::Result<Vec<Mount>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut mounts: Vec<Mount> = Vec::new();
    for mount in parse_mountinfo(&text) {
        if devs.contains(&mount.dev) && !mounts.iter().any(|m| m.dev == mount.dev) {
            mounts.push(mount);
        }
    }
    Ok(mounts)
}

/// Parses mountinfo lines: "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw".
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = DevNum::parse(fields.get(2)?)?;
            let mountpoint = PathBuf::from(unescape(fields.get(4)?));
            let separator = fields.iter().position(|f| *f == "-")?;
            let fs_type = fields.get(separator + 1)?.to_string();
            Some(Mount {
                dev,
                mountpoint,
                fs_type,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Frozen filesystems; thawed when dropped (or by [`Frozen::thaw`]).
pub struct Frozen {
    frozen: Vec<(File, PathBuf)>,
    since: Instant,
}

impl Frozen {
    /// Freezes each mount in order. If one fails, those already frozen are
    /// thawed before the error is returned.
    pub fn freeze(mounts: &[Mount]) -> anyhow::Result<Frozen> {
        let mut frozen = Frozen {
            frozen: Vec::new(),
            since: Instant::now(),
        };
        for mount in mounts {
            let dir = File::open(&mount.mountpoint)
                .with_context(|| format!("cannot open {}", mount.mountpoint.display()))?;
            // SAFETY: FIFREEZE takes an int argument it ignores; the fd is ours.
            let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
            if rc != 0 {
                let error = std::io::Error::last_os_error();
                return Err(error).with_context(|| {
                    format!(
                        "cannot freeze {} ({}): FIFREEZE failed",
                        mount.mountpoint.display(),
                        mount.fs_type
                    )
                });
            }
            frozen.frozen.push((dir, mount.mountpoint.clone()));
        }
        frozen.since = Instant::now();
        Ok(frozen)
    }

    /// The mountpoints, for messages.
    pub fn describe(&self) -> String {
        self.frozen
            .iter()
            .map(|(_, path)| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Thaws everything and returns how long it was frozen.
    pub fn thaw(mut self) -> anyhow::Result<Duration> {
        let held = self.since.elapsed();
        let errors = self.thaw_all();
        if errors.is_empty() {
            Ok(held)
        } else {
            anyhow::bail!("{}", errors.join("; "))
        }
    }

    fn thaw_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        // Thaw in reverse order of freezing.
        while let Some((dir, path)) = self.frozen.pop() {
            // SAFETY: FITHAW takes an int argument it ignores; the fd is ours.
            let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) };
            if rc != 0 {
                errors.push(format!(
                    "cannot thaw {}: {}; thaw it with `fsfreeze -u {}`",
                    path.display(),
                    std::io::Error::last_os_error(),
                    path.display()
                ));
            }
        }
        errors
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for error in self.thaw_all() {
            eprintln!("hot-clone: ERROR: {error}");
        }
    }
}

/// Whether `path` (or, if it does not exist, its parent) is on one of the
/// filesystems in `mounts`.
pub fn is_on(path: &Path, mounts: &[Mount]) -> bool {
    crate::blockdev::device_for_new_file(path)
        .ok()
        .flatten()
        .is_some_and(|dev| mounts.iter().any(|m| m.dev == dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
36 35 7:3 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/loop3 rw
37 35 7:3 /sub /mnt/bind rw - ext4 /dev/loop3 rw
garbage
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(mounts[1].dev, DevNum { major: 7, minor: 3 });
        assert_eq!(mounts[1].fs_type, "ext4");
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
