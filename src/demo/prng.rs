//! The one seeded PRNG of the demo, the bundled tools and the tests.

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
    fn xorshift_is_reproducible_and_fills_odd_lengths() {
        let (mut a, mut b) = (XorShift::new(3), XorShift::new(3));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(XorShift::new(3).next_u64(), XorShift::new(4).next_u64());
    }
}
