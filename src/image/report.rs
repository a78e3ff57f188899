//! What a run says: the progress lines of the main pass, the summary, the
//! last line and exit status, and `--stats-json`.

use super::stats::{Latency, RunStats, UnreadableStats};
use super::{ImageOptions, Outcome, Verdict, output};
use crate::exit::Exit;
use crate::units::{Bytes, Rate};
use anyhow::Context;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Progress lines at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Runs `body` with a thread that prints a progress line every second until
/// it returns: `body` adds the bytes it has read to the counter it is given;
/// `status` says the dirty sectors and event drops at each line.
pub(super) fn with_progress<T>(
    total_bytes: u64,
    status: impl Fn() -> (u64, u64) + Sync,
    body: impl FnOnce(&AtomicU64) -> T,
) -> T {
    let progress = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let started = Instant::now();
            let mut next = started + PROGRESS_INTERVAL;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                if Instant::now() < next {
                    continue;
                }
                next += PROGRESS_INTERVAL;
                let (dirty_sectors, lost) = status();
                eprintln!(
                    "{}",
                    progress_line(
                        progress.load(Ordering::Relaxed),
                        total_bytes,
                        started.elapsed(),
                        dirty_sectors,
                        lost
                    )
                );
            }
        });
        // Stops the progress thread on every way out, unwinding too.
        let _stop_progress = SetOnDrop(&done);
        body(&progress)
    })
}

/// One progress line: `read_bytes` of `total_bytes` after `elapsed`.
fn progress_line(
    read_bytes: u64,
    total_bytes: u64,
    elapsed: Duration,
    dirty_sectors: u64,
    lost: u64,
) -> String {
    let rate = read_bytes as f64 / elapsed.as_secs_f64();
    let eta = if rate > 0.0 {
        format!(
            "{:.0}s",
            total_bytes.saturating_sub(read_bytes) as f64 / rate
        )
    } else {
        "unknown".to_string()
    };
    format!(
        "Read {} of {} ({}, ETA {eta}) -- {dirty_sectors} dirty sectors ({lost} event drops)",
        Bytes(read_bytes),
        Bytes(total_bytes),
        Rate(rate),
    )
}

/// Sets the flag when dropped: a helper thread's stop signal that also
/// fires when its scope unwinds.
pub(super) struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl std::fmt::Display for UnreadableStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unreadable range{}, {} ({} bytes): ",
            self.range_count,
            if self.range_count == 1 { "" } else { "s" },
            Bytes(self.bytes),
            self.bytes
        )?;
        for (index, range) in self.ranges.iter().enumerate() {
            let sep = if index == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}bytes {}..{}",
                range.offset_bytes,
                range.offset_bytes + range.len_bytes
            )?;
        }
        if self.range_count > self.ranges.len() as u64 {
            write!(
                f,
                ", ... ({} more)",
                self.range_count - self.ranges.len() as u64
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "no reads");
        }
        write!(
            f,
            "p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us ({} reads)",
            self.p50, self.p90, self.p99, self.p99_9, self.max, self.count
        )
    }
}

/// Prints the end-of-run summary on stderr.
pub fn print_summary(outcome: &Outcome) {
    for line in summary_lines(outcome) {
        eprintln!("{line}");
    }
}

