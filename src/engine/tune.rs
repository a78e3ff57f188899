//! Defaults that depend on the kind of device, and the probe that tells the
//! kinds apart.
//!
//! Measured here (PERF.md has the tables): with registered buffers, reads of
//! a bio-based RAM device (zram) run inside `io_uring_enter` on the
//! submitting thread, so a deep queue only spreads the copies over more
//! buffers than fit in the cache (QD64 ran at 0.75x QD1); a request-based
//! device (loop, virtio, NVMe) completes asynchronously and needs many bytes
//! in flight to hide its latency. Larger reads beat capping a read at the
//! queue's `max_sectors_kb`: the kernel splits a large read into requests
//! cheaper than we can issue them (zram's limit is 124 KiB: 124 KiB reads
//! ran at 0.6x-0.7x of 1 MiB reads).
//!
//! Two things that did not depend on the device: registering the buffers
//! (`ReadFixed`) made zram reads 1.4x faster (no page pinning per read: it is
//! why the engine beats fio's default psync and io_uring runs there) and
//! helped on loop too; `IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN` (which
//! would tie a ring to one thread for life) showed no gain on either.

use super::{BUFFER_ALIGN_BYTES_MIN, CHUNK_BYTES_MAX, EngineConfig, QUEUE_DEPTH_MAX, THREADS_MAX};
use crate::geom::SECTOR_BYTES;
use std::path::Path;

/// A setting the caller may leave to the engine: [`Choice::Auto`] lets it
/// pick from the device's facts (see [`choose_geometry`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choice<T> {
    #[default]
    Auto,
    Value(T),
}

impl<T: Default + PartialEq> Choice<T> {
    /// A command-line value, whose documented 0 means "choose for me".
    pub fn zero_is_auto(value: T) -> Choice<T> {
        if value == T::default() {
            Choice::Auto
        } else {
            Choice::Value(value)
        }
    }
}

/// What the engine's geometry depends on, gathered once by `Engine::new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceFacts {
    pub kind: DeviceKind,
    pub device_bytes: u64,
    pub logical_block_bytes: u32,
    /// CPUs in this process's affinity mask; `None` when unreadable.
    pub cpu_count: Option<usize>,
    /// [`in_flight_bytes_budget`] on this machine.
    pub in_flight_budget_bytes: u64,
}

/// How the engine reads, resolved from its config and the device's facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadGeometry {
    pub threads: usize,
    pub queue_depth: u32,
    /// A positive multiple of the logical block, at most [`CHUNK_BYTES_MAX`].
    pub chunk_bytes: u32,
    /// Every buffer starts on a multiple of this: the logical block, at
    /// least a page.
    pub align_bytes: u32,
    /// Bytes per buffer slot: `chunk_bytes` rounded up to `align_bytes`, so
    /// that every slot of the pool starts aligned.
    pub slot_bytes: u32,
}

/// A config or a device the engine cannot read with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("logical block size {0} is not a power of two of at least 512")]
    LogicalBlock(u32),
    #[error(
        "size {device_bytes} is not a multiple of its logical block size {logical_block_bytes}"
    )]
    SizeNotBlockMultiple {
        device_bytes: u64,
        logical_block_bytes: u32,
    },
    #[error("{0} threads: at most {THREADS_MAX}")]
    TooManyThreads(usize),
    #[error("queue depth {0}: at most {QUEUE_DEPTH_MAX}")]
    QueueTooDeep(u32),
    #[error("{0} of 0: at least 1 (leave it to the engine instead)")]
    Zero(&'static str),
}

impl GeometryError {
    /// The error is about the device, not the config: say which device.
    pub fn is_about_the_device(&self) -> bool {
        matches!(
            self,
            GeometryError::LogicalBlock(_) | GeometryError::SizeNotBlockMultiple { .. }
        )
    }
}

