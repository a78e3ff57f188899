//! The live write-event sources on real loop devices this test creates (and
//! always detaches). Root only: run `sudo cargo test --test trace_live`.
//! Without root every test fails with a message saying so, never skips.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hot_clone::geom::SECTOR_BYTES as SECTOR;
use hot_clone::trace::live::{
    self, EventSource, INSTANCE_PREFIX, InstanceName, LiveError, SourceConfig, SourceKind,
    TRACEFS_ROOT, TraceTarget, cleanup_stale_instances, open_source, open_tracefs,
};
use hot_clone::trace::{DevT, Phase, WriteEvent, WriteKind};

use hc_test_kit::loopdev::{LoopDevice, LoopOptions, detach_all_after};
use hc_test_kit::stale::{dead_pid, held_stale_instance};
use hc_test_kit::{AlignedBuf, open_direct};

/// A hung test must not leave loop devices behind when the harness or CI
/// kills the process (Drop does not run then).
const WATCHDOG: Duration = Duration::from_secs(300);

fn require_root() {
    hc_test_kit::require_root(
        "create loop devices and tracefs instances (`sudo cargo test --test trace_live`)",
    );
    detach_all_after(WATCHDOG, "trace_live");
}

// ---------------------------------------------------------------------------
// Fixtures: loop devices quiet enough to trace, and aligned buffers.

/// A loop device on a file in the temp dir, with direct I/O to it, once
/// udev's probe of it settled (its reads are not writes, but keep the
/// trace quiet).
fn settled_device(bytes: u64) -> LoopDevice {
    LoopDevice::scratch(
        bytes,
        LoopOptions {
            settle: true,
            ..LoopOptions::default()
        },
    )
}

/// A fast loop device for load tests: backed by a file in /dev/shm
/// (memory), through the page cache (tmpfs has no direct I/O).
fn in_memory_device(bytes: u64) -> LoopDevice {
    LoopDevice::scratch_in(
        Path::new("/dev/shm"),
        bytes,
        LoopOptions {
            direct_io: false,
            settle: true,
            ..LoopOptions::default()
        },
    )
}

fn dev_of(device: &LoopDevice) -> DevT {
    let meta = fs::metadata(&device.path).unwrap();
    DevT::from_userspace(meta.rdev()).unwrap()
}

fn whole_target(device: &LoopDevice) -> TraceTarget {
    TraceTarget {
        disk: dev_of(device),
        sector_first: 0,
        sector_count: device.sectors(),
    }
}

/// A 4096-aligned buffer for O_DIRECT, every byte `fill`.
fn filled(bytes: usize, fill: u8) -> AlignedBuf {
    let mut buf = AlignedBuf::new(bytes);
    buf.fill(fill);
    buf
}

fn write_direct(file: &File, sector: u64, sectors: u64) {
    let buf = filled((sectors * SECTOR) as usize, 0xa5);
    file.write_all_at(&buf[..], sector * SECTOR)
        .unwrap_or_else(|e| panic!("pwrite at sector {sector}: {e}"));
}

fn read_direct(file: &File, sector: u64, sectors: u64) {
    let mut buf = filled((sectors * SECTOR) as usize, 0);
    file.read_exact_at(&mut buf[..], sector * SECTOR).unwrap();
}

/// BLKDISCARD = _IO(0x12, 119), BLKZEROOUT = _IO(0x12, 127): {start, length} in bytes.
fn range_ioctl(file: &File, request: libc::c_ulong, sector: u64, sectors: u64) {
    let range: [u64; 2] = [sector * SECTOR, sectors * SECTOR];
    // SAFETY: both ioctls read two u64 through the pointer, a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, range.as_ptr()) };
    assert_eq!(
        rc,
        0,
        "ioctl {request:#x}: {}",
        std::io::Error::last_os_error()
    );
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn tracefs_config(buffer_bytes_per_cpu: u64) -> SourceConfig {
    SourceConfig {
        kind: SourceKind::Tracefs,
        buffer_bytes_per_cpu,
    }
}

/// Sectors covered by the events of one phase.
fn covered(events: &[WriteEvent], phase: Phase) -> BTreeSet<u64> {
    events
        .iter()
        .filter(|e| e.phase == phase)
        .flat_map(|e| e.sector_first..e.sector_first + e.sector_count)
        .collect()
}

fn assert_covers(events: &[WriteEvent], first: u64, count: u64, what: &str) {
    for phase in [Phase::Queue, Phase::Complete] {
        let sectors = covered(events, phase);
        let missing: Vec<u64> = (first..first + count)
            .filter(|s| !sectors.contains(s))
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "{what}: sectors {first}+{count} not all seen at {phase:?} (missing e.g. {missing:?}); events: {events:#?}"
        );
    }
}

