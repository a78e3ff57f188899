//! The read engine (being written).
