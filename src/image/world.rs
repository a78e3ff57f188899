//! The catch-up rounds' view of a live run ([`World`]): a look
//! drains the trace and takes the dirty set under the source's lock; a
//! read goes through the engine into the image.

use super::rounds::{Look, RoundRead, World};
use super::{ImageError, Run, lock, yielding};
use crate::dirty;
use crate::format::RunState;
use crate::geom::ByteExtent;
use crate::signals;
use crate::trace::WriteEvent;
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A catch-up round reads across clean gaps up to this long between dirty
/// extents in one read (`dirty::merge_small_gaps`): on a densely dirtied
/// device this turns many small reads into few sequential ones (PERF.md,
/// "Catch-up").
pub const CATCH_UP_GAP_MERGE_BYTES: u64 = 32 << 10;

/// Extents handed to the engine at most this long (it splits them further).
const EXTENT_BYTES_MAX: u64 = 64 << 20;

/// Extents one catch-up look takes at most (plus one leaf's worth): 1 MiB
/// of extent list however many blocks are dirty; a larger dirty set is read
/// in several looks (a pass, `rounds.rs`).
const TAKE_EXTENTS_MAX: usize = 1 << 16;

pub(super) struct LiveWorld<'r, 'a> {
    pub run: &'r Run<'a>,
    /// Every catch-up read's latency.
    pub latency: &'r mut Histogram<u64>,
    pub events: Vec<WriteEvent>,
    /// Where the current pass's next bounded take starts.
    pub cursor: dirty::TakeCursor,
    /// The hold-frozen hook's marker file was made.
    #[cfg(feature = "test-hooks")]
    pub hold_frozen_said: bool,
}

/// What a look took, and what the trace said as it took it.
struct Taken {
    dirty_bytes: u64,
    pass_whole: bool,
    pending: super::pending::PendingSummary,
    completions: super::Completions,
}

impl LiveWorld<'_, '_> {
    /// Drains and takes under one hold of the lock: no pump drain can mark
    /// a block between what this look saw and what it took.
    fn drain_and_take(&mut self, extents: &mut Vec<ByteExtent>) -> anyhow::Result<Taken> {
        let run = self.run;
        self.events.clear();
        let mut traced = lock(&run.traced);
        run.drain_locked(&mut traced, true, &mut self.events)?;
        let mut pass_whole = self.cursor.is_finished();
        if pass_whole {
            self.cursor = dirty::TakeCursor::new();
        }
        let mut dirty_bytes = self.take(extents);
        if extents.is_empty() && !pass_whole {
            // The rest of this pass was clean; what was marked behind it is
            // in the next one, which starts now: "took nothing" must mean
            // the whole map.
            pass_whole = true;
            self.cursor = dirty::TakeCursor::new();
            dirty_bytes = self.take(extents);
        }
        Ok(Taken {
            dirty_bytes,
            pass_whole,
            pending: traced.pending.summary(),
            completions: traced.pending.completions(Instant::now()),
        })
    }

    fn take(&mut self, extents: &mut Vec<ByteExtent>) -> u64 {
        self.run.dirty.take_bounded(
            &mut self.cursor,
            extents,
            EXTENT_BYTES_MAX,
            TAKE_EXTENTS_MAX,
        )
    }

    /// `--hold-frozen-file` (a test hook): while frozen, stay frozen while
    /// the file exists.
    #[cfg(feature = "test-hooks")]
    fn hold_frozen(&mut self, frozen: bool) -> bool {
        let options = self.run.options;
        let hold_frozen = frozen
            && options
                .hold_frozen_file
                .as_deref()
                .is_some_and(std::path::Path::exists);
        if hold_frozen && !self.hold_frozen_said {
            // Test hook: stderr is held while frozen, so say it in a file
            // beside the hold file (never on a frozen filesystem: the test
            // puts it elsewhere).
            self.hold_frozen_said = true;
            if let Some(file) = &options.hold_frozen_file {
                let mut said = file.as_os_str().to_owned();
                said.push(".frozen");
                let _ = std::fs::write(said, b"");
            }
        }
        hold_frozen
    }

    /// Without the `test-hooks` feature (every build a user makes) there is
    /// no hold.
    #[cfg(not(feature = "test-hooks"))]
    fn hold_frozen(&mut self, _frozen: bool) -> bool {
        false
    }
}

impl World for LiveWorld<'_, '_> {
    fn check(&mut self) -> anyhow::Result<()> {
        signals::check().map_err(ImageError::from)?;
        Ok(self.run.check_events()?)
    }

    fn look(&mut self, extents: &mut Vec<ByteExtent>) -> anyhow::Result<Look> {
        let run = self.run;
        // Thawed early by the pump (timeout): what was held goes out.
        run.release_output()?;
        let taken = self.drain_and_take(extents)?;
        dirty::merge_small_gaps(extents, CATCH_UP_GAP_MERGE_BYTES);
        // An extra check after the take, never the proof: it misses writes
        // in a plug, the scheduler, rq-qos or a tag wait (`blk_mq_in_flight`
        // counts started requests only).
        let (_, writes_in_flight) = run.device.inflight()?;
        // After the take: held now means held since the freeze (a freeze
        // that ended is never taken again).
        let frozen = run.freeze_held();
        let hold_frozen = self.hold_frozen(frozen);
        Ok(Look {
            dirty_bytes: taken.dirty_bytes,
            extent_count: extents.len(),
            pass_complete: self.cursor.is_finished(),
            pass_whole: taken.pass_whole && self.cursor.is_finished(),
            pending: taken.pending,
            completions: taken.completions,
            writes_in_flight,
            held: !frozen && run.held(),
            hold_frozen,
            frozen,
            now: Instant::now(),
        })
    }

    fn put_back(&mut self, extents: &[ByteExtent]) {
        self.run.mark_again(extents);
    }

    fn read(&mut self, extents: &[ByteExtent]) -> anyhow::Result<RoundRead> {
        let stats = self.run.read(extents, None)?;
        self.latency
            .add(&stats.latency_us)
            .expect("histograms agree");
        let elapsed_ns = stats.elapsed.as_nanos() as u64;
        let before_ns = self
            .run
            .last_catch_up_read_ns
            .swap(elapsed_ns, Ordering::Relaxed);
        if yielding::catch_up_needs_full_speed(
            stats.elapsed,
            (before_ns > 0).then(|| Duration::from_nanos(before_ns)),
        ) && self.run.engine.is_gentle()
            && !self.run.catch_up_full_speed.swap(true, Ordering::Relaxed)
        {
            tracing::info!(
                "{}: a gentle catch-up read took {:.1}s, no less than the one before: the workload writes faster than gentle reads catch up, so the rest of the run reads at full speed",
                self.run.device.path.display(),
                stats.elapsed.as_secs_f64()
            );
        }
        Ok(RoundRead {
            bytes_read: stats.bytes_read,
            seconds: stats.elapsed.as_secs_f64(),
        })
    }

    fn freeze(&mut self) -> anyhow::Result<String> {
        self.run.freeze_now()
    }

    fn thaw(&mut self) -> anyhow::Result<()> {
        let thawed = self.run.thaw(None);
        let released = self.run.release_output();
        thawed.and(released)
    }

    fn dirty_bytes(&mut self) -> u64 {
        self.run.dirty.count_dirty_blocks() * u64::from(self.run.dirty.block_bytes())
    }

    fn mark_unconverged(&mut self, changed_bytes: u64) -> anyhow::Result<()> {
        self.run
            .write_state(RunState::Unconverged { changed_bytes })
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}