/// Threads, queue depth, read size and buffer alignment from the device's
/// facts and the config: each [`Choice::Auto`] by the defaults the `engine`
/// module documentation lists (paced reads by [`paced_geometry`], otherwise
/// by [`DeviceKind`]), each value as given, the read size rounded down to
/// the logical block (at least one) and capped at [`CHUNK_BYTES_MAX`].
pub(crate) fn choose_geometry(
    facts: &DeviceFacts,
    config: &EngineConfig,
) -> Result<ReadGeometry, GeometryError> {
    let block_bytes = facts.logical_block_bytes;
    if !block_bytes.is_power_of_two() || u64::from(block_bytes) < SECTOR_BYTES {
        return Err(GeometryError::LogicalBlock(block_bytes));
    }
    if !facts.device_bytes.is_multiple_of(u64::from(block_bytes)) {
        return Err(GeometryError::SizeNotBlockMultiple {
            device_bytes: facts.device_bytes,
            logical_block_bytes: block_bytes,
        });
    }
    let rate = config.max_rate_bytes_per_second;
    let paced = (config.paced || rate > 0).then(|| paced_geometry(facts.kind, rate));
    let threads = match (config.threads, paced) {
        (Choice::Value(threads), _) => threads,
        (Choice::Auto, Some(paced)) => paced.threads,
        (Choice::Auto, None) => facts.cpu_count.unwrap_or(1),
    };
    if threads == 0 {
        return Err(GeometryError::Zero("threads"));
    }
    if threads > THREADS_MAX {
        return Err(GeometryError::TooManyThreads(threads));
    }
    let chunk_bytes = round_chunk_bytes(
        match (config.chunk_bytes, paced) {
            (Choice::Value(chunk_bytes), _) => chunk_bytes,
            (Choice::Auto, Some(paced)) => paced.chunk_bytes,
            (Choice::Auto, None) => facts.kind.chunk_bytes_default(),
        },
        block_bytes,
    );
    let queue_depth = match (config.queue_depth, paced) {
        (Choice::Value(queue_depth), _) => queue_depth,
        (Choice::Auto, Some(paced)) => paced.queue_depth,
        (Choice::Auto, None) => {
            facts
                .kind
                .queue_depth_default(threads, chunk_bytes, facts.in_flight_budget_bytes)
        }
    };
    if queue_depth == 0 {
        return Err(GeometryError::Zero("queue depth"));
    }
    if queue_depth > QUEUE_DEPTH_MAX {
        return Err(GeometryError::QueueTooDeep(queue_depth));
    }
    let align_bytes = block_bytes.max(BUFFER_ALIGN_BYTES_MIN);
    Ok(ReadGeometry {
        threads,
        queue_depth,
        chunk_bytes,
        align_bytes,
        slot_bytes: chunk_bytes.next_multiple_of(align_bytes),
    })
}

/// `requested_bytes` rounded down to the logical block, at least one block,
/// at most [`CHUNK_BYTES_MAX`].
fn round_chunk_bytes(requested_bytes: u32, block_bytes: u32) -> u32 {
    let bytes = requested_bytes.min(CHUNK_BYTES_MAX);
    (bytes - bytes % block_bytes).max(block_bytes)
}

/// How a device completes reads, as far as the engine's defaults care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Bio-based and stacked on nothing (zram, brd, pmem): reads complete
    /// while they are submitted, on the submitting thread.
    Inline,
    /// Anything else (blk-mq devices such as loop, virtio, NVMe, SCSI; and
    /// bio-based stacking drivers such as device-mapper and md, which pass
    /// reads on to queued devices).
    Queued,
}

impl DeviceKind {
    /// From `/sys/block/<disk>`: blk-mq devices have an `mq` directory;
    /// stacking drivers list the devices under them in `slaves`.
    pub fn detect(disk_name: &str) -> DeviceKind {
        DeviceKind::from_sysfs(&Path::new("/sys/block").join(disk_name))
    }

