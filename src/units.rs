//! Human-readable quantities for log lines.

use std::fmt;

/// Bytes in IEC units with one decimal, as the original's log lines show them
/// ("3.7 GiB").
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNIT: u64 = 1024;
        if self.0 < UNIT {
            return write!(f, "{} B", self.0);
        }
        let mut div = UNIT;
        let mut exp = 0;
        let mut n = self.0 / UNIT;
        while n >= UNIT && exp < 5 {
            div *= UNIT;
            exp += 1;
            n /= UNIT;
        }
        let prefix = b"KMGTPE"[exp] as char;
        write!(f, "{:.1} {prefix}iB", self.0 as f64 / div as f64)
    }
}

/// A rate in bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct Rate(pub f64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", Bytes(self.0.max(0.0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_original() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(1023).to_string(), "1023 B");
        assert_eq!(Bytes(18 * 1024 * 1024).to_string(), "18.0 MiB");
        assert_eq!(Bytes(3_959_422_976).to_string(), "3.7 GiB");
        assert_eq!(Bytes(u64::MAX).to_string(), "16.0 EiB");
    }
}
