//! What a run did, in numbers: the `--stats-json` document and the
//! arithmetic that fills it. The text made of it is `report.rs`.

use super::bad::BadMap;
use super::yielding::GaitChange;
use crate::engine::{EngineSettings, ReadStats};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::PathBuf;

/// Unreadable ranges listed in the summary and `--stats-json`, and logged
/// as found; the rest are counted.
pub const UNREADABLE_RANGES_LISTED: usize = 16;

/// Ranges the device could not read, in `--stats-json` and the summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UnreadableStats {
    /// Maximal ranges, each a `B:` record in the image.
    pub range_count: u64,
    pub bytes: u64,
    /// The first [`UNREADABLE_RANGES_LISTED`] ranges, by offset.
    pub ranges: Vec<ByteRange>,
    /// `--read-retries` and `--max-bad-bytes`.
    pub read_retries: u32,
    pub max_bad_bytes: u64,
    /// Chunks whose read failed and were re-read in pieces and blocks, the
    /// reads that took, and of them the retries of a failing block.
    pub chunks_salvaged: u64,
    pub salvage_reads: u64,
    pub retry_reads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

/// Salvage work over every pass of a run (`engine::Salvage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SalvageCounts {
    pub chunks_salvaged: u64,
    pub salvage_reads: u64,
    pub retry_reads: u64,
}

impl SalvageCounts {
    pub fn add(&mut self, stats: &ReadStats) {
        self.chunks_salvaged += stats.chunks_salvaged;
        self.salvage_reads += stats.salvage_reads;
        self.retry_reads += stats.retry_reads;
    }
}

impl UnreadableStats {
    /// What `bad` holds after the last read, with the salvage counts and
    /// the bounds it was read under.
    pub fn of(
        bad: &BadMap,
        salvage: SalvageCounts,
        read_retries: u32,
        max_bad_bytes: u64,
    ) -> UnreadableStats {
        UnreadableStats {
            range_count: bad.len() as u64,
            bytes: bad.bytes(),
            ranges: bad
                .ranges()
                .iter()
                .take(UNREADABLE_RANGES_LISTED)
                .map(|r| ByteRange {
                    offset_bytes: r.start,
                    len_bytes: r.end - r.start,
                })
                .collect(),
            read_retries,
            max_bad_bytes,
            chunks_salvaged: salvage.chunks_salvaged,
            salvage_reads: salvage.salvage_reads,
            retry_reads: salvage.retry_reads,
        }
    }
}

/// What one run did, for `--stats-json` and the summary.
#[derive(Clone, Debug, Serialize)]
pub struct RunStats {
    pub device: PathBuf,
    pub device_bytes: u64,
    pub logical_block_bytes: u32,
    pub dirty_block_bytes: u32,
    pub event_source: String,
    pub engine: EngineStats,
    pub quiesce_wait_seconds: f64,
    pub main_pass: PassStats,
    pub rounds: Vec<RoundStats>,
    pub catch_up: PassStats,
    pub events: EventStats,
    pub dirty_map_memory_bytes: u64,
    /// `--dirty-map-memory`: the bound, and how often a region had to be
    /// marked whole because the map had reached it.
    pub dirty_map_memory_max_bytes: u64,
    pub dirty_map_whole_region_marks: u64,
    pub image_bytes: u64,
    /// CPU time of the whole process (user + system), from getrusage.
    pub cpu_seconds: f64,
    /// Peak resident memory of the process (read buffers, trace buffers
    /// mapped, dirty map, extents), from getrusage.
    pub max_rss_bytes: u64,
    pub converged: bool,
    /// Bytes that changed during the last round of an unconverged run.
    pub unconverged_changed_bytes: u64,
    /// `--freeze`: the mountpoints frozen for the final round, and for how
    /// long writes to them were blocked.
    pub frozen: Vec<PathBuf>,
    pub freeze_seconds: Option<f64>,
    /// Why the freeze ended before the rounds did (`--freeze-timeout`,
    /// `--freeze-memory`): the image is then not one instant of the
    /// filesystem.
    pub freeze_ended_early: Option<String>,
    /// Whether the run yielded to other programs' I/O (not
    /// `--full-speed`), and if so: how it sensed them, each switch of the
    /// gait (the run starts gentle), and the seconds it read gently.
    pub yielding: Option<YieldStats>,
    /// What the device could not read (each range a `B:` record).
    pub unreadable: UnreadableStats,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineStats {
    pub threads: usize,
    pub queue_depth: u32,
    pub chunk_bytes: u32,
    pub device_kind: String,
    pub registered_buffers: bool,
    pub pool_bytes: usize,
    pub notes: Vec<String>,
}

impl From<&EngineSettings> for EngineStats {
    fn from(s: &EngineSettings) -> EngineStats {
        EngineStats {
            threads: s.threads,
            queue_depth: s.queue_depth,
            chunk_bytes: s.chunk_bytes,
            device_kind: format!("{:?}", s.device_kind),
            registered_buffers: s.registered_buffers,
            pool_bytes: s.pool_bytes,
            notes: s.notes.clone(),
        }
    }
}

/// Reads of one pass (the main pass, or all catch-up rounds together).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassStats {
    pub bytes: u64,
    pub reads: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
    pub latency_us: Latency,
}

