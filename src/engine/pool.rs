//! The engine's one buffer area: `slot_count` slots of `slot_bytes`, each
//! aligned for O_DIRECT, allocated once when the engine is built and freed
//! when it is dropped. Each worker owns a disjoint run of slots; a slot is
//! written by the kernel while its read is in flight and read by `deliver`
//! after the completion is reaped, never both at once.
//!
//! The area is an anonymous mapping aligned to 2 MiB and advised for
//! transparent huge pages: a registered buffer backed by huge pages reaches
//! the driver as a few large segments instead of one per 4 KiB page, which
//! on a direct-io loop device doubled read throughput (PERF.md, "main
//! pass"). Where the kernel gives no huge pages it is still correct.

use super::EngineError;
use std::ptr::NonNull;

/// Bytes the pool may take in all: the buffers are registered with the rings
/// (pinned in memory), so a typo in `--chunk` must not pin the machine's RAM.
pub(crate) const POOL_BYTES_MAX: u64 = 4 << 30;

/// The huge page size the mapping is aligned for (x86-64 and arm64 with
/// 4 KiB pages).
const HUGE_PAGE_BYTES: usize = 2 << 20;

pub(crate) struct BufferPool {
    /// The whole mapping, for munmap.
    mapping: NonNull<u8>,
    mapping_bytes: usize,
    base: NonNull<u8>,
    total_bytes: usize,
    slot_bytes: usize,
    slot_count: usize,
}

// SAFETY: the pool is plain memory owned by the engine. Who may touch which
// slot, and when, is the engine's discipline (a slot belongs to one worker;
// the kernel writes it only while its read is in flight), not the pool's.
unsafe impl Send for BufferPool {}
// SAFETY: as above; `&BufferPool` only hands out raw pointers.
unsafe impl Sync for BufferPool {}

impl BufferPool {
    /// `slot_count` zeroed slots of `slot_bytes`, each starting on an
    /// `align_bytes` boundary (`slot_bytes` is a multiple of it).
    pub fn new(
        slot_count: usize,
        slot_bytes: usize,
        align_bytes: usize,
    ) -> Result<BufferPool, EngineError> {
        assert!(align_bytes.is_power_of_two());
        assert!(slot_count > 0 && slot_bytes > 0);
        assert!(
            slot_bytes.is_multiple_of(align_bytes),
            "slot {slot_bytes} is not a multiple of the alignment {align_bytes}"
        );
        let total_bytes = slot_count
            .checked_mul(slot_bytes)
            .filter(|&bytes| bytes as u64 <= POOL_BYTES_MAX)
            .ok_or(EngineError::PoolTooLarge {
                slot_count,
                slot_bytes,
                limit_mib: POOL_BYTES_MAX >> 20,
            })?;
        let align = align_bytes.max(HUGE_PAGE_BYTES);
        let mapping_bytes = total_bytes + align;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. Anonymous memory is zero-filled, so no byte the kernel
        // did not write can ever be read.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(EngineError::PoolAlloc {
                bytes: total_bytes,
                error: std::io::Error::last_os_error(),
            });
        }
        let mapping = NonNull::new(mapping.cast::<u8>()).expect("mmap succeeded");
        let offset = (align - mapping.as_ptr() as usize % align) % align;
        // SAFETY: offset < align, so base..base+total_bytes lies inside the
        // mapping of total_bytes + align bytes.
        let base = unsafe { mapping.add(offset) };
        // SAFETY: advice on our own mapping; failure (no THP) only costs
        // speed, so its result is ignored.
        unsafe {
            libc::madvise(base.as_ptr().cast(), total_bytes, libc::MADV_HUGEPAGE);
        }
        Ok(BufferPool {
            mapping,
            mapping_bytes,
            base,
            total_bytes,
            slot_bytes,
            slot_count,
        })
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// The start of slot `slot_index`. Writing or reading through it is the
    /// caller's responsibility (see the module documentation).
    pub fn slot_ptr(&self, slot_index: usize) -> *mut u8 {
        assert!(
            slot_index < self.slot_count,
            "slot {slot_index} out of range"
        );
        // SAFETY: slot_index * slot_bytes < total size, so the result stays
        // inside the allocation.
        unsafe { self.base.as_ptr().add(slot_index * self.slot_bytes) }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length. The engine drops its
        // rings (which hold the registration and any in-flight reads) before
        // the pool: see the field order of `Engine`.
        unsafe {
            libc::munmap(self.mapping.as_ptr().cast(), self.mapping_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_disjoint() {
        let pool = BufferPool::new(3, 8192, 4096).unwrap();
        assert_eq!(pool.total_bytes(), 3 * 8192);
        for i in 0..3 {
            assert_eq!(pool.slot_ptr(i) as usize % 4096, 0);
        }
        assert_eq!(pool.slot_ptr(1) as usize - pool.slot_ptr(0) as usize, 8192);
    }

    #[test]
    fn an_oversized_pool_is_refused() {
        let err = BufferPool::new(1 << 20, 1 << 20, 4096).err().unwrap();
        assert!(err.to_string().contains("exceed the limit"), "{err}");
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn a_slot_past_the_end_is_a_bug() {
        BufferPool::new(2, 4096, 4096).unwrap().slot_ptr(2);
    }
}
