//! The catch-up rounds: when to read again, freeze, wait, or stop.
//!
//! [`Rounds`] is the decision, pure: it sees one [`Look`] at a time (what a
//! round took from the dirty map and what the trace says is still in flight)
//! and answers with a [`Step`]. [`catch_up`] carries the steps out through a
//! [`World`] — the trace, the dirty map, the device, the freeze — which the
//! run implements for real and the tests script.
//!
//! # Why no write can be missed
//!
//! Terms: a write's *queue event* is emitted when it is submitted, its
//! *completion event* once its data is on the device (`pending.rs` names the
//! kernel functions). A *look* ([`World::look`]) holds the trace source's
//! lock while it (1) waits until every event emitted before it is readable
//! and drains them all (`sync_drain`), marking each write's blocks dirty and
//! updating the pending writes, then (2) takes the dirty set — or a bounded
//! batch of it, from where the last take stopped: a *pass* of several looks,
//! blocks marked behind it waiting for the next pass. No drain runs
//! between (1) and (2), so nothing is marked between what the look saw and
//! what it took. The run converges at a look L that took nothing (so its
//! take was a whole pass), found no
//! write pending, and saw `/sys/block/DISK/inflight` at zero (an extra
//! check, not a premise). On a device that reports in-range completions:
//!
//! - Let W be a write to block B whose queue event was emitted before L. L
//!   drained it, and found no write pending, so W's completion event was
//!   drained too: it was emitted before L.
//! - Let R be the last read of B in the image (a later section wins).
//!   If R was submitted after W's completion event, R returned W's data or
//!   newer: the completion is emitted in the driver's end-of-I/O path
//!   (`blk_update_request`, `bio_endio`), after the device acknowledged the
//!   write, and a read submitted after a write's acknowledgement returns it.
//! - Otherwise W's completion event was emitted after R was submitted and
//!   before L, so a drain D between the two marked B. The dirty set is
//!   taken only by looks, each followed by a read of what it took; L took
//!   nothing, so a look after D and before L took B, and its read of B came
//!   after R (rounds run one after another): R was not the last read of B.
//!   Contradiction.
//! - A write queued before tracing started has no queue event. If its
//!   completion event was emitted after tracing started and before L, the
//!   last two cases apply unchanged. If it completed before tracing started,
//!   the main pass (which starts later) read it.
//!
//! So every write queued before L is in the image: the image is the device
//! as of L. What no event can reveal is a write submitted before tracing
//! started and still not complete at L. Before the main pass the run waits
//! for `inflight` to read zero, which rules out such a write once a driver
//! has started it; one held in a plug, the scheduler or rq-qos throttling
//! for the whole run would escape (README, "What an image promises").
//!
//! # Devices that do not report in-range completions
//!
//! There a queued write never leaves the pending set, and the argument above
//! has no premise. `PendingWrites::completions` says so after a bound; the
//! run then ends without a trailer ([`Step::NoCompletions`]) unless
//! `--freeze` applies: once `FIFREEZE` returned, the filesystem has written
//! back and waited on all its I/O (`freeze_super` → `sync_filesystem`) and
//! blocks new writes, so a look after the freeze that takes nothing, with no
//! write in flight, ends the run. A round that read while `inflight` showed
//! writes re-reads its extents, since no completion will mark them. Writes
//! that bypass the filesystem (a raw writer on the device) still show as
//! queue events and keep the rounds going.

use super::RoundStats;
use super::pending::{Completions, PendingSummary};
use crate::geom::{ByteExtent as Extent, SECTOR_BYTES};
use crate::units::Bytes;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the rounds are bounded by, and whether they may freeze.
#[derive(Clone, Debug)]
pub struct RoundsConfig {
    /// Rounds counted at most before the run ends unconverged.
    pub rounds_max: u32,
    /// `--freeze`: there are filesystems to freeze for the final rounds.
    pub freeze: bool,
    /// Freeze once a round's dirty set is at most this large.
    pub freeze_dirty_bytes_max: u64,
    /// With nothing to read but writes in flight, wait this long before
    /// counting a round.
    pub settle_wait_max: Duration,
    /// `--hold-file`, for the log line only.
    pub hold_file: Option<PathBuf>,
}

