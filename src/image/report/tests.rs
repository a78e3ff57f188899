use super::*;
use crate::image::stats::{
    ByteRange, EngineStats, EventStats, PassStats, RunStats, UnreadableStats,
};

fn stats() -> RunStats {
    RunStats {
        device: "/dev/loop7".into(),
        device_bytes: 64 << 20,
        logical_block_bytes: 512,
        dirty_block_bytes: 4096,
        event_source: "tracefs".into(),
        engine: EngineStats {
            threads: 1,
            queue_depth: 8,
            chunk_bytes: 1 << 20,
            device_kind: "Loop".into(),
            registered_buffers: true,
            pool_bytes: 8 << 20,
            notes: Vec::new(),
        },
        quiesce_wait_seconds: 0.0,
        main_pass: PassStats {
            bytes: 64 << 20,
            reads: 64,
            seconds: 0.5,
            bytes_per_second: f64::from(128 << 20),
            latency_us: Latency::default(),
        },
        rounds: Vec::new(),
        catch_up: PassStats::default(),
        events: EventStats {
            writes_seen: 12,
            ..EventStats::default()
        },
        dirty_map_memory_bytes: 8192,
        dirty_map_memory_max_bytes: u64::MAX,
        dirty_map_whole_region_marks: 0,
        image_bytes: (64 << 20) + 300,
        cpu_seconds: 0.1,
        max_rss_bytes: 1 << 20,
        converged: true,
        unconverged_changed_bytes: 0,
        frozen: Vec::new(),
        freeze_seconds: None,
        freeze_ended_early: None,
        yielding: None,
        unreadable: UnreadableStats::default(),
        seconds: 1.25,
    }
}

fn converged(stats: RunStats) -> Outcome {
    Outcome {
        verdict: Verdict::Converged,
        stats,
    }
}

fn unreadable(bytes: u64) -> UnreadableStats {
    UnreadableStats {
        range_count: 1,
        bytes,
        ranges: vec![ByteRange {
            offset_bytes: 4096,
            len_bytes: bytes,
        }],
        read_retries: 2,
        max_bad_bytes: 1 << 30,
        chunks_salvaged: 1,
        salvage_reads: 9,
        retry_reads: 2,
    }
}

#[test]
fn a_clean_run_has_four_summary_lines() {
    let lines = summary_lines(&converged(stats()));
    assert_eq!(
        lines,
        [
            "Summary: main pass 64.0 MiB at 128.0 MiB/s; read latency no reads",
            "Summary: catch-up 0 rounds, 0 B re-read; read latency no reads",
            "Summary: 12 write events seen, 0 lost (tracefs); dirty map 8.0 KiB",
            "Summary: image 64.0 MiB in 1.2s",
        ]
    );
}

#[test]
fn the_summary_says_freeze_bad_ranges_bound_and_staleness() {
    let mut stats = stats();
    stats.frozen = vec!["/mnt/a".into(), "/mnt/b".into()];
    stats.freeze_seconds = Some(0.0125);
    stats.freeze_ended_early = Some("the freeze reached --freeze-timeout (1.0 s)".into());
    stats.dirty_map_whole_region_marks = 3;
    stats.unreadable = unreadable(4096);
    let outcome = Outcome {
        verdict: Verdict::Unconverged {
            changed_bytes: 1 << 20,
        },
        stats,
    };
    let lines = summary_lines(&outcome);
    assert_eq!(lines.len(), 6, "{lines:#?}");
    assert!(
        lines[2]
            .ends_with("dirty map 8.0 KiB (at its bound: 3 regions marked whole, re-read in full)")
    );
    assert_eq!(
        lines[3],
        "Summary: froze /mnt/a, /mnt/b for 12 ms, thawed early (the freeze reached --freeze-timeout (1.0 s)): the image is NOT point-in-time, only crash-consistent"
    );
    assert_eq!(
        lines[4],
        "Summary: 1 unreadable range, 4.0 KiB (4096 bytes): bytes 4096..8192 (B: records; restored as zeros); 1 chunks re-read block by block, 2 retries"
    );
    assert_eq!(
        lines[5],
        "Summary: image 64.0 MiB in 1.2s, NOT converged (1.0 MiB may be stale)"
    );
}

#[test]
fn unreadable_ranges_past_the_list_are_counted() {
    let mut listed = unreadable(512);
    listed.range_count = 3;
    listed.ranges.push(ByteRange {
        offset_bytes: 65536,
        len_bytes: 512,
    });
    assert_eq!(
        listed.to_string(),
        "3 unreadable ranges, 512 B (512 bytes): bytes 4096..4608, bytes 65536..66048, ... (1 more)"
    );
}

#[test]
fn latency_says_its_percentiles() {
    let latency = Latency {
        count: 5,
        p50: 10,
        p90: 20,
        p99: 30,
        p99_9: 40,
        max: 50,
    };
    assert_eq!(
        latency.to_string(),
        "p50 10 us, p90 20 us, p99 30 us, p99.9 40 us, max 50 us (5 reads)"
    );
}

#[test]
fn each_ending_has_its_last_line_and_exit_status() {
    let device = Path::new("/dev/loop7");
    assert_eq!(
        ending(&converged(stats()), device),
        ("Done".to_string(), Exit::Success)
    );

    let mut thawed = stats();
    thawed.freeze_ended_early = Some("why".into());
    let (line, exit) = ending(&converged(thawed), device);
    assert_eq!(exit, Exit::Success);
    assert!(
        line.starts_with("Done, but NOT point-in-time: why, so"),
        "{line}"
    );

    let mut bad = stats();
    bad.unreadable = unreadable(4096);
    let (line, exit) = ending(&converged(bad.clone()), device);
    assert_eq!(exit, Exit::Unreadable);
    assert!(
        line.starts_with("Done, but 4096 bytes of /dev/loop7 could not be read"),
        "{line}"
    );

    // Unconverged wins over unreadable: not even a consistent copy.
    let unconverged = Outcome {
        verdict: Verdict::Unconverged { changed_bytes: 1 },
        stats: bad,
    };
    assert_eq!(
        ending(&unconverged, device),
        (
            "Done, but NOT converged (see the warning above), and 4096 bytes could not be read"
                .to_string(),
            Exit::Incomplete
        )
    );
}

#[test]
fn a_progress_line_says_rate_and_time_left() {
    assert_eq!(
        progress_line(1 << 20, 4 << 20, Duration::from_secs(1), 16, 0),
        "Read 1.0 MiB of 4.0 MiB (1.0 MiB/s, ETA 3s) -- 16 dirty sectors (0 event drops)"
    );
    assert_eq!(
        progress_line(0, 4 << 20, Duration::from_secs(1), 0, 2),
        "Read 0 B of 4.0 MiB (0 B/s, ETA unknown) -- 0 dirty sectors (2 event drops)"
    );
}