/// Drains (with the grace period) until `done(events)` or a few seconds pass:
/// completions of direct I/O are reported before the syscall returns, but
/// stay tolerant of a slow machine.
fn drain_until(
    source: &mut dyn EventSource,
    events: &mut Vec<WriteEvent>,
    done: impl Fn(&[WriteEvent]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        source.sync_drain(events).expect("drain");
        if done(events) || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn tracefs_reports_writes_discards_and_zeroouts_but_not_reads() {
    require_root();
    let device = settled_device(64 << 20);
    let target = whole_target(&device);
    let monotonic_before_ns = monotonic_ns();
    let (mut source, reason) = open_source(&target, &tracefs_config(1 << 20)).expect("open");
    assert_eq!(source.name(), "tracefs");
    assert_eq!(reason, None);
    let file = open_direct(&device.path);

    let writes: [(u64, u64, &str); 4] = [
        (80, 8, "4 KiB write"),
        (2048, 128, "64 KiB write"),
        (8192, 2048, "1 MiB discard"),
        (16384, 1024, "512 KiB zero-out"),
    ];
    write_direct(&file, 80, 8);
    write_direct(&file, 2048, 128);
    read_direct(&file, 800, 8);
    range_ioctl(&file, BLKDISCARD, 8192, 2048);
    range_ioctl(&file, BLKZEROOUT, 16384, 1024);
    file.sync_all().unwrap();

    let mut events = Vec::new();
    drain_until(source.as_mut(), &mut events, |events| {
        writes.iter().all(|&(first, count, _)| {
            let queued = covered(events, Phase::Queue);
            let completed = covered(events, Phase::Complete);
            (first..first + count).all(|s| queued.contains(&s) && completed.contains(&s))
        })
    });
    for &(first, count, what) in &writes {
        assert_covers(&events, first, count, what);
    }
    // Nothing else: the read and the flushes are not writes.
    let expected: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(first, count, _)| first..first + count)
        .collect();
    for event in &events {
        assert_eq!(event.dev, target.disk);
        assert!(event.sector_count > 0, "empty event {event:?}");
        for sector in event.sector_first..event.sector_first + event.sector_count {
            assert!(expected.contains(&sector), "unexpected event {event:?}");
        }
    }
    assert!(
        events.iter().any(|e| e.kind == WriteKind::Discard),
        "no discard kind: {events:#?}"
    );
    // Time stamps are CLOCK_MONOTONIC.
    let monotonic_after_ns = monotonic_ns();
    for event in &events {
        assert!(
            (monotonic_before_ns..=monotonic_after_ns).contains(&event.timestamp_ns),
            "time stamp {} outside {monotonic_before_ns}..={monotonic_after_ns}",
            event.timestamp_ns
        );
    }
    let counters = source.counters();
    assert_eq!(counters.writes_kept, events.len() as u64);
    assert!(counters.events_read >= counters.writes_kept);
    assert!(counters.pages_read > 0);
    let health = source.health().unwrap();
    assert!(health.is_clean(), "{health}");

    // A drain of an idle source returns at once with nothing.
    let started = Instant::now();
    let mut more = Vec::new();
    let stats = source.drain(&mut more).unwrap();
    assert_eq!(stats.writes_kept, 0, "{more:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn partition_writes_are_translated_and_clipped() {
    require_root();
    let mut device = settled_device(64 << 20);
    let (start, length) = (2049u64, 10_000u64);
    let partition = device.add_partition(1, start, length);
    let target = TraceTarget {
        disk: dev_of(&device),
        sector_first: start,
        sector_count: length,
    };
    let (mut source, _) = open_source(&target, &tracefs_config(1 << 20)).expect("open");
    let part = open_direct(&partition);
    let disk = open_direct(&device.path);

    write_direct(&part, 0, 8); // partition 0..8
    write_direct(&part, 100, 16); // partition 100..116
    write_direct(&disk, 0, 8); // outside, before
    write_direct(&disk, 20_000, 8); // outside, after
    write_direct(&disk, start - 4, 8); // straddles the start: partition 0..4
    write_direct(&disk, start + length - 4, 8); // straddles the end: 9996..10000
    write_direct(&part, length - 8, 8); // the last 8 sectors

    let expected: [(u64, u64); 4] = [(0, 8), (100, 16), (0, 4), (length - 8, 8)];
    let mut events = Vec::new();
    drain_until(source.as_mut(), &mut events, |events| {
        let queued = covered(events, Phase::Queue);
        let completed = covered(events, Phase::Complete);
        expected
            .iter()
            .all(|&(f, c)| (f..f + c).all(|s| queued.contains(&s) && completed.contains(&s)))
    });
    for (first, count) in expected {
        assert_covers(&events, first, count, "partition write");
    }
    for event in &events {
        let end = event.sector_first + event.sector_count;
        assert!(end <= length, "event past the partition end: {event:?}");
        assert!(
            expected
                .iter()
                .any(|&(f, c)| event.sector_first >= f && end <= f + c),
            "unexpected event {event:?}"
        );
    }
    // The straddlers were clipped, not dropped: sector 9996..10000 is only
    // written by the write across the end.
    let queued = covered(&events, Phase::Queue);
    assert!((length - 8..length).all(|s| queued.contains(&s)));
    let health = source.health().unwrap();
    assert!(health.is_clean(), "{health}");
}

#[test]
fn tiny_buffer_under_load_reports_loss() {
    require_root();
    let device = in_memory_device(64 << 20);
    let target = whole_target(&device);
    let (mut source, _) = open_source(&target, &tracefs_config(4096)).expect("open");
    let file = open_direct(&device.path);
    let buf = filled(4096, 0x5a);
    for index in 0..4000u64 {
        file.write_all_at(&buf[..], (index % 16_000) * 4096)
            .unwrap();
    }
    let lost = source.health().unwrap().lost;
    assert!(lost > 0, "4000 writes into a 4 KiB buffer lost nothing?");
    assert_eq!(source.counters().lost_events, lost);
    // Draining still works; the loss stays reported.
    let mut events = Vec::new();
    source.drain(&mut events).unwrap();
    assert!(source.health().unwrap().lost >= lost);
}

#[test]
fn drop_removes_the_instance_even_when_unwinding() {
    require_root();
    let device = settled_device(16 << 20);
    let target = whole_target(&device);
    let source = open_tracefs(&target, &tracefs_config(1 << 20)).expect("open");
    let path = source.instance_path().to_path_buf();
    assert!(path.is_dir());
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(&format!("{INSTANCE_PREFIX}{}-", std::process::id())));
    drop(source);
    assert!(!path.exists(), "{} left behind", path.display());

    let seen: Mutex<Option<PathBuf>> = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let source = open_tracefs(&target, &tracefs_config(1 << 20)).expect("open");
        *seen.lock().unwrap() = Some(source.instance_path().to_path_buf());
        panic!("deliberate panic with a live source");
    }));
    assert!(result.is_err());
    let path = seen.lock().unwrap().clone().unwrap();
    assert!(
        !path.exists(),
        "{} left behind after a panic",
        path.display()
    );
}

