//! Where an image goes, and the guard that keeps it off the device being
//! imaged.
//!
//! Every check is made on what was opened (`fstat` of the descriptor, or of
//! the directory descriptor a new file is made in), never on a path looked
//! up earlier, so a rename between check and open cannot walk around it:
//!
//! - The output is resolved to the block devices that hold it and refused
//!   if it overlaps the source in any way [`topology::find_overlap`] knows:
//!   the same device, a disk and its partitions, a filesystem and its
//!   device (via mountinfo where `st_dev` is no block device), stacked
//!   devices (sysfs holders/slaves), loop devices and their backing files.
//! - A block device is opened with `O_EXCL`, so the kernel refuses it while
//!   it is mounted or held, and refused when it (or a partition) is mounted,
//!   swap or held ([`blockdev::uses_of`]).
//! - A new regular file is not made on devtmpfs (`/dev/sdX` mistyped).
//! - `-o FILE` is written as `.FILE.hc-partial-PID` beside FILE, mode 0600,
//!   and renamed onto FILE only by [`Placement::commit`]; dropped without
//!   it, the temporary is removed and an earlier FILE is left as it was.
//! - The last path component is never followed if it is a symbolic link.
//!
//! `--force` turns every refusal off (and opens a block device without
//! `O_EXCL`, and follows a link).

use crate::dropbehind::{DropBehind, DropFailed};
use crate::image::Output;
use crate::source::SourceDevice;
use crate::source::blockdev::{self, DevNum};
use crate::source::topology::{self, FileId, Place, View};
use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The pipe size asked for when the image goes to a pipe.
const PIPE_BYTES_WANTED: libc::c_int = 4 << 20;

/// What has to happen once the image is complete: a temporary file renamed
/// into place, an exclusive claim on a block device released. Dropped
/// without [`Placement::commit`], the temporary is removed.
#[derive(Debug)]
pub struct Placement {
    pending: Option<Pending>,
    /// Keeps a block device behind standard output claimed (`O_EXCL`)
    /// while the image is written through the inherited descriptor.
    _claim: Option<File>,
}

impl Placement {
    /// Makes the written image FILE: syncs it, renames the temporary onto
    /// FILE and syncs the directory, so the name is durable too. The image,
    /// synced by now, leaves the page cache ([`crate::dropbehind`]).
    pub fn commit(mut self, file: &File) -> anyhow::Result<()> {
        // Without a temporary, the run synced the output (`finish_image`)
        // before its trailer counted.
        if let Some(pending) = self.pending.take() {
            pending.commit(file)?;
        }
        if DropBehind::for_file(file).is_some() {
            // Advice: a failure only leaves pages cached.
            let _ = DropBehind::drop_synced(file);
        }
        Ok(())
    }
}

/// A temporary `.NAME.hc-partial-PID` in an open directory.
#[derive(Debug)]
struct Pending {
    dir: File,
    temp: CString,
    name: CString,
    /// FILE as given, for messages.
    path: PathBuf,
    committed: bool,
}

impl Pending {
    /// Creates the temporary beside `name` in `dir`, mode 0600 whatever the
    /// umask or an earlier FILE's mode.
    fn create(dir: File, name: &OsStr, path: &Path) -> anyhow::Result<(File, Pending)> {
        let mut temp = std::ffi::OsString::from(".");
        temp.push(name);
        temp.push(format!(".hc-partial-{}", std::process::id()));
        let temp_path = path.with_file_name(&temp);
        let temp = c_name(&temp)?;
        let file = open_at(
            &dir,
            &temp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
        .with_context(|| format!("cannot create {}", temp_path.display()))?;
        let pending = Pending {
            dir,
            temp,
            name: c_name(name)?,
            path: path.to_path_buf(),
            committed: false,
        };
        nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(0o600))
            .map_err(io::Error::from)
            .with_context(|| format!("cannot set mode 0600 on {}", temp_path.display()))?;
        Ok((file, pending))
    }

