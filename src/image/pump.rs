//! The pump: a thread that drains the trace every couple of milliseconds
//! into the dirty map and the pending writes, checks the source's health,
//! ends a freeze at `--freeze-timeout`, and switches the engine between
//! full speed and gentle as other programs use the disk (`yielding.rs`).

use super::pending::Completions;
use super::yielding::{self, GaitChange, Yielder};
use super::{Run, Traced, lock};
use crate::signals;
use crate::trace::live::foreground::ForegroundSensor;
use crate::trace::{Phase, WriteEvent};
use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The pump drains the trace at least this often.
const PUMP_INTERVAL: Duration = Duration::from_millis(2);

/// The pump asks the source for lost events at least this often.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The default's yielding, fed by the foreground sensor.
pub(super) struct Yielding {
    /// `None` once it failed: the run then stays gentle.
    sensor: Option<Box<dyn ForegroundSensor>>,
    yielder: Yielder,
    last_sample: Option<Instant>,
    /// The gait the engine has: the yielder's, or full speed while frozen.
    engine_gentle: bool,
    changes: Vec<GaitChange>,
}

impl Yielding {
    /// `sensor`: `None` if no sensor could be opened (the run stays gentle).
    pub(super) fn new(sensor: Option<Box<dyn ForegroundSensor>>) -> Yielding {
        Yielding {
            sensor,
            yielder: Yielder::new(),
            last_sample: None,
            engine_gentle: true,
            changes: Vec::new(),
        }
    }

    /// What the sensor is and whether it is blind to reads (`None`: no
    /// sensor).
    pub(super) fn sensor_facts(&self) -> (String, bool) {
        match &self.sensor {
            Some(sensor) => (sensor.describe(), sensor.blind_to_reads()),
            None => ("none: reading gently throughout".to_string(), true),
        }
    }
}

