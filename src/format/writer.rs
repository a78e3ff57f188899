//! Writes an image stream, keeping the CRC-32C and byte count that the END
//! trailer records (over every byte before the trailer line).

use super::record::{Record, RunState, Trailer, encode_record};
use super::{Banner, REVISION_EXTENDED, crc32c_append, crc32c_combine};
use crate::geom::ByteExtent;
use std::io::{self, Write};

pub struct ImageWriter<W: Write> {
    inner: W,
    crc32c: u32,
    bytes_written: u64,
    revision: u32,
    device_bytes: Option<u64>,
    /// Data bytes still owed to the open `S:` section.
    section_remaining_bytes: u64,
}

impl<W: Write> ImageWriter<W> {
    /// Starts an image: writes the banner.
    pub fn new(inner: W, banner: &Banner) -> io::Result<Self> {
        let mut writer = ImageWriter {
            inner,
            crc32c: 0,
            bytes_written: 0,
            revision: banner.revision,
            device_bytes: banner.meta.device_bytes,
            section_remaining_bytes: 0,
        };
        let mut line = Vec::with_capacity(256);
        banner.encode(&mut line)?;
        writer.put(&line)?;
        Ok(writer)
    }

    /// Opens an `S:` section; exactly `extent.len_bytes` bytes must follow
    /// through [`write_data`](Self::write_data).
    pub fn begin_section(&mut self, extent: ByteExtent) -> io::Result<()> {
        self.put_record(&Record::Data(extent))?;
        self.section_remaining_bytes = extent.len_bytes;
        Ok(())
    }

    /// Data of the open section.
    pub fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        assert!(
            data.len() as u64 <= self.section_remaining_bytes,
            "section data overruns its header"
        );
        self.section_remaining_bytes -= data.len() as u64;
        self.put(data)
    }

    /// A whole section: header and data.
    pub fn write_section(&mut self, sector: u64, data: &[u8]) -> io::Result<()> {
        self.begin_section(section_extent(sector, data))?;
        self.write_data(data)
    }

    /// A whole section whose data CRC-32C the caller computed already
    /// (`crc32c_append(0, data)`), so that several threads can checksum
    /// their data in parallel and only the write is serialized. The stream
    /// and the trailer are the same as [`write_section`](Self::write_section)
    /// makes; a wrong `data_crc32c` makes a trailer that does not verify.
    pub fn write_section_checksummed(
        &mut self,
        sector: u64,
        data: &[u8],
        data_crc32c: u32,
    ) -> io::Result<()> {
        self.begin_section(section_extent(sector, data))?;
        self.inner.write_all(data)?;
        self.crc32c = crc32c_combine(self.crc32c, data_crc32c, data.len() as u64);
        self.bytes_written += data.len() as u64;
        self.section_remaining_bytes = 0;
        Ok(())
    }

    /// A `Z:` record (revision 2): the extent reads as zeros.
    pub fn write_zero(&mut self, extent: ByteExtent) -> io::Result<()> {
        self.put_record(&Record::Zero(extent))
    }

    /// A `B:` record (revision 2): the source could not read this extent.
    pub fn write_bad(&mut self, extent: ByteExtent) -> io::Result<()> {
        self.put_record(&Record::Bad(extent))
    }

    /// A `STATE:` record (revision 2).
    pub fn write_state(&mut self, state: RunState) -> io::Result<()> {
        self.put_record(&Record::State(state))
    }

    /// Ends the image with the trailer and flushes. Returns the inner writer
    /// and what the trailer says.
    pub fn finish(mut self) -> io::Result<(W, Trailer)> {
        assert_eq!(self.section_remaining_bytes, 0, "finish inside a section");
        let trailer = Trailer {
            crc32c: self.crc32c,
            bytes: self.bytes_written,
        };
        encode_record(&mut self.inner, &Record::End(trailer))?;
        self.inner.flush()?;
        Ok((self.inner, trailer))
    }

    /// Ends the image without a trailer, so that no reader takes it for a
    /// complete image (the run could not promise one). Flushes what was written.
    pub fn abandon(mut self) -> io::Result<W> {
        self.inner.flush()?;
        Ok(self.inner)
    }

    /// The inner writer, for the run's control of its output (holding it
    /// while frozen); writing to it directly would break the stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Bytes written so far (banner, headers and data).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn put_record(&mut self, record: &Record) -> io::Result<()> {
        assert_eq!(
            self.section_remaining_bytes, 0,
            "record inside a section's data"
        );
        match record {
            Record::Data(extent) | Record::Zero(extent) | Record::Bad(extent) => {
                let end_bytes = extent.end_bytes();
                if let Some(device_bytes) = self.device_bytes {
                    assert!(end_bytes <= device_bytes, "extent past the declared size");
                }
            }
            Record::State(_) | Record::End(_) => {}
        }
        if !matches!(record, Record::Data(_)) {
            assert!(
                self.revision >= REVISION_EXTENDED,
                "extension record in a revision {} image",
                self.revision
            );
        }
        let mut line = [0u8; 96];
        let mut cursor = io::Cursor::new(&mut line[..]);
        encode_record(&mut cursor, record)?;
        let len = cursor.position() as usize;
        self.put(&line[..len])
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.crc32c = crc32c_append(self.crc32c, bytes);
        self.bytes_written += bytes.len() as u64;
        Ok(())
    }
}

/// The extent of a section of `data` at sector `sector`.
///
/// # Panics
///
/// If its bytes do not fit in a `u64`: the caller's sectors come from a
/// device, whose bytes do.
fn section_extent(sector: u64, data: &[u8]) -> ByteExtent {
    ByteExtent::from_sectors(sector, data.len() as u64)
        .unwrap_or_else(|overflow| panic!("{overflow}"))
}
