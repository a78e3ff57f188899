//! `--freeze`: the filesystems on the imaged device, frozen (FIFREEZE) for
//! the final catch-up rounds and thawed (FITHAW) on every way out of them.
//!
//! A frozen filesystem has flushed its dirty data and journal to the device
//! and blocks new writes until thawed, so the final rounds read a clean
//! filesystem at one instant. The freeze is held by [`Frozen`]: dropping it
//! thaws, which covers success, errors, signals (they become errors) and
//! unwinding; a second signal thaws from the signal handler
//! ([`crate::signals`]); and a **guardian** process thaws when the imager
//! dies any other way (SIGKILL, the OOM killer, an abort).
//!
//! # Why a guardian, and why it may thaw
//!
//! From the kernel (fs/ioctl.c, fs/super.c, 6.x): FIFREEZE is
//! `freeze_super(sb, FREEZE_HOLDER_USERSPACE, NULL)` and FITHAW is
//! `thaw_super(sb, FREEZE_HOLDER_USERSPACE, NULL)`. The freeze is state of
//! the superblock held by "userspace" as one holder, with no owner (the
//! owner argument is NULL for the ioctls) and no tie to the file or the
//! process that asked: nothing thaws when the freezer's descriptors close
//! or it dies, which is why a SIGKILLed imager used to leave the filesystem
//! frozen. For the same reason any process with CAP_SYS_ADMIN in the
//! superblock's user namespace may thaw it (`ioctl_fsthaw` checks only
//! that), and a second userspace FIFREEZE fails with EBUSY instead of
//! nesting (no `FREEZE_MAY_NEST` for the ioctls) — so once our FIFREEZE
//! returned, the userspace freeze is ours until a FITHAW.
//!
//! The guardian is this binary, started (fork and exec, by
//! `std::process::Command`, so the child is a fresh single-threaded process
//! and no `unsafe` fork is needed) before the freeze as
//! `hot-clone freeze-guardian`. It opens each mountpoint itself, checks that
//! it is the filesystem the parent named (`st_dev`), and holds the
//! descriptor (which also pins the superblock: FITHAW through it reaches the
//! frozen filesystem even if something is mounted over the path). Its stdin
//! is a pipe from the imager; the imager writes `freezing` before its first
//! FIFREEZE and `thawed` after its last FITHAW. The kernel closes every
//! descriptor of a process that ends, however it ends (`do_exit` →
//! `exit_files`), so the guardian's read sees end-of-file when the imager
//! dies; if it does so after `freezing` and before `thawed`, it runs FITHAW
//! on every mountpoint and exits. As a second trigger it polls its parent
//! pid every 200 ms (a write end leaked into another process would keep the
//! pipe open). `PR_SET_PDEATHSIG` is not used: it fires when the parent
//! *thread* that forked exits, not the process, and it delivers a signal
//! whose default action would kill the guardian before it thaws.
//!
//! The guardian writes nothing into any filesystem: stdin and stdout are
//! pipes to the imager, stderr is /dev/null (so it never keeps the
//! imager's stderr pipe open past the imager's death: a pipe consumer sees
//! end-of-file), every other inherited descriptor is closed at its start,
//! and its one report after the imager died goes to the kernel log
//! (`/dev/kmsg`). It blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT and runs in
//! its own process group, so a Ctrl-C or a hangup meant for the imager does
//! not take the guardian away first. The imager reaps it after `thawed`; if
//! the imager died, init (or the subreaper) does.
//!
//! The one window: an imager that dies after writing `freezing` and before
//! its FIFREEZE makes the guardian thaw a filesystem that is not frozen
//! (EINVAL, harmless) — or, if another program froze it in that instant,
//! that program's freeze.
//!
//! # Nothing written while frozen
//!
//! From before the first FIFREEZE until after the last FITHAW, stderr (fd
//! 2) is pointed at an in-memory file (memfd) and copied to the real
//! stderr after the thaw: a log line must not block on a filesystem the
//! run froze (stderr redirected into it, or a pipe whose reader writes
//! there). The image output is held by the run ([`crate::image::output::ImageOut`]).

use crate::signals::Emergency;
use crate::source::blockdev::DevNum;
use anyhow::{Context, bail};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int); both
// ignore their argument.
const FIFREEZE: libc::c_ulong =
    nix::request_code_readwrite!(b'X', 119, size_of::<libc::c_int>()) as libc::c_ulong;
const FITHAW: libc::c_ulong =
    nix::request_code_readwrite!(b'X', 120, size_of::<libc::c_int>()) as libc::c_ulong;
