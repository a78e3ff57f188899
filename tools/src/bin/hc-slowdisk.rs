//! `hc-slowdisk MOUNTPOINT --backing FILE`: a slow, faulty disk for tests.
//!
//! Serves one file, `MOUNTPOINT/disk`, over FUSE, with the size and content
//! of FILE. Every write (and fallocate: a loop device's discard or
//! write-zeroes) completes only after `--write-delay`, and its data reaches
//! FILE only then, so a loop device over `MOUNTPOINT/disk` has writes in
//! flight for that long and a read meanwhile returns the old data — the
//! race a live imager's catch-up must survive. `--eio START..END` makes
//! reads (and with `--eio-writes`, writes) that touch the range fail with
//! EIO. `--eio-file F` adds the ranges listed in F (one START..END a line)
//! and re-reads F every 50 ms, so a range can start (or stop) failing while
//! the disk is in use: a block that turns bad after an imager's main pass.
//! The file is opened with FOPEN_DIRECT_IO, so no page cache sits between
//! the loop device and this server.
//!
//! Mounts with the mount(2) syscall (needs root; no fusermount). Runs until
//! SIGINT/SIGTERM, then unmounts.

use anyhow::{Context, bail};
use clap::Parser;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(
    name = "hc-slowdisk",
    about = "Serve a file over FUSE whose writes complete late and whose chosen ranges fail with EIO"
)]
struct Args {
    /// Where to mount; the disk appears as MOUNTPOINT/disk.
    mountpoint: PathBuf,
    /// The file whose size and content the disk has.
    #[arg(long)]
    backing: PathBuf,
    /// How long every write (and fallocate) takes to complete, e.g. 50 (ms).
    #[arg(long, default_value_t = 50, value_name = "MS")]
    write_delay_ms: u64,
    /// A byte range START..END (sizes like 1M accepted) where I/O fails
    /// with EIO; repeatable.
    #[arg(long = "eio", value_name = "START..END", value_parser = parse_range)]
    eio: Vec<(u64, u64)>,
    /// Fail writes in the --eio ranges too (reads always fail there).
    #[arg(long)]
    eio_writes: bool,
    /// More EIO ranges, one START..END a line, re-read every 50 ms while the
    /// disk runs (a missing or empty file: none). --eio-writes applies to
    /// them too.
    #[arg(long, value_name = "FILE")]
    eio_file: Option<PathBuf>,
}

/// The ranges listed in an --eio-file's text.
fn parse_ranges(text: &str) -> Result<Vec<(u64, u64)>, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(parse_range)
        .collect()
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?}: expected START..END"))?;
    let start = hot_clone::cli::parse_bytes(start)?;
    let end = hot_clone::cli::parse_bytes(end)?;
    if end <= start {
        return Err(format!("{text:?}: END must be above START"));
    }
    Ok((start, end))
}

const DISK_INODE: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

struct SlowDisk {
    backing: Arc<File>,
    size: u64,
    write_delay: Duration,
    /// The --eio ranges, then those of the --eio-file as last read.
    eio: Arc<RwLock<Vec<(u64, u64)>>>,
    eio_writes: bool,
}

impl SlowDisk {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.size, 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    fn faulty(&self, offset: u64, len: u64) -> bool {
        self.eio
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|&(start, end)| offset < end && start < offset.saturating_add(len))
    }
}

impl Filesystem for SlowDisk {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Asynchronous direct I/O: a loop device's reads and writes are then
        // in flight together instead of one after the other. Best effort.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "disk" {
            reply.entry(&TTL, &self.attr(DISK_INODE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == DISK_INODE {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == DISK_INODE {
            // Parallel direct writes: the kernel then takes the inode lock
            // shared for writes, so a read is not queued behind a slow write.
            reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            );
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if self.faulty(offset, u64::from(size)) {
            reply.error(Errno::EIO);
            return;
        }
        let len = u64::from(size).min(self.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match self.backing.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(error) => reply.error(Errno::from(error)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.eio_writes && self.faulty(offset, data.len() as u64) {
            reply.error(Errno::EIO);
            return;
        }
        if offset.saturating_add(data.len() as u64) > self.size {
            reply.error(Errno::from_i32(libc::ENOSPC));
            return;
        }
        // Completes (and lands) only after the delay, off the FUSE thread,
        // so that many writes can be in flight at once and reads go on.
        let (backing, delay, data) = (Arc::clone(&self.backing), self.write_delay, data.to_vec());
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            match backing.write_all_at(&data, offset) {
                Ok(()) => reply.written(data.len() as u32),
                Err(error) => reply.error(Errno::from(error)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.eio_writes && self.faulty(offset, length) {
            reply.error(Errno::EIO);
            return;
        }
        let (backing, delay) = (Arc::clone(&self.backing), self.write_delay);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: fallocate on our own descriptor; no memory passed.
            let rc =
                unsafe { libc::fallocate(backing.as_raw_fd(), mode, offset as i64, length as i64) };
            if rc == 0 {
                reply.ok();
            } else {
                reply.error(Errno::from(std::io::Error::last_os_error()));
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(Errno::from(error)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INODE, FileType::RegularFile, "disk"),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> std::process::ExitCode {
    hot_clone::exit::tool_exit("hc-slowdisk", run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<()> {
    hot_clone::signals::install();
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.backing)
        .with_context(|| format!("cannot open {}", args.backing.display()))?;
    let size = backing.metadata()?.len();
    if size == 0 {
        bail!("{} is empty", args.backing.display());
    }
    let eio = Arc::new(RwLock::new(args.eio.clone()));
    let read_eio_file = |path: &PathBuf| -> anyhow::Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    };
    let mut eio_file_text = None;
    let mut apply_eio_file = |text: Option<String>| -> anyhow::Result<()> {
        if text == eio_file_text {
            return Ok(());
        }
        let mut ranges = args.eio.clone();
        ranges.extend(parse_ranges(text.as_deref().unwrap_or("")).map_err(anyhow::Error::msg)?);
        *eio.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ranges;
        eio_file_text = text;
        Ok(())
    };
    if let Some(path) = &args.eio_file {
        apply_eio_file(read_eio_file(path)?)?;
    }
    let disk = SlowDisk {
        backing: Arc::new(backing),
        size,
        write_delay: Duration::from_millis(args.write_delay_ms),
        eio: Arc::clone(&eio),
        eio_writes: args.eio_writes,
    };
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("hc-slowdisk".into())];
    config.n_threads = Some(4);
    let session = fuser::spawn_mount(disk, &args.mountpoint, &config)
        .with_context(|| format!("cannot mount FUSE on {}", args.mountpoint.display()))?;
    eprintln!(
        "hc-slowdisk: serving {}/disk ({size} bytes, writes complete after {} ms)",
        args.mountpoint.display(),
        args.write_delay_ms
    );
    while !hot_clone::signals::interrupted() {
        if session.guard.is_finished() {
            bail!("the FUSE session ended");
        }
        if let Some(path) = &args.eio_file {
            apply_eio_file(read_eio_file(path)?)?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    session
        .umount_and_join()
        .with_context(|| format!("cannot unmount {}", args.mountpoint.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eio_files_list_ranges_a_line() {
        assert_eq!(parse_ranges(""), Ok(vec![]));
        assert_eq!(
            parse_ranges("4096..8192\n\n 1M..2M \n"),
            Ok(vec![(4096, 8192), (1 << 20, 2 << 20)])
        );
        assert!(parse_ranges("8192..4096").is_err());
        assert!(parse_ranges("4096").is_err());
    }
}
