//! The read engine against real loop devices (root): every byte delivered
//! is the device's, whole devices and scattered extents, 512-byte and 4Kn
//! blocks, sizes that are not a chunk multiple; the stop flag, deliver()
//! errors and panics, and a device that shrinks under the engine.
//!
//! `bench_device` (ignored) measures throughput on a device you name:
//!
//! ```text
//! HC_BENCH_DEVICE=/dev/zram0 HC_BENCH_THREADS=2 HC_BENCH_QD=2 HC_BENCH_CHUNK_KIB=1024 \
//!     cargo test --release --test engine -- --ignored --nocapture bench_device
//! ```

use hc_test_kit::*;
use hot_clone::engine::{Choice, DeviceKind, Engine, EngineConfig, EngineError, ReadDone};
use hot_clone::geom::ByteExtent as Extent;
use hot_clone::source::SourceDevice;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn extent(offset_bytes: u64, len_bytes: u64) -> Extent {
    Extent {
        offset_bytes,
        len_bytes,
    }
}

fn config(threads: usize, queue_depth: u32, chunk_bytes: u32) -> EngineConfig {
    // 0 = the engine picks, as on the command line (the bench passes 0s).
    EngineConfig {
        threads: Choice::zero_is_auto(threads),
        queue_depth: Choice::zero_is_auto(queue_depth),
        chunk_bytes: Choice::zero_is_auto(chunk_bytes),
        ..EngineConfig::default()
    }
}

/// Every delivery, in arrival order.
#[derive(Default)]
struct Deliveries {
    pieces: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Deliveries {
    fn deliver(&self, done: ReadDone<'_>) -> anyhow::Result<()> {
        self.pieces
            .lock()
            .unwrap()
            .push((done.offset_bytes, done.data.to_vec()));
        Ok(())
    }

    fn take(&self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut *self.pieces.lock().unwrap())
    }
}

/// Checks each piece against the device's content and its alignment;
/// returns which bytes were delivered how often.
fn check_pieces(
    pieces: &[(u64, Vec<u8>)],
    content: &[u8],
    block_bytes: u64,
    chunk_bytes: u64,
) -> Vec<u8> {
    let mut delivered = vec![0u8; content.len()];
    for (offset, data) in pieces {
        let offset = *offset as usize;
        assert_eq!(
            offset as u64 % block_bytes,
            0,
            "piece at {offset} not block-aligned"
        );
        assert_eq!(
            data.len() as u64 % block_bytes,
            0,
            "piece at {offset}: length {}",
            data.len()
        );
        assert!(
            !data.is_empty() && data.len() as u64 <= chunk_bytes,
            "piece at {offset}: length {}",
            data.len()
        );
        assert!(
            offset + data.len() <= content.len(),
            "piece at {offset} runs past the device end"
        );
        assert!(
            data[..] == content[offset..offset + data.len()],
            "piece at {offset} ({} bytes) differs from the device",
            data.len()
        );
        for count in &mut delivered[offset..offset + data.len()] {
            *count += 1;
        }
    }
    delivered
}

fn read_whole(device_path: &Path, engine_config: EngineConfig) {
    let source = SourceDevice::open(device_path).unwrap();
    let content = read_device(device_path);
    let engine = Engine::new(&source, engine_config).unwrap();
    let settings = engine.settings().clone();
    assert!(settings.registered_buffers, "{settings:?}");
    let deliveries = Deliveries::default();
    let progress = AtomicU64::new(0);
    let stats = engine
        .read_extents(
            &[extent(0, source.size_bytes)],
            &|done| deliveries.deliver(done),
            Some(&progress),
            &AtomicBool::new(false),
        )
        .unwrap();
    let pieces = deliveries.take();
    let delivered = check_pieces(
        &pieces,
        &content,
        u64::from(source.logical_block_bytes),
        u64::from(settings.chunk_bytes),
    );
    assert!(
        delivered.iter().all(|&count| count == 1),
        "every byte exactly once"
    );
    assert_eq!(stats.bytes_read, source.size_bytes);
    assert_eq!(progress.load(Ordering::Relaxed), source.size_bytes);
    let read_count = source.size_bytes.div_ceil(u64::from(settings.chunk_bytes));
    assert_eq!(stats.reads, read_count);
    assert_eq!(pieces.len() as u64, read_count);
    assert_eq!(stats.latency_us.len(), read_count);
}