/// What one look saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Look {
    /// Bytes taken from the dirty map (whole dirty blocks).
    pub dirty_bytes: u64,
    /// Extents taken (after gap merging); 0 = nothing to read.
    pub extent_count: usize,
    /// The take reached the device's end. A take is bounded (memory), so a
    /// large dirty set is read in a *pass* of several looks, each taking on
    /// from where the last stopped; blocks marked behind a pass wait for the
    /// next one. A look that takes nothing has taken a whole pass by itself
    /// ([`World::look`] starts a fresh pass rather than return the empty
    /// end of one).
    pub pass_complete: bool,
    /// This look's take was a whole pass: it started at the device start.
    pub pass_whole: bool,
    /// Writes queued and not seen complete.
    pub pending: PendingSummary,
    pub completions: Completions,
    /// `/sys/block/DISK/inflight` writes, read after the take.
    pub writes_in_flight: u64,
    /// The hold file exists: do not end the run.
    pub held: bool,
    /// Test hook: stay frozen.
    pub hold_frozen: bool,
    /// The freeze was still held after this look's take. A freeze that ends
    /// early (`--freeze-timeout`, `--freeze-memory`) is never taken again,
    /// so a look that finds it held knows it was held since it began.
    pub frozen: bool,
    pub now: Instant,
}

/// What to do after a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read what was taken. With `remark`, mark it dirty again afterwards.
    Read { remark: bool },
    /// Nothing was taken but writes are in flight (or the run is held):
    /// wait, then look again.
    Wait,
    /// Put back what was taken, freeze, look again.
    Freeze,
    /// Put back what was taken and stay frozen (test hook).
    HoldFrozen,
    /// The image holds every write queued before this look.
    Converged,
    /// Out of rounds: put back what was taken and end marked unconverged.
    Unconverged,
    /// The device does not report where its writes complete and nothing
    /// stops them: end without vouching for the image.
    NoCompletions,
}

/// The round-by-round decision.
#[derive(Debug)]
pub struct Rounds {
    config: RoundsConfig,
    /// Rounds counted towards `rounds_max` (held rounds are not).
    counted: u32,
    frozen: bool,
    /// The freeze ended early: the rest of the run is by the trace alone.
    freeze_spent: bool,
    /// Since when looks have found nothing to read but writes in flight.
    waiting_since: Option<Instant>,
}

