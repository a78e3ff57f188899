//! Live write-event sources (being written).