    fn temp_path(&self) -> PathBuf {
        self.path
            .with_file_name(OsStr::from_bytes(self.temp.as_bytes()))
    }

    fn commit(mut self, file: &File) -> anyhow::Result<()> {
        file.sync_all()
            .with_context(|| format!("cannot flush {} to disk", self.temp_path().display()))?;
        let renamed = nix::fcntl::renameat(
            &self.dir,
            self.temp.as_c_str(),
            &self.dir,
            self.name.as_c_str(),
        );
        if let Err(errno) = renamed {
            return Err(io::Error::from(errno)).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    self.temp_path().display(),
                    self.path.display()
                )
            });
        }
        self.committed = true;
        self.dir.sync_all().with_context(|| {
            format!(
                "cannot flush the directory of {} to disk after renaming it into place",
                self.path.display()
            )
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                self.temp.as_c_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// A character device (/dev/null), a FIFO or a socket at `name` in `dir`,
/// opened to be written in place.
fn special_at(dir: &File, name: &CString, shown: &str) -> anyhow::Result<(File, Placement)> {
    let file = open_at(
        dir,
        name,
        libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .with_context(|| format!("cannot open {shown} for writing"))?;
    if file.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        grow_pipe(&file);
    }
    let placement = Placement {
        pending: None,
        _claim: None,
    };
    Ok((file, placement))
}

/// Opens where the image goes, refusing a place that overlaps the device
/// being imaged or is in use (unless `force`).
pub fn open(
    output: &Output,
    device: &SourceDevice,
    force: bool,
) -> anyhow::Result<(File, Placement)> {
    let guard = Guard {
        view: View::read(),
        source: device.dev,
        source_name: device.path.display().to_string(),
        force,
    };
    match output {
        Output::Stdout => guard.stdout(),
        Output::File(path) => guard.file(path, LINK_HOPS_MAX),
    }
}

/// `--force` follows a symbolic link; a chain of them at most this long.
const LINK_HOPS_MAX: u32 = 8;

struct Guard {
    view: View,
    source: DevNum,
    source_name: String,
    force: bool,
}

impl Guard {
    fn stdout(&self) -> anyhow::Result<(File, Placement)> {
        let name = "standard output";
        let fd = io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot use standard output")?;
        let file = File::from(fd);
        let meta = file.metadata().context("cannot stat standard output")?;
        let kind = meta.file_type();
        let mut claim = None;
        if kind.is_fifo() {
            grow_pipe(&file);
        } else if kind.is_block_device() {
            let dev = DevNum::from_rdev(meta.rdev());
            self.refuse_overlap(name, Place::Block(dev))?;
            self.refuse_in_use(name, dev)?;
            if !self.force {
                // Claim the device the shell opened for us, exclusively,
                // through our own descriptor of it.
                let held = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
                    .open("/proc/self/fd/1")
                    .map_err(|e| self.busy(name, dev, e))?;
                let held_meta = held.metadata().context("cannot stat standard output")?;
                if held_meta.rdev() != meta.rdev() {
                    bail!("standard output changed while it was being checked; run again");
                }
                claim = Some(held);
            }
        } else if kind.is_file() {
            let st_dev = DevNum::from_rdev(meta.dev());
            if !self.force && self.view.fs_type_of(st_dev) == Some("devtmpfs") {
                bail!(
                    "refusing to write the image to standard output: it is a regular file in the kernel's device directory (devtmpfs), most likely made by the shell for a mistyped device name; remove it, check the name with lsblk, or use --force to write there anyway"
                );
            }
            self.refuse_overlap(name, Place::File(FileId::of(&meta)))?;
        }
        Ok((
            file,
            Placement {
                pending: None,
                _claim: claim,
            },
        ))
    }

    fn file(&self, path: &Path, links_left: u32) -> anyhow::Result<(File, Placement)> {
        let (dir, name) = open_parent(path)?;
        let shown = path.display().to_string();
        let c = c_name(name)?;
        let existing = stat_at(&dir, &c).with_context(|| format!("cannot stat {shown}"))?;
        let kind = existing.as_ref().map(|st| st.st_mode & libc::S_IFMT);
        match kind {
            Some(libc::S_IFLNK) => {
                let target = refuse_link(path, "the image", "-o", self.force)?;
                if links_left == 0 {
                    bail!("{shown}: too many symbolic links");
                }
                return self.file(&target, links_left - 1);
            }
            Some(libc::S_IFDIR) => {
                bail!("cannot write the image to {shown}: it is a directory; give a file name")
            }
            Some(libc::S_IFBLK) => return self.block_at(&dir, &c, &shown),
            Some(libc::S_IFREG) | None => {}
            // A character device (/dev/null), a FIFO, a socket: written in
            // place, holding no block device.
            Some(_) => return special_at(&dir, &c, &shown),
        }
        // Checked before anything is made: the directory the entry goes in.
        let dir_meta = dir
            .metadata()
            .with_context(|| format!("cannot stat the directory of {shown}"))?;
        let dir_dev = DevNum::from_rdev(dir_meta.dev());
        if !self.force && self.view.fs_type_of(dir_dev) == Some("devtmpfs") {
            let dir_shown = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .display();
            bail!(
                "refusing to create {shown}: {dir_shown} is the kernel's device directory (devtmpfs), and there is no device by that name, so it is most likely a mistyped device name; check it with lsblk, or use --force to create a regular file there anyway"
            );
        }
        let ino = existing.as_ref().map_or(0, |st| st.st_ino);
        self.refuse_overlap(&shown, Place::File(FileId { dev: dir_dev, ino }))?;
        let (file, pending) = Pending::create(dir, name, path)?;
        // And again on the descriptor of what was made.
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", pending.temp_path().display()))?;
        self.refuse_overlap(&shown, Place::File(FileId::of(&meta)))?;
        let placement = Placement {
            pending: Some(pending),
            _claim: None,
        };
        Ok((file, placement))
    }

    /// An existing block device named by `-o`: opened exclusively, then
    /// checked by what the descriptor is.
    fn block_at(
        &self,
        dir: &File,
        name: &CString,
        shown: &str,
    ) -> anyhow::Result<(File, Placement)> {
        let exclusive = if self.force { 0 } else { libc::O_EXCL };
        let flags = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | exclusive;
        let file = match open_at(dir, name, flags, 0) {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                // Say who holds it: look at it without claiming it.
                let peek = open_at(
                    dir,
                    name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0,
                )
                .with_context(|| format!("cannot open {shown}"))?;
                let dev = DevNum::from_rdev(peek.metadata()?.rdev());
                return Err(self.busy(shown, dev, error));
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot open {shown} for writing"));
            }
        };
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {shown}"))?;
        if !meta.file_type().is_block_device() {
            bail!("{shown} changed while it was being opened; run again");
        }
        let dev = DevNum::from_rdev(meta.rdev());
        self.refuse_overlap(shown, Place::Block(dev))?;
        self.refuse_in_use(shown, dev)?;
        let placement = Placement {
            pending: None,
            _claim: None,
        };
        Ok((file, placement))
    }

    fn refuse_overlap(&self, name: &str, place: Place) -> anyhow::Result<()> {
        if self.force {
            return Ok(());
        }
        if let Some(overlap) =
            topology::find_overlap(&self.view, place, self.source, &self.source_name)
        {
            bail!(
                "refusing to write the image to {name}: {}, so writing the image there would change what is being imaged; use --force to do it anyway",
                overlap.text
            );
        }
        Ok(())
    }

    /// A block device (or a partition of it) mounted, swap, or held.
    fn refuse_in_use(&self, name: &str, dev: DevNum) -> anyhow::Result<()> {
        if self.force {
            return Ok(());
        }
        let uses = blockdev::uses_with_partitions(dev);
        if !uses.is_empty() {
            bail!(
                "refusing to write the image to {name}: it is in use ({}), and writing onto it would corrupt what uses it; unmount it (or swapoff, or stop the holder) first, or use --force to do it anyway",
                uses.join("; ")
            );
        }
        Ok(())
    }

    /// The error for a block device the kernel would not open exclusively.
    fn busy(&self, name: &str, dev: DevNum, error: io::Error) -> anyhow::Error {
        let uses = blockdev::uses_with_partitions(dev);
        let why = if uses.is_empty() {
            "another program has it open exclusively".to_string()
        } else {
            uses.join("; ")
        };
        anyhow::anyhow!(
            "refusing to write the image to {name}: the kernel refused to open it exclusively ({error}): {why}; stop what uses it first, or use --force to do it anyway"
        )
    }
}

/// `--stats-json` and such: written as a 0600 temporary beside `path` and
/// renamed onto it, never through a symbolic link (unless `force`).
pub fn write_atomically(path: &Path, bytes: &[u8], flag: &str, force: bool) -> anyhow::Result<()> {
    let mut path = path.to_path_buf();
    for _ in 0..=LINK_HOPS_MAX {
        let (dir, name) = open_parent(&path)?;
        let c = c_name(name)?;
        let existing =
            stat_at(&dir, &c).with_context(|| format!("cannot stat {}", path.display()))?;
        match existing.map(|st| st.st_mode & libc::S_IFMT) {
            Some(libc::S_IFLNK) => {
                path = refuse_link(&path, "the run statistics", flag, force)?;
                continue;
            }
            Some(libc::S_IFREG) | None => {
                let (mut file, pending) = Pending::create(dir, name, &path)?;
                file.write_all(bytes)
                    .with_context(|| format!("cannot write {}", pending.temp_path().display()))?;
                return pending.commit(&file);
            }
            Some(libc::S_IFDIR) => bail!(
                "cannot write {flag} to {}: it is a directory",
                path.display()
            ),
            // Never written in place, not even with --force: it may be the
            // source (`--stats-json /dev/sdb1` while imaging /dev/sdb1), and
            // a statistics file has no business on any block device.
            Some(libc::S_IFBLK) => bail!(
                "refusing to write {flag} to {}: it is a block device; give a file name",
                path.display()
            ),
            // /dev/stdout's target, a FIFO: written in place.
            Some(_) => {
                let mut file = open_at(
                    &dir,
                    &c,
                    libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0,
                )
                .with_context(|| format!("cannot open {} for writing", path.display()))?;
                return file
                    .write_all(bytes)
                    .with_context(|| format!("cannot write {}", path.display()));
            }
        }
    }
    bail!("{}: too many symbolic links", path.display())
}

/// A symbolic link where a file is to be written: refused, or with `force`
/// the path it points to.
fn refuse_link(path: &Path, what: &str, flag: &str, force: bool) -> anyhow::Result<PathBuf> {
    let target =
        fs::read_link(path).with_context(|| format!("cannot read the link {}", path.display()))?;
    if !force {
        bail!(
            "refusing to write {what} to {}: it is a symbolic link (to {}), and {flag} does not follow links, so that a link planted in a shared directory cannot send the write elsewhere; give the link's target, or use --force to follow it",
            path.display(),
            target.display()
        );
    }
    Ok(match path.parent() {
        Some(parent) if target.is_relative() => parent.join(target),
        _ => target,
    })
}

/// The directory `path` names its entry in, opened, and the entry's name.
fn open_parent(path: &Path) -> anyhow::Result<(File, &OsStr)> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let dir_file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .with_context(|| {
            format!(
                "cannot open the directory {} to write {}",
                dir.display(),
                path.display()
            )
        })?;
    Ok((dir_file, name))
}

