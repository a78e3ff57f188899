//! Reads an image stream record by record, checking everything the format
//! promises: canonical record lines, extents that fit, data that is all
//! there, and the trailer's CRC-32C and byte count. Every error names the
//! byte offset in the image where it was found.

use super::error::{FormatError, FormatErrorKind};
use super::record::{Record, Trailer, parse_record};
use super::{BANNER_LINE_MAX_BYTES, Banner, RECORD_LINE_MAX_BYTES, crc32c_append};
use crate::geom::ByteExtent;
use std::io::{self, BufRead};

pub struct ImageReader<R: BufRead> {
    inner: R,
    /// Offset in the image of the next byte to read.
    offset: u64,
    /// CRC-32C of every byte before `offset` (the trailer line excluded).
    crc32c: u32,
    banner: Banner,
    /// The `S:` section whose data is being read, and the bytes left of it.
    section: Option<(ByteExtent, u64)>,
    trailer: Option<Trailer>,
    ended: bool,
    line: Vec<u8>,
}

impl<R: BufRead> ImageReader<R> {
    /// Reads and checks the banner.
    pub fn new(inner: R) -> Result<Self, FormatError> {
        let mut reader = ImageReader {
            inner,
            offset: 0,
            crc32c: 0,
            banner: Banner::plain(),
            section: None,
            trailer: None,
            ended: false,
            line: Vec::with_capacity(RECORD_LINE_MAX_BYTES),
        };
        reader.read_line(BANNER_LINE_MAX_BYTES)?;
        if reader.line.is_empty() {
            return Err(FormatError::new(0, FormatErrorKind::Empty));
        }
        reader.banner = Banner::parse(&reader.line).map_err(|kind| FormatError::new(0, kind))?;
        reader.account_line();
        Ok(reader)
    }

    pub fn banner(&self) -> &Banner {
        &self.banner
    }