#[test]
fn cleanup_removes_stale_instances_only() {
    require_root();
    let device = settled_device(16 << 20);
    let live_source = open_tracefs(&whole_target(&device), &tracefs_config(1 << 20)).expect("open");
    // A dead pid of this boot and namespace. The counter part is our pid,
    // so parallel test processes (which probe the same dead pid) make
    // different names.
    let mut identity = live::current_identity().expect("identity");
    identity.pid = dead_pid();
    let stale_name = InstanceName::format(&identity, u64::from(std::process::id()));
    let stale = Path::new(TRACEFS_ROOT).join("instances").join(&stale_name);
    fs::create_dir(&stale).expect("create a fake stale instance");
    let removed = cleanup_stale_instances();
    let exists_after = stale.exists();
    if exists_after {
        let _ = fs::remove_dir(&stale);
    }
    let removed = removed.expect("cleanup");
    assert!(!exists_after, "{stale_name} survived the cleanup");
    // Another test process's cleanup may have removed it first.
    if !removed.contains(&stale_name) {
        eprintln!("{stale_name} was removed by a concurrent cleanup");
    }
    // Our own live instance is untouched, and still tracing.
    assert!(live_source.instance_path().is_dir());
    assert_eq!(
        fs::read_to_string(live_source.instance_path().join("tracing_on"))
            .unwrap()
            .trim(),
        "1"
    );
    let own = live_source
        .instance_path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(!removed.contains(&own));
}