const _: () = assert!(FIFREEZE == 0xC004_5877 && FITHAW == 0xC004_5878);
nix::ioctl_write_int_bad!(fifreeze, FIFREEZE);
nix::ioctl_write_int_bad!(fithaw, FITHAW);

/// FIFREEZE on the filesystem `dir` is on.
fn freeze_fs(dir: &File) -> io::Result<()> {
    // SAFETY: FIFREEZE passes its int argument by value and touches no
    // user memory; the fd is open for the call.
    unsafe { fifreeze(dir.as_raw_fd(), 0) }?;
    Ok(())
}

/// FITHAW on the filesystem `dir` is on.
fn thaw_fs(dir: &File) -> io::Result<()> {
    // SAFETY: as for FIFREEZE.
    unsafe { fithaw(dir.as_raw_fd(), 0) }?;
    Ok(())
}

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

/// How long the imager waits for the guardian to say it is ready.
const GUARDIAN_READY_WAIT_MS: u16 = 5000;

/// How often the guardian looks at its parent pid.
const GUARDIAN_POLL_MS: u16 = 200;

/// One frozen filesystem. The emergency registration is dropped (and the
/// signal handler forgets the descriptor) before the descriptor closes.
struct FrozenMount {
    _emergency: Emergency,
    dir: File,
    path: PathBuf,
}

/// What went wrong undoing a freeze, one message each (a filesystem left
/// frozen says how to thaw it by hand; the guardian; stderr's hold).
#[derive(Debug, thiserror::Error)]
#[error("{}", errors.join("; "))]
pub struct ThawError {
    pub errors: Vec<String>,
}

/// Frozen filesystems; thawed when dropped (or by [`Frozen::thaw`]).
pub struct Frozen {
    frozen: Vec<FrozenMount>,
    since: Instant,
    guardian: Option<Guardian>,
    stderr: Option<HeldStderr>,
}

impl Frozen {
    /// Starts the guardian, holds stderr, then freezes each mount in order.
    /// If one fails, those already frozen are thawed before the error is
    /// returned.
    pub fn freeze(mounts: &[Mount]) -> anyhow::Result<Frozen> {
        let mut dirs = Vec::with_capacity(mounts.len());
        for mount in mounts {
            let dir = File::open(&mount.mountpoint)
                .with_context(|| format!("cannot open {}", mount.mountpoint.display()))?;
            dirs.push(dir);
        }
        let mut guardian = Guardian::start(mounts)?;
        let mut frozen = Frozen {
            frozen: Vec::with_capacity(mounts.len()),
            since: Instant::now(),
            guardian: None,
            stderr: None,
        };
        frozen.stderr = Some(HeldStderr::start()?);
        guardian.arm()?;
        frozen.guardian = Some(guardian);
        for (mount, dir) in mounts.iter().zip(dirs) {
            // Registered before the ioctl: a second signal arriving just
            // after it returns must find it.
            let emergency = Emergency::ioctl(dir.as_raw_fd(), FITHAW);
            if let Err(error) = freeze_fs(&dir) {
                drop(emergency);
                return Err(error).with_context(|| {
                    format!(
                        "cannot freeze {} ({}): FIFREEZE failed",
                        mount.mountpoint.display(),
                        mount.fs_type
                    )
                });
            }
            frozen.frozen.push(FrozenMount {
                _emergency: emergency,
                dir,
                path: mount.mountpoint.clone(),
            });
        }
        frozen.since = Instant::now();
        tracing::debug!("freeze: froze {}", frozen.describe());
        Ok(frozen)
    }