    pub(crate) fn from_sysfs(disk_dir: &Path) -> DeviceKind {
        let is_blk_mq = disk_dir.join("mq").is_dir();
        let stacks_on_others = std::fs::read_dir(disk_dir.join("slaves"))
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        if is_blk_mq || stacks_on_others || !disk_dir.is_dir() {
            DeviceKind::Queued
        } else {
            DeviceKind::Inline
        }
    }

    /// Reads in flight per worker when the caller leaves it to the engine,
    /// for `threads` workers reading `chunk_bytes` each.
    ///
    /// Inline devices: [`QUEUE_DEPTH_INLINE`]. Queued devices: as many as
    /// fit the in-flight budget (`budget_bytes`, [`in_flight_bytes_budget`]
    /// on this machine) shared by the
    /// workers, within [`QUEUE_DEPTH_QUEUED_MIN`, `QUEUE_DEPTH_QUEUED_MAX`].
    /// On the direct-io loop device here, with buffers in huge pages
    /// (`pool.rs`), two workers reached 3.09 GB/s at 4 reads of 1 MiB in
    /// flight each (p50 read latency 2.5 ms), 3.09 GB/s at 8 (5 ms) and
    /// 3.3 GB/s at 128 (62 ms): beyond a few MiB in flight, depth buys
    /// little throughput and a lot of latency that the live workload shares.
    /// (With 4 KiB pages, throughput had followed the bytes in flight up to
    /// about 256 MiB; huge pages removed that need.)
    pub fn queue_depth_default(self, threads: usize, chunk_bytes: u32, budget_bytes: u64) -> u32 {
        match self {
            DeviceKind::Inline => QUEUE_DEPTH_INLINE,
            DeviceKind::Queued => {
                let per_worker_bytes = budget_bytes / threads.max(1) as u64;
                let depth = per_worker_bytes / u64::from(chunk_bytes.max(1));
                depth.clamp(
                    u64::from(QUEUE_DEPTH_QUEUED_MIN),
                    u64::from(QUEUE_DEPTH_QUEUED_MAX),
                ) as u32
            }
        }
    }

    /// Bytes per read when the caller leaves it to the engine.
    pub fn chunk_bytes_default(self) -> u32 {
        match self {
            DeviceKind::Inline => CHUNK_BYTES_INLINE,
            DeviceKind::Queued => CHUNK_BYTES_QUEUED,
        }
    }
}

/// Inline devices: reads complete inside the submit, so a second buffer
/// only lets a read wait while the first is delivered (QD1 ran at 0.99x,
/// QD8 at 0.94x and QD64 at 0.76x of QD2 with two workers on zram).
pub const QUEUE_DEPTH_INLINE: u32 = 2;
pub const QUEUE_DEPTH_QUEUED_MIN: u32 = 8;
pub const QUEUE_DEPTH_QUEUED_MAX: u32 = 128;
/// 1 MiB: 4 MiB reads ran 3 % faster on zram at four times the buffer
/// memory and latency; 256 KiB reads ran 17 % slower.
pub const CHUNK_BYTES_INLINE: u32 = 1 << 20;
pub const CHUNK_BYTES_QUEUED: u32 = 1 << 20;
/// Read buffers in flight on a queued device, all workers together, at
/// most; see [`DeviceKind::queue_depth_default`].
pub const IN_FLIGHT_BYTES_QUEUED_MAX: u64 = 16 << 20;
/// ... and at most this share of the machine's memory (the buffers are
/// pinned): 1/32, so a 4 GiB machine gives 128 MiB.
pub const IN_FLIGHT_SHARE_OF_RAM_DIVISOR: u64 = 32;

/// Threads, reads in flight and read size when the caller leaves them to
/// the engine and reads are paced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacedGeometry {
    pub threads: usize,
    pub queue_depth: u32,
    pub chunk_bytes: u32,
}

