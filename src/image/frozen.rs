//! `--freeze` in the run: the freeze taken for the final rounds, the image
//! output held while it lasts (nothing may be written while frozen), and the
//! thaw — by the rounds, by the pump at `--freeze-timeout`, or by a read at
//! `--freeze-memory`.

use super::{Run, Writer, lock, write_failed};
use crate::source::freeze::Frozen;
use crate::units::Bytes;
use anyhow::Context;

/// What besides a section's data can reach the output with it: the
/// buffered record lines before it, and its header.
const HOLD_SLACK_BYTES: usize = super::OUTPUT_BUFFER_BYTES + 4096;

/// The freeze of one run: taken once, thawed once.
#[derive(Default)]
pub(super) struct FreezeState {
    frozen: Option<Frozen>,
    /// Why it ended before the rounds did.
    pub ended_early: Option<String>,
    /// How long writes were blocked, once thawed.
    pub held_seconds: Option<f64>,
}

impl Run<'_> {
    /// Freezes the mounts, holding the image output from just before the
    /// first FIFREEZE (nothing may be written while frozen).
    pub(super) fn freeze_now(&self) -> anyhow::Result<String> {
        let mut guard = lock(&self.writer);
        let Some(writer) = guard.as_mut() else {
            return Err(write_failed());
        };
        let out = writer.get_mut().get_mut();
        out.hold(self.options.freeze_memory_max);
        let mut state = lock(&self.freeze);
        assert!(
            state.frozen.is_none() && state.ended_early.is_none(),
            "frozen once per run"
        );
        match Frozen::freeze(&self.mounts) {
            Ok(frozen) => {
                let what = frozen.describe();
                state.frozen = Some(frozen);
                Ok(what)
            }
            Err(error) => {
                drop(state);
                if let Err(release) = out.release() {
                    let release = anyhow::Error::from(release).context("cannot write the image");
                    return Err(self.output_broke(&mut guard, release));
                }
                Err(error)
            }
        }
    }

    pub(super) fn freeze_held(&self) -> bool {
        lock(&self.freeze).frozen.is_some()
    }

    /// Thaws, if frozen. `early`: why the freeze ends before the rounds do,
    /// said loudly; the image is then not one instant of the filesystem.
    /// Callable from any thread; the held output is written by the next
    /// writer ([`Run::make_room`], [`Run::release_output`]).
    pub(super) fn thaw(&self, early: Option<String>) -> anyhow::Result<()> {
        let mut state = lock(&self.freeze);
        let Some(frozen) = state.frozen.take() else {
            return Ok(());
        };
        let what = frozen.describe();
        let held = frozen.held_for();
        // Stderr is the real one again once this returns.
        let thawed = frozen.thaw();
        eprintln!(
            "Thawed {what}: writes were blocked for {:.0} ms",
            held.as_secs_f64() * 1000.0
        );
        state.held_seconds = Some(held.as_secs_f64());
        if let Some(why) = early {
            eprintln!(
                "hot-clone: WARNING: {why}, so {what} was thawed before the final round ended: the image is NOT point-in-time (not one instant of the filesystem); the run goes on unfrozen, and the image is what the trace alone can promise (crash-consistent, as without --freeze)"
            );
            state.ended_early = Some(why);
        }
        thawed.map(|_| ())
    }

    /// The pump's check of `--freeze-timeout`.
    pub(super) fn check_freeze_timeout(&self) -> anyhow::Result<()> {
        let timeout = self.options.freeze_timeout;
        let expired = lock(&self.freeze)
            .frozen
            .as_ref()
            .is_some_and(|frozen| frozen.held_for() >= timeout);
        if expired {
            self.thaw(Some(format!(
                "the freeze reached --freeze-timeout ({:.1} s)",
                timeout.as_secs_f64()
            )))?;
        }
        Ok(())
    }

    /// Before `len_bytes` of section data go to the output: while frozen,
    /// keeps the output held unless that would pass `--freeze-memory` (then
    /// thaws early); once thawed, writes out what was held.
    pub(super) fn make_room(&self, writer: &mut Writer, len_bytes: usize) -> anyhow::Result<()> {
        let out = writer.get_mut().get_mut();
        if !out.is_held() {
            return Ok(());
        }
        let max = self.options.freeze_memory_max;
        if self.freeze_held() {
            if out.held_bytes() + len_bytes + HOLD_SLACK_BYTES <= max {
                return Ok(());
            }
            self.thaw(Some(format!(
                "the image held in memory while frozen reached --freeze-memory ({})",
                Bytes(max as u64)
            )))?;
        }
        out.release().context("cannot write the image")
    }

    /// Writes out what was held while frozen, once thawed.
    pub(super) fn release_output(&self) -> anyhow::Result<()> {
        let mut guard = lock(&self.writer);
        let Some(writer) = guard.as_mut() else {
            return Ok(());
        };
        let out = writer.get_mut().get_mut();
        if !out.is_held() || self.freeze_held() {
            return Ok(());
        }
        out.release()
            .context("cannot write the image")
            .map_err(|error| self.output_broke(&mut guard, error))
    }
}