fn c_name(name: &OsStr) -> anyhow::Result<CString> {
    CString::new(name.as_bytes()).with_context(|| format!("{name:?}: a file name with a NUL byte"))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; None if there is no entry.
fn stat_at(dir: &File, name: &CString) -> io::Result<Option<libc::stat>> {
    match nix::sys::stat::fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(errno) => Err(errno.into()),
    }
}

/// `openat(dir, name, flags, mode)`.
fn open_at(dir: &File, name: &CString, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let fd = nix::fcntl::openat(
        dir,
        name.as_c_str(),
        OFlag::from_bits_retain(flags),
        Mode::from_bits_truncate(mode),
    )?;
    Ok(File::from(fd))
}

/// A pipe of 64 KiB (the default) wakes its reader 16 times per 1 MiB read;
/// grow it to `/proc/sys/fs/pipe-max-size` (1 MiB by default). Measured in
/// PERF.md ("Output to a pipe"). Failure only costs speed.
fn grow_pipe(pipe: &File) {
    let max = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|text| text.trim().parse::<libc::c_int>().ok())
        .unwrap_or(1 << 20)
        .min(PIPE_BYTES_WANTED);
    let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(max));
}

/// How long a write to a pipe waits for room before it looks at the signal
/// flag again.
const PIPE_WAIT_SLICE_MS: u16 = 100;