impl PassStats {
    /// One pass of the engine.
    pub fn of(stats: &ReadStats) -> PassStats {
        let seconds = stats.elapsed.as_secs_f64();
        PassStats {
            bytes: stats.bytes_read,
            reads: stats.reads,
            seconds,
            bytes_per_second: stats.bytes_read as f64 / seconds.max(1e-9),
            latency_us: Latency::of(&stats.latency_us),
        }
    }

    /// The catch-up rounds as one pass: their bytes and seconds summed,
    /// their reads and latencies from `latency`, which every round's reads
    /// were added to.
    pub fn of_rounds(rounds: &[RoundStats], latency: &Histogram<u64>) -> PassStats {
        let bytes = rounds.iter().map(|round| round.bytes_read).sum();
        let seconds = rounds.iter().map(|round| round.seconds).sum();
        PassStats {
            bytes,
            reads: latency.len(),
            seconds,
            bytes_per_second: bytes as f64 / f64::max(seconds, 1e-9),
            latency_us: Latency::of(latency),
        }
    }
}

/// Read latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        Latency {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p99_9: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundStats {
    pub round: u32,
    /// Dirty bytes taken for this round (whole dirty blocks).
    pub dirty_bytes: u64,
    pub extents: usize,
    pub bytes_read: u64,
    pub seconds: f64,
    /// Writes were still in flight when the round read, so it will read its
    /// extents again.
    pub unsettled: bool,
    /// The hold file existed: the round did not count toward the limit.
    pub held: bool,
    /// `--freeze`: the round read while the filesystems were frozen.
    pub frozen: bool,
    /// Sectors of writes queued and not yet seen complete at the look.
    pub pending_sectors: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EventStats {
    pub events_read: u64,
    pub writes_seen: u64,
    pub pages_read: u64,
    pub lost: u64,
    /// Queue events of writes in the imaged range.
    pub writes_queued: u64,
    /// Completion events that ended a queued write.
    pub completions_matched: u64,
    /// Sectors completed with no write queued there: writes queued before
    /// tracing started, or repeated completions.
    pub completions_unmatched_sectors: u64,
}

/// The default's yielding to other programs (`yielding.rs`).
#[derive(Clone, Debug, Serialize)]
pub struct YieldStats {
    /// What the sensor counts (`trace::live::foreground`).
    pub sensor: String,
    /// The sensor sees other programs' writes but not their reads.
    pub blind_to_reads: bool,
    pub gait_changes: Vec<GaitChange>,
    pub gentle_seconds: f64,
}

/// This process's use of the machine, from getrusage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub max_rss_bytes: u64,
}

impl Usage {
    /// getrusage(RUSAGE_SELF).
    pub fn own() -> Usage {
        // SAFETY: getrusage fills the struct we pass; zeroed is a valid start.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        Usage::of(usage.ru_utime, usage.ru_stime, usage.ru_maxrss)
    }