/// Paced reads exist to spare a live workload, and what a live request
/// waits for is the bytes of ours queued ahead of it at the device, not
/// the average rate: one worker keeps one read in flight, and on a queued
/// device each read is about half a millisecond of the rate
/// (`rate / 2048`, rounded down to a power of two, within
/// [`PACED_CHUNK_BYTES_MIN`, `CHUNK_BYTES_QUEUED`]; [`PACED_CHUNK_BYTES_UNCAPPED`]
/// when the rate is not known in advance: a caller sets it later with
/// `Engine::set_rate_limit`).
/// Measured with `hc-impact` on the direct-io loop device at
/// `--max-rate 750M` (PERF.md): the default geometry (two workers, eight
/// 1 MiB reads each) inflated the foreground's p99 15x; one 256 KiB read in
/// flight, 1.6x, still reading at 700 MB/s. The cost: a paced run cannot
/// go faster than the device serves one read at a time.
pub fn paced_geometry(kind: DeviceKind, rate_bytes_per_second: u64) -> PacedGeometry {
    let chunk_bytes = match kind {
        DeviceKind::Inline => CHUNK_BYTES_INLINE,
        DeviceKind::Queued if rate_bytes_per_second == 0 => PACED_CHUNK_BYTES_UNCAPPED,
        DeviceKind::Queued => {
            let half_ms_bytes = rate_bytes_per_second / 2048;
            let floor_pow2 = match half_ms_bytes {
                0 => 0,
                bytes => 1u64 << bytes.ilog2(),
            };
            floor_pow2.clamp(
                u64::from(PACED_CHUNK_BYTES_MIN),
                u64::from(CHUNK_BYTES_QUEUED),
            ) as u32
        }
    };
    PacedGeometry {
        threads: 1,
        queue_depth: 1,
        chunk_bytes,
    }
}

/// Smallest paced read: below this, per-read costs dominate.
pub const PACED_CHUNK_BYTES_MIN: u32 = 64 << 10;
/// Paced read size when the rate is not known in advance.
pub const PACED_CHUNK_BYTES_UNCAPPED: u32 = 256 << 10;

