//! Small system helpers shared by the live sources: tracefs/sysfs text files
//! with errors that name the path, mounts, CPU lists, process liveness and
//! the RCU grace period behind [`super::EventSource::sync_drain`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::LiveError;

/// Longest CPU list we accept (`/sys/devices/system/cpu/online`).
pub const CPUS_MAX: usize = 4096;

/// Builds an [`LiveError::Io`].
pub fn io_error(op: &'static str, path: &Path, error: io::Error) -> LiveError {
    LiveError::Io {
        op,
        path: path.to_path_buf(),
        error,
    }
}

/// First read of [`read_text`]: larger than any control file we read.
const TEXT_READ_BYTES: usize = 64 << 10;
/// Largest control file we read.
const TEXT_BYTES_MAX: usize = 16 << 20;

/// Reads a small text file (sysfs, tracefs, procfs). The first `read(2)`
/// asks for 64 KiB: some tracefs files (`events/header_page`) answer only the
/// first read and return EOF after it, so a small probe read (what
/// `fs::read_to_string` starts with on a file of size 0) would truncate them.
pub fn read_text(path: &Path) -> Result<String, LiveError> {
    let mut file = File::open(path).map_err(|error| io_error("cannot open", path, error))?;
    let mut bytes = vec![0u8; TEXT_READ_BYTES];
    let mut length = 0;
    loop {
        if length == bytes.len() {
            if bytes.len() >= TEXT_BYTES_MAX {
                return Err(LiveError::Parse {
                    path: path.to_path_buf(),
                    message: format!("longer than {TEXT_BYTES_MAX} bytes"),
                });
            }
            bytes.resize(bytes.len() * 2, 0);
        }
        match file.read(&mut bytes[length..]) {
            Ok(0) => break,
            Ok(read) => length += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error("cannot read", path, error)),
        }
    }
    bytes.truncate(length);
    String::from_utf8(bytes).map_err(|_| LiveError::Parse {
        path: path.to_path_buf(),
        message: "not UTF-8 text".to_string(),
    })
}

/// Writes `text` to an existing control file in one `write(2)`, as the
/// tracefs files expect (a filter or a number is parsed per write).
pub fn write_text(path: &Path, text: &str) -> Result<(), LiveError> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|error| io_error("cannot open for writing", path, error))?;
    file.write_all(text.as_bytes())
        .map_err(|error| LiveError::Io {
            op: "cannot write",
            path: path.to_path_buf(),
            error: io::Error::new(error.kind(), format!("{text:?}: {error}")),
        })
}

/// Reads a file that regenerates its content on every read at offset 0
/// (`per_cpu/cpuN/stats`) into `buf`, without allocating.
pub fn pread_text<'a>(file: &File, path: &Path, buf: &'a mut [u8]) -> Result<&'a str, LiveError> {
    let length = file
        .read_at(buf, 0)
        .map_err(|error| io_error("cannot read", path, error))?;
    std::str::from_utf8(&buf[..length]).map_err(|_| LiveError::Parse {
        path: path.to_path_buf(),
        message: "not UTF-8 text".to_string(),
    })
}

/// Mounts a pseudo file system (`tracefs`, `debugfs`) at `target`.
pub fn mount_pseudo(fs_type: &str, target: &Path) -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    // `data` may be null for these file systems.
    mount(
        Some("nodev"),
        target,
        Some(fs_type),
        MsFlags::empty(),
        None::<&str>,
    )?;
    Ok(())
}

/// A pseudo file system mounted in a private temporary directory, for a
/// moment: dropping it detaches the mount (files opened through it stay
/// usable) and removes the directory, so nothing is left on the system.
pub struct PrivateMount {
    path: PathBuf,
}

static PRIVATE_MOUNT_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl PrivateMount {
    pub fn new(fs_type: &str) -> io::Result<PrivateMount> {
        let counter = PRIVATE_MOUNT_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "hot-clone-{fs_type}-{}-{counter}",
            std::process::id()
        ));
        fs::create_dir(&path)?;
        if let Err(error) = mount_pseudo(fs_type, &path) {
            let _ = fs::remove_dir(&path);
            return Err(error);
        }
        Ok(PrivateMount { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.path);
    }
}