    /// The mountpoints, for messages.
    pub fn describe(&self) -> String {
        self.frozen
            .iter()
            .map(|m| m.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How long the filesystems have been frozen.
    pub fn held_for(&self) -> Duration {
        self.since.elapsed()
    }

    /// Thaws everything, tells the guardian, prints what stderr held, and
    /// returns how long it was frozen.
    /// An error is a [`ThawError`] (anyhow until the imaging run's errors
    /// are typed).
    pub fn thaw(mut self) -> anyhow::Result<Duration> {
        let held = self.since.elapsed();
        let errors = self.thaw_all();
        if errors.is_empty() {
            Ok(held)
        } else {
            Err(ThawError { errors }.into())
        }
    }

    fn thaw_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        // Thaw in reverse order of freezing.
        while let Some(mount) = self.frozen.pop() {
            if let Err(error) = thaw_fs(&mount.dir) {
                errors.push(format!(
                    "cannot thaw {}: {error}; thaw it with `fsfreeze -u {}`",
                    mount.path.display(),
                    mount.path.display()
                ));
            }
        }
        if let Some(guardian) = self.guardian.take()
            && let Err(error) = guardian.disarm()
        {
            errors.push(format!("{error:#}"));
        }
        if let Some(stderr) = self.stderr.take()
            && let Err(error) = stderr.release()
        {
            errors.push(format!("{error:#}"));
        }
        errors
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for error in self.thaw_all() {
            tracing::error!("hot-clone: ERROR: {error}");
        }
    }
}

/// The guardian process, from the imager's side.
struct Guardian {
    child: Child,
    to: Option<ChildStdin>,
    from: BufReader<ChildStdout>,
}

impl Guardian {
    /// Starts `hot-clone freeze-guardian` for `mounts` and waits until it
    /// holds them.
    fn start(mounts: &[Mount]) -> anyhow::Result<Guardian> {
        let mut command = Command::new("/proc/self/exe");
        command
            .arg("freeze-guardian")
            .arg("--parent")
            .arg(std::process::id().to_string());
        for mount in mounts {
            command.arg(mount.dev.to_string()).arg(&mount.mountpoint);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = command.spawn().context(
            "cannot start the freeze guardian (hot-clone freeze-guardian), which thaws the filesystems if this run dies; not freezing",
        )?;
        let to = child.stdin.take().expect("piped");
        let from = BufReader::new(child.stdout.take().expect("piped"));
        let mut guardian = Guardian {
            child,
            to: Some(to),
            from,
        };
        let line = guardian.read_line(GUARDIAN_READY_WAIT_MS)?;
        if line.trim_end() != "ready" {
            guardian.stop();
            bail!(
                "the freeze guardian did not start: {}; not freezing",
                if line.is_empty() {
                    "it ended without a word".to_string()
                } else {
                    line.trim_end().to_string()
                }
            );
        }
        Ok(guardian)
    }

    fn read_line(&mut self, wait_ms: u16) -> anyhow::Result<String> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.from.get_ref().as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(wait_ms))
            .context("cannot wait for the freeze guardian")?;
        if ready == 0 {
            self.stop();
            bail!(
                "the freeze guardian did not answer within {} s; not freezing",
                wait_ms / 1000
            );
        }
        let mut line = String::new();
        self.from
            .read_line(&mut line)
            .context("cannot read from the freeze guardian")?;
        Ok(line)
    }

    /// From now on the guardian thaws if this process dies.
    fn arm(&mut self) -> anyhow::Result<()> {
        let to = self.to.as_mut().expect("armed once");
        to.write_all(b"freezing\n")
            .and_then(|()| to.flush())
            .context("the freeze guardian ended before the freeze; not freezing")
    }

    /// Everything is thawed: the guardian ends without thawing; reaped.
    fn disarm(mut self) -> anyhow::Result<()> {
        let told = self.to.take().map(|mut to| to.write_all(b"thawed\n"));
        let status = self
            .child
            .wait()
            .context("cannot reap the freeze guardian")?;
        match told {
            Some(Ok(())) if status.success() => Ok(()),
            _ => bail!(
                "the freeze guardian ended early ({status}); the filesystems were thawed by this run"
            ),
        }
    }