/// The image's output descriptor as the run writes it.
///
/// - **A stalled reader cannot pin the run.** A pipe or socket is written
///   with `pwritev2(RWF_NOWAIT)`: the kernel's `pipe_write` returns EAGAIN
///   instead of sleeping when the pipe is full (`IOCB_NOWAIT`), without
///   setting `O_NONBLOCK` on a file description the shell shares. The
///   writer then polls for room in slices of 100 ms and stops once a signal
///   has arrived, so `hot-clone image | sleep 1000` ends on SIGINT. A
///   reader that is merely slow is waited for as long as it takes: that
///   wait has no bound, on purpose.
/// - **Errors name the place and the byte.** A failed write (ENOSPC,
///   EDQUOT, EIO, EPIPE) says which output and at which byte of the image
///   stream it failed ([`OutputFailed`]).
/// - **The image does not fill the page cache.** Written to a regular file
///   or a block device, every 16 MiB is handed to writeback and dropped
///   from the cache 8 windows later ([`DropBehind`]); a writeback error is
///   a write error of the output like any other.
/// - **Held while frozen.** Between [`ImageOut::hold`] and
///   [`ImageOut::release`] bytes are kept in memory, bounded, in order, so
///   nothing is written while `--freeze` holds filesystems frozen (the
///   output, or a pipe's consumer, could be waiting on one of them).
#[derive(Debug)]
pub struct ImageOut {
    file: File,
    name: String,
    nowait: bool,
    /// Bytes of the image stream that reached the output.
    written_bytes: u64,
    held: Option<Vec<u8>>,
    /// None for a pipe, a socket, a character device.
    drop_behind: Option<DropBehind>,
}