    /// From getrusage's user and system time and peak RSS.
    fn of(user: libc::timeval, system: libc::timeval, max_rss_kib: libc::c_long) -> Usage {
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Usage {
            cpu_seconds: seconds(user) + seconds(system),
            // Linux reports ru_maxrss in KiB.
            max_rss_bytes: u64::try_from(max_rss_kib).unwrap_or(0) * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn histogram(values: &[u64]) -> Histogram<u64> {
        let mut histogram = Histogram::<u64>::new(3).expect("histogram");
        for &value in values {
            histogram.record(value).expect("in range");
        }
        histogram
    }

    fn round(bytes_read: u64, seconds: f64) -> RoundStats {
        RoundStats {
            round: 1,
            dirty_bytes: bytes_read,
            extents: 1,
            bytes_read,
            seconds,
            unsettled: false,
            held: false,
            frozen: false,
            pending_sectors: 0,
        }
    }

    #[test]
    fn the_rounds_add_up_to_one_catch_up_pass() {
        let rounds = [round(4096, 0.5), round(8192, 1.5)];
        let pass = PassStats::of_rounds(&rounds, &histogram(&[10, 20, 30]));
        assert_eq!(pass.bytes, 12288);
        assert_eq!(pass.seconds, 2.0);
        assert_eq!(pass.bytes_per_second, 6144.0);
        assert_eq!(pass.reads, 3);
        assert_eq!(pass.latency_us.count, 3);
        assert_eq!(pass.latency_us.max, 30);
    }

    #[test]
    fn no_rounds_are_an_empty_pass_not_a_division_by_zero() {
        let pass = PassStats::of_rounds(&[], &histogram(&[]));
        assert_eq!((pass.bytes, pass.reads, pass.seconds), (0, 0, 0.0));
        assert_eq!(pass.bytes_per_second, 0.0);
        assert_eq!(pass.latency_us.count, 0);
    }

    #[test]
    fn a_pass_rate_is_its_bytes_over_its_time() {
        let stats = ReadStats {
            bytes_read: 1 << 20,
            reads: 4,
            elapsed: Duration::from_millis(250),
            latency_us: histogram(&[100, 200, 300, 400]),
            bytes_unreadable: 0,
            chunks_salvaged: 0,
            salvage_reads: 0,
            retry_reads: 0,
        };
        let pass = PassStats::of(&stats);
        assert_eq!(pass.bytes_per_second, 4.0 * f64::from(1 << 20));
        assert_eq!(pass.latency_us.p50, 200);
        assert_eq!(pass.latency_us.max, 400);
    }

    #[test]
    fn usage_adds_user_and_system_time_and_counts_rss_in_kib() {
        let time = |tv_sec, tv_usec| libc::timeval { tv_sec, tv_usec };
        assert_eq!(
            Usage::of(time(1, 500_000), time(2, 0), 3),
            Usage {
                cpu_seconds: 3.5,
                max_rss_bytes: 3072
            }
        );
    }

    #[test]
    fn unreadable_stats_list_the_first_ranges_and_count_the_rest() {
        let mut bad = BadMap::default();
        for index in 0..UNREADABLE_RANGES_LISTED as u64 + 2 {
            assert!(bad.insert(index * 8192..index * 8192 + 4096));
        }
        let salvage = SalvageCounts {
            chunks_salvaged: 1,
            salvage_reads: 2,
            retry_reads: 3,
        };
        let stats = UnreadableStats::of(&bad, salvage, 2, 1 << 30);
        assert_eq!(stats.range_count, UNREADABLE_RANGES_LISTED as u64 + 2);
        assert_eq!(stats.bytes, stats.range_count * 4096);
        assert_eq!(stats.ranges.len(), UNREADABLE_RANGES_LISTED);
        assert_eq!(
            stats.ranges[1],
            ByteRange {
                offset_bytes: 8192,
                len_bytes: 4096
            }
        );
        assert_eq!(
            (
                stats.chunks_salvaged,
                stats.salvage_reads,
                stats.retry_reads
            ),
            (1, 2, 3)
        );
    }
}