impl Rounds {
    pub fn new(config: RoundsConfig) -> Rounds {
        Rounds {
            config,
            counted: 0,
            frozen: false,
            freeze_spent: false,
            waiting_since: None,
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Whether the freeze ended before the rounds did.
    #[cfg(test)]
    pub fn freeze_spent(&self) -> bool {
        self.freeze_spent
    }

    pub fn decide(&mut self, look: &Look) -> Step {
        if self.frozen && !look.frozen {
            // Thawed early (timeout or memory bound): from here on the run
            // converges, or not, by the trace's rules alone, and a device
            // without in-range completions cannot converge at all.
            self.frozen = false;
            self.freeze_spent = true;
        }
        let may_freeze = self.config.freeze && !self.freeze_spent;
        let missing = matches!(look.completions, Completions::Missing { .. });
        if missing && !may_freeze {
            return Step::NoCompletions;
        }
        let nothing = look.extent_count == 0;
        // Without completions (only reached with --freeze) pending writes
        // never clear; the freeze is what stops them.
        let quiet = look.writes_in_flight == 0 && (missing || look.pending.is_empty());
        let would_converge = nothing && quiet;
        if may_freeze
            && !self.frozen
            && !look.held
            && (missing
                || would_converge
                || (look.pass_whole && look.dirty_bytes <= self.config.freeze_dirty_bytes_max)
                || self.counted >= self.config.rounds_max)
        {
            // Converged as far as the live filesystem lets us: freeze it
            // (which writes back its dirty data and journal, all traced) and
            // read what is left while nothing can write.
            self.frozen = true;
            self.counted = 0; // the frozen rounds have a limit of their own
            self.waiting_since = None;
            return Step::Freeze;
        }
        if self.frozen && look.hold_frozen {
            return Step::HoldFrozen;
        }
        if would_converge && !look.held {
            return Step::Converged;
        }
        if !look.held && self.counted >= self.config.rounds_max {
            return Step::Unconverged;
        }
        if nothing {
            let since = *self.waiting_since.get_or_insert(look.now);
            if !look.held
                && look.now.saturating_duration_since(since) >= self.config.settle_wait_max
            {
                self.counted += 1;
                self.waiting_since = None;
            }
            return Step::Wait;
        }
        self.waiting_since = None;
        // A round is a whole pass over the dirty set, however many bounded
        // takes it needs.
        if !look.held && look.pass_complete {
            self.counted += 1;
        }
        Step::Read {
            remark: missing && look.writes_in_flight > 0,
        }
    }
}

/// What a round's read did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundRead {
    pub bytes_read: u64,
    pub seconds: f64,
}

/// The run's side of the rounds: the kernel-facing parts.
pub trait World {
    /// Fails if the run must stop (a signal, lost events).
    fn check(&mut self) -> anyhow::Result<()>;
    /// Drains the trace synchronously, then takes the dirty set, or the
    /// next bounded batch of it, into `extents`, with no drain in between
    /// (see the module documentation). Never returns an empty take that
    /// did not start at the device start.
    fn look(&mut self, extents: &mut Vec<Extent>) -> anyhow::Result<Look>;
    /// Marks `extents` dirty again.
    fn put_back(&mut self, extents: &[Extent]);
    /// Reads `extents` into the image.
    fn read(&mut self, extents: &[Extent]) -> anyhow::Result<RoundRead>;
    /// Freezes the filesystems; returns what was frozen, for the log.
    fn freeze(&mut self) -> anyhow::Result<String>;
    /// Thaws what was frozen, if anything.
    fn thaw(&mut self) -> anyhow::Result<()>;
    /// Bytes dirty now (after a put-back), for an unconverged ending.
    fn dirty_bytes(&mut self) -> u64;
    /// Writes the unconverged state record.
    fn mark_unconverged(&mut self, changed_bytes: u64) -> anyhow::Result<()>;
    fn sleep(&mut self, duration: Duration);
}

/// How the rounds ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Converged,
    Unconverged {
        changed_bytes: u64,
    },
    /// The device does not report in-range completions; what the look saw.
    NoCompletions(Completions),
}

/// Runs the catch-up rounds to their end. Thaws on every way out that
/// returns (the world's freeze guard covers unwinding).
pub fn catch_up<W: World>(
    world: &mut W,
    rounds: &mut Rounds,
    stats: &mut Vec<RoundStats>,
    device_bytes: u64,
) -> anyhow::Result<Ending> {
    let result = run_rounds(world, rounds, stats, device_bytes);
    if result.is_err() {
        // The error is what counts; a failed thaw is reported by the guard.
        let _ = world.thaw();
    }
    result
}

fn run_rounds<W: World>(
    world: &mut W,
    rounds: &mut Rounds,
    stats: &mut Vec<RoundStats>,
    device_bytes: u64,
) -> anyhow::Result<Ending> {
    let mut extents = Vec::new();
    let mut wait = WAIT_FIRST;
    let mut hold = HoldNotes::default();
    loop {
        world.check()?;
        extents.clear();
        let look = world.look(&mut extents)?;
        debug_assert_eq!(look.extent_count, extents.len());
        hold.note(&look, rounds.config.hold_file.as_deref());
        let step = rounds.decide(&look);
        if step != Step::Wait {
            wait = WAIT_FIRST;
        }
        if step.returns_taken() {
            world.put_back(&extents);
        }
        let ending = match step {
            Step::Read { remark } => {
                read_round(world, rounds, stats, &look, &extents, remark)?;
                None
            }
            Step::Freeze => {
                let what = world.freeze()?;
                eprintln!(
                    "Frozen {what} for the final round (after {} rounds)",
                    stats.len()
                );
                None
            }
            Step::HoldFrozen => {
                world.sleep(HOLD_FROZEN_PAUSE);
                None
            }
            Step::Converged => Some(converge(world, stats.len())?),
            Step::Unconverged => Some(end_unconverged(world, rounds, device_bytes)?),
            Step::NoCompletions => Some(Ending::NoCompletions(look.completions)),
            Step::Wait => {
                world.sleep(wait);
                wait = (wait * 2).min(WAIT_MAX);
                None
            }
        };
        if let Some(ending) = ending {
            return Ok(ending);
        }
    }
}