/// An instance that looks stale (its pid is dead) but whose pipe some
/// process reads is in use: the cleanup must neither remove it nor switch
/// its tracing off. Once nothing holds it, the next cleanup removes it.
#[test]
fn cleanup_leaves_an_instance_in_use_alone_and_tracing() {
    require_root();
    let (instance, pipe) = held_stale_instance(1);
    let name = instance.name();

    let removed = cleanup_stale_instances().expect("cleanup");
    assert!(!removed.contains(&name), "removed an instance in use");
    assert!(instance.path.is_dir(), "{name} is gone");
    let tracing_on = fs::read_to_string(instance.path.join("tracing_on")).unwrap();
    assert_eq!(tracing_on.trim(), "1", "the cleanup switched tracing off");
    let enable =
        fs::read_to_string(instance.path.join("events/block/block_bio_queue/enable")).unwrap();
    assert_eq!(enable.trim(), "1", "the cleanup disabled an event");

    drop(pipe);
    let removed = cleanup_stale_instances().expect("cleanup");
    // A concurrent test process's cleanup may have been first.
    assert!(
        !instance.path.exists(),
        "{name} survived a cleanup once nothing held it (removed: {removed:?})"
    );
}

#[test]
fn auto_falls_back_to_tracefs_when_blktrace_is_blocked() {
    require_root();
    let device = settled_device(16 << 20);
    let target = whole_target(&device);
    let blktrace = SourceConfig {
        kind: SourceKind::Blktrace,
        buffer_bytes_per_cpu: 1 << 20,
    };
    match open_source(&target, &blktrace) {
        Err(LiveError::Lockdown { path, reason }) => {
            // This machine kind: lockdown=integrity.
            assert!(path.to_string_lossy().contains("/block/"), "{path:?}");
            assert!(reason.contains("lockdown"), "{reason}");
            let message = LiveError::Lockdown { path, reason }.to_string();
            assert!(
                message.starts_with("blktrace relay files are blocked"),
                "{message}"
            );
            // The failed attempt was torn down: another setup works (a
            // leftover would make it fail with EBUSY).
            match open_source(&target, &blktrace) {
                Err(LiveError::Lockdown { .. }) => {}
                Err(other) => panic!("second blktrace attempt: {other}"),
                Ok(_) => panic!("blktrace opened on the second attempt"),
            }
            let auto = SourceConfig {
                kind: SourceKind::Auto,
                buffer_bytes_per_cpu: 1 << 20,
            };
            let (mut source, reason) = open_source(&target, &auto).expect("auto");
            assert_eq!(source.name(), "tracefs");
            let reason = reason.expect("a reason for the fallback");
            assert!(
                reason.starts_with("blktrace relay files are blocked (")
                    && reason.ends_with("; using tracefs"),
                "{reason}"
            );
            assert!(!reason.contains('\n'));
            eprintln!("fallback reason: {reason}");
            // And it traces.
            let file = open_direct(&device.path);
            write_direct(&file, 64, 8);
            let mut events = Vec::new();
            drain_until(source.as_mut(), &mut events, |e| {
                covered(e, Phase::Complete).contains(&64)
            });
            assert_covers(&events, 64, 8, "write after fallback");
        }
        Ok((mut source, _)) => {
            // A machine without lockdown: blktrace itself must work.
            assert_eq!(source.name(), "blktrace");
            let file = open_direct(&device.path);
            write_direct(&file, 64, 8);
            let mut events = Vec::new();
            drain_until(source.as_mut(), &mut events, |e| {
                covered(e, Phase::Complete).contains(&64)
            });
            assert_covers(&events, 64, 8, "blktrace write");
        }
        Err(other) => panic!("blktrace failed with an unexpected error: {other}"),
    }
}

