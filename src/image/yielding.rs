//! The default: full speed on an idle disk, out of the way of a busy one.
//!
//! The pump samples a count of other programs' I/O on the disk
//! (`trace::live::foreground`) every [`SAMPLE_INTERVAL`]. Any growth — a
//! read or a write of anyone but our readers — switches the engine to its
//! gentle gait (`engine::gait`: one small read at a time, spaced); the
//! engine goes back to full speed once the disk has had no I/O of anyone
//! else for [`HOLD`]. `--full-speed` turns this off; `--max-rate` caps both
//! gaits.
//!
//! A run starts gentle and goes to full speed at the first sample that saw
//! nothing: a workload already running is never hit by a full queue. While
//! the filesystem is frozen for the final round the run reads at full speed
//! whatever it sees: nothing can write then, and a shorter freeze is what
//! spares the workload (`Run::pump`).
//!
//! Catch-up rounds read gently too, until a round's reads take longer
//! than [`CATCH_UP_GENTLE_READ_MAX`] and no less than the round's before
//! ([`catch_up_needs_full_speed`]): the rounds are then not shrinking, the
//! workload writes faster than gentle reads catch up, and the rest of the
//! run reads at full speed — a run that never converges would only go on
//! loading the disk, and end with an image it cannot vouch for
//! (`world.rs`). A long first round alone (the writes of a long main pass)
//! is read gently: the next one is shorter if gentle reads keep up.
//!
//! The decision is [`Yielder::observe`], pure over (time, count), so the
//! orders that matter are unit tests.

use serde::Serialize;
use std::time::Duration;

/// How often the foreground count is sampled: the longest a workload that
/// starts while we read at full speed waits for us to notice (plus the
/// reads already queued, about 8 ms of a 16 MiB queue at 2 GB/s). At
/// 10 ms a run switches within 1% of an 8-second workload's requests, and
/// the sample costs one small file read per CPU.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// How long the disk must have had no I/O of anyone else before reading
/// at full speed again: a workload of one request a second is still
/// yielded to throughout, and a filesystem's journal commit (every 5 s on
/// ext4) costs at most a second of gentle reading.
pub const HOLD: Duration = Duration::from_secs(1);

/// A gentle catch-up read longer than this, and no shorter than the one
/// before, switches the rest of the run to full speed (module
/// documentation): a light workload's rounds (milliseconds) stay gentle
/// whatever their trend.
pub const CATCH_UP_GENTLE_READ_MAX: Duration = Duration::from_millis(250);

/// Whether catch-up must read at full speed from now on: this read took
/// `this` gently, the one before `before` (`None`: it is the first).
pub fn catch_up_needs_full_speed(this: Duration, before: Option<Duration>) -> bool {
    this > CATCH_UP_GENTLE_READ_MAX && before.is_some_and(|before| this >= before)
}

/// The controller.
#[derive(Clone, Debug)]
pub struct Yielder {
    gentle: bool,
    last_count: Option<u64>,
    /// When another program's I/O was last seen.
    last_foreground: Option<Duration>,
}

impl Default for Yielder {
    fn default() -> Yielder {
        Yielder::new()
    }
}

impl Yielder {
    /// Gentle, until the first sample says the disk is idle.
    pub fn new() -> Yielder {
        Yielder {
            gentle: true,
            last_count: None,
            last_foreground: None,
        }
    }

    pub fn is_gentle(&self) -> bool {
        self.gentle
    }

    /// One sample: `count` of the sensor at `at` (time since the run
    /// started). Returns the new gait when it changes: `Some(true)` gentle,
    /// `Some(false)` full speed.
    pub fn observe(&mut self, at: Duration, count: u64) -> Option<bool> {
        let Some(last) = self.last_count.replace(count) else {
            // The first sample is the baseline; the next one decides.
            return None;
        };
        // A count that went back (a sensor reset) is read as activity:
        // yielding too long is the safe side.
        let busy = count != last;
        if busy {
            self.last_foreground = Some(at);
        }
        let quiet_long_enough = match self.last_foreground {
            None => true,
            Some(seen) => at.saturating_sub(seen) >= HOLD,
        };
        let gentle = busy || (self.gentle && !quiet_long_enough);
        (gentle != self.gentle).then(|| {
            self.gentle = gentle;
            gentle
        })
    }
}

