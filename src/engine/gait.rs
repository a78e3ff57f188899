//! How the engine reads right now: at full speed, or gently, switched while
//! reads run (by `image::yielding`, which watches the disk for I/O of
//! anyone else).
//!
//! What a live request waits for is the bytes of ours queued ahead of it at
//! the device (PERF.md, `tune::paced_geometry`). So the gentle gait keeps at
//! most one read of ours in flight, of at most [`GENTLE_CHUNK_BYTES`] on a
//! queued device, and after each read leaves the device to others for as
//! long again as that read took ([`GAP_PER_SERVICE`]): we occupy the device
//! half the time at most, and a live request queues behind at most one
//! small read. The gap follows the device's own speed, so the gait needs no
//! rate to be chosen for it; `--max-rate` still caps both gaits.
//!
//! The decision for each submission is the pure [`admit`], so the orders
//! that matter (a switch with reads in flight, a gap not yet over, another
//! worker's turn) are unit tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The largest read of the gentle gait on a queued device: about 50-100 us
/// at the speeds of a loop device or an NVMe disk (PERF.md), so a live
/// request that finds one of ours ahead of it waits about that long.
pub const GENTLE_CHUNK_BYTES: u32 = 128 << 10;

/// The gap after a gentle read, per unit of its service time: 1 = as long
/// again, so that we use the device half the time at most.
pub const GAP_PER_SERVICE: u32 = 1;

/// The longest one worker sleeps before looking again (a gap, or while
/// another worker has the gentle turn), so that a switch back to full
/// speed and a stop are seen promptly.
pub const HOLD_SLICE: Duration = Duration::from_millis(2);

/// Whether a worker may submit a read now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Submit one read of at most `len_bytes_max`.
    Go { len_bytes_max: u32 },
    /// Not now: look again in at most this long. A worker with nothing in
    /// flight sleeps it; one with reads in flight waits for them instead.
    Hold(Duration),
}

/// The decision for one submission: `worker_index` has `in_flight` reads on
/// its ring; `chunk_bytes` is the engine's read size; `wait` is how long
/// the gentle gap still runs (zero once it is over).
///
/// Full speed: always go, at the engine's read size. Gentle: only worker 0
/// reads (the others hold, after their reads in flight complete), one read
/// at a time, after the gap, of at most `gentle_chunk_bytes`.
pub fn admit(
    gentle: bool,
    worker_index: usize,
    in_flight: usize,
    chunk_bytes: u32,
    gentle_chunk_bytes: u32,
    wait: Duration,
) -> Admit {
    if !gentle {
        return Admit::Go {
            len_bytes_max: chunk_bytes,
        };
    }
    if worker_index != 0 || in_flight > 0 {
        return Admit::Hold(HOLD_SLICE);
    }
    if !wait.is_zero() {
        return Admit::Hold(wait.min(HOLD_SLICE));
    }
    Admit::Go {
        len_bytes_max: chunk_bytes.min(gentle_chunk_bytes),
    }
}

/// The gait shared by the engine's workers: set by [`Gait::set_gentle`]
/// from any thread, read by the workers before every submission.
#[derive(Debug)]
pub struct Gait {
    gentle: AtomicBool,
    /// The read size of the gentle gait (the engine's own on inline devices,
    /// whose reads are copies on the submitting CPU, not a device queue).
    gentle_chunk_bytes: u32,
    epoch: Instant,
    /// When the gentle gap ends, in nanoseconds since `epoch`.
    resume_at_ns: AtomicU64,
}

impl Gait {
    pub fn new(gentle_chunk_bytes: u32) -> Gait {
        Gait {
            gentle: AtomicBool::new(false),
            gentle_chunk_bytes,
            epoch: Instant::now(),
            resume_at_ns: AtomicU64::new(0),
        }
    }

    pub fn set_gentle(&self, gentle: bool) {
        self.gentle.store(gentle, Ordering::Relaxed);
    }

    pub fn is_gentle(&self) -> bool {
        self.gentle.load(Ordering::Relaxed)
    }

