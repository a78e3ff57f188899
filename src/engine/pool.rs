//! The engine's one buffer area: `slot_count` slots of `slot_bytes`, each
//! aligned for O_DIRECT, allocated once when the engine is built and freed
//! when it is dropped. Each worker owns a disjoint run of slots; a slot is
//! written by the kernel while its read is in flight and read by `deliver`
//! after the completion is reaped, never both at once.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Bytes the pool may take in all: the buffers are registered with the rings
/// (pinned in memory), so a typo in `--chunk` must not pin the machine's RAM.
pub(crate) const POOL_BYTES_MAX: u64 = 4 << 30;

pub(crate) struct BufferPool {
    base: NonNull<u8>,
    layout: Layout,
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
    ) -> anyhow::Result<BufferPool> {
        assert!(align_bytes.is_power_of_two());
        assert!(slot_count > 0 && slot_bytes > 0);
        assert!(
            slot_bytes.is_multiple_of(align_bytes),
            "slot {slot_bytes} is not a multiple of the alignment {align_bytes}"
        );
        let total_bytes = slot_count
            .checked_mul(slot_bytes)
            .filter(|&bytes| bytes as u64 <= POOL_BYTES_MAX)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "read buffers of {slot_count} x {slot_bytes} bytes exceed the limit of {} MiB; \
                     use a smaller chunk, queue depth or thread count",
                    POOL_BYTES_MAX >> 20
                )
            })?;
        let layout = Layout::from_size_align(total_bytes, align_bytes)?;
        // SAFETY: the layout has a non-zero size (both factors are positive).
        // Zeroed so that no byte the kernel did not write can ever be read.
        let base = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(base).ok_or_else(|| {
            anyhow::anyhow!("cannot allocate {total_bytes} bytes of read buffers")
        })?;
        Ok(BufferPool {
            base,
            layout,
            slot_bytes,
            slot_count,
        })
    }

    pub fn total_bytes(&self) -> usize {
        self.layout.size()
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
        // SAFETY: allocated in `new` with this layout. The engine drops its
        // rings (which hold the registration and any in-flight reads) before
        // the pool: see the field order of `Engine`.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
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