/// The io_uring path: an idle drain must return (a read of an empty pipe
/// would wait for data without the zero timeout), and writes are seen.
#[test]
fn io_uring_reads_return_on_empty_pipes() {
    require_root();
    let device = settled_device(16 << 20);
    let mut source = open_tracefs(&whole_target(&device), &tracefs_config(1 << 20)).expect("open");
    source.use_io_uring();
    assert_eq!(source.read_method(), "io_uring", "{}", source.describe());
    let started = Instant::now();
    let mut events = Vec::new();
    source.drain(&mut events).unwrap();
    source.drain(&mut events).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    let file = open_direct(&device.path);
    write_direct(&file, 16, 8);
    drain_until(&mut source, &mut events, |e| {
        covered(e, Phase::Complete).contains(&16)
    });
    assert_covers(&events, 16, 8, "write read through io_uring");
}

/// Every write of unthrottled writers (one per thread, each in its own part
/// of the device) is seen, at queue and at completion, while draining every
/// few milliseconds; prints the rates.
#[test]
fn every_write_under_load_is_seen() {
    require_root();
    const WRITERS: u64 = 4;
    let device = in_memory_device(256 << 20);
    let target = whole_target(&device);
    // 4 MiB per CPU: some 250 ms of events at this rate, headroom for a busy
    // machine descheduling the drain loop.
    let (mut source, _) = open_source(&target, &tracefs_config(4 << 20)).expect("open");
    eprintln!("{}", source.describe());
    let stop = AtomicBool::new(false);
    let blocks_per_writer = (256u64 << 20) / 4096 / WRITERS;
    // Visits every block of the writer's part before repeating (7919 is prime).
    let block_of =
        |writer: u64, count: u64| writer * blocks_per_writer + (count * 7919) % blocks_per_writer;
    let mut events = Vec::with_capacity(1 << 20);
    let mut drains = 0u64;
    let mut drain_time = Duration::ZERO;
    let run_for = Duration::from_secs(3);
    let written: Vec<u64> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let file = open_direct(&device.path);
                let stop = &stop;
                scope.spawn(move || {
                    let buf = filled(4096, 0x3c);
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        file.write_all_at(&buf[..], block_of(writer, count) * 4096)
                            .unwrap();
                        count += 1;
                    }
                    count
                })
            })
            .collect();
        let started = Instant::now();
        while started.elapsed() < run_for {
            let t = Instant::now();
            source.drain(&mut events).unwrap();
            drain_time += t.elapsed();
            drains += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let t = Instant::now();
    source.sync_drain(&mut events).unwrap();
    let sync_time = t.elapsed();
    let counters = source.counters();
    let lost = source.health().unwrap().lost;
    let total: u64 = written.iter().sum();
    eprintln!(
        "{total} writes by {WRITERS} threads in {run_for:?} ({:.0}/s); {} events read, {} writes kept \
         in {drains} drains ({:.1} ms spent draining, {:.1} µs per drain, {:.0} events/s while draining); \
         final sync_drain {sync_time:?}; lost {lost}",
        total as f64 / run_for.as_secs_f64(),
        counters.events_read,
        counters.writes_kept,
        drain_time.as_secs_f64() * 1e3,
        drain_time.as_secs_f64() * 1e6 / drains as f64,
        counters.events_read as f64 / drain_time.as_secs_f64(),
    );
    assert_eq!(
        lost, 0,
        "events lost with a 1 MiB buffer drained every 5 ms"
    );
    let queued = covered(&events, Phase::Queue);
    let completed = covered(&events, Phase::Complete);
    for (writer, &count) in written.iter().enumerate() {
        for index in 0..count.min(blocks_per_writer) {
            let sector = block_of(writer as u64, index) * 8;
            assert!(
                queued.contains(&sector) && completed.contains(&sector),
                "write {index} of writer {writer} at sector {sector} not seen"
            );
        }
    }
}

