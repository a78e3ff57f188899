//! Sensing I/O of anyone else on the disk being imaged, for the default
//! gentle imaging (`image::yielding`): a count that grows with every bio
//! somebody other than our readers submits to the disk, reads and writes
//! alike.
//!
//! With tracefs: a second private instance (named like the trace's, so
//! [`super::cleanup_stale_instances`] removes it after a crash) with only
//! `block_bio_queue` enabled, filtered in the kernel to the disk and to
//! submitters that are not our read threads. `block_bio_queue` fires in
//! `submit_bio_noacct_nocheck` in the submitter's context, and its `comm`
//! is the submitting task's: our readers are threads named
//! [`crate::engine::READ_THREAD_PREFIX`]`N`, and io_uring reads they punt
//! run on their io-wq workers, named `iou-wrk-<tid>` (`io_wq_worker`,
//! io_uring/io-wq.c). Nothing of the events is read: the instance's buffer
//! stays one page per CPU in overwrite mode, and the count is, per CPU,
//! `entries + overrun` of `per_cpu/cpuN/stats`, which is every event written
//! less those read (`rb_num_of_entries` in kernel/trace/ring_buffer.c), and
//! we read none. So the sensor costs one small file read per CPU per sample.
//!
//! What it cannot tell apart: another program's io_uring reads punted to
//! its io-wq workers look like ours (all `iou-wrk-*` are left out), so a
//! workload of only those is not yielded to.
//!
//! Without tracefs (the trace came from blktrace): `/sys/dev/block/M:m/stat`
//! of the disk, its writes, discards and flushes only — we never write the
//! source, so each of those is somebody else's, but reads there include
//! ours and cannot be told apart; [`DiskstatsWrites::blind_to_reads`] says so.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::sys::{self, pread_text, write_text};
use super::tracefs::{Instance, ensure_tracefs};
use super::{LiveError, TraceTarget};
use crate::trace::DevT;

/// Bytes of a `stat` file read at most.
const STATS_BYTES_MAX: usize = 1024;

/// A count of other programs' I/O on the disk that only grows.
pub trait ForegroundSensor: Send {
    /// The count now.
    fn count(&mut self) -> Result<u64, LiveError>;
    /// What the count leaves out that a user would expect it to see, if
    /// anything.
    fn blind_to_reads(&self) -> bool;
    /// How it senses, for `-v`.
    fn describe(&self) -> String;
}

/// The kernel filter: the disk's bios, not submitted by our readers.
pub fn filter_expression(disk: DevT) -> String {
    format!(
        "dev == {} && !(comm ~ \"{}*\") && !(comm ~ \"iou-wrk-*\")",
        disk.0,
        crate::engine::READ_THREAD_PREFIX
    )
}

/// The tracefs sensor (module documentation).
pub struct TracefsForeground {
    stats_files: Vec<(PathBuf, File)>,
    buf: Box<[u8]>,
    /// Last: removed once the files are closed.
    _instance: Instance,
}

impl TracefsForeground {
    pub fn open(target: &TraceTarget) -> Result<TracefsForeground, LiveError> {
        let root = ensure_tracefs()?;
        let event = root.join("events/block/block_bio_queue");
        if !event.is_dir() {
            return Err(LiveError::BlockEventsMissing { path: event });
        }
        let instance = Instance::create(&root)?;
        let dir = instance.path().to_path_buf();
        write_text(&dir.join("tracing_on"), "0")?;
        // The smallest buffer, overwritten: nothing is read from it.
        write_text(&dir.join("options/overwrite"), "1")?;
        write_text(&dir.join("buffer_size_kb"), "4")?;
        let event_dir = dir.join("events/block/block_bio_queue");
        write_text(&event_dir.join("filter"), &filter_expression(target.disk))?;
        write_text(&event_dir.join("enable"), "1")?;
        let mut stats_files = Vec::new();
        for cpu in sys::possible_cpus()? {
            let path = dir.join(format!("per_cpu/cpu{cpu}/stats"));
            let file =
                File::open(&path).map_err(|error| sys::io_error("cannot open", &path, error))?;
            stats_files.push((path, file));
        }
        write_text(&dir.join("tracing_on"), "1")?;
        Ok(TracefsForeground {
            stats_files,
            buf: vec![0; STATS_BYTES_MAX].into_boxed_slice(),
            _instance: instance,
        })
    }
}

