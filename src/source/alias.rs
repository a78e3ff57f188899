//! Other ways to write a loop device's data that the trace cannot see.
//!
//! The trace watches the source's request queue. A loop device's bytes are
//! its backing file's, and that file can also be written through a second
//! loop device attached to it or by any process that has it open for
//! writing (or mapped shared and writable): those writes reach the file
//! through the page cache or another queue, never through the source's, so
//! no event marks them dirty and the image can hold stale data for them.

use super::DevNum;
use super::topology::FileId;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Another loop device and the file behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopAttachment {
    /// Kernel name, e.g. `loop9`.
    pub name: String,
    pub file: FileId,
}

/// A process that can write a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub pid: u32,
    pub comm: String,
    /// "fd 5", or "a shared writable mapping".
    pub how: String,
}

/// Findings reported at most; the rest are counted.
const FINDINGS_SHOWN_MAX: usize = 8;

/// Why writes to `source_name` (a loop device over `backing_path`, whose
/// identity is `backing`) could bypass its queue, one sentence each; empty
/// when none. `own_loop` is the kernel name of the source's loop disk.
pub fn alias_findings(
    source_name: &str,
    own_loop: &str,
    backing_path: &str,
    backing: FileId,
    loops: &[LoopAttachment],
    writers: &[Writer],
) -> Vec<String> {
    let mut findings: Vec<String> = loops
        .iter()
        .filter(|l| l.file == backing && l.name != own_loop)
        .map(|l| {
            format!(
                "/dev/{} is attached to {backing_path}, the file behind {source_name}, too: detach it (losetup -d /dev/{})",
                l.name, l.name
            )
        })
        .collect();
    findings.extend(writers.iter().map(|w| {
        format!(
            "process {} ({}) can write {backing_path}, the file behind {source_name} ({}): stop it",
            w.pid, w.comm, w.how
        )
    }));
    if findings.len() > FINDINGS_SHOWN_MAX {
        let more = findings.len() - FINDINGS_SHOWN_MAX;
        findings.truncate(FINDINGS_SHOWN_MAX);
        findings.push(format!("{more} more like these"));
    }
    findings
}

// From <linux/loop.h>: an old-style request number, not _IOR-encoded.
nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

impl LoopInfo64 {
    const ZEROED: LoopInfo64 = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
}

/// The identity of the file behind an open loop device (or a partition of
/// one), from LOOP_GET_STATUS64: it names the inode even when the file has
/// been deleted or lives in another mount namespace. None for a loop device
/// with no file attached.
pub fn loop_backing(device: &File) -> io::Result<Option<FileId>> {
    let mut info = LoopInfo64::ZEROED;
    // SAFETY: LOOP_GET_STATUS64 writes one struct loop_info64 through the
    // pointer, which points at a live local of that layout (size checked
    // above) for the duration of the call.
    match unsafe { loop_get_status64(device.as_raw_fd(), &mut info) } {
        Ok(_) => {}
        Err(nix::errno::Errno::ENXIO) => return Ok(None),
        Err(errno) => return Err(errno.into()),
    }
    // lo_device is the kernel's huge_encode_dev, which glibc's major/minor
    // decode (the same layout below 2^32).
    Ok(Some(FileId {
        dev: DevNum::from_rdev(info.lo_device),
        ino: info.lo_inode,
    }))
}

/// Every loop device with a backing file we can stat.
pub fn loop_attachments() -> Vec<LoopAttachment> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = fs::read_to_string(entry.path().join("loop/backing_file")).ok()?;
            let meta = fs::metadata(text.trim_end_matches('\n')).ok()?;
            Some(LoopAttachment {
                name,
                file: FileId::of(&meta),
            })
        })
        .collect()
}

/// Processes (other than this one) holding `file` open for writing, or
/// mapped shared and writable: from `/proc/PID/fd`, `fdinfo` and `maps`.
pub fn writers_of(file: FileId) -> Vec<Writer> {
    let own = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut writers = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let dir = entry.path();
        let comm = || {
            fs::read_to_string(dir.join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default()
        };
        for fd in fds_writing(&dir, file) {
            writers.push(Writer {
                pid,
                comm: comm(),
                how: format!("fd {fd}"),
            });
        }
        if let Ok(maps) = fs::read_to_string(dir.join("maps"))
            && maps_write_shared(&maps, file)
        {
            writers.push(Writer {
                pid,
                comm: comm(),
                how: "a shared writable mapping".to_string(),
            });
        }
    }
    writers
}