/// The barrier: after a write returns, one drain (no retries, no sleeping)
/// already holds its queue event, and one `sync_drain` its completion too.
#[test]
fn a_drain_after_a_write_returns_holds_its_events() {
    require_root();
    let device = in_memory_device(64 << 20);
    let target = whole_target(&device);
    let (mut source, _) = open_source(&target, &tracefs_config(1 << 20)).expect("open");
    let file = open_direct(&device.path);
    let mut completion_after_sync = 0;
    let writes = 500u64;
    for index in 0..writes {
        let sector = index * 8;
        write_direct(&file, sector, 8);
        let mut events = Vec::new();
        source.drain(&mut events).unwrap();
        let seen = |events: &[WriteEvent], phase| {
            events.iter().any(|e| {
                e.phase == phase
                    && e.sector_first <= sector
                    && sector < e.sector_first + e.sector_count
            })
        };
        assert!(
            seen(&events, Phase::Queue),
            "write {index}: queue event not in the drain after the write returned: {events:?}"
        );
        if !seen(&events, Phase::Complete) {
            source.sync_drain(&mut events).unwrap();
            assert!(
                seen(&events, Phase::Complete),
                "write {index}: completion missing after sync_drain"
            );
            completion_after_sync += 1;
        }
    }
    eprintln!("{writes} writes: {completion_after_sync} completions needed sync_drain");
    let health = source.health().unwrap();
    assert!(health.is_clean(), "{health}");
}

#[test]
fn invalid_target_is_rejected() {
    require_root();
    let target = TraceTarget {
        disk: DevT::from_major_minor(7, 0).unwrap(),
        sector_first: 0,
        sector_count: 0,
    };
    match open_source(&target, &tracefs_config(1 << 20)) {
        Err(LiveError::InvalidTarget(message)) => assert!(message.contains("empty"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("an empty range opened"),
    }
    let _ = live::SourceKind::default();
}

/// Two sources see the same backlog of writes; each drains it once, one with
/// read(2) and one through io_uring. Same events; prints both rates.
#[test]
fn read_syscalls_and_io_uring_drain_the_same_backlog() {
    require_root();
    let device = in_memory_device(256 << 20);
    let target = whole_target(&device);
    let config = tracefs_config(64 << 20);
    let mut syscalls = open_tracefs(&target, &config).expect("open");
    let mut uring = open_tracefs(&target, &config).expect("open");
    uring.use_io_uring();
    let blocks = (256u64 << 20) / 4096;
    let writers = 4u64;
    let per_writer = 5_000u64;
    std::thread::scope(|scope| {
        for writer in 0..writers {
            let file = open_direct(&device.path);
            scope.spawn(move || {
                let buf = filled(4096, 0x11);
                for index in 0..per_writer {
                    let block = (writer * per_writer + index) % blocks;
                    file.write_all_at(&buf[..], block * 4096).unwrap();
                }
            });
        }
    });
    let mut rates = Vec::new();
    for source in [&mut syscalls, &mut uring] {
        let mut events = Vec::with_capacity(1 << 20);
        // Every write has completed: all its events are committed, a plain
        // drain returns them.
        let started = Instant::now();
        let stats = source.drain(&mut events).unwrap();
        let elapsed = started.elapsed();
        let health = source.health().unwrap();
        assert!(health.is_clean(), "{health}");
        assert_eq!(
            stats.writes_kept,
            2 * writers * per_writer,
            "{}",
            source.describe()
        );
        rates.push((stats, elapsed));
        eprintln!(
            "{}: {} events, {} pages in {:?} ({:.0} events/s, {:.0} pages/s)",
            source.describe(),
            stats.events_read,
            stats.pages_read,
            elapsed,
            stats.events_read as f64 / elapsed.as_secs_f64(),
            stats.pages_read as f64 / elapsed.as_secs_f64(),
        );
    }
    assert_eq!(rates[0].0, rates[1].0);
}