    /// [`admit`] for `worker_index` now.
    pub fn admit(&self, worker_index: usize, in_flight: usize, chunk_bytes: u32) -> Admit {
        let gentle = self.is_gentle();
        // Full speed reads no clock per submission.
        let wait = if gentle {
            let resume_at_ns = self.resume_at_ns.load(Ordering::Relaxed);
            Duration::from_nanos(resume_at_ns.saturating_sub(self.now_ns()))
        } else {
            Duration::ZERO
        };
        admit(
            gentle,
            worker_index,
            in_flight,
            chunk_bytes,
            self.gentle_chunk_bytes,
            wait,
        )
    }

    /// A read that took `service` completed: while gentle, the next may
    /// start only after a gap of [`GAP_PER_SERVICE`] times as long.
    pub fn completed(&self, service: Duration) {
        if !self.is_gentle() {
            return;
        }
        let gap_ns = service.as_nanos() as u64 * u64::from(GAP_PER_SERVICE);
        self.resume_at_ns
            .store(self.now_ns() + gap_ns, Ordering::Relaxed);
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    #[test]
    fn full_speed_always_goes_at_the_engine_read_size() {
        for worker in 0..3 {
            for in_flight in [0, 1, 7] {
                assert_eq!(
                    admit(
                        false,
                        worker,
                        in_flight,
                        MIB,
                        GENTLE_CHUNK_BYTES,
                        Duration::ZERO
                    ),
                    Admit::Go { len_bytes_max: MIB }
                );
            }
        }
        // A gap left over from a gentle spell does not slow full speed.
        assert_eq!(
            admit(false, 0, 0, MIB, GENTLE_CHUNK_BYTES, Duration::from_secs(1)),
            Admit::Go { len_bytes_max: MIB }
        );
    }

    #[test]
    fn gentle_reads_one_small_read_at_a_time_on_worker_zero() {
        assert_eq!(
            admit(true, 0, 0, MIB, GENTLE_CHUNK_BYTES, Duration::ZERO),
            Admit::Go {
                len_bytes_max: GENTLE_CHUNK_BYTES
            }
        );
        // A switch while worker 0 has reads in flight: it waits them out.
        assert_eq!(
            admit(true, 0, 3, MIB, GENTLE_CHUNK_BYTES, Duration::ZERO),
            Admit::Hold(HOLD_SLICE)
        );
        // Every other worker holds, whatever it has in flight.
        for in_flight in [0, 2] {
            assert_eq!(
                admit(true, 1, in_flight, MIB, GENTLE_CHUNK_BYTES, Duration::ZERO),
                Admit::Hold(HOLD_SLICE)
            );
        }
        // The engine's read size is kept when it is smaller.
        assert_eq!(
            admit(true, 0, 0, 64 << 10, GENTLE_CHUNK_BYTES, Duration::ZERO),
            Admit::Go {
                len_bytes_max: 64 << 10
            }
        );
    }

    #[test]
    fn gentle_waits_out_the_gap_in_slices() {
        let short = Duration::from_micros(300);
        assert_eq!(
            admit(true, 0, 0, MIB, GENTLE_CHUNK_BYTES, short),
            Admit::Hold(short)
        );
        assert_eq!(
            admit(true, 0, 0, MIB, GENTLE_CHUNK_BYTES, Duration::from_secs(5)),
            Admit::Hold(HOLD_SLICE)
        );
    }

    #[test]
    fn the_gap_follows_the_service_time_only_while_gentle() {
        let gait = Gait::new(GENTLE_CHUNK_BYTES);
        gait.completed(Duration::from_secs(60));
        assert!(
            matches!(gait.admit(0, 0, MIB), Admit::Go { .. }),
            "full speed sets no gap"
        );
        gait.set_gentle(true);
        assert!(matches!(gait.admit(0, 0, MIB), Admit::Go { .. }));
        gait.completed(Duration::from_secs(60));
        assert_eq!(gait.admit(0, 0, MIB), Admit::Hold(HOLD_SLICE));
        // Back to full speed: the gap no longer applies.
        gait.set_gentle(false);
        assert_eq!(gait.admit(0, 0, MIB), Admit::Go { len_bytes_max: MIB });
    }
}
