//! restore's read path (the parser thread, the pipeline, the summary) from
//! memory into a sink that checks every call. The first byte of the input
//! chooses how it is fed and whether a *valid* trailer is appended (CRC-32C
//! and byte count of the rest), so that mutated records still reach the
//! code that runs only after the trailer verified.

#![no_main]

use hot_clone::format::{Banner, crc32c_of};
use hot_clone::geom::ByteExtent as Extent;
use hot_clone::restore::{self, Sink};
use libfuzzer_sys::fuzz_target;
use std::io::{self, BufReader, Read};

/// At most `max` bytes per read.
struct Tiny {
    data: Vec<u8>,
    at: usize,
    max: usize,
}

impl Read for Tiny {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.max).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

struct Checking {
    image_bytes: u64,
    device_bytes: Option<u64>,
    admitted: Option<Extent>,
    cursor_bytes: u64,
    written_bytes: u64,
}

impl Sink for Checking {
    fn begin(&mut self, banner: &Banner) -> anyhow::Result<()> {
        self.device_bytes = banner.meta.device_bytes;
        Ok(())
    }
    fn admit(&mut self, extent: Extent) -> anyhow::Result<()> {
        let end = extent
            .checked_end_bytes()
            .expect("an extent past 2^64 was admitted");
        assert!(
            self.device_bytes.is_none_or(|size| end <= size),
            "past size="
        );
        self.admitted = Some(extent);
        self.cursor_bytes = extent.offset_bytes;
        Ok(())
    }
    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> anyhow::Result<()> {
        let extent = self.admitted.expect("write without an extent");
        assert_eq!(offset_bytes, self.cursor_bytes, "write out of order");
        self.cursor_bytes += data.len() as u64;
        assert!(
            self.cursor_bytes <= extent.end_bytes(),
            "write past the extent"
        );
        self.written_bytes += data.len() as u64;
        assert!(
            self.written_bytes <= self.image_bytes,
            "more written than read"
        );
        Ok(())
    }
    fn zero(&mut self, offset_bytes: u64, len_bytes: u64) -> anyhow::Result<()> {
        let extent = self.admitted.take().expect("zero without an extent");
        assert_eq!(
            (offset_bytes, len_bytes),
            (extent.offset_bytes, extent.len_bytes)
        );
        Ok(())
    }
    fn section_done(&mut self, extent: Extent) {
        assert_eq!(
            self.admitted.take(),
            Some(extent),
            "section_done out of turn"
        );
        assert_eq!(self.cursor_bytes, extent.end_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let mut image = body.to_vec();
    if flags & 1 == 1 {
        let trailer = format!(
            "END\tCRC:{:08x}\tBYTES:{}\n",
            crc32c_of(&image),
            image.len()
        );
        image.extend_from_slice(trailer.as_bytes());
    }
    let read_max = 1 + usize::from(flags >> 1 & 7);
    let buffer_bytes = 1 + usize::from(flags >> 4 & 3) * 300;
    // At least 64: a 1-byte chunk makes every byte a cross-thread hand-off
    // (27 runs/s); tests/restore_properties.rs covers chunks of 1..4096.
    let chunk_bytes = 64 + usize::from(flags >> 6) * 1000;
    let mut sink = Checking {
        image_bytes: image.len() as u64,
        device_bytes: None,
        admitted: None,
        cursor_bytes: 0,
        written_bytes: 0,
    };
    let input = BufReader::with_capacity(
        buffer_bytes,
        Tiny {
            data: image,
            at: 0,
            max: read_max,
        },
    );
    match restore::read_stream(Box::new(input), "fuzz", &mut sink, chunk_bytes) {
        Ok(summary) => assert_eq!(summary.data_bytes, sink.written_bytes),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(
                message.contains("image byte offset "),
                "no offset: {message}"
            );
        }
    }
});