/// A write to the image's output failed; the cause is the error's source.
#[derive(Debug)]
pub struct OutputFailed {
    pub name: String,
    /// Byte offset in the image stream of the first byte not written.
    pub offset_bytes: u64,
    cause: OutputCause,
}

#[derive(Debug)]
enum OutputCause {
    Io(io::Error),
    /// A signal arrived while the output's reader was not reading.
    Interrupted(crate::signals::Interrupted),
    /// More held than the bound (a bug of the caller's check).
    HoldFull(usize),
    /// Writing back what was written failed (drop-behind's sync).
    Writeback(DropFailed),
}

impl std::fmt::Display for OutputFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writing the image to {} stopped at byte {} of the image",
            self.name, self.offset_bytes
        )?;
        let os_error = match &self.cause {
            OutputCause::Io(error) => error.raw_os_error(),
            OutputCause::Writeback(failed) => failed.error.raw_os_error(),
            OutputCause::Interrupted(_) => {
                return f.write_str(" (its reader was not reading)");
            }
            OutputCause::HoldFull(max) => {
                return write!(f, " (more than {max} bytes were held while frozen)");
            }
        };
        match os_error {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                f.write_str(" (no space left there: free some, or write the image elsewhere)")
            }
            Some(libc::EIO) => f.write_str(
                " (the storage under it reported an I/O error: check it, and write the image elsewhere)",
            ),
            Some(libc::EPIPE) => f.write_str(" (the reader of the pipe went away)"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for OutputFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            OutputCause::Io(error) => Some(error),
            OutputCause::Interrupted(interrupted) => Some(interrupted),
            OutputCause::HoldFull(_) => None,
            OutputCause::Writeback(failed) => Some(failed),
        }
    }
}

