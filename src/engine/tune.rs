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

use std::path::Path;

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
    /// fit the in-flight budget ([`in_flight_bytes_budget`]) shared by the
    /// workers, within [`QUEUE_DEPTH_QUEUED_MIN`, `QUEUE_DEPTH_QUEUED_MAX`].
    /// On the direct-io loop device here, with buffers in huge pages
    /// (`pool.rs`), two workers reached 3.09 GB/s at 4 reads of 1 MiB in
    /// flight each (p50 read latency 2.5 ms), 3.09 GB/s at 8 (5 ms) and
    /// 3.3 GB/s at 128 (62 ms): beyond a few MiB in flight, depth buys
    /// little throughput and a lot of latency that the live workload shares.
    /// (With 4 KiB pages, throughput had followed the bytes in flight up to
    /// about 256 MiB; huge pages removed that need.)
    pub fn queue_depth_default(self, threads: usize, chunk_bytes: u32) -> u32 {
        match self {
            DeviceKind::Inline => QUEUE_DEPTH_INLINE,
            DeviceKind::Queued => {
                let per_worker_bytes = in_flight_bytes_budget() / threads.max(1) as u64;
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
/// when the rate is not known in advance, as under `--adaptive` alone).
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
        assert_eq!(chunk(0), PACED_CHUNK_BYTES_UNCAPPED, "adaptive alone");
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
        let depth = DeviceKind::Queued.queue_depth_default(2, mib);
        assert_eq!(
            u64::from(depth),
            (budget / 2 / u64::from(mib)).clamp(8, 128),
            "two workers split the budget"
        );
        assert_eq!(
            DeviceKind::Queued.queue_depth_default(64, mib),
            QUEUE_DEPTH_QUEUED_MIN
        );
        assert_eq!(
            DeviceKind::Queued.queue_depth_default(1, 4096),
            QUEUE_DEPTH_QUEUED_MAX
        );
        assert_eq!(
            DeviceKind::Inline.queue_depth_default(2, mib),
            QUEUE_DEPTH_INLINE
        );
    }
}
