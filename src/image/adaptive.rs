//! `--adaptive`: imaging that yields to the live workload. The trace already
//! sees the workload's writes being queued and completed; their latency is
//! the workload's own measure of how busy the device is. The controller
//! starts reading slowly and speeds up while that latency stays near the
//! lowest seen, and halves its rate when the latency climbs — additive
//! increase would be too slow for a device that reads GB/s, so it grows by
//! a quarter per window instead (TCP slow start's shape, gentler).
//!
//! Needs completion events: request-based devices (loop, NVMe, SCSI) and
//! partitions report them; bio-based zram does not, so there the controller
//! never sees a latency and simply ramps to full speed.

use std::collections::HashMap;

/// Decisions are made once per window of this length.
pub const WINDOW_MS: u64 = 100;

/// The first rate, and the lowest the controller goes: slow enough to be
/// harmless, fast enough to finish a small device quickly.
pub const RATE_START_BYTES_PER_SECOND: u64 = 64 << 20;
pub const RATE_MIN_BYTES_PER_SECOND: u64 = 16 << 20;

/// Latency above `baseline * SLOW_FACTOR + SLOW_MARGIN_US` means the
/// workload is suffering.
const SLOW_FACTOR: f64 = 2.0;
const SLOW_MARGIN_US: f64 = 200.0;

/// Growth per window while the workload is fine.
const GROWTH: f64 = 1.25;

/// Queue events waiting for their completion, at most (a bounded memory
/// even if completions go missing).
const PENDING_MAX: usize = 65_536;

/// Pairs queue and completion events of writes by their first sector and
/// collects their latencies for the current window.
#[derive(Debug, Default)]
pub struct LatencyProbe {
    queued_ns: HashMap<u64, u64>,
    window_sum_us: f64,
    window_count: u64,
}

impl LatencyProbe {
    pub fn queued(&mut self, sector_first: u64, timestamp_ns: u64) {
        if self.queued_ns.len() >= PENDING_MAX {
            self.queued_ns.clear();
        }
        self.queued_ns.insert(sector_first, timestamp_ns);
    }

    pub fn completed(&mut self, sector_first: u64, timestamp_ns: u64) {
        if let Some(queued) = self.queued_ns.remove(&sector_first)
            && timestamp_ns >= queued
        {
            self.window_sum_us += (timestamp_ns - queued) as f64 / 1000.0;
            self.window_count += 1;
        }
    }

    /// The mean latency of the window's samples (None without any), and
    /// starts a new window.
    pub fn take_window(&mut self) -> Option<f64> {
        let mean = (self.window_count > 0).then(|| self.window_sum_us / self.window_count as f64);
        self.window_sum_us = 0.0;
        self.window_count = 0;
        mean
    }
}

/// The rate controller.
#[derive(Debug, Clone)]
pub struct Controller {
    rate: f64,
    /// The user's --max-rate, or None.
    ceiling: Option<f64>,
    /// The lowest window latency seen: what the device gives the workload
    /// when we stay out of its way.
    baseline_us: Option<f64>,
}

impl Controller {
    pub fn new(ceiling_bytes_per_second: u64) -> Controller {
        let ceiling = (ceiling_bytes_per_second > 0).then_some(ceiling_bytes_per_second as f64);
        let start = RATE_START_BYTES_PER_SECOND as f64;
        Controller {
            rate: ceiling.map_or(start, |c| c.min(start)),
            ceiling,
            baseline_us: None,
        }
    }

    /// The rate to read at now, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Takes one window's mean write latency (None: no write completed)
    /// and returns the new rate.
    pub fn on_window(&mut self, latency_us: Option<f64>) -> u64 {
        let slow = match latency_us {
            None => false,
            Some(latency) => {
                let baseline = self.baseline_us.map_or(latency, |b| b.min(latency));
                self.baseline_us = Some(baseline);
                latency > baseline * SLOW_FACTOR + SLOW_MARGIN_US
            }
        };
        self.rate = if slow {
            (self.rate / 2.0).max(RATE_MIN_BYTES_PER_SECOND as f64)
        } else {
            let grown = self.rate * GROWTH;
            self.ceiling.map_or(grown, |c| grown.min(c))
        };
        self.rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_pairs_queue_and_completion_by_sector() {
        let mut probe = LatencyProbe::default();
        probe.queued(100, 1_000_000);
        probe.queued(200, 1_000_000);
        probe.completed(100, 1_300_000); // 300 us
        probe.completed(200, 1_100_000); // 100 us
        probe.completed(999, 5_000_000); // never queued: ignored
        assert_eq!(probe.take_window(), Some(200.0));
        assert_eq!(probe.take_window(), None);
    }

    #[test]
    fn ramps_up_while_the_workload_is_fine() {
        let mut c = Controller::new(0);
        let start = c.rate();
        for _ in 0..10 {
            c.on_window(Some(100.0));
        }
        assert!(c.rate() > start * 9, "{} vs {start}", c.rate());
        // No samples at all (no foreground writes): keeps ramping.
        let before = c.rate();
        c.on_window(None);
        assert!(c.rate() > before);
    }

    #[test]
    fn halves_when_latency_climbs_and_respects_floor_and_ceiling() {
        let mut c = Controller::new(0);
        for _ in 0..20 {
            c.on_window(Some(100.0));
        }
        let fast = c.rate();
        c.on_window(Some(5_000.0));
        assert_eq!(c.rate(), fast / 2);
        for _ in 0..40 {
            c.on_window(Some(5_000.0));
        }
        assert_eq!(c.rate(), RATE_MIN_BYTES_PER_SECOND);
        let mut capped = Controller::new(100 << 20);
        for _ in 0..40 {
            capped.on_window(Some(50.0));
        }
        assert_eq!(capped.rate(), 100 << 20);
    }
}