impl ImageOut {
    /// `name` is what messages call it ("standard output", the `-o` path).
    pub fn new(file: File, name: String) -> ImageOut {
        let kind = file.metadata().map(|m| m.file_type()).ok();
        let nowait = kind.is_some_and(|k| k.is_fifo() || k.is_socket());
        let drop_behind = DropBehind::for_file(&file);
        ImageOut {
            file,
            name,
            nowait,
            written_bytes: 0,
            held: None,
            drop_behind,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Keeps everything written from now on in memory, up to `bytes_max`
    /// (allocated now, once), until [`ImageOut::release`].
    pub fn hold(&mut self, bytes_max: usize) {
        assert!(self.held.is_none(), "the output is already held");
        self.held = Some(Vec::with_capacity(bytes_max));
    }

    /// Bytes held now (0 when not holding).
    pub fn held_bytes(&self) -> usize {
        self.held.as_ref().map_or(0, Vec::len)
    }

    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Writes out what was held, in order, and stops holding.
    pub fn release(&mut self) -> io::Result<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let mut rest = &held[..];
        while !rest.is_empty() {
            let n = self.write_out(rest)?;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn failed(&self, cause: OutputCause) -> io::Error {
        let (kind, offset_bytes) = match &cause {
            OutputCause::Io(error) => (error.kind(), self.written_bytes),
            // The first byte that may not have reached the storage.
            OutputCause::Writeback(failed) => (
                failed.error.kind(),
                failed.offset_bytes.min(self.written_bytes),
            ),
            _ => (io::ErrorKind::Other, self.written_bytes),
        };
        io::Error::new(
            kind,
            OutputFailed {
                name: self.name.clone(),
                offset_bytes,
                cause,
            },
        )
    }

    /// One write to the descriptor: at least one byte, or an error that is
    /// never `ErrorKind::Interrupted` (which `write_all` would retry).
    fn write_out(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let rc = if self.nowait {
                let iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: one iovec over `buf`, valid for the call; offset
                // -1 writes at the current position (a pipe has none).
                unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) }
            } else {
                // SAFETY: write from `buf`, valid for the call.
                unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) }
            };
            if rc > 0 {
                let n = rc as usize;
                self.written_bytes += n as u64;
                if let Some(drop_behind) = &mut self.drop_behind
                    && let Err(failed) = drop_behind.wrote(&self.file, n as u64)
                {
                    return Err(self.failed(OutputCause::Writeback(failed)));
                }
                return Ok(n);
            }
            if rc == 0 {
                let error = io::Error::from(io::ErrorKind::WriteZero);
                return Err(self.failed(OutputCause::Io(error)));
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) if self.nowait => self.wait_for_room()?,
                // A kernel without IOCB_NOWAIT for this kind of file.
                Some(libc::EOPNOTSUPP) if self.nowait => self.nowait = false,
                Some(libc::EINTR) => {}
                _ => return Err(self.failed(OutputCause::Io(error))),
            }
            if crate::signals::interrupted() {
                return Err(self.failed(OutputCause::Interrupted(crate::signals::Interrupted)));
            }
        }
    }

    fn wait_for_room(&self) -> io::Result<()> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(PIPE_WAIT_SLICE_MS)) {
            // Ready, timed out, or interrupted: the caller looks at the
            // signal flag and writes again (POLLERR shows as EPIPE there).
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(errno) => Err(self.failed(OutputCause::Io(io::Error::from(errno)))),
        }
    }
}

impl Write for ImageOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(held) = &mut self.held {
            if held.len() + buf.len() > held.capacity() {
                let max = held.capacity();
                return Err(self.failed(OutputCause::HoldFull(max)));
            }
            held.extend_from_slice(buf);
            return Ok(buf.len());
        }
        self.write_out(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
