//! The pump: a thread that drains the trace every couple of milliseconds
//! into the dirty map and the pending writes, checks the source's health,
//! ends a freeze at `--freeze-timeout`, and paces reads (`--adaptive`).

use super::adaptive::{self, Controller, LatencyProbe};
use super::pending::Completions;
use super::stats::RateRange;
use super::{Run, Traced, lock};
use crate::signals;
use crate::trace::{Phase, WriteEvent};
use crate::units::Rate;
use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The pump drains the trace at least this often.
const PUMP_INTERVAL: Duration = Duration::from_millis(2);

/// The pump asks the source for lost events at least this often.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// `--adaptive`: the pump's read-rate control, fed by its drains.
struct Pacing {
    /// The workload's write latencies.
    probe: LatencyProbe,
    controller: Controller,
    window_started: Instant,
    /// The lowest and highest rate set.
    rates: RateRange,
}

impl Run<'_> {
    /// Drains the trace until `done`, checking for loss; on loss or a
    /// signal it sets `stop` so the engine stops reading. Returns the range
    /// of read rates `--adaptive` set (empty without it).
    pub(super) fn pump(&self, done: &AtomicBool) -> anyhow::Result<RateRange> {
        let mut last_loss_check = Instant::now();
        let mut pacing = self.options.adaptive.then(|| Pacing {
            probe: LatencyProbe::default(),
            controller: Controller::new(self.options.engine.max_rate_bytes_per_second),
            window_started: Instant::now(),
            rates: RateRange::default(),
        });
        if let Some(pacing) = &mut pacing {
            self.set_rate(pacing, pacing.controller.rate());
        }
        let mut events = Vec::new();
        while !done.load(Ordering::SeqCst) {
            if let Some(pacing) = &mut pacing {
                self.pace(pacing);
            }
            if signals::interrupted() {
                self.stop.store(true, Ordering::SeqCst);
            }
            self.check_freeze_timeout()?;
            let drained = self.drain(&mut events, pacing.as_mut().map(|p| &mut p.probe))?;
            if last_loss_check.elapsed() >= LOSS_CHECK_INTERVAL {
                last_loss_check = Instant::now();
                self.check_health()?;
            }
            if drained == 0 {
                std::thread::sleep(PUMP_INTERVAL);
            }
        }
        self.check_health()?;
        Ok(pacing.map_or_else(RateRange::default, |pacing| pacing.rates))
    }

    /// Once a window: the rate the workload's write latency allows.
    fn pace(&self, pacing: &mut Pacing) {
        if pacing.window_started.elapsed() < Duration::from_millis(adaptive::WINDOW_MS) {
            return;
        }
        pacing.window_started = Instant::now();
        let latency = pacing.probe.take_window();
        let rate = pacing.controller.on_window(latency);
        self.set_rate(pacing, rate);
        if self.options.verbose {
            eprintln!(
                "Adaptive: workload write latency {} -> reading at {}",
                latency.map_or("none".to_string(), |l| format!("{l:.0} us")),
                Rate(rate as f64)
            );
        }
    }

    fn set_rate(&self, pacing: &mut Pacing, bytes_per_second: u64) {
        self.engine.set_rate_limit(bytes_per_second);
        pacing.rates.include(bytes_per_second);
    }

    /// Drains the trace once, marking every write, and feeds `probe` the
    /// write latencies. `events` is scratch space the caller keeps, so
    /// that draining every couple of milliseconds allocates nothing once
    /// it has grown.
    fn drain(
        &self,
        events: &mut Vec<WriteEvent>,
        probe: Option<&mut LatencyProbe>,
    ) -> anyhow::Result<usize> {
        events.clear();
        let mut traced = lock(&self.traced);
        self.drain_locked(&mut traced, false, events)?;
        // Marked before the lock is released: whoever takes the dirty set
        // after holding this lock sees these writes.
        drop(traced);
        if let Some(probe) = probe {
            for event in events.iter() {
                match event.phase {
                    Phase::Queue => probe.queued(event.sector_first, event.timestamp_ns),
                    Phase::Complete => probe.completed(event.sector_first, event.timestamp_ns),
                    Phase::Issue => {}
                }
            }
        }
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