#[test]
fn whole_device_at_512_byte_blocks_not_a_chunk_multiple() {
    let device = LoopDevice::new(8 * MIB + 12 * KIB + 512);
    fill_device(&device.path, 1);
    read_whole(&device.path, config(2, 4, 256 * KIB as u32));
}

#[test]
fn whole_device_at_4096_byte_blocks_not_a_chunk_multiple() {
    let device = LoopDevice::with_sector_size(8 * MIB + 12 * KIB, 4096);
    fill_device(&device.path, 2);
    read_whole(&device.path, config(2, 3, 100_000)); // rounds down to 98304
}

#[test]
fn whole_device_with_defaults() {
    let device = LoopDevice::new(6 * MIB + 4 * KIB);
    fill_device(&device.path, 3);
    let source = SourceDevice::open(&device.path).unwrap();
    let engine = Engine::new(&source, EngineConfig::default()).unwrap();
    let settings = engine.settings();
    assert_eq!(
        settings.device_kind,
        DeviceKind::Queued,
        "a loop device is blk-mq"
    );
    assert!(settings.threads >= 1 && settings.queue_depth >= 1 && settings.chunk_bytes >= 4096);
    drop(engine);
    read_whole(&device.path, EngineConfig::default());
}

#[test]
fn one_thread_queue_depth_one() {
    let device = LoopDevice::new(2 * MIB);
    fill_device(&device.path, 4);
    read_whole(&device.path, config(1, 1, 64 * KIB as u32));
}

/// Extents of whole sectors, unaligned to the 4 KiB block: the engine widens
/// each to whole blocks and delivers every requested byte, nothing outside
/// the widened ranges, and (for sorted extents) no block twice.
#[test]
fn scattered_extents_on_a_4kn_device_are_widened() {
    let device = LoopDevice::with_sector_size(16 * MIB, 4096);
    fill_device(&device.path, 5);
    let source = SourceDevice::open(&device.path).unwrap();
    assert_eq!(source.logical_block_bytes, 4096);
    let content = read_device(&device.path);
    let chunk_bytes = 64 * KIB;
    let engine = Engine::new(&source, config(2, 8, chunk_bytes as u32)).unwrap();

    let mut state = 0x5eed_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut extents: Vec<Extent> = (0..300)
        .map(|_| {
            let offset = next() % (source.size_bytes / 512) * 512;
            let len = (1 + next() % 600) * 512;
            extent(offset, len.min(source.size_bytes - offset))
        })
        .collect();
    // The last sector of the device, and a run that ends past it (clamped).
    extents.push(extent(source.size_bytes - 512, 512));
    extents.push(extent(source.size_bytes - 3 * 512, 64 * KIB));
    extents.sort();

    let deliveries = Deliveries::default();
    let stats = engine
        .read_extents(
            &extents,
            &|done| deliveries.deliver(done),
            None,
            &AtomicBool::new(false),
        )
        .unwrap();
    let pieces = deliveries.take();
    let delivered = check_pieces(&pieces, &content, 4096, chunk_bytes);
    let mut widened = vec![false; content.len()];
    for e in &extents {
        let start = e.offset_bytes / 4096 * 4096;
        let end = e
            .end_bytes()
            .div_ceil(4096)
            .saturating_mul(4096)
            .min(source.size_bytes);
        widened[start as usize..end as usize].fill(true);
        for (at, &count) in delivered
            .iter()
            .enumerate()
            .take(e.end_bytes().min(source.size_bytes) as usize)
            .skip(e.offset_bytes as usize)
        {
            assert!(count > 0, "byte {at} of {e:?} not delivered");
        }
    }
    for (at, &count) in delivered.iter().enumerate() {
        assert!(
            count <= 1,
            "byte {at} delivered {count} times from sorted extents"
        );
        assert!(
            count == 0 || widened[at],
            "byte {at} delivered but not asked for"
        );
    }
    assert_eq!(
        stats.bytes_read,
        delivered.iter().map(|&c| u64::from(c)).sum::<u64>()
    );
    assert_eq!(stats.reads, pieces.len() as u64);
}

