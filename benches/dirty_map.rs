//! Dirty map: marking write events, and taking dirty extents, on a 1 TiB map
//! at 4 KiB blocks (the default).
//!
//! Marking reports events per second. Writes are 4 KiB-aligned, 4 KiB to
//! 1 MiB (uniform in 4 KiB steps) at random offsets, or sequential. Taking
//! is timed on a map 0.1 %, 1 % and 10 % dirty; the map's memory at each
//! level is printed once to stderr (`memory_bytes`), for PERF.md.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hot_clone::dirty::DirtyMap;
use hot_clone::geom::{ByteExtent as Extent, SECTOR_BYTES};
use std::hint::black_box;
use std::time::{Duration, Instant};

const TIB: u64 = 1 << 40;
const MIB: u64 = 1 << 20;
const BLOCK_BYTES: u32 = 4096;
/// Events per marking iteration: a plausible trace batch.
const EVENT_COUNT: usize = 1 << 16;
/// The catch-up's read size: extents are split there.
const EXTENT_BYTES_MAX: u64 = MIB;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A write as the trace reports it.
#[derive(Clone, Copy)]
struct Write {
    sector_first: u64,
    sector_count: u64,
}

/// A 4 KiB-aligned write of `len_bytes_min..=len_bytes_max` (4 KiB steps)
/// at a random offset inside the device.
fn random_write(rng: &mut Rng, device_bytes: u64, len_bytes_min: u64, len_bytes_max: u64) -> Write {
    let step_count = (len_bytes_max - len_bytes_min) / 4096 + 1;
    let len_bytes = len_bytes_min + rng.next() % step_count * 4096;
    let offset_bytes = rng.next() % ((device_bytes - len_bytes) / 4096) * 4096;
    Write {
        sector_first: offset_bytes / SECTOR_BYTES,
        sector_count: len_bytes / SECTOR_BYTES,
    }
}

fn random_writes(seed: u64, count: usize, len_bytes_min: u64, len_bytes_max: u64) -> Vec<Write> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| random_write(&mut rng, TIB, len_bytes_min, len_bytes_max))
        .collect()
}

/// Random 4 KiB..1 MiB writes until `dirty_fraction` of the device is dirty.
fn writes_until_dirty(dirty_fraction: f64) -> Vec<Write> {
    let map = DirtyMap::new(TIB, BLOCK_BYTES);
    let block_count_target = (map.block_count() as f64 * dirty_fraction) as u64;
    let mut rng = Rng(7);
    let mut writes = Vec::new();
    // Bounded: each write dirties at least one block.
    while map.count_dirty_blocks() < block_count_target {
        for _ in 0..256 {
            let write = random_write(&mut rng, TIB, 4096, MIB);
            map.mark_sectors(write.sector_first, write.sector_count);
            writes.push(write);
        }
    }
    writes
}

fn mark_all(map: &DirtyMap, writes: &[Write]) {
    for write in writes {
        black_box(map.mark_sectors(write.sector_first, write.sector_count));
    }
}

fn bench_mark(c: &mut Criterion) {
    let mut group = c.benchmark_group("mark_1tib");
    group.throughput(Throughput::Elements(EVENT_COUNT as u64));

    let writes_4k_1m = random_writes(1, EVENT_COUNT, 4096, MIB);
    let map = DirtyMap::new(TIB, BLOCK_BYTES);
    group.bench_function("random_4k_to_1m", |b| {
        b.iter(|| mark_all(&map, &writes_4k_1m))
    });

    let writes_4k = random_writes(2, EVENT_COUNT, 4096, 4096);
    let map = DirtyMap::new(TIB, BLOCK_BYTES);
    group.bench_function("random_4k", |b| b.iter(|| mark_all(&map, &writes_4k)));

    // Sequential 128 KiB writes: a file copy or a log.
    let writes_sequential: Vec<Write> = (0..EVENT_COUNT as u64)
        .map(|i| Write {
            sector_first: i * 256,
            sector_count: 256,
        })
        .collect();
    let map = DirtyMap::new(TIB, BLOCK_BYTES);
    group.bench_function("sequential_128k", |b| {
        b.iter(|| mark_all(&map, &writes_sequential))
    });

    // First marks of leaves on a fresh map: the pool-claim path.
    group.bench_function("random_4k_to_1m_fresh_map", |b| {
        b.iter_batched(
            || DirtyMap::new(TIB, BLOCK_BYTES),
            |map| {
                mark_all(&map, &writes_4k_1m);
                map
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn bench_take(c: &mut Criterion) {
    let mut group = c.benchmark_group("take_1tib");
    group.sample_size(10);
    let mut out: Vec<Extent> = Vec::new();

    let map = DirtyMap::new(TIB, BLOCK_BYTES);
    group.bench_function("clean", |b| {
        b.iter(|| {
            out.clear();
            black_box(map.take_into(&mut out, EXTENT_BYTES_MAX))
        })
    });

    for (name, dirty_fraction) in [
        ("dirty_0.1pct", 0.001),
        ("dirty_1pct", 0.01),
        ("dirty_10pct", 0.1),
    ] {
        let writes = writes_until_dirty(dirty_fraction);
        let map = DirtyMap::new(TIB, BLOCK_BYTES);
        mark_all(&map, &writes);
        out.clear();
        map.take_into(&mut out, EXTENT_BYTES_MAX);
        eprintln!(
            "{name}: {} writes, {} extents of <= 1 MiB, memory {:.2} MiB (max {:.2} MiB, flat bitmap 32 MiB)",
            writes.len(),
            out.len(),
            map.memory_bytes() as f64 / MIB as f64,
            map.memory_bytes_max() as f64 / MIB as f64,
        );
        group.bench_function(name, |b| {
            b.iter_custom(|iteration_count| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iteration_count {
                    mark_all(&map, &writes);
                    out.clear();
                    let started = Instant::now();
                    black_box(map.take_into(&mut out, EXTENT_BYTES_MAX));
                    elapsed += started.elapsed();
                }
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_mark, bench_take);
criterion_main!(benches);