impl Run<'_> {
    /// Drains the trace until `done`, checking for loss; on loss or a
    /// signal it sets `stop` so the engine stops reading. Returns the
    /// gait's changes (none with `--full-speed`).
    pub(super) fn pump(&self, done: &AtomicBool) -> anyhow::Result<Vec<GaitChange>> {
        let mut last_loss_check = Instant::now();
        let mut yielding = lock(&self.yielding).take();
        let mut events = Vec::new();
        while !done.load(Ordering::SeqCst) {
            if let Some(yielding) = &mut yielding {
                self.yield_to_foreground(yielding);
            }
            if signals::interrupted() {
                self.stop.store(true, Ordering::SeqCst);
            }
            self.check_freeze_timeout()?;
            let drained = self.drain(&mut events)?;
            if last_loss_check.elapsed() >= LOSS_CHECK_INTERVAL {
                last_loss_check = Instant::now();
                self.check_health()?;
            }
            if drained == 0 {
                std::thread::sleep(PUMP_INTERVAL);
            }
        }
        self.check_health()?;
        Ok(yielding.map_or_else(Vec::new, |yielding| yielding.changes))
    }

    /// Once a sample interval: the gait the foreground allows; full speed
    /// while frozen, and once catch-up reads could not keep up gently.
    fn yield_to_foreground(&self, yielding: &mut Yielding) {
        if yielding
            .last_sample
            .is_some_and(|at| at.elapsed() < yielding::SAMPLE_INTERVAL)
        {
            return;
        }
        yielding.last_sample = Some(Instant::now());
        let at = self.started.elapsed();
        if let Some(sensor) = &mut yielding.sensor {
            match sensor.count() {
                Ok(count) => {
                    if let Some(gentle) = yielding.yielder.observe(at, count) {
                        tracing::info!(
                            "{}: {}",
                            self.device.path.display(),
                            if gentle {
                                "other programs use the disk: reading gently"
                            } else {
                                "no I/O of other programs for a second: reading at full speed"
                            }
                        );
                    }
                }
                Err(error) => {
                    eprintln!(
                        "hot-clone: WARNING: cannot sense other programs' I/O on {} any more ({error}): reading gently to the end",
                        self.device.path.display()
                    );
                    yielding.sensor = None;
                    yielding.yielder = Yielder::new();
                }
            }
        }
        let gentle = yielding.yielder.is_gentle()
            && !self.freeze_held()
            && !self.catch_up_full_speed.load(Ordering::Relaxed);
        if gentle != yielding.engine_gentle {
            yielding.engine_gentle = gentle;
            self.engine.set_gentle(gentle);
            yielding.changes.push(GaitChange {
                at_seconds: at.as_secs_f64(),
                gentle,
                read_bytes: self.read_bytes.load(Ordering::Relaxed),
            });
        }
    }

    /// Drains the trace once, marking every write. `events` is scratch
    /// space the caller keeps, so that draining every couple of
    /// milliseconds allocates nothing once it has grown.
    fn drain(&self, events: &mut Vec<WriteEvent>) -> anyhow::Result<usize> {
        events.clear();
        let mut traced = lock(&self.traced);
        self.drain_locked(&mut traced, false, events)?;
        // Marked before the lock is released: whoever takes the dirty set
        // after holding this lock sees these writes.
        drop(traced);
        Ok(events.len())
    }

    /// Drains with the lock held: marks every write and updates the
    /// pending writes. `sync` waits first until every event emitted before
    /// the call is readable.
    pub(super) fn drain_locked(
        &self,
        traced: &mut Traced,
        sync: bool,
        events: &mut Vec<WriteEvent>,
    ) -> anyhow::Result<()> {
        let Traced { source, pending } = traced;
        if sync {
            source.sync_drain(events)
        } else {
            source.drain(events)
        }
        .context("cannot read the trace")?;
        // One CPU's buffer after another: put the batch in time order, so
        // a completion meets the queue event before it (`pending.rs`).
        events.sort_unstable_by_key(|event| event.timestamp_ns);
        let now = Instant::now();
        for event in events.iter() {
            self.mark(event);
            match event.phase {
                Phase::Queue => pending.queued(
                    event.sector_first,
                    event.sector_count,
                    event.timestamp_ns,
                    now,
                ),
                Phase::Complete => pending.completed(
                    event.sector_first,
                    event.sector_count,
                    event.timestamp_ns,
                    now,
                ),
                Phase::Issue => {}
            }
        }
        Ok(())
    }

    fn mark(&self, event: &WriteEvent) {
        self.dirty
            .mark_sectors(event.sector_first, event.sector_count);
        if self.options.print_writes {
            eprintln!("{}", write_line(event));
        }
    }

    /// Asks the source for its health and the pending writes whether
    /// completions are seen; a run that cannot vouch for its image stops.
    fn check_health(&self) -> anyhow::Result<()> {
        let (health, completions) = {
            let mut traced = lock(&self.traced);
            let health = traced.source.health().context("cannot check the trace")?;
            (health, traced.pending.completions(Instant::now()))
        };
        self.lost.store(health.lost, Ordering::SeqCst);
        let missing = self.mounts.is_empty() && matches!(completions, Completions::Missing { .. });
        let clean = health.is_clean();
        if missing || !clean {
            let mut trouble = lock(&self.trouble);
            if missing {
                // No freeze can end this device's writes: the run cannot
                // vouch for an image, so stop reading now rather than after
                // the pass.
                trouble.completions_missing = Some(completions);
            }
            if !clean {
                trouble.unclean = Some(health);
            }
            drop(trouble);
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// `--print-writes`: one line per write event.
fn write_line(event: &WriteEvent) -> String {
    format!(
        "{} {}+{} {:?} pid {} cpu {}{}",
        match event.phase {
            Phase::Queue => "Q",
            Phase::Issue => "D",
            Phase::Complete => "C",
        },
        event.sector_first,
        event.sector_count,
        event.kind,
        event.pid,
        event.cpu,
        if event.error != 0 {
            format!(" error {}", event.error)
        } else {
            String::new()
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{DevT, WriteKind};

    fn event(phase: Phase, error: i32) -> WriteEvent {
        WriteEvent {
            dev: DevT::from_major_minor(7, 0).expect("fits"),
            sector_first: 2048,
            sector_count: 8,
            kind: WriteKind::Write,
            phase,
            pid: 42,
            timestamp_ns: 1,
            cpu: 1,
            error,
        }
    }

    #[test]
    fn print_writes_says_phase_range_kind_task_and_error() {
        assert_eq!(
            write_line(&event(Phase::Queue, 0)),
            "Q 2048+8 Write pid 42 cpu 1"
        );
        assert_eq!(
            write_line(&event(Phase::Issue, 0)),
            "D 2048+8 Write pid 42 cpu 1"
        );
        assert_eq!(
            write_line(&event(Phase::Complete, -5)),
            "C 2048+8 Write pid 42 cpu 1 error -5"
        );
    }
}