    /// Offset in the image of the next byte to be read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The verified trailer, once the END record has been read.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// The next record, or `None` at the end of the image. The end is either
    /// the END trailer, checked and followed by nothing, or — for a legacy
    /// image without a trailer — the end of the stream at a record boundary;
    /// [`trailer`](Self::trailer) tells the two apart.
    ///
    /// Data of a `S:` section not yet read with [`read_data`](Self::read_data)
    /// is read and checked here.
    pub fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        if self.ended {
            return Ok(None);
        }
        self.skip_data()?;
        let line_offset = self.offset;
        self.read_line(RECORD_LINE_MAX_BYTES)?;
        if self.line.is_empty() {
            self.ended = true;
            return Ok(None);
        }
        let at_line = |kind| FormatError::new(line_offset, kind);
        let record = parse_record(&self.line, self.banner.revision).map_err(at_line)?;
        match record {
            Record::Data(extent) | Record::Zero(extent) | Record::Bad(extent) => {
                // The parser refused any extent whose end overflows.
                let end_bytes = extent.end_bytes();
                if let Some(device_bytes) = self.banner.meta.device_bytes
                    && end_bytes > device_bytes
                {
                    return Err(at_line(FormatErrorKind::PastDeclaredSize {
                        sector: extent.sector_first(),
                        len_bytes: extent.len_bytes,
                        end_bytes,
                        device_bytes,
                    }));
                }
                if let Record::Data(_) = record {
                    self.section = Some((extent, extent.len_bytes));
                }
                self.account_line();
            }
            Record::State(_) => self.account_line(),
            Record::End(trailer) => {
                if trailer.bytes != line_offset {
                    return Err(at_line(FormatErrorKind::ByteCountMismatch {
                        recorded: trailer.bytes,
                        counted: line_offset,
                    }));
                }
                if trailer.crc32c != self.crc32c {
                    return Err(at_line(FormatErrorKind::CrcMismatch {
                        recorded: trailer.crc32c,
                        computed: self.crc32c,
                        bytes: line_offset,
                    }));
                }
                self.offset += self.line.len() as u64;
                if !self.fill_buf()?.is_empty() {
                    return Err(FormatError::new(
                        self.offset,
                        FormatErrorKind::DataAfterTrailer,
                    ));
                }
                self.trailer = Some(trailer);
                self.ended = true;
            }
        }
        Ok(Some(record))
    }

    /// Reads data of the current `S:` section into the front of `buf`: as
    /// many bytes as fit, or as remain of the section. Returns 0 when the
    /// section's data is all read. A short image is an error, never a short
    /// count.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, FormatError> {
        let Some((extent, remaining_bytes)) = self.section else {
            return Ok(0);
        };
        let want = buf
            .len()
            .min(usize::try_from(remaining_bytes).unwrap_or(usize::MAX));
        let mut filled = 0;
        while filled < want {
            match self.inner.read(&mut buf[filled..want]) {
                Ok(0) => {
                    return Err(self.truncated(
                        self.offset + filled as u64,
                        extent,
                        remaining_bytes - filled as u64,
                    ));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FormatError::new(self.offset + filled as u64, e.into())),
            }
        }
        self.crc32c = crc32c_append(self.crc32c, &buf[..filled]);
        self.offset += filled as u64;
        self.consume_section(filled as u64);
        Ok(filled)
    }

    /// Bytes of the current section's data not read yet.
    pub fn section_remaining_bytes(&self) -> u64 {
        self.section.map_or(0, |(_, remaining)| remaining)
    }

    fn consume_section(&mut self, bytes: u64) {
        if let Some((extent, remaining)) = self.section {
            debug_assert!(bytes <= remaining);
            self.section = (remaining > bytes).then(|| (extent, remaining - bytes));
        }
    }

    fn skip_data(&mut self) -> Result<(), FormatError> {
        while let Some((extent, remaining_bytes)) = self.section {
            let chunk = fill(&mut self.inner, self.offset)?;
            if chunk.is_empty() {
                return Err(self.truncated(self.offset, extent, remaining_bytes));
            }
            let take = chunk
                .len()
                .min(usize::try_from(remaining_bytes).unwrap_or(usize::MAX));
            self.crc32c = crc32c_append(self.crc32c, &chunk[..take]);
            self.inner.consume(take);
            self.offset += take as u64;
            self.consume_section(take as u64);
        }
        Ok(())
    }

    fn truncated(&self, offset: u64, extent: ByteExtent, missing_bytes: u64) -> FormatError {
        FormatError::new(
            offset,
            FormatErrorKind::TruncatedSection {
                sector: extent.sector_first(),
                len_bytes: extent.len_bytes,
                got_bytes: extent.len_bytes - missing_bytes,
            },
        )
    }

    /// Reads one line, newline included, into `self.line`; empty at the end
    /// of the stream. Never buffers more than `max_bytes`.
    fn read_line(&mut self, max_bytes: usize) -> Result<(), FormatError> {
        self.line.clear();
        loop {
            let offset = self.offset;
            let chunk = fill(&mut self.inner, offset)?;
            if chunk.is_empty() {
                return Ok(());
            }
            let (take, complete) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if self.line.len() + take > max_bytes {
                let room = max_bytes.saturating_sub(self.line.len()).min(chunk.len());
                self.line.extend_from_slice(&chunk[..room]);
                return Err(FormatError::new(
                    offset,
                    FormatErrorKind::LineTooLong {
                        max_bytes,
                        start: super::error::quote_line(&self.line),
                    },
                ));
            }
            self.line.extend_from_slice(&chunk[..take]);
            self.inner.consume(take);
            if complete {
                return Ok(());
            }
        }
    }

    /// Adds the line just read to the CRC and the offset.
    fn account_line(&mut self) {
        self.crc32c = crc32c_append(self.crc32c, &self.line);
        self.offset += self.line.len() as u64;
    }

    fn fill_buf(&mut self) -> Result<&[u8], FormatError> {
        fill(&mut self.inner, self.offset)
    }
}

/// `fill_buf` that retries on EINTR and names the offset on error. A free
/// function so that callers can borrow other fields of the reader meanwhile.
fn fill<R: BufRead>(inner: &mut R, offset: u64) -> Result<&[u8], FormatError> {
    loop {
        match inner.fill_buf() {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FormatError::new(offset, e.into())),
        }
    }
    // The loop above proved the buffer is ready; borrowck needs a second call.
    inner
        .fill_buf()
        .map_err(|e| FormatError::new(offset, e.into()))
}