/// The descriptors under `/proc/PID` open on `file` with write access.
fn fds_writing(proc_dir: &Path, file: FileId) -> Vec<u32> {
    let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let number: u32 = fd.file_name().to_str()?.parse().ok()?;
            let meta = fs::metadata(fd.path()).ok()?;
            if FileId::of(&meta) != file {
                return None;
            }
            let info = fs::read_to_string(proc_dir.join("fdinfo").join(number.to_string())).ok()?;
            fdinfo_writable(&info).then_some(number)
        })
        .collect()
}

/// Whether an fdinfo's `flags:` (octal) open the file for writing.
pub fn fdinfo_writable(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .and_then(|flags| u32::from_str_radix(flags.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
}

/// Whether `/proc/PID/maps` maps `file` shared and writable:
/// `7f..-7f.. rw-s 00000000 fd:01 1234 /path`.
pub fn maps_write_shared(maps: &str, file: FileId) -> bool {
    maps.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(perms), Some(_), Some(dev), Some(ino)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return false;
        };
        let perms = perms.as_bytes();
        let dev = dev.split_once(':').and_then(|(major, minor)| {
            Some(DevNum {
                major: u32::from_str_radix(major, 16).ok()?,
                minor: u32::from_str_radix(minor, 16).ok()?,
            })
        });
        perms.get(1) == Some(&b'w')
            && perms.get(3) == Some(&b's')
            && dev == Some(file.dev)
            && ino.parse() == Ok(file.ino)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: FileId = FileId {
        dev: DevNum {
            major: 252,
            minor: 1,
        },
        ino: 4242,
    };

    fn attachment(name: &str, ino: u64) -> LoopAttachment {
        LoopAttachment {
            name: name.to_string(),
            file: FileId { ino, ..FILE },
        }
    }

    #[test]
    fn a_second_loop_device_on_the_same_file() {
        let loops = [
            attachment("loop5", 4242),
            attachment("loop9", 4242),
            attachment("loop3", 7),
        ];
        let found = alias_findings("/dev/loop5p1", "loop5", "/var/d.img", FILE, &loops, &[]);
        assert_eq!(
            found,
            [
                "/dev/loop9 is attached to /var/d.img, the file behind /dev/loop5p1, too: detach it (losetup -d /dev/loop9)"
            ]
        );
        // The source's own loop device alone is no alias.
        assert!(
            alias_findings("/dev/loop5", "loop5", "/var/d.img", FILE, &loops[..1], &[]).is_empty()
        );
    }

    #[test]
    fn a_process_that_can_write_the_file() {
        let writers = [Writer {
            pid: 77,
            comm: "dd".to_string(),
            how: "fd 3".to_string(),
        }];
        let found = alias_findings("/dev/loop5", "loop5", "/var/d.img", FILE, &[], &writers);
        assert_eq!(
            found,
            ["process 77 (dd) can write /var/d.img, the file behind /dev/loop5 (fd 3): stop it"]
        );
    }

    #[test]
    fn many_findings_are_counted() {
        let loops: Vec<_> = (0..20)
            .map(|n| attachment(&format!("loop{n}"), 4242))
            .collect();
        let found = alias_findings("/dev/loop99", "loop99", "/f", FILE, &loops, &[]);
        assert_eq!(found.len(), FINDINGS_SHOWN_MAX + 1);
        assert_eq!(found.last().unwrap(), "12 more like these");
    }

    #[test]
    fn fdinfo_flags() {
        assert!(!fdinfo_writable("pos:\t0\nflags:\t0100000\nmnt_id:\t1\n"));
        assert!(fdinfo_writable("pos:\t0\nflags:\t0100001\nmnt_id:\t1\n"));
        assert!(fdinfo_writable("pos:\t0\nflags:\t02100002\n"));
        assert!(!fdinfo_writable("pos:\t0\n"));
    }

    #[test]
    fn shared_writable_mappings() {
        let maps = "7f00-7f10 r--s 00000000 fc:01 4242 /var/d.img\n\
                    7f10-7f20 rw-p 00000000 fc:01 4242 /var/d.img\n";
        assert!(
            !maps_write_shared(maps, FILE),
            "read-only and private mappings"
        );
        let maps = "7f20-7f30 rw-s 00001000 fc:01 4242 /var/d.img\n";
        assert!(maps_write_shared(maps, FILE));
        assert!(!maps_write_shared(maps, FileId { ino: 1, ..FILE }));
    }
}