/// One switch of the gait, for `--stats-json` and the summary.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GaitChange {
    /// Seconds since the run started.
    pub at_seconds: f64,
    pub gentle: bool,
    /// Bytes the run had read by then, main pass and catch-up.
    pub read_bytes: u64,
}

/// Seconds spent gentle from `changes` (which start gentle, as a run does)
/// until `end_seconds`.
pub fn gentle_seconds(changes: &[GaitChange], end_seconds: f64) -> f64 {
    let mut total = 0.0;
    let mut gentle_since = Some(0.0);
    for change in changes {
        match (change.gentle, gentle_since) {
            (true, None) => gentle_since = Some(change.at_seconds),
            (false, Some(since)) => {
                total += change.at_seconds - since;
                gentle_since = None;
            }
            _ => {}
        }
    }
    if let Some(since) = gentle_since {
        total += (end_seconds - since).max(0.0);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn an_idle_disk_goes_to_full_speed_at_the_second_sample() {
        let mut y = Yielder::new();
        assert!(y.is_gentle(), "starts gentle");
        assert_eq!(
            y.observe(ms(0), 500),
            None,
            "the first sample is the baseline"
        );
        assert_eq!(y.observe(ms(10), 500), Some(false));
        assert_eq!(y.observe(ms(20), 500), None);
        assert!(!y.is_gentle());
    }

    #[test]
    fn a_workload_running_from_the_start_keeps_it_gentle() {
        let mut y = Yielder::new();
        y.observe(ms(0), 0);
        for step in 1..500 {
            assert_eq!(y.observe(ms(10 * step), step), None, "step {step}");
        }
        assert!(y.is_gentle());
    }

    #[test]
    fn any_other_io_yields_at_once_and_full_speed_returns_after_the_hold() {
        let mut y = Yielder::new();
        y.observe(ms(0), 7);
        y.observe(ms(10), 7);
        assert!(!y.is_gentle());
        // One request of somebody else.
        assert_eq!(y.observe(ms(20), 8), Some(true));
        // Quiet, but not for HOLD yet.
        let hold = HOLD.as_millis() as u64;
        assert_eq!(y.observe(ms(20 + hold - 10), 8), None);
        assert!(y.is_gentle());
        // Another request restarts the hold.
        assert_eq!(y.observe(ms(20 + hold - 5), 9), None);
        assert_eq!(y.observe(ms(20 + hold + 10), 9), None);
        assert!(y.is_gentle());
        assert_eq!(y.observe(ms(15 + 2 * hold), 9), Some(false));
        assert!(!y.is_gentle());
    }

    #[test]
    fn a_count_that_goes_back_is_read_as_activity() {
        let mut y = Yielder::new();
        y.observe(ms(0), 100);
        y.observe(ms(10), 100);
        assert_eq!(y.observe(ms(20), 3), Some(true));
    }

    #[test]
    fn catch_up_goes_full_speed_only_for_long_rounds_that_do_not_shrink() {
        let (long, longer) = (ms(2000), ms(2400));
        // The first round, however long: gentle.
        assert!(!catch_up_needs_full_speed(longer, None));
        // Shrinking: gentle keeps up.
        assert!(!catch_up_needs_full_speed(long, Some(longer)));
        // Not shrinking: it does not.
        assert!(catch_up_needs_full_speed(longer, Some(long)));
        assert!(catch_up_needs_full_speed(long, Some(long)));
        // Short rounds stay gentle whatever their trend.
        assert!(!catch_up_needs_full_speed(ms(20), Some(ms(10))));
    }

    #[test]
    fn gentle_seconds_add_up_the_gentle_spells() {
        let change = |at_seconds, gentle| GaitChange {
            at_seconds,
            gentle,
            read_bytes: 0,
        };
        // Gentle 0..0.5, full, gentle 2..3, full, gentle 4..end (5).
        let changes = [
            change(0.5, false),
            change(2.0, true),
            change(3.0, false),
            change(4.0, true),
        ];
        assert!((gentle_seconds(&changes, 5.0) - 2.5).abs() < 1e-9);
        assert!((gentle_seconds(&[], 2.0) - 2.0).abs() < 1e-9);
        assert!(gentle_seconds(&[change(0.01, false)], 9.0) < 0.02);
    }
}