impl ForegroundSensor for TracefsForeground {
    fn count(&mut self) -> Result<u64, LiveError> {
        let mut total = 0;
        for (path, file) in &self.stats_files {
            let text = pread_text(file, path, &mut self.buf)?;
            total += written_events(text).map_err(|message| LiveError::Parse {
                path: path.clone(),
                message,
            })?;
        }
        Ok(total)
    }

    fn blind_to_reads(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        "bios of other programs on the disk, from a tracefs instance".to_string()
    }
}

/// Events ever written to one CPU's buffer that nobody read: `entries` plus
/// `overrun` of its `stats` file.
pub fn written_events(stats: &str) -> Result<u64, String> {
    let mut entries = None;
    let mut overrun = None;
    for line in stats.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "entries" => &mut entries,
            "overrun" => &mut overrun,
            _ => continue,
        };
        *slot = Some(
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{key}: not a number: {value:?}"))?,
        );
    }
    match (entries, overrun) {
        (Some(entries), Some(overrun)) => Ok(entries + overrun),
        _ => Err("no `entries:` and `overrun:` lines".to_string()),
    }
}

/// The fallback sensor: the disk's writes, discards and flushes from its
/// `stat` file (Documentation/block/stat.rst).
pub struct DiskstatsWrites {
    path: PathBuf,
    file: File,
    buf: Box<[u8]>,
}

impl DiskstatsWrites {
    pub fn open(disk: DevT) -> Result<DiskstatsWrites, LiveError> {
        let path = PathBuf::from(format!(
            "/sys/dev/block/{}:{}/stat",
            disk.major(),
            disk.minor()
        ));
        let file = File::open(&path).map_err(|error| sys::io_error("cannot open", &path, error))?;
        Ok(DiskstatsWrites {
            path,
            file,
            buf: vec![0; STATS_BYTES_MAX].into_boxed_slice(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ForegroundSensor for DiskstatsWrites {
    fn count(&mut self) -> Result<u64, LiveError> {
        let text = pread_text(&self.file, &self.path, &mut self.buf)?;
        writes_of_diskstats(text).map_err(|message| LiveError::Parse {
            path: self.path.clone(),
            message,
        })
    }

    fn blind_to_reads(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("writes of the disk in {}", self.path.display())
    }
}

/// Write, discard and flush requests completed, from a `stat` line: fields
/// 5, 12 and 16 (the last two only on kernels that have them).
pub fn writes_of_diskstats(text: &str) -> Result<u64, String> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|field| {
            field
                .parse()
                .map_err(|_| format!("not a number: {field:?}"))
        })
        .collect::<Result<_, _>>()?;
    if fields.len() < 11 {
        return Err(format!("{} fields, expected at least 11", fields.len()));
    }
    Ok(fields[4] + fields.get(11).copied().unwrap_or(0) + fields.get(15).copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_leaves_out_our_readers_and_their_io_wq_workers() {
        assert_eq!(
            filter_expression(DevT(7 << 20)),
            "dev == 7340032 && !(comm ~ \"hc-read-*\") && !(comm ~ \"iou-wrk-*\")"
        );
    }

    #[test]
    fn written_events_are_entries_plus_overrun() {
        let stats = "entries: 12\noverrun: 30\ncommit overrun: 0\nbytes: 0\n\
                     oldest event ts:     0.000000\nnow ts: 18735.092143\n\
                     dropped events: 0\nread events: 0\n";
        assert_eq!(written_events(stats), Ok(42));
        assert!(written_events("entries: 1\n").is_err());
        assert!(written_events("entries: x\noverrun: 0\n").is_err());
    }

    #[test]
    fn diskstats_writes_count_writes_discards_and_flushes() {
        // 6.x: 17 fields.
        let line = "    100  0  800  5  7  0  56  3  0  9  8  2  0  16  1  4  1\n";
        assert_eq!(writes_of_diskstats(line), Ok(7 + 2 + 4));
        // Before discards (4.18) and flushes (5.5): 11 fields.
        assert_eq!(writes_of_diskstats("1 0 8 0 3 0 24 0 0 0 0"), Ok(3));
        assert!(writes_of_diskstats("1 2 3").is_err());
        assert!(writes_of_diskstats("1 0 8 0 x 0 24 0 0 0 0").is_err());
    }
}
