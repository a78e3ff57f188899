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

/// xorshift64: the seeded, reproducible stream the demo and the tools
/// draw offsets and data from (not for anything that must be unguessable).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Starts from `state` as it is (made odd, so never zero).
    pub fn from_state(state: u64) -> XorShift {
        XorShift(state | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `out` with the stream, eight bytes at a time.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
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

    #[test]
    fn xorshift_is_reproducible_and_fills_odd_lengths() {
        let (mut a, mut b) = (XorShift::new(3), XorShift::new(3));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(XorShift::new(3).next_u64(), XorShift::new(4).next_u64());
    }
}