#[test]
fn an_empty_extent_list_reads_nothing() {
    let device = LoopDevice::new(MIB);
    let source = SourceDevice::open(&device.path).unwrap();
    let engine = Engine::new(&source, config(2, 2, 64 * KIB as u32)).unwrap();
    let stats = engine
        .read_extents(
            &[],
            &|_| panic!("nothing to deliver"),
            None,
            &AtomicBool::new(false),
        )
        .unwrap();
    assert_eq!((stats.bytes_read, stats.reads), (0, 0));
    let stats = engine
        .read_extents(
            &[extent(4096, 0)],
            &|_| panic!("nothing to deliver"),
            None,
            &AtomicBool::new(false),
        )
        .unwrap();
    assert_eq!((stats.bytes_read, stats.reads), (0, 0));
}

/// The stop flag set mid-run: the call returns `Stopped` soon, delivers
/// nothing after it returns, and the engine reads everything afterwards.
#[test]
fn the_stop_flag_stops_promptly_and_the_engine_stays_usable() {
    let device = LoopDevice::new(64 * MIB);
    fill_device(&device.path, 6);
    let source = SourceDevice::open(&device.path).unwrap();
    let engine = Engine::new(&source, config(2, 4, 64 * KIB as u32)).unwrap();
    let whole = [extent(0, source.size_bytes)];

    let stop = AtomicBool::new(true);
    let err = engine
        .read_extents(&whole, &|_| panic!("stopped before the start"), None, &stop)
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref(), Some(EngineError::Stopped(_))),
        "{err:#}"
    );

    let stop = AtomicBool::new(false);
    let delivered = AtomicUsize::new(0);
    let returned = AtomicBool::new(false);
    let started = Instant::now();
    let err = engine
        .read_extents(
            &whole,
            &|_| {
                assert!(
                    !returned.load(Ordering::SeqCst),
                    "deliver() after read_extents returned"
                );
                if delivered.fetch_add(1, Ordering::SeqCst) == 10 {
                    stop.store(true, Ordering::SeqCst);
                }
                Ok(())
            },
            None,
            &stop,
        )
        .unwrap_err();
    returned.store(true, Ordering::SeqCst);
    assert!(
        matches!(err.downcast_ref(), Some(EngineError::Stopped(_))),
        "{err:#}"
    );
    let delivered = delivered.load(Ordering::SeqCst);
    assert!(
        (11..11 + 2 * 4).contains(&delivered),
        "{delivered} deliveries: after the stop at most the reads already completed"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    read_whole(&device.path, config(2, 4, 64 * KIB as u32));
    let stats = engine
        .read_extents(&whole, &|_| Ok(()), None, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(stats.bytes_read, source.size_bytes);
}

/// deliver() failing stops every worker and the error comes back with its
/// context; the engine reads everything afterwards.
#[test]
fn a_deliver_error_is_returned_and_the_engine_stays_usable() {
    let device = LoopDevice::new(32 * MIB);
    fill_device(&device.path, 7);
    let source = SourceDevice::open(&device.path).unwrap();
    let engine = Engine::new(&source, config(2, 4, 64 * KIB as u32)).unwrap();
    let whole = [extent(0, source.size_bytes)];
    let calls = AtomicUsize::new(0);
    let err = engine
        .read_extents(
            &whole,
            &|done| {
                calls.fetch_add(1, Ordering::SeqCst);
                if done.offset_bytes == 4 * MIB {
                    anyhow::bail!("output closed");
                }
                Ok(())
            },
            None,
            &AtomicBool::new(false),
        )
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("output closed"), "{text}");
    assert!(text.contains(&format!("byte offset {}", 4 * MIB)), "{text}");
    assert!(text.contains(&device.path.display().to_string()), "{text}");
    // Reads already in flight when the error happened are not delivered.
    assert!(
        calls.load(Ordering::SeqCst) < 512 / 2,
        "the other worker stopped too"
    );

    let stats = engine
        .read_extents(&whole, &|_| Ok(()), None, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(stats.bytes_read, source.size_bytes);
}

/// A panic in deliver() reaches the caller, after the workers drained their
/// rings; the engine still works.
#[test]
fn a_deliver_panic_reaches_the_caller_and_the_engine_stays_usable() {
    let device = LoopDevice::new(16 * MIB);
    fill_device(&device.path, 8);
    let source = SourceDevice::open(&device.path).unwrap();
    let engine = Engine::new(&source, config(2, 8, 64 * KIB as u32)).unwrap();
    let whole = [extent(0, source.size_bytes)];
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.read_extents(
            &whole,
            &|done| {
                assert!(done.offset_bytes != 2 * MIB, "deliver bug");
                Ok(())
            },
            None,
            &AtomicBool::new(false),
        )
    }));
    let payload = outcome.unwrap_err();
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(message.contains("deliver bug"), "{message}");
    read_whole(&device.path, config(2, 8, 64 * KIB as u32));
    let stats = engine
        .read_extents(&whole, &|_| Ok(()), None, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(stats.bytes_read, source.size_bytes);
}