/// The in-flight budget for queued devices on this machine.
pub fn in_flight_bytes_budget() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page_bytes) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram_bytes = if pages > 0 && page_bytes > 0 {
        pages as u64 * page_bytes as u64
    } else {
        u64::MAX
    };
    IN_FLIGHT_BYTES_QUEUED_MAX.min(ram_bytes / IN_FLIGHT_SHARE_OF_RAM_DIVISOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_sysfs_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let zram = dir.path().join("zram0");
        std::fs::create_dir_all(zram.join("slaves")).unwrap();
        assert_eq!(DeviceKind::from_sysfs(&zram), DeviceKind::Inline);

        let loop_dev = dir.path().join("loop0");
        std::fs::create_dir_all(loop_dev.join("mq/0")).unwrap();
        assert_eq!(DeviceKind::from_sysfs(&loop_dev), DeviceKind::Queued);

        let dm = dir.path().join("dm-0");
        std::fs::create_dir_all(dm.join("slaves/loop0")).unwrap();
        assert_eq!(DeviceKind::from_sysfs(&dm), DeviceKind::Queued);

        // Unknown: the safe default is a deep queue.
        assert_eq!(
            DeviceKind::from_sysfs(&dir.path().join("nope")),
            DeviceKind::Queued
        );
    }

    #[test]
    fn paced_reads_are_one_at_a_time_and_sized_by_the_rate() {
        let kib = 1 << 10;
        let chunk = |rate: u64| paced_geometry(DeviceKind::Queued, rate).chunk_bytes;
        assert_eq!(chunk(750_000_000), 256 * kib, "750 MB/s: 366 KB per 0.5 ms");
        assert_eq!(chunk(200_000_000), 64 * kib);
        assert_eq!(chunk(1), PACED_CHUNK_BYTES_MIN);
        assert_eq!(chunk(u64::MAX), CHUNK_BYTES_QUEUED);
        assert_eq!(
            chunk(0),
            PACED_CHUNK_BYTES_UNCAPPED,
            "paced, rate set later"
        );
        let geometry = paced_geometry(DeviceKind::Queued, 750_000_000);
        assert_eq!((geometry.threads, geometry.queue_depth), (1, 1));
        assert_eq!(
            paced_geometry(DeviceKind::Inline, 750_000_000).chunk_bytes,
            CHUNK_BYTES_INLINE
        );
    }

    #[test]
    fn queued_depth_shares_the_in_flight_budget() {
        let budget = in_flight_bytes_budget();
        assert!(budget > 0 && budget <= IN_FLIGHT_BYTES_QUEUED_MAX);
        let mib = 1 << 20;
        let depth = DeviceKind::Queued.queue_depth_default(2, mib, budget);
        assert_eq!(
            u64::from(depth),
            (budget / 2 / u64::from(mib)).clamp(8, 128),
            "two workers split the budget"
        );
        assert_eq!(
            DeviceKind::Queued.queue_depth_default(64, mib, budget),
            QUEUE_DEPTH_QUEUED_MIN
        );
        assert_eq!(
            DeviceKind::Queued.queue_depth_default(1, 4096, budget),
            QUEUE_DEPTH_QUEUED_MAX
        );
        assert_eq!(
            DeviceKind::Inline.queue_depth_default(2, mib, budget),
            QUEUE_DEPTH_INLINE
        );
    }

    const MIB: u32 = 1 << 20;

    fn queued_facts() -> DeviceFacts {
        DeviceFacts {
            kind: DeviceKind::Queued,
            device_bytes: 1 << 30,
            logical_block_bytes: 512,
            cpu_count: Some(2),
            in_flight_budget_bytes: IN_FLIGHT_BYTES_QUEUED_MAX,
        }
    }

    fn explicit(threads: usize, queue_depth: u32, chunk_bytes: u32) -> EngineConfig {
        EngineConfig {
            threads: Choice::Value(threads),
            queue_depth: Choice::Value(queue_depth),
            chunk_bytes: Choice::Value(chunk_bytes),
            ..EngineConfig::default()
        }
    }

    fn shape(geometry: ReadGeometry) -> (usize, u32, u32) {
        (geometry.threads, geometry.queue_depth, geometry.chunk_bytes)
    }

    #[test]
    fn auto_geometry_follows_the_device_kind_and_the_cpus() {
        let auto = EngineConfig::default();
        let queued = queued_facts();
        // Two workers share 16 MiB of 1 MiB reads: 8 each.
        let geometry = choose_geometry(&queued, &auto).unwrap();
        assert_eq!(shape(geometry), (2, 8, MIB));
        assert_eq!((geometry.align_bytes, geometry.slot_bytes), (4096, MIB));
        // A small machine's budget is smaller, but never below the minimum depth.
        let small = DeviceFacts {
            in_flight_budget_bytes: 4 << 20,
            cpu_count: None,
            ..queued
        };
        assert_eq!(shape(choose_geometry(&small, &auto).unwrap()), (1, 8, MIB));
        let inline = DeviceFacts {
            kind: DeviceKind::Inline,
            cpu_count: Some(4),
            ..queued
        };
        assert_eq!(
            shape(choose_geometry(&inline, &auto).unwrap()),
            (4, QUEUE_DEPTH_INLINE, CHUNK_BYTES_INLINE)
        );
    }

    #[test]
    fn paced_geometry_applies_only_to_what_is_left_auto() {
        let rated = EngineConfig {
            max_rate_bytes_per_second: 750_000_000,
            ..EngineConfig::default()
        };
        let facts = queued_facts();
        assert_eq!(
            shape(choose_geometry(&facts, &rated).unwrap()),
            (1, 1, 256 << 10)
        );
        let paced_later = EngineConfig {
            paced: true,
            ..EngineConfig::default()
        };
        assert_eq!(
            shape(choose_geometry(&facts, &paced_later).unwrap()),
            (1, 1, PACED_CHUNK_BYTES_UNCAPPED)
        );
        let deeper = EngineConfig {
            queue_depth: Choice::Value(4),
            ..rated
        };
        assert_eq!(
            shape(choose_geometry(&facts, &deeper).unwrap()),
            (1, 4, 256 << 10)
        );
    }

    #[test]
    fn given_values_are_kept_and_reads_rounded_to_the_block() {
        let facts = queued_facts();
        let geometry = choose_geometry(&facts, &explicit(3, 5, 1_000_000)).unwrap();
        assert_eq!(shape(geometry), (3, 5, 999_936));
        // The slot is whole pages so that every slot of the pool starts aligned.
        assert_eq!(geometry.slot_bytes, 245 * 4096);
        let four_k = DeviceFacts {
            logical_block_bytes: 4096,
            ..facts
        };
        let geometry = choose_geometry(&four_k, &explicit(1, 1, 1_000_000)).unwrap();
        assert_eq!(
            (geometry.chunk_bytes, geometry.slot_bytes),
            (999_424, 999_424)
        );
        assert_eq!(
            choose_geometry(&four_k, &explicit(1, 1, 100))
                .unwrap()
                .chunk_bytes,
            4096
        );
        assert_eq!(
            choose_geometry(&four_k, &explicit(1, 1, 0))
                .unwrap()
                .chunk_bytes,
            4096
        );
        let huge = choose_geometry(&four_k, &explicit(1, 1, u32::MAX)).unwrap();
        assert_eq!(huge.chunk_bytes, CHUNK_BYTES_MAX);
        let big_blocks = DeviceFacts {
            logical_block_bytes: 8192,
            ..facts
        };
        assert_eq!(
            choose_geometry(&big_blocks, &explicit(1, 1, MIB))
                .unwrap()
                .align_bytes,
            8192
        );
    }

    #[test]
    fn impossible_geometries_are_errors() {
        let facts = queued_facts();
        let error = |facts: &DeviceFacts, config: EngineConfig| {
            choose_geometry(facts, &config).unwrap_err()
        };
        assert_eq!(
            error(&facts, explicit(THREADS_MAX + 1, 1, MIB)),
            GeometryError::TooManyThreads(THREADS_MAX + 1)
        );
        assert!(choose_geometry(&facts, &explicit(THREADS_MAX, 1, MIB)).is_ok());
        assert_eq!(
            error(&facts, explicit(1, QUEUE_DEPTH_MAX + 1, MIB)),
            GeometryError::QueueTooDeep(QUEUE_DEPTH_MAX + 1)
        );
        assert_eq!(
            error(&facts, explicit(0, 1, MIB)),
            GeometryError::Zero("threads")
        );
        assert_eq!(
            error(&facts, explicit(1, 0, MIB)),
            GeometryError::Zero("queue depth")
        );
        let odd_block = DeviceFacts {
            logical_block_bytes: 1000,
            ..facts
        };
        let odd = error(&odd_block, EngineConfig::default());
        assert_eq!(odd, GeometryError::LogicalBlock(1000));
        assert!(odd.is_about_the_device());
        let ragged = DeviceFacts {
            device_bytes: (1 << 30) + 512,
            logical_block_bytes: 4096,
            ..facts
        };
        assert!(matches!(
            error(&ragged, EngineConfig::default()),
            GeometryError::SizeNotBlockMultiple { .. }
        ));
    }

    #[test]
    fn zero_on_the_command_line_means_auto() {
        assert_eq!(Choice::zero_is_auto(0u32), Choice::Auto);
        assert_eq!(Choice::zero_is_auto(7usize), Choice::Value(7));
    }
}