    /// Ends a guardian that was never armed, and reaps it.
    fn stop(&mut self) {
        self.to = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stderr pointed at an in-memory file while frozen.
struct HeldStderr {
    real: OwnedFd,
    memory: File,
}

impl HeldStderr {
    fn start() -> anyhow::Result<HeldStderr> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let real = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate stderr to hold it while frozen")?;
        let memory = File::from(
            memfd_create("hot-clone-stderr", MFdFlags::MFD_CLOEXEC)
                .context("cannot make an in-memory file to hold stderr while frozen")?,
        );
        nix::unistd::dup2_stderr(&memory).context("cannot hold stderr while frozen")?;
        Ok(HeldStderr { real, memory })
    }

    /// Points stderr back and prints what it held.
    fn release(mut self) -> anyhow::Result<()> {
        nix::unistd::dup2_stderr(&self.real).context("cannot restore stderr after the thaw")?;
        self.memory.rewind()?;
        let mut held = Vec::new();
        self.memory.read_to_end(&mut held)?;
        io::stderr()
            .write_all(&held)
            .context("cannot print what stderr held while frozen")
    }
}

/// `hot-clone freeze-guardian --parent PID DEV MOUNTPOINT...` (started by
/// [`Frozen::freeze`], not by hand): see the module documentation.
pub fn guardian_main(parent: u32, items: &[std::ffi::OsString]) -> ExitCode {
    // Stop signals stay pending, never delivered: only SIGKILL ends it.
    let mut blocked = nix::sys::signal::SigSet::empty();
    for signal in crate::signals::STOP_SIGNALS {
        blocked.add(signal);
    }
    let _ = blocked.thread_block();
    // SAFETY: close_range on descriptors this fresh process inherited and
    // does not use (std holds none open at this point).
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut out = io::stdout();
    let dirs = match guardian_open(items) {
        Ok(dirs) => dirs,
        Err(error) => {
            let _ = writeln!(out, "{error:#}");
            return ExitCode::FAILURE;
        }
    };
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    let mut armed = false;
    // The descriptor itself, unbuffered: poll must see every unread byte.
    let Ok(mut input) = io::stdin().as_fd().try_clone_to_owned().map(File::from) else {
        return ExitCode::FAILURE;
    };
    let mut buf = [0u8; 64];
    let mut line = Vec::with_capacity(buf.len());
    // Runs until the imager says "thawed", closes the pipe, or dies: no
    // other bound, on purpose.
    loop {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(GUARDIAN_POLL_MS)).unwrap_or(0);
        let gone = if ready == 0 {
            std::os::unix::process::parent_id() != parent
        } else {
            match input.read(&mut buf) {
                Ok(0) => true,
                Ok(n) => {
                    for &byte in &buf[..n] {
                        if byte != b'\n' {
                            line.push(byte);
                            continue;
                        }
                        match &line[..] {
                            b"freezing" => armed = true,
                            b"thawed" => return ExitCode::SUCCESS,
                            _ => {}
                        }
                        line.clear();
                    }
                    line.truncate(buf.len());
                    false
                }
                Err(error) => error.kind() != io::ErrorKind::Interrupted,
            }
        };
        if gone {
            if armed {
                guardian_thaw(parent, &dirs);
            }
            return ExitCode::SUCCESS;
        }
    }
}

/// Opens each `DEV MOUNTPOINT` pair and checks the descriptor is on DEV.
fn guardian_open(items: &[std::ffi::OsString]) -> anyhow::Result<Vec<(File, PathBuf)>> {
    if items.is_empty() || !items.len().is_multiple_of(2) {
        bail!("freeze-guardian: expected DEV MOUNTPOINT pairs");
    }
    let mut dirs = Vec::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        let dev = pair[0]
            .to_str()
            .and_then(DevNum::parse)
            .with_context(|| format!("freeze-guardian: {:?} is no MAJOR:MINOR", pair[0]))?;
        let path = PathBuf::from(&pair[1]);
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("freeze-guardian: cannot open {}", path.display()))?;
        let meta = dir
            .metadata()
            .with_context(|| format!("freeze-guardian: cannot stat {}", path.display()))?;
        if DevNum::from_rdev(meta.dev()) != dev {
            bail!(
                "freeze-guardian: {} is no longer the filesystem on {dev}",
                path.display()
            );
        }
        dirs.push((dir, path));
    }
    Ok(dirs)
}

/// The imager died while frozen: thaw, and say so in the kernel log (the
/// one place that is neither the imager's stderr nor a filesystem).
fn guardian_thaw(parent: u32, dirs: &[(File, PathBuf)]) {
    let mut kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    for (dir, path) in dirs.iter().rev() {
        let outcome = match thaw_fs(dir) {
            Ok(()) => "thawed it".to_string(),
            Err(error) => format!("FITHAW: {error}"),
        };
        if let Some(kmsg) = kmsg.as_mut() {
            // One write: each write(2) to /dev/kmsg is one record.
            let line = format!(
                "hot-clone freeze guardian: the imager (pid {parent}) ended while {} was frozen; {outcome}\n",
                path.display()
            );
            let _ = kmsg.write_all(line.as_bytes());
        }
    }
}

/// Whether `path` (or, if it does not exist, its parent) is on one of the
/// filesystems in `mounts`.
pub fn is_on(path: &Path, mounts: &[Mount]) -> bool {
    crate::source::blockdev::device_for_new_file(path)
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
    fn thaw_errors_join_in_one_message() {
        let error = anyhow::Error::from(ThawError {
            errors: vec![
                "cannot thaw /mnt/a: EIO".to_string(),
                "guardian".to_string(),
            ],
        });
        assert_eq!(error.to_string(), "cannot thaw /mnt/a: EIO; guardian");
        assert!(error.downcast_ref::<ThawError>().is_some());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