/// A device that shrinks after the engine planned its reads: the reads past
/// the new end come back short or empty, and the call says so instead of
/// looping or delivering garbage.
#[test]
fn a_device_that_shrinks_under_the_engine_is_an_error() {
    let device = LoopDevice::new(8 * MIB);
    fill_device(&device.path, 9);
    let source = SourceDevice::open(&device.path).unwrap();
    let engine = Engine::new(&source, config(1, 4, MIB as u32)).unwrap();
    let backing = std::fs::OpenOptions::new()
        .write(true)
        .open(device.backing())
        .unwrap();
    backing.set_len(4 * MIB + 512 * KIB).unwrap();
    let status = Command::new("losetup")
        .args(["-c", device.path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "losetup -c");
    let err = engine
        .read_extents(
            &[extent(0, 8 * MIB)],
            &|_| Ok(()),
            None,
            &AtomicBool::new(false),
        )
        .unwrap_err();
    let text = format!("{err:#}");
    eprintln!("error as reported: {text}");
    let is_read_error = matches!(err.downcast_ref(), Some(EngineError::Read(_)));
    assert!(
        text.contains("end of device") || is_read_error,
        "unexpected error: {text}"
    );
    assert!(text.contains(&device.path.display().to_string()), "{text}");
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|text| {
            text.parse()
                .unwrap_or_else(|_| panic!("{name}={text:?} is not a number"))
        })
        .unwrap_or(default)
}

/// Throughput of the engine on `HC_BENCH_DEVICE` (read-only), deliver() doing
/// nothing: whole-device passes for `HC_BENCH_SECONDS` (3), reports GB/s.
/// `HC_BENCH_THREADS`, `HC_BENCH_QD`, `HC_BENCH_CHUNK_KIB`: 0 = default.
#[test]
#[ignore = "a benchmark: needs HC_BENCH_DEVICE, run by hand with --release"]
fn bench_device() {
    require_root("open a block device with O_DIRECT");
    let device_path = std::env::var("HC_BENCH_DEVICE").expect("HC_BENCH_DEVICE=/dev/...");
    let source = SourceDevice::open(Path::new(&device_path)).unwrap();
    let engine_config = config(
        env_or("HC_BENCH_THREADS", 0),
        env_or("HC_BENCH_QD", 0),
        env_or::<u32>("HC_BENCH_CHUNK_KIB", 0) * 1024,
    );
    let seconds: f64 = env_or("HC_BENCH_SECONDS", 3.0);
    let engine = Engine::new(&source, engine_config).unwrap();
    let whole = [extent(0, source.size_bytes)];
    let stop = AtomicBool::new(false);
    // One pass to warm up (rings, page tables of the pool), not counted.
    engine
        .read_extents(&whole, &|_| Ok(()), None, &stop)
        .unwrap();
    let started = Instant::now();
    let mut bytes_read = 0u64;
    let mut latency_us = None::<hdrhistogram::Histogram<u64>>;
    while started.elapsed().as_secs_f64() < seconds {
        let stats = engine
            .read_extents(&whole, &|_| Ok(()), None, &stop)
            .unwrap();
        bytes_read += stats.bytes_read;
        match &mut latency_us {
            Some(h) => h.add(&stats.latency_us).unwrap(),
            None => latency_us = Some(stats.latency_us),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let latency_us = latency_us.unwrap();
    let settings = engine.settings();
    println!(
        "BENCH {device_path} threads={} qd={} chunk={}K kind={:?} registered={}: {:.2} GB/s \
         (latency us p50 {} p99 {} max {})",
        settings.threads,
        settings.queue_depth,
        settings.chunk_bytes / 1024,
        settings.device_kind,
        settings.registered_buffers,
        bytes_read as f64 / elapsed / 1e9,
        latency_us.value_at_quantile(0.5),
        latency_us.value_at_quantile(0.99),
        latency_us.max(),
    );
}