/// The end-of-run summary, a line each.
fn summary_lines(outcome: &Outcome) -> Vec<String> {
    let stats = &outcome.stats;
    let mut lines = vec![
        format!(
            "Summary: main pass {} at {}; read latency {}",
            Bytes(stats.main_pass.bytes),
            Rate(stats.main_pass.bytes_per_second),
            stats.main_pass.latency_us
        ),
        format!(
            "Summary: catch-up {} rounds, {} re-read; read latency {}",
            stats.rounds.len(),
            Bytes(stats.catch_up.bytes),
            stats.catch_up.latency_us
        ),
        format!(
            "Summary: {} write events seen, {} lost ({}); dirty map {}{}",
            stats.events.writes_seen,
            stats.events.lost,
            stats.event_source,
            Bytes(stats.dirty_map_memory_bytes),
            match stats.dirty_map_whole_region_marks {
                0 => String::new(),
                marks => format!(" (at its bound: {marks} regions marked whole, re-read in full)"),
            }
        ),
    ];
    lines.extend(freeze_line(stats));
    lines.extend(yield_line(stats));
    if stats.unreadable.range_count > 0 {
        lines.push(format!(
            "Summary: {} (B: records; restored as zeros); {} chunks re-read block by block, {} retries",
            stats.unreadable, stats.unreadable.chunks_salvaged, stats.unreadable.retry_reads
        ));
    }
    lines.push(format!(
        "Summary: image {} in {:.1}s{}",
        Bytes(stats.image_bytes),
        stats.seconds,
        match outcome.verdict {
            Verdict::Converged => String::new(),
            Verdict::Unconverged { changed_bytes } =>
                format!(", NOT converged ({} may be stale)", Bytes(changed_bytes)),
        }
    ));
    lines
}

/// The default's yielding: how long the run read gently, and what it could
/// not see.
fn yield_line(stats: &RunStats) -> Option<String> {
    let yielding = stats.yielding.as_ref()?;
    // A run starts gentle: one spell, and one more per switch back.
    let spells = 1 + yielding.gait_changes.iter().filter(|c| c.gentle).count();
    Some(format!(
        "Summary: read gently for {:.1}s of {:.1}s ({} {}){}",
        yielding.gentle_seconds,
        stats.seconds,
        spells,
        if spells == 1 { "spell" } else { "spells" },
        if yielding.blind_to_reads {
            "; other programs' reads could not be seen"
        } else {
            ""
        }
    ))
}

/// `--freeze`: what was frozen, how long, and whether it ended early.
fn freeze_line(stats: &RunStats) -> Option<String> {
    let seconds = stats.freeze_seconds?;
    Some(format!(
        "Summary: froze {} for {:.0} ms{}",
        stats
            .frozen
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        seconds * 1000.0,
        match &stats.freeze_ended_early {
            Some(why) => format!(
                ", thawed early ({why}): the image is NOT point-in-time, only crash-consistent"
            ),
            None => String::new(),
        }
    ))
}

/// How `hot-clone image` ends after a run that wrote its trailer: the last
/// line on stderr and the exit status. Exit 3 wins over 6: an unconverged
/// image is not a consistent copy.
pub fn ending(outcome: &Outcome, device: &Path) -> (String, Exit) {
    let unreadable_bytes = outcome.stats.unreadable.bytes;
    match outcome.verdict {
        Verdict::Converged if unreadable_bytes == 0 => {
            let line = match &outcome.stats.freeze_ended_early {
                Some(why) => format!(
                    "Done, but NOT point-in-time: {why}, so the freeze ended early; the image is crash-consistent, as without --freeze"
                ),
                None => "Done".to_string(),
            };
            (line, Exit::Success)
        }
        Verdict::Converged => (
            format!(
                "Done, but {unreadable_bytes} bytes of {} could not be read: the image records them as bad ranges and holds nothing for them (see above)",
                device.display()
            ),
            Exit::Unreadable,
        ),
        Verdict::Unconverged { .. } => (
            format!(
                "Done, but NOT converged (see the warning above){}",
                if unreadable_bytes > 0 {
                    format!(", and {unreadable_bytes} bytes could not be read")
                } else {
                    String::new()
                }
            ),
            Exit::Incomplete,
        ),
    }
}

/// `--stats-json`: the run's statistics, written atomically.
pub(super) fn write_stats(options: &ImageOptions, stats: &RunStats) -> anyhow::Result<()> {
    if let Some(path) = &options.stats_json {
        let text = serde_json::to_string_pretty(stats).expect("stats serialize");
        output::write_atomically(
            path,
            (text + "\n").as_bytes(),
            "--stats-json",
            options.force,
        )
        .with_context(|| format!("cannot write the run statistics to {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