impl Step {
    /// What the look took goes back into the dirty map unread: the step
    /// reads it later (after a freeze, while held frozen) or never (out of
    /// rounds, so it counts as changed). A read with `remark` puts its
    /// extents back after reading them.
    fn returns_taken(self) -> bool {
        matches!(self, Step::Freeze | Step::HoldFrozen | Step::Unconverged)
    }
}

/// `--hold-file`: a note once a second while the run is held.
#[derive(Default)]
struct HoldNotes {
    held_since: Option<Instant>,
    last_note: Option<Instant>,
}

impl HoldNotes {
    fn note(&mut self, look: &Look, hold_file: Option<&Path>) {
        if !look.held {
            self.held_since = None;
            return;
        }
        let since = *self.held_since.get_or_insert(look.now);
        if self
            .last_note
            .is_some_and(|at| look.now.saturating_duration_since(at) < HOLD_NOTE)
        {
            return;
        }
        self.last_note = Some(look.now);
        eprintln!(
            "Holding for {:.0}s while {} exists -- {} dirty sectors",
            look.now.saturating_duration_since(since).as_secs_f64(),
            hold_file.map_or("the hold file".into(), |p| p.display().to_string()),
            look.dirty_bytes / SECTOR_BYTES
        );
    }
}

/// One round: read what the look took, and with `remark` mark it again.
fn read_round<W: World>(
    world: &mut W,
    rounds: &Rounds,
    stats: &mut Vec<RoundStats>,
    look: &Look,
    extents: &[Extent],
    remark: bool,
) -> anyhow::Result<()> {
    let read = world.read(extents)?;
    if remark {
        // A write in flight during these reads may land after them, and
        // no completion event will say so.
        world.put_back(extents);
    }
    let round = RoundStats {
        round: stats.len() as u32 + 1,
        dirty_bytes: look.dirty_bytes,
        extents: extents.len(),
        bytes_read: read.bytes_read,
        seconds: read.seconds,
        unsettled: remark,
        held: look.held,
        frozen: rounds.is_frozen(),
        pending_sectors: look.pending.sectors,
    };
    eprintln!(
        "Round {}: {} in {} extents read in {:.0} ms{}{}",
        round.round,
        Bytes(round.bytes_read),
        round.extents,
        round.seconds * 1000.0,
        if remark {
            " (writes in flight: will read again)"
        } else {
            ""
        },
        if look.held { " (held)" } else { "" }
    );
    stats.push(round);
    Ok(())
}

fn converge<W: World>(world: &mut W, round_count: usize) -> anyhow::Result<Ending> {
    world.thaw()?;
    eprintln!(
        "Converged after {round_count} round{}: nothing changed and no write in flight",
        if round_count == 1 { "" } else { "s" }
    );
    Ok(Ending::Converged)
}

/// Out of rounds: what is dirty now (what the look took, put back, and
/// what was marked since) may be older in the image than on the device.
fn end_unconverged<W: World>(
    world: &mut W,
    rounds: &Rounds,
    device_bytes: u64,
) -> anyhow::Result<Ending> {
    world.thaw()?;
    let changed_bytes = world.dirty_bytes().min(device_bytes);
    eprintln!(
        "WARNING: writes did not quiesce within {} catch-up rounds: {} changed during the last round and may be older in the image than on the device; the image is marked NOT converged",
        rounds.config.rounds_max,
        Bytes(changed_bytes)
    );
    world.mark_unconverged(changed_bytes)?;
    Ok(Ending::Unconverged { changed_bytes })
}

/// While held frozen (a test hook), the pause between looks.
const HOLD_FROZEN_PAUSE: Duration = Duration::from_millis(5);

/// The first pause between looks while writes are in flight; each next
/// one doubles, up to [`WAIT_MAX`].
const WAIT_FIRST: Duration = Duration::from_micros(50);

/// The longest pause between looks while writes are in flight.
const WAIT_MAX: Duration = Duration::from_millis(5);

/// Hold notes at most this often.
const HOLD_NOTE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests;
