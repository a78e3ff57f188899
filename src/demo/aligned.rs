//! A zeroed heap buffer aligned to a page, as O_DIRECT needs, for the
//! demo, the bundled tools and the tests (the read engine has its own pool).

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Page alignment; also enough for every logical block size up to 4 KiB.
pub const ALIGN_BYTES: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain bytes owned by this value alone.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes starting on a page boundary.
    pub fn new(len: usize) -> AlignedBuf {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(Self::layout(len)) };
        AlignedBuf {
            ptr: NonNull::new(ptr).expect("out of memory"),
            len,
        }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), ALIGN_BYTES).expect("aligned buffer layout")
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut buf = AlignedBuf::new(3 * 4096 + 5);
        assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
        assert_eq!(buf.len(), 3 * 4096 + 5);
        assert!(buf.iter().all(|&b| b == 0));
        buf[7] = 1;
        assert_eq!(buf.as_mut()[7], 1);
    }
}
