//! Facts about block devices: size, logical block size, partitions, and who
//! is using them (mounts, swap, holders). Read from ioctls, sysfs and procfs.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A device number as userspace sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub fn from_rdev(rdev: u64) -> DevNum {
        DevNum {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }

    /// The number of the block device at `path`, or None if it is not one.
    pub fn of_path(path: &Path) -> io::Result<Option<DevNum>> {
        let meta = fs::metadata(path)?;
        Ok(meta
            .file_type()
            .is_block_device()
            .then(|| DevNum::from_rdev(meta.rdev())))
    }

    /// `/sys/dev/block/MAJ:MIN`, a link to the device's sysfs directory.
    pub fn sysfs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{}:{}", self.major, self.minor))
    }

    /// Parses `MAJ:MIN` as sysfs and mountinfo write it.
    pub fn parse(text: &str) -> Option<DevNum> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevNum {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The block device a file's data lives on: the filesystem's device for a
/// regular file or directory, the device itself for a block device, None
/// for anything else (a pipe, a terminal, a character device).
pub fn device_holding(meta: &fs::Metadata) -> Option<DevNum> {
    let kind = meta.file_type();
    if kind.is_block_device() {
        Some(DevNum::from_rdev(meta.rdev()))
    } else if kind.is_file() || kind.is_dir() {
        Some(DevNum::from_rdev(meta.dev()))
    } else {
        None
    }
}

/// Where a file at `path` would live: `path` if it exists, else its
/// directory (`.` for a bare name). Errors name the path looked at.
pub fn device_for_new_file(path: &Path) -> io::Result<Option<DevNum>> {
    let probe = if path.exists() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    fs::metadata(&probe)
        .map(|meta| device_holding(&meta))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot stat {}: {e}", probe.display())))
}

// From <linux/fs.h>: BLKGETSIZE64 is _IOR(0x12, 114, size_t), BLKSSZGET
// _IO(0x12, 104) but writes an int, BLKRRPART _IO(0x12, 95).
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_none!(blkrrpart, 0x12, 95);

const _: () = assert!(nix::request_code_read!(0x12, 114, 8) == 0x8008_1272);
const _: () = assert!(nix::request_code_none!(0x12, 104) == 0x1268);
const _: () = assert!(nix::request_code_none!(0x12, 95) == 0x125f);

/// Size in bytes of an open block device.
pub fn size_bytes(file: &File) -> io::Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local for the duration of the call.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut bytes) }?;
    Ok(bytes)
}

/// Logical block size in bytes of an open block device.
pub fn logical_block_bytes(file: &File) -> io::Result<u32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live local for the duration of the call.
    unsafe { blksszget(file.as_raw_fd(), &mut bytes) }?;
    Ok(bytes as u32)
}

/// Asks the kernel to re-read the partition table of an open whole disk.
/// EINVAL means the device does not support partitions (a loop device
/// without partition scanning, zram); EBUSY that a partition is open.
pub fn reread_partitions(file: &File) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument and touches no user memory.
    unsafe { blkrrpart(file.as_raw_fd()) }?;
    Ok(())
}

/// True when `dev` is a partition, not a whole disk (sysfs has a
/// `partition` attribute only for partitions).
pub fn is_partition(dev: DevNum) -> bool {
    dev.sysfs_dir().join("partition").exists()
}

/// The partitions of a whole disk (empty for a partition or a disk without).
pub fn partitions_of(disk: DevNum) -> Vec<DevNum> {
    let Ok(entries) = fs::read_dir(disk.sysfs_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("partition").exists())
        .filter_map(|e| fs::read_to_string(e.path().join("dev")).ok())
        .filter_map(|text| DevNum::parse(&text))
        .collect()
}

/// Why a device must not be written: each use found, in words.
pub fn uses_of(devs: &[DevNum]) -> Vec<String> {
    let mut uses = Vec::new();
    if let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") {
        for line in mountinfo.lines() {
            // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
            let fields: Vec<&str> = line.split(' ').collect();
            if let (Some(dev), Some(mountpoint)) = (fields.get(2), fields.get(4))
                && let Some(dev) = DevNum::parse(dev)
                && devs.contains(&dev)
            {
                uses.push(format!("{dev} is mounted on {mountpoint}"));
            }
        }
    }
    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for path in swaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
        {
            if let Ok(Some(dev)) = DevNum::of_path(Path::new(path))
                && devs.contains(&dev)
            {
                uses.push(format!("{dev} is in use as swap ({path})"));
            }
        }
    }
    for dev in devs {
        if let Ok(holders) = fs::read_dir(dev.sysfs_dir().join("holders")) {
            for holder in holders.flatten() {
                uses.push(format!(
                    "{dev} is held by {}",
                    holder.file_name().to_string_lossy()
                ));
            }
        }
    }
    uses
}