/// Parses a kernel CPU list (`0-3,8,10-11`), sorted and without duplicates.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (first, last),
            None => (part, part),
        };
        let first: u32 = first
            .parse()
            .map_err(|_| format!("bad CPU number in {part:?}"))?;
        let last: u32 = last
            .parse()
            .map_err(|_| format!("bad CPU number in {part:?}"))?;
        if first > last {
            return Err(format!("descending CPU range {part:?}"));
        }
        if (last - first) as usize + cpus.len() >= CPUS_MAX {
            return Err(format!("more than {CPUS_MAX} CPUs"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The first CPU in `online` that is not in `read` (the CPUs whose
/// buffers a source reads): its events would go unread.
pub fn cpu_not_read(online: &[u32], read: &[u32]) -> Option<u32> {
    online.iter().copied().find(|cpu| !read.contains(cpu))
}

/// The online CPUs.
pub fn online_cpus() -> Result<Vec<u32>, LiveError> {
    cpu_list(Path::new("/sys/devices/system/cpu/online"))
}

/// The CPUs that can ever come online (`/sys/devices/system/cpu/possible`):
/// a tracefs instance has a `per_cpu/cpuN` directory for each.
pub fn possible_cpus() -> Result<Vec<u32>, LiveError> {
    cpu_list(Path::new("/sys/devices/system/cpu/possible"))
}

fn cpu_list(path: &Path) -> Result<Vec<u32>, LiveError> {
    let text = read_text(path)?;
    parse_cpu_list(&text).map_err(|message| LiveError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// The boot's identity: the first 8 hex digits of
/// `/proc/sys/kernel/random/boot_id` (random per boot).
pub fn boot_id() -> Result<String, LiveError> {
    let path = Path::new("/proc/sys/kernel/random/boot_id");
    let text = read_text(path)?;
    parse_boot_id(&text).ok_or_else(|| LiveError::Parse {
        path: path.to_path_buf(),
        message: format!("not a boot id: {:?}", text.trim()),
    })
}

/// `84022ec3-50c6-...` → `84022ec3`.
pub fn parse_boot_id(text: &str) -> Option<String> {
    let head = text.trim().get(..8)?;
    head.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| head.to_ascii_lowercase())
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid` links to
/// `pid:[4026531836]`): pids are only comparable within one namespace.
pub fn pid_namespace() -> Result<u64, LiveError> {
    let path = Path::new("/proc/self/ns/pid");
    let target = fs::read_link(path).map_err(|error| io_error("cannot read link", path, error))?;
    let text = target.to_string_lossy();
    parse_namespace_link(&text).ok_or_else(|| LiveError::Parse {
        path: path.to_path_buf(),
        message: format!("not a namespace link: {text:?}"),
    })
}

/// `pid:[4026531836]` → 4026531836.
pub fn parse_namespace_link(text: &str) -> Option<u64> {
    text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Whether a process with this pid exists (a zombie counts as alive).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // No signal: only checks for existence and permission.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// The effective user id.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1 << 0;

/// Waits until every CPU has left any preempt- or interrupt-disabled section
/// it was in when this was called: `membarrier(MEMBARRIER_CMD_GLOBAL)` is
/// `synchronize_rcu()`, and since Linux 4.20 an RCU grace period also waits
/// for those sections. Ring-buffer writers reserve and commit an event with
/// preemption disabled, so afterwards every event whose tracepoint started
/// before this call is committed. Falls back to running this thread on each
/// online CPU in turn (being scheduled on a CPU proves that CPU is not inside
/// such a section) where membarrier is unavailable (nohz_full, old kernels).
pub fn wait_for_cpus_quiescent() -> Result<(), LiveError> {
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc == 0 {
        return Ok(());
    }
    visit_every_cpu()
}

fn visit_every_cpu() -> Result<(), LiveError> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    // Pid 0 is the calling thread.
    let this_thread = nix::unistd::Pid::from_raw(0);
    let cpus = online_cpus()?;
    let path = PathBuf::from("sched_setaffinity");
    let saved = sched_getaffinity(this_thread)
        .map_err(|errno| io_error("cannot get affinity", &path, errno.into()))?;
    let mut result = Ok(());
    for cpu in cpus {
        let mut set = CpuSet::new();
        // A CPU past cpu_set_t's 1024 bits leaves the set empty, which
        // sched_setaffinity refuses (EINVAL). Returning from it means the
        // thread now runs on `cpu`.
        let _ = set.set(cpu as usize);
        if let Err(errno) = sched_setaffinity(this_thread, &set) {
            result = Err(io_error("cannot set affinity", &path, errno.into()));
            break;
        }
    }
    let _ = sched_setaffinity(this_thread, &saved);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), [0, 1]);
        assert_eq!(parse_cpu_list("0").unwrap(), [0]);
        assert_eq!(parse_cpu_list("0,2-4,7").unwrap(), [0, 2, 3, 4, 7]);
        assert_eq!(parse_cpu_list("3,1-2,2").unwrap(), [1, 2, 3]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("4-2").is_err());
        assert!(parse_cpu_list("0-100000").is_err());
    }

    #[test]
    fn unread_cpus() {
        assert_eq!(cpu_not_read(&[0, 1], &[0, 1]), None);
        assert_eq!(cpu_not_read(&[0, 1, 2], &[0, 1]), Some(2));
        assert_eq!(cpu_not_read(&[0], &[0, 1, 2, 3]), None);
    }

    #[test]
    fn boot_and_namespace_ids() {
        assert_eq!(
            parse_boot_id("84022EC3-50c6-49f6-a8d7-757931173446\n").as_deref(),
            Some("84022ec3")
        );
        assert_eq!(parse_boot_id("8402"), None);
        assert_eq!(parse_boot_id("8402zec3-50c6"), None);
        assert_eq!(
            parse_namespace_link("pid:[4026531836]"),
            Some(4_026_531_836)
        );
        assert_eq!(parse_namespace_link("net:[4026531836]"), None);
        assert_eq!(parse_namespace_link("pid:[x]"), None);
        assert_eq!(boot_id().unwrap().len(), 8);
        assert!(pid_namespace().unwrap() > 0);
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
