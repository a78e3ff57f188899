//! hot-clone: image a live block device into a `.hc` stream and restore it.
//!
//! The pure parts (the image format, the dirty map, the trace parsers) do no
//! I/O beyond `Read`/`Write`, so they can be unit-tested, fuzzed and benched.

pub mod cli;
pub mod demo;
pub mod dirty;
pub mod dropbehind;
pub mod engine;
pub mod exit;
pub mod format;
pub mod geom;
pub mod image;
pub mod logging;
pub mod restore;
pub mod signals;
pub mod source;
pub mod trace;
pub mod units;
pub mod uring;
