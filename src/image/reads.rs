//! What reaches the image: each completed read as a section (checksummed on
//! the reading thread), each range the device could not read as a `B:`
//! record, the `STATE:` record of an unconverged run.

use super::bad::BadMap;
use super::error::TooManyUnreadable;
use super::stats::{SalvageCounts, UNREADABLE_RANGES_LISTED, UnreadableStats};
use super::{ImageError, Run, Writer, lock, write_failed};
use crate::engine::{ReadDone, ReadStats, Salvage, Unreadable};
use crate::format::{RunState, crc32c_of};
use crate::geom::{ByteExtent, SECTOR_BYTES};
use crate::signals;
use anyhow::Context;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the last read of each block could not read (`bad.rs`), and the
/// salvage work that found it, under one lock.
#[derive(Default)]
pub(super) struct UnreadableRanges {
    pub map: BadMap,
    pub salvage: SalvageCounts,
}

impl Run<'_> {
    /// Writes to the image with `write`. A failed write breaks the stream
    /// (mid-record, perhaps): nothing more may be written to it, by this
    /// call or one on another thread, so the writer is dropped.
    pub(super) fn write_image<T>(
        &self,
        write: impl FnOnce(&Self, &mut Writer) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut guard = lock(&self.writer);
        let Some(writer) = guard.as_mut() else {
            return Err(write_failed());
        };
        write(self, writer).map_err(|error| self.output_broke(&mut guard, error))
    }

    /// Reads `extents` into the image; `progress` counts the bytes read.
    pub(super) fn read(
        &self,
        extents: &[ByteExtent],
        progress: Option<&AtomicU64>,
    ) -> anyhow::Result<ReadStats> {
        let deliver = |done: ReadDone<'_>| self.deliver(done);
        let report = |unreadable: Unreadable| self.report_unreadable(unreadable);
        let salvage = Salvage {
            retries: self.options.read_retries,
            report: &report,
        };
        match self.engine.read_extents_salvaging(
            extents,
            &deliver,
            Some(&salvage),
            progress,
            &self.stop,
        ) {
            Ok(stats) => {
                lock(&self.unreadable).salvage.add(&stats);
                Ok(stats)
            }
            Err(error) => {
                // A stop has a cause; report the cause, not the stop.
                signals::check().map_err(ImageError::from)?;
                self.check_events()?;
                Err(error)
            }
        }
    }

    /// One completed read: its section goes to the image, and it overrides
    /// an earlier failure to read the same bytes.
    fn deliver(&self, done: ReadDone<'_>) -> anyhow::Result<()> {
        // Checksummed on the reading thread, in parallel; only the write
        // itself is serialized.
        let crc = crc32c_of(done.data);
        self.read_bytes
            .fetch_add(done.data.len() as u64, Ordering::Relaxed);
        self.write_image(|run, writer| {
            run.make_room(writer, done.data.len())?;
            writer
                .write_section_checksummed(done.offset_bytes / SECTOR_BYTES, done.data, crc)
                .context("cannot write the image")
        })?;
        if !self.bad_nonempty.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Read now: its data section overrides an earlier failure.
        let end_bytes = done.offset_bytes + done.data.len() as u64;
        let mut unreadable = lock(&self.unreadable);
        let bad = &mut unreadable.map;
        if !bad.remove(done.offset_bytes..end_bytes) {
            return Err(self.too_many_unreadable(bad, bad.bytes(), 0, true).into());
        }
        self.bad_nonempty.store(!bad.is_empty(), Ordering::Relaxed);
        Ok(())
    }

    fn too_many_unreadable(
        &self,
        bad: &BadMap,
        bad_bytes: u64,
        first_offset_bytes_if_none: u64,
        ranges_full: bool,
    ) -> TooManyUnreadable {
        TooManyUnreadable {
            device: self.device.path.clone(),
            bad_bytes,
            max_bad_bytes: self.options.max_bad_bytes,
            range_count: bad.len(),
            first_offset_bytes: bad
                .ranges()
                .first()
                .map_or(first_offset_bytes_if_none, |r| r.start),
            ranges_full,
        }
    }

    /// A read found `unreadable` (after its retries): record it, log the
    /// first few, and fail once more is bad than `--max-bad-bytes` allows.
    fn report_unreadable(&self, unreadable: Unreadable) -> anyhow::Result<()> {
        let range = unreadable.offset_bytes..unreadable.offset_bytes + unreadable.len_bytes;
        let mut ranges = lock(&self.unreadable);
        let bad = &mut ranges.map;
        let fits = bad.insert(range.clone());
        self.bad_nonempty.store(!bad.is_empty(), Ordering::Relaxed);
        if !fits || bad.bytes() > self.options.max_bad_bytes {
            let bad_bytes = bad.bytes() + if fits { 0 } else { unreadable.len_bytes };
            return Err(self
                .too_many_unreadable(bad, bad_bytes, range.start, !fits)
                .into());
        }
        drop(ranges);
        let logged = self.bad_logged.fetch_add(1, Ordering::Relaxed);
        if logged < UNREADABLE_RANGES_LISTED as u64 {
            let retries = self.options.read_retries;
            eprintln!(
                "Unreadable: bytes {}..{} of {} ({} bytes): {} after {retries} retr{} of each block; recorded as a bad range{}",
                range.start,
                range.end,
                self.device.path.display(),
                unreadable.len_bytes,
                io::Error::from_raw_os_error(unreadable.errno),
                if retries == 1 { "y" } else { "ies" },
                if logged + 1 == UNREADABLE_RANGES_LISTED as u64 {
                    " (further ones are counted in the summary)"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// After the last read: one `B:` record per range whose last read
    /// failed, after every section, so that a restore's zeros there win over
    /// an older section of the same bytes (`bad.rs`).
    pub(super) fn write_bad_ranges(&self) -> anyhow::Result<UnreadableStats> {
        // Lock order: `unreadable`, then `writer`.
        let unreadable = lock(&self.unreadable);
        for range in unreadable.map.ranges() {
            assert!(
                range.start.is_multiple_of(SECTOR_BYTES)
                    && range.end.is_multiple_of(SECTOR_BYTES)
                    && range.end <= self.device.size_bytes,
                "bad range {range:?} is whole blocks on the device"
            );
            self.write_image(|_, writer| {
                writer
                    .write_bad(ByteExtent {
                        offset_bytes: range.start,
                        len_bytes: range.end - range.start,
                    })
                    .context("cannot write the image")
            })?;
        }
        Ok(UnreadableStats::of(
            &unreadable.map,
            unreadable.salvage,
            self.options.read_retries,
            self.options.max_bad_bytes,
        ))
    }

    pub(super) fn write_state(&self, state: RunState) -> anyhow::Result<()> {
        self.write_image(|_, writer| writer.write_state(state).context("cannot write the image"))
    }
}
