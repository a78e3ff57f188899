//! Parsers for tracefs: event `format` files, `events/header_page`,
//! `events/header_event`, and the binary ring-buffer pages read from
//! `per_cpu/cpuN/trace_pipe_raw`, decoded into [`WriteEvent`]s.
//!
//! Nothing here is hard-coded that the kernel describes: field offsets and
//! sizes come from the event's `format` file, the page layout from
//! `header_page`, and the event header encoding is checked against
//! `header_event` before any page is parsed. Read the files of the instance
//! you trace (`instances/NAME/events/...`): its sub-buffer size may differ
//! from the top-level buffer's.
//!
//! # Page layout (kernel/trace/ring_buffer.c, checked on 6.18)
//!
//! A page is `struct buffer_data_page`: a `u64` timestamp, a `local_t`
//! commit word (8 bytes on 64-bit), then the event data. The low 30 bits of
//! the commit word are the number of data bytes; bit 31 (`RB_MISSED_EVENTS`)
//! says events were lost before this page; bit 30 (`RB_MISSED_STORED`) says the
//! number lost is stored as an `unsigned long` right after the data. The
//! kernel adds `RB_MISSED_EVENTS` as the C int `1 << 31`, which sign-extends:
//! a real page read here had commit `0xffff_ffff_c000_0fdc` (4060 bytes, both
//! flags, 3850 events lost). Only the low 32 bits are meaningful.
//!
//! Each event starts with a 32-bit header, `type_len:5` (low bits) and
//! `time_delta:27`, followed by `array[]`:
//! - `type_len` 1..=28: data of `type_len * 4` bytes in `array[0..]`;
//! - `type_len` 0: data length + 4 in `array[0]`, data from `array[1]`;
//! - 29 padding: with `time_delta` 0 the rest of the page is empty, otherwise
//!   `array[0]` bytes follow the header (discarded events — every event an
//!   event filter rejects and could not un-reserve — become padding);
//! - 30 time extend: adds `array[0] << 27 | time_delta` to the clock;
//! - 31 time stamp: sets the clock to the absolute `array[0] << 27 |
//!   time_delta` (59 bits; the top bits come from the page timestamp).
//!
//! Data events add their `time_delta` to a clock that starts at the page
//! timestamp. A data event's payload starts with the common fields
//! (`common_type`, the event id, at offset 0).

use std::fmt;

use super::{DevT, Phase, WriteEvent, WriteKind, classify_rwbs};

/// Largest sub-buffer we accept (the kernel allows up to `MAX_PAGE_ORDER`
/// pages, 4 MiB on x86-64).
pub const SUBBUF_BYTES_MAX: usize = 8 << 20;

/// Largest page header we accept (16 bytes on 64-bit kernels).
pub const PAGE_HEADER_BYTES_MAX: usize = 4096;

/// Longest `rwbs` array we decode; 10 on 6.18 (`RWBS_LEN`), 8 on older kernels.
pub const RWBS_BYTES_MAX: usize = 16;

/// Longest `comm` array we decode (`TASK_COMM_LEN`, 16).
pub const COMM_BYTES_MAX: usize = 16;

/// Bytes of the event header word.
const EVENT_HEADER_BYTES: usize = 4;
/// Bytes of one `array[]` word.
const ARRAY_WORD_BYTES: usize = 4;
/// Smallest event of any type: a header and one array word.
const EVENT_BYTES_MIN: usize = EVENT_HEADER_BYTES + ARRAY_WORD_BYTES;

const TYPE_LEN_BITS: u32 = 5;
const TIME_DELTA_BITS: u32 = 27;
const ARRAY_BITS: u32 = 32;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;
const TYPE_LEN_DATA_MAX: u32 = 28;

const COMMIT_MISSED_EVENTS: u64 = 1 << 31;
const COMMIT_MISSED_STORED: u64 = 1 << 30;
const COMMIT_LENGTH_MASK: u64 = (1 << 30) - 1;

/// Top bits of a timestamp that an absolute time-stamp event does not carry
/// (`TS_MSB` in ring_buffer.c).
const TS_MSB: u64 = 0xf8 << 56;

const _: () = assert!(TYPE_LEN_BITS + TIME_DELTA_BITS == 32);
const _: () = assert!(TYPE_LEN_DATA_MAX < TYPE_PADDING);
const _: () = assert!(RWBS_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(COMM_BYTES_MAX <= u8::MAX as usize);

// ---------------------------------------------------------------------------
// Field lines, shared by format files and header_page.

/// One `field:` line of a format file or of `header_page`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldFormat {
    /// The field name without any `[N]` suffix.
    pub name: String,
    /// The declared type without the name, e.g. `unsigned int`, `char`,
    /// `__data_loc char[]`.
    pub type_name: String,
    /// Offset from the start of the event payload (or the page).
    pub offset_bytes: usize,
    pub size_bytes: usize,
    pub signed: bool,
    /// `N` of a `name[N]` declaration.
    pub array_len: Option<usize>,
    /// A `__data_loc`/`__rel_loc` field: a 32-bit (length << 16 | offset) locator.
    pub is_dynamic: bool,
}

/// Why a `field:` line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldLineError {
    #[error("no `field:` prefix")]
    NoPrefix,
    #[error("no field name in the declaration")]
    NoName,
    #[error("missing `{0}:`")]
    MissingKey(&'static str),
    #[error("`{key}:` is not a number: {value:?}")]
    BadNumber { key: &'static str, value: String },
    #[error("array length in {0:?} is not a number")]
    BadArrayLength(String),
    #[error("offset {offset_bytes} + size {size_bytes} overflows")]
    Overflow {
        offset_bytes: usize,
        size_bytes: usize,
    },
}

fn parse_field_line(line: &str) -> Result<FieldFormat, FieldLineError> {
    let rest = line
        .trim_start()
        .strip_prefix("field:")
        .ok_or(FieldLineError::NoPrefix)?;
    let mut parts = rest.split(';');
    let declaration = parts.next().unwrap_or("").trim();
    let mut offset_bytes = None;
    let mut size_bytes = None;
    let mut signed = None;
    for part in parts {
        let part = part.trim();
        if let Some((key, value)) = part.split_once(':') {
            let key = match key.trim() {
                "offset" => "offset",
                "size" => "size",
                "signed" => "signed",
                _ => continue, // unknown keys are for newer tools; ignore
            };
            let value = value.trim();
            let number: usize = value.parse().map_err(|_| FieldLineError::BadNumber {
                key,
                value: value.to_string(),
            })?;
            match key {
                "offset" => offset_bytes = Some(number),
                "size" => size_bytes = Some(number),
                _ => signed = Some(number != 0),
            }
        }
    }
    let offset_bytes = offset_bytes.ok_or(FieldLineError::MissingKey("offset"))?;
    let size_bytes = size_bytes.ok_or(FieldLineError::MissingKey("size"))?;
    if offset_bytes.checked_add(size_bytes).is_none() {
        return Err(FieldLineError::Overflow {
            offset_bytes,
            size_bytes,
        });
    }
    let (type_part, name_part) = match declaration.rsplit_once(char::is_whitespace) {
        Some((type_part, name_part)) => (type_part.trim(), name_part),
        None => return Err(FieldLineError::NoName),
    };
    let (name, array_len) = match name_part.split_once('[') {
        Some((name, rest)) => {
            let length = rest.strip_suffix(']').unwrap_or(rest);
            let length = length
                .parse()
                .map_err(|_| FieldLineError::BadArrayLength(name_part.to_string()))?;
            (name, Some(length))
        }
        None => (name_part, None),
    };
    if name.is_empty() || type_part.is_empty() {
        return Err(FieldLineError::NoName);
    }
    Ok(FieldFormat {
        name: name.to_string(),
        type_name: type_part.to_string(),
        offset_bytes,
        size_bytes,
        // Very old kernels print no `signed:`; none of the fields we read is signed
        // except `error`, which we check explicitly.
        signed: signed.unwrap_or(false),
        array_len,
        is_dynamic: type_part.starts_with("__data_loc") || type_part.starts_with("__rel_loc"),
    })
}

// ---------------------------------------------------------------------------
// Event format files.

/// An event's `format` file: its numeric id (the `common_type` of its records)
/// and the layout of its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFormat {
    pub name: String,
    pub id: u16,
    /// Common fields first, then the event's own, in file order.
    pub fields: Vec<FieldFormat>,
}

impl EventFormat {
    /// The field called `name`, if any.
    pub fn field(&self, name: &str) -> Option<&FieldFormat> {
        self.fields.iter().find(|field| field.name == name)
    }
}

/// Why an event `format` file could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no `name:` line")]
    MissingName,
    #[error("no `ID:` line")]
    MissingId,
    #[error("event id {0:?} is not a number from 0 to 65535")]
    BadId(String),
    #[error("line {line_number}: {source}: {line:?}")]
    BadField {
        line_number: usize,
        line: String,
        source: FieldLineError,
    },
    #[error("field `{0}` appears twice")]
    DuplicateField(String),
    #[error("no `field:` lines")]
    NoFields,
}

/// Parses an event `format` file (`events/SYSTEM/EVENT/format`).
pub fn parse_event_format(text: &str) -> Result<EventFormat, FormatError> {
    let mut name = None;
    let mut id = None;
    let mut fields: Vec<FieldFormat> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(value) = trimmed.strip_prefix("name:") {
            name = Some(value.trim().to_string());
        } else if let Some(value) = trimmed.strip_prefix("ID:") {
            let value = value.trim();
            let parsed: u16 = value
                .parse()
                .map_err(|_| FormatError::BadId(value.to_string()))?;
            id = Some(parsed);
        } else if trimmed.starts_with("field:") {
            let field = parse_field_line(trimmed).map_err(|source| FormatError::BadField {
                line_number: index + 1,
                line: line.to_string(),
                source,
            })?;
            if fields.iter().any(|known| known.name == field.name) {
                return Err(FormatError::DuplicateField(field.name));
            }
            fields.push(field);
        } else if trimmed.starts_with("print fmt:") {
            break;
        }
    }
    let name = name.ok_or(FormatError::MissingName)?;
    let id = id.ok_or(FormatError::MissingId)?;
    if fields.is_empty() {
        return Err(FormatError::NoFields);
    }
    Ok(EventFormat { name, id, fields })
}

// ---------------------------------------------------------------------------
// header_page and header_event.

/// `events/header_page`: where the page timestamp, commit word and data are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderPage {
    pub timestamp: FieldFormat,
    pub commit: FieldFormat,
    /// A legacy description of the commit word's flag byte; informational.
    pub overwrite: Option<FieldFormat>,
    pub data: FieldFormat,
}

/// Why `header_page` could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderPageError {
    #[error("line {line_number}: {source}: {line:?}")]
    BadField {
        line_number: usize,
        line: String,
        source: FieldLineError,
    },
    #[error("no `{0}` field")]
    MissingField(&'static str),
}

/// Parses `events/header_page`.
pub fn parse_header_page(text: &str) -> Result<HeaderPage, HeaderPageError> {
    let mut timestamp = None;
    let mut commit = None;
    let mut overwrite = None;
    let mut data = None;
    for (index, line) in text.lines().enumerate() {
        if !line.trim_start().starts_with("field:") {
            continue;
        }
        let field = parse_field_line(line).map_err(|source| HeaderPageError::BadField {
            line_number: index + 1,
            line: line.to_string(),
            source,
        })?;
        let slot = match field.name.as_str() {
            "timestamp" => &mut timestamp,
            "commit" => &mut commit,
            "overwrite" => &mut overwrite,
            "data" => &mut data,
            _ => continue,
        };
        *slot = Some(field);
    }
    Ok(HeaderPage {
        timestamp: timestamp.ok_or(HeaderPageError::MissingField("timestamp"))?,
        commit: commit.ok_or(HeaderPageError::MissingField("commit"))?,
        overwrite,
        data: data.ok_or(HeaderPageError::MissingField("data"))?,
    })
}

/// `events/header_event`: the bit layout of the event header and the
/// `type_len` values of the special event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderEvent {
    pub type_len_bits: u32,
    pub time_delta_bits: u32,
    pub array_bits: u32,
    pub type_padding: u32,
    pub type_time_extend: u32,
    pub type_time_stamp: u32,
    pub type_len_data_max: u32,
}

/// Why `header_event` could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderEventError {
    #[error("no `{0}` line")]
    Missing(&'static str),
    #[error("line {line_number} is not a number where one is expected: {line:?}")]
    BadNumber { line_number: usize, line: String },
}

/// Parses `events/header_event`.
pub fn parse_header_event(text: &str) -> Result<HeaderEvent, HeaderEventError> {
    let mut type_len_bits = None;
    let mut time_delta_bits = None;
    let mut array_bits = None;
    let mut type_padding = None;
    let mut type_time_extend = None;
    let mut type_time_stamp = None;
    let mut type_len_data_max = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let bad = || HeaderEventError::BadNumber {
            line_number: index + 1,
            line: line.to_string(),
        };
        // "data max type_len  == 28"
        if let Some(value) = trimmed.strip_prefix("data max type_len") {
            let value = value.trim().trim_start_matches("==").trim();
            type_len_data_max = Some(value.parse::<u32>().map_err(|_| bad())?);
            continue;
        }
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let slot = match key.trim() {
            "type_len" => &mut type_len_bits,
            "time_delta" => &mut time_delta_bits,
            "array" => &mut array_bits,
            "padding" => &mut type_padding,
            "time_extend" => &mut type_time_extend,
            "time_stamp" => &mut type_time_stamp,
            _ => continue,
        };
        // "5 bits" or "type == 29"
        let number = if let Some(bits) = value.strip_suffix("bits") {
            bits.trim()
        } else if let Some(type_value) = value.strip_prefix("type") {
            type_value.trim().trim_start_matches("==").trim()
        } else {
            return Err(bad());
        };
        *slot = Some(number.parse::<u32>().map_err(|_| bad())?);
    }
    Ok(HeaderEvent {
        type_len_bits: type_len_bits.ok_or(HeaderEventError::Missing("type_len"))?,
        time_delta_bits: time_delta_bits.ok_or(HeaderEventError::Missing("time_delta"))?,
        array_bits: array_bits.ok_or(HeaderEventError::Missing("array"))?,
        type_padding: type_padding.ok_or(HeaderEventError::Missing("padding"))?,
        type_time_extend: type_time_extend.ok_or(HeaderEventError::Missing("time_extend"))?,
        type_time_stamp: type_time_stamp.ok_or(HeaderEventError::Missing("time_stamp"))?,
        type_len_data_max: type_len_data_max
            .ok_or(HeaderEventError::Missing("data max type_len"))?,
    })
}

// ---------------------------------------------------------------------------
// Page layout.

/// Where things are in a ring-buffer page, checked against what this parser
/// implements. Build once per instance with [`PageLayout::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLayout {
    timestamp_offset_bytes: usize,
    commit_offset_bytes: usize,
    /// Size of `local_t`, and of the stored missed-events count (`unsigned long`).
    commit_bytes: usize,
    data_offset_bytes: usize,
    data_bytes_max: usize,
}

/// Why a page layout is not one this parser can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("page timestamp is {0} bytes; expected 8")]
    TimestampSize(usize),
    #[error("page commit word is {0} bytes; expected 4 or 8")]
    CommitSize(usize),
    #[error(
        "page fields overlap or are out of order (timestamp at {timestamp_offset_bytes}, commit at {commit_offset_bytes}, data at {data_offset_bytes})"
    )]
    Overlap {
        timestamp_offset_bytes: usize,
        commit_offset_bytes: usize,
        data_offset_bytes: usize,
    },
    #[error("page data area of {0} bytes is empty or larger than {SUBBUF_BYTES_MAX}")]
    DataSize(usize),
    #[error("page header of {0} bytes is larger than {PAGE_HEADER_BYTES_MAX}")]
    DataOffset(usize),
    #[error(
        "event header is not the one this parser implements (5-bit type_len, 27-bit time_delta, padding 29, time extend 30, time stamp 31, data type_len up to 28): {0:?}"
    )]
    EventHeader(HeaderEvent),
}

impl PageLayout {
    /// Checks `header_page` and `header_event` against what this parser
    /// implements.
    pub fn new(page: &HeaderPage, event: &HeaderEvent) -> Result<PageLayout, LayoutError> {
        let expected = HeaderEvent {
            type_len_bits: TYPE_LEN_BITS,
            time_delta_bits: TIME_DELTA_BITS,
            array_bits: ARRAY_BITS,
            type_padding: TYPE_PADDING,
            type_time_extend: TYPE_TIME_EXTEND,
            type_time_stamp: TYPE_TIME_STAMP,
            type_len_data_max: TYPE_LEN_DATA_MAX,
        };
        if *event != expected {
            return Err(LayoutError::EventHeader(*event));
        }
        if page.timestamp.size_bytes != 8 {
            return Err(LayoutError::TimestampSize(page.timestamp.size_bytes));
        }
        if page.commit.size_bytes != 4 && page.commit.size_bytes != 8 {
            return Err(LayoutError::CommitSize(page.commit.size_bytes));
        }
        let timestamp_end = page
            .timestamp
            .offset_bytes
            .saturating_add(page.timestamp.size_bytes);
        let commit_end = page
            .commit
            .offset_bytes
            .saturating_add(page.commit.size_bytes);
        let ordered =
            timestamp_end <= page.commit.offset_bytes || commit_end <= page.timestamp.offset_bytes;
        if !ordered || page.data.offset_bytes < timestamp_end || page.data.offset_bytes < commit_end
        {
            return Err(LayoutError::Overlap {
                timestamp_offset_bytes: page.timestamp.offset_bytes,
                commit_offset_bytes: page.commit.offset_bytes,
                data_offset_bytes: page.data.offset_bytes,
            });
        }
        if page.data.offset_bytes > PAGE_HEADER_BYTES_MAX {
            return Err(LayoutError::DataOffset(page.data.offset_bytes));
        }
        if page.data.size_bytes < EVENT_BYTES_MIN || page.data.size_bytes > SUBBUF_BYTES_MAX {
            return Err(LayoutError::DataSize(page.data.size_bytes));
        }
        Ok(PageLayout {
            timestamp_offset_bytes: page.timestamp.offset_bytes,
            commit_offset_bytes: page.commit.offset_bytes,
            commit_bytes: page.commit.size_bytes,
            data_offset_bytes: page.data.offset_bytes,
            data_bytes_max: page.data.size_bytes,
        })
    }

    /// Bytes of one page (sub-buffer) as `trace_pipe_raw` returns it: read in
    /// units of this size.
    pub fn page_bytes(&self) -> usize {
        self.data_offset_bytes + self.data_bytes_max
    }

    /// Bytes of the page header before the event data.
    pub fn data_offset_bytes(&self) -> usize {
        self.data_offset_bytes
    }

    /// Most data events one page can hold: size a per-page output buffer with
    /// this so parsing never reallocates.
    pub fn events_per_page_max(&self) -> usize {
        self.data_bytes_max / EVENT_BYTES_MIN
    }
}

// ---------------------------------------------------------------------------
// Pages.

/// Events the kernel lost before a page, as its commit word reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissedEvents {
    None,
    /// Events were lost but the page had no room to store how many.
    Unknown,
    Count(u64),
}

impl MissedEvents {
    /// Whether any events were lost: a trace with losses cannot vouch for the
    /// image.
    pub fn any(self) -> bool {
        self != MissedEvents::None
    }
}

/// The header of one ring-buffer page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    /// Time of the page's first event (the clock the event deltas add to).
    pub timestamp_ns: u64,
    /// Bytes of event data after the header.
    pub data_bytes: usize,
    pub missed: MissedEvents,
}

/// Why a page (or an event in it) could not be parsed. Offsets are from the
/// start of the page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("page of {page_bytes} bytes is shorter than its {header_bytes}-byte header")]
    TooShort {
        page_bytes: usize,
        header_bytes: usize,
    },
    #[error(
        "page commit word {commit:#x} claims {data_bytes} data bytes; the page holds at most {capacity_bytes}"
    )]
    CommitTooLarge {
        commit: u64,
        data_bytes: usize,
        capacity_bytes: usize,
    },
    #[error("page says a missed-events count is stored, but the page ends first")]
    MissedCountTruncated,
    #[error("event at byte {offset_bytes} is cut off by the end of the page data")]
    EventTruncated { offset_bytes: usize },
    #[error("event at byte {offset_bytes} declares an impossible length {length_bytes}")]
    EventLength {
        offset_bytes: usize,
        length_bytes: u32,
    },
    #[error(
        "event at byte {offset_bytes} (id {id}) has {payload_bytes} payload bytes; its format needs {needed_bytes}"
    )]
    PayloadTooShort {
        offset_bytes: usize,
        id: u16,
        payload_bytes: usize,
        needed_bytes: usize,
    },
}

/// One data event of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub timestamp_ns: u64,
    /// Offset of the event header from the start of the page.
    pub offset_bytes: usize,
    /// The record: common fields (`common_type` at offset 0) then the event's.
    pub payload: &'a [u8],
}

impl RawEvent<'_> {
    /// The event id (`common_type`), if the payload is long enough to hold it.
    pub fn common_type(&self) -> Option<u16> {
        read_array::<2>(self.payload, 0).map(u16::from_ne_bytes)
    }
}

/// Iterator over the data events of one page; stops after the first error.
#[derive(Clone, Debug)]
pub struct PageEvents<'a> {
    /// The page from its start through the end of the committed data.
    page: &'a [u8],
    offset_bytes: usize,
    clock_ns: u64,
    failed: bool,
}

/// Parses a page's header and returns an iterator over its data events.
pub fn parse_page<'a>(
    layout: &PageLayout,
    page: &'a [u8],
) -> Result<(PageHeader, PageEvents<'a>), PageError> {
    let too_short = PageError::TooShort {
        page_bytes: page.len(),
        header_bytes: layout.data_offset_bytes,
    };
    if page.len() < layout.data_offset_bytes {
        return Err(too_short);
    }
    let timestamp_ns = read_array::<8>(page, layout.timestamp_offset_bytes)
        .map(u64::from_ne_bytes)
        .ok_or(too_short.clone())?;
    let commit = read_word(page, layout.commit_offset_bytes, layout.commit_bytes)
        .ok_or(too_short.clone())?;
    // Only the low 32 bits carry the length and flags; the rest is sign extension.
    let commit_low = commit & 0xffff_ffff;
    let capacity_bytes = layout
        .data_bytes_max
        .min(page.len() - layout.data_offset_bytes);
    let data_bytes_claimed = commit_low & COMMIT_LENGTH_MASK;
    let data_bytes = match usize::try_from(data_bytes_claimed) {
        Ok(data_bytes) if data_bytes <= capacity_bytes => data_bytes,
        _ => {
            return Err(PageError::CommitTooLarge {
                commit,
                data_bytes: usize::try_from(data_bytes_claimed).unwrap_or(usize::MAX),
                capacity_bytes,
            });
        }
    };
    let data_end = layout.data_offset_bytes + data_bytes;
    let missed = if commit_low & COMMIT_MISSED_EVENTS == 0 {
        MissedEvents::None
    } else if commit_low & COMMIT_MISSED_STORED == 0 {
        MissedEvents::Unknown
    } else {
        let count = read_word(page, data_end, layout.commit_bytes)
            .ok_or(PageError::MissedCountTruncated)?;
        MissedEvents::Count(count)
    };
    let header = PageHeader {
        timestamp_ns,
        data_bytes,
        missed,
    };
    let events = PageEvents {
        page: &page[..data_end],
        offset_bytes: layout.data_offset_bytes,
        clock_ns: timestamp_ns,
        failed: false,
    };
    Ok((header, events))
}

impl<'a> PageEvents<'a> {
    fn step(&mut self) -> Result<Option<RawEvent<'a>>, PageError> {
        // Every iteration advances by at least EVENT_HEADER_BYTES, so this loop
        // ends within page length / 4 turns.
        loop {
            let offset_bytes = self.offset_bytes;
            if offset_bytes >= self.page.len() {
                return Ok(None);
            }
            let truncated = PageError::EventTruncated { offset_bytes };
            let header = read_u32(self.page, offset_bytes).ok_or(truncated.clone())?;
            let type_len = header & ((1 << TYPE_LEN_BITS) - 1);
            let time_delta = u64::from(header >> TYPE_LEN_BITS);
            let array_0 = read_u32(self.page, offset_bytes + EVENT_HEADER_BYTES);
            let (event_bytes, payload) = match type_len {
                TYPE_PADDING => {
                    if time_delta == 0 {
                        // A null padding event: nothing more on this page.
                        self.offset_bytes = self.page.len();
                        return Ok(None);
                    }
                    let length_bytes = array_0.ok_or(truncated.clone())?;
                    (EVENT_HEADER_BYTES as u64 + u64::from(length_bytes), None)
                }
                TYPE_TIME_EXTEND => {
                    let high = u64::from(array_0.ok_or(truncated.clone())?);
                    self.clock_ns = self
                        .clock_ns
                        .wrapping_add((high << TIME_DELTA_BITS) | time_delta);
                    (EVENT_BYTES_MIN as u64, None)
                }
                TYPE_TIME_STAMP => {
                    let high = u64::from(array_0.ok_or(truncated.clone())?);
                    let absolute_ns = (high << TIME_DELTA_BITS) | time_delta;
                    self.clock_ns = fix_absolute_timestamp(absolute_ns, self.clock_ns);
                    (EVENT_BYTES_MIN as u64, None)
                }
                0 => {
                    // array[0] holds the data length plus its own 4 bytes.
                    let length_bytes = array_0.ok_or(truncated.clone())?;
                    if (length_bytes as usize) < ARRAY_WORD_BYTES {
                        return Err(PageError::EventLength {
                            offset_bytes,
                            length_bytes,
                        });
                    }
                    let payload_first = offset_bytes + EVENT_BYTES_MIN;
                    let payload_bytes = length_bytes as usize - ARRAY_WORD_BYTES;
                    let event_bytes =
                        EVENT_HEADER_BYTES as u64 + u64::from(length_bytes).next_multiple_of(4);
                    (event_bytes, Some((payload_first, payload_bytes)))
                }
                _ => {
                    debug_assert!((1..=TYPE_LEN_DATA_MAX).contains(&type_len));
                    let payload_first = offset_bytes + EVENT_HEADER_BYTES;
                    let payload_bytes = type_len as usize * ARRAY_WORD_BYTES;
                    let event_bytes = (EVENT_HEADER_BYTES + payload_bytes) as u64;
                    (event_bytes, Some((payload_first, payload_bytes)))
                }
            };
            let remaining_bytes = (self.page.len() - offset_bytes) as u64;
            if event_bytes > remaining_bytes {
                return Err(truncated);
            }
            debug_assert!(event_bytes >= EVENT_HEADER_BYTES as u64);
            self.offset_bytes = offset_bytes + event_bytes as usize;
            if let Some((payload_first, payload_bytes)) = payload {
                self.clock_ns = self.clock_ns.wrapping_add(time_delta);
                let payload = self
                    .page
                    .get(payload_first..payload_first + payload_bytes)
                    .ok_or(truncated)?;
                return Ok(Some(RawEvent {
                    timestamp_ns: self.clock_ns,
                    offset_bytes,
                    payload,
                }));
            }
        }
    }
}

impl<'a> Iterator for PageEvents<'a> {
    type Item = Result<RawEvent<'a>, PageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(Some(event)) => Some(Ok(event)),
            Ok(None) => None,
            Err(error) => {
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

/// `rb_fix_abs_ts`: an absolute time stamp keeps 59 bits; restore the top bits
/// from the clock so far, allowing one wrap.
fn fix_absolute_timestamp(absolute_ns: u64, clock_ns: u64) -> u64 {
    if clock_ns & TS_MSB == 0 {
        return absolute_ns;
    }
    let fixed = absolute_ns | (clock_ns & TS_MSB);
    if fixed < clock_ns {
        fixed.wrapping_add(1 << 59)
    } else {
        fixed
    }
}

// ---------------------------------------------------------------------------
// Block events.

/// The block tracepoints we decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockEventType {
    BioQueue,
    BioComplete,
    RqIssue,
    RqComplete,
}

impl BlockEventType {
    pub const ALL: [BlockEventType; 4] = [
        BlockEventType::BioQueue,
        BlockEventType::BioComplete,
        BlockEventType::RqIssue,
        BlockEventType::RqComplete,
    ];

    /// The tracepoint's name under `events/block/`.
    pub fn name(self) -> &'static str {
        match self {
            BlockEventType::BioQueue => "block_bio_queue",
            BlockEventType::BioComplete => "block_bio_complete",
            BlockEventType::RqIssue => "block_rq_issue",
            BlockEventType::RqComplete => "block_rq_complete",
        }
    }

    pub fn phase(self) -> Phase {
        match self {
            BlockEventType::BioQueue => Phase::Queue,
            BlockEventType::RqIssue => Phase::Issue,
            BlockEventType::BioComplete | BlockEventType::RqComplete => Phase::Complete,
        }
    }

    fn index(self) -> usize {
        match self {
            BlockEventType::BioQueue => 0,
            BlockEventType::BioComplete => 1,
            BlockEventType::RqIssue => 2,
            BlockEventType::RqComplete => 3,
        }
    }

    fn from_name(name: &str) -> Option<BlockEventType> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// The `rwbs` letters of an event, without the trailing NULs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Rwbs {
    bytes: [u8; RWBS_BYTES_MAX],
    length: u8,
}

impl Rwbs {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.length)]
    }

    fn from_field(field: &[u8]) -> Rwbs {
        let length = field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(field.len())
            .min(RWBS_BYTES_MAX);
        let mut bytes = [0; RWBS_BYTES_MAX];
        bytes[..length].copy_from_slice(&field[..length]);
        Rwbs {
            bytes,
            length: length as u8,
        }
    }
}

impl fmt::Debug for Rwbs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Display for Rwbs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// The `comm` of an event (the current task's name, `TASK_COMM_LEN` bytes),
/// without the trailing NULs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; COMM_BYTES_MAX],
    length: u8,
}

impl Comm {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.length)]
    }

    fn from_field(field: &[u8]) -> Comm {
        let length = field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(field.len())
            .min(COMM_BYTES_MAX);
        let mut bytes = [0; COMM_BYTES_MAX];
        bytes[..length].copy_from_slice(&field[..length]);
        Comm {
            bytes,
            length: length as u8,
        }
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// A decoded block tracepoint record, reads and flushes included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEvent {
    pub event_type: BlockEventType,
    pub dev: DevT,
    pub sector_first: u64,
    pub sector_count: u64,
    pub rwbs: Rwbs,
    /// `common_pid`: the task current when the event fired.
    pub pid: u32,
    /// The `comm` field (`block_bio_queue`, `block_rq_issue`): the name of
    /// the task current when the event fired. `None` for events without one
    /// (completions: they run in interrupt context, so neither their pid
    /// nor a name would say who wrote).
    pub comm: Option<Comm>,
    /// The `error` field of completions (negative errno); 0 where absent.
    pub error: i32,
    pub timestamp_ns: u64,
}

impl BlockEvent {
    /// What kind of write this is; `None` for reads and data-less flushes.
    /// An `N` operation without a usable range is a passthrough command
    /// ([`WriteKind::Passthrough`]): sector `(sector_t)-1` at completion,
    /// 0 sectors at issue (see there). Write-zeroes, the other `N`, always
    /// carries its range.
    pub fn write_kind(&self) -> Option<WriteKind> {
        let kind = classify_rwbs(self.rwbs.as_bytes())?;
        if kind == WriteKind::Other && (self.sector_first == u64::MAX || self.sector_count == 0) {
            return Some(WriteKind::Passthrough);
        }
        Some(kind)
    }

    /// Whether this is a passthrough command's event.
    pub fn is_passthrough(&self) -> bool {
        self.write_kind() == Some(WriteKind::Passthrough)
    }

    /// The write this event reports, if it reports one.
    pub fn write_event(&self, cpu: u32) -> Option<WriteEvent> {
        Some(WriteEvent {
            dev: self.dev,
            sector_first: self.sector_first,
            sector_count: self.sector_count,
            kind: self.write_kind()?,
            phase: self.event_type.phase(),
            pid: self.pid,
            timestamp_ns: self.timestamp_ns,
            cpu,
            error: self.error,
        })
    }
}

/// An integer field's place in the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FieldSpan {
    offset_bytes: usize,
    size_bytes: usize,
}

impl FieldSpan {
    fn of(field: &FieldFormat) -> FieldSpan {
        FieldSpan {
            offset_bytes: field.offset_bytes,
            size_bytes: field.size_bytes,
        }
    }

    /// Saturates: a span past `usize::MAX` fails the payload length check.
    fn end_bytes(self) -> usize {
        self.offset_bytes.saturating_add(self.size_bytes)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EventDecoder {
    event_type: BlockEventType,
    id: u16,
    pid: FieldSpan,
    dev: FieldSpan,
    sector: FieldSpan,
    nr_sector: FieldSpan,
    rwbs: FieldSpan,
    comm: Option<FieldSpan>,
    error: Option<FieldSpan>,
    payload_bytes_min: usize,
}

/// Why the format files cannot drive a block-event decoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecoderError {
    #[error(
        "none of block_bio_queue, block_bio_complete, block_rq_issue, block_rq_complete among the formats"
    )]
    NoBlockEvents,
    #[error("format of {event} given twice")]
    DuplicateEvent { event: &'static str },
    #[error("{event} has no `{field}` field")]
    MissingField {
        event: &'static str,
        field: &'static str,
    },
    #[error("{event} field `{field}` is {size_bytes} bytes; expected {expected}")]
    FieldSize {
        event: &'static str,
        field: &'static str,
        size_bytes: usize,
        expected: &'static str,
    },
    #[error("events {first} and {second} share id {id}")]
    DuplicateId {
        first: &'static str,
        second: &'static str,
        id: u16,
    },
}

/// What one page held, after [`BlockDecoder::decode_page`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSummary {
    pub header: PageHeader,
    /// Data events on the page.
    pub events_total: usize,
    /// Data events that were one of the decoded block tracepoints.
    pub events_block: usize,
    /// Write events appended to the output.
    pub events_write: usize,
    /// Passthrough events on the page ([`WriteKind::Passthrough`]; also
    /// appended to the output, as writes).
    pub events_passthrough: usize,
    /// The passthrough event that best names its submitter: the first one
    /// with a `comm` (an issue event), else the first one.
    pub first_passthrough: Option<BlockEvent>,
}

/// Decodes the block tracepoints' payloads using their format files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDecoder {
    decoders: [Option<EventDecoder>; 4],
}

impl BlockDecoder {
    /// Builds a decoder from format files. Formats of other events are
    /// ignored; at least one block tracepoint must be among them.
    pub fn new(formats: &[EventFormat]) -> Result<BlockDecoder, DecoderError> {
        let mut decoders: [Option<EventDecoder>; 4] = [None; 4];
        for format in formats {
            let Some(event_type) = BlockEventType::from_name(&format.name) else {
                continue;
            };
            let slot = &mut decoders[event_type.index()];
            if slot.is_some() {
                return Err(DecoderError::DuplicateEvent {
                    event: event_type.name(),
                });
            }
            *slot = Some(EventDecoder::new(event_type, format)?);
        }
        let known: Vec<&EventDecoder> = decoders.iter().flatten().collect();
        if known.is_empty() {
            return Err(DecoderError::NoBlockEvents);
        }
        for (index, first) in known.iter().enumerate() {
            if let Some(second) = known[index + 1..].iter().find(|d| d.id == first.id) {
                return Err(DecoderError::DuplicateId {
                    first: first.event_type.name(),
                    second: second.event_type.name(),
                    id: first.id,
                });
            }
        }
        Ok(BlockDecoder { decoders })
    }

    /// The id (`common_type`) of a tracepoint, if its format was given.
    pub fn event_id(&self, event_type: BlockEventType) -> Option<u16> {
        self.decoders[event_type.index()].map(|decoder| decoder.id)
    }

    /// Decodes one event; `Ok(None)` if it is not one of the block tracepoints
    /// this decoder knows.
    pub fn decode(&self, event: &RawEvent<'_>) -> Result<Option<BlockEvent>, PageError> {
        let Some(id) = event.common_type() else {
            return Err(PageError::PayloadTooShort {
                offset_bytes: event.offset_bytes,
                id: 0,
                payload_bytes: event.payload.len(),
                needed_bytes: 2,
            });
        };
        let Some(decoder) = self.decoders.iter().flatten().find(|d| d.id == id) else {
            return Ok(None);
        };
        decoder.decode(event).map(Some)
    }

    /// Parses one page and appends the writes it reports to `out`. Reads,
    /// flushes and other event types are counted, not appended.
    ///
    /// Reserve [`PageLayout::events_per_page_max`] in `out` beforehand and this
    /// never allocates. On error `out` is left as it was on entry: the page is
    /// rejected whole, and the caller must treat its events as lost.
    pub fn decode_page(
        &self,
        layout: &PageLayout,
        cpu: u32,
        page: &[u8],
        out: &mut Vec<WriteEvent>,
    ) -> Result<PageSummary, PageError> {
        let out_length_before = out.len();
        let result = self.decode_page_into(layout, cpu, page, out);
        if result.is_err() {
            out.truncate(out_length_before);
        }
        result
    }

    fn decode_page_into(
        &self,
        layout: &PageLayout,
        cpu: u32,
        page: &[u8],
        out: &mut Vec<WriteEvent>,
    ) -> Result<PageSummary, PageError> {
        let (header, events) = parse_page(layout, page)?;
        let mut summary = PageSummary {
            header,
            events_total: 0,
            events_block: 0,
            events_write: 0,
            events_passthrough: 0,
            first_passthrough: None,
        };
        for event in events {
            let event = event?;
            summary.events_total += 1;
            let Some(block) = self.decode(&event)? else {
                continue;
            };
            summary.events_block += 1;
            if let Some(write) = block.write_event(cpu) {
                if write.kind == WriteKind::Passthrough {
                    summary.events_passthrough += 1;
                    let better = match &summary.first_passthrough {
                        None => true,
                        Some(first) => first.comm.is_none() && block.comm.is_some(),
                    };
                    if better {
                        summary.first_passthrough = Some(block);
                    }
                }
                out.push(write);
                summary.events_write += 1;
            }
        }
        debug_assert!(summary.events_total <= layout.events_per_page_max());
        Ok(summary)
    }
}

/// The fields of one event's format, checked for what the decoder reads;
/// errors name the event.
struct Fields<'a> {
    event: &'static str,
    format: &'a EventFormat,
}

impl Fields<'_> {
    fn find(&self, field: &'static str) -> Result<&FieldFormat, DecoderError> {
        self.format.field(field).ok_or(DecoderError::MissingField {
            event: self.event,
            field,
        })
    }

    fn size_error(
        &self,
        field: &'static str,
        found: &FieldFormat,
        expected: &'static str,
    ) -> DecoderError {
        DecoderError::FieldSize {
            event: self.event,
            field,
            size_bytes: found.size_bytes,
            expected,
        }
    }

    /// A plain integer of one of `sizes` bytes.
    fn integer(
        &self,
        field: &'static str,
        sizes: &[usize],
        expected: &'static str,
    ) -> Result<FieldSpan, DecoderError> {
        let found = self.find(field)?;
        if !sizes.contains(&found.size_bytes) || found.is_dynamic || found.array_len.is_some() {
            return Err(self.size_error(field, found, expected));
        }
        Ok(FieldSpan::of(found))
    }

    /// `rwbs`: a char array of 1 to [`RWBS_BYTES_MAX`] bytes.
    fn rwbs(&self) -> Result<FieldSpan, DecoderError> {
        let found = self.find("rwbs")?;
        if found.size_bytes == 0 || found.size_bytes > RWBS_BYTES_MAX {
            return Err(self.size_error("rwbs", found, "1 to 16 (char array)"));
        }
        Ok(FieldSpan::of(found))
    }

    /// `comm`, if the event has it: a fixed char array of 1 to
    /// [`COMM_BYTES_MAX`] bytes.
    fn comm(&self) -> Result<Option<FieldSpan>, DecoderError> {
        match self.format.field("comm") {
            None => Ok(None),
            Some(found)
                if found.size_bytes == 0
                    || found.size_bytes > COMM_BYTES_MAX
                    || found.is_dynamic =>
            {
                Err(self.size_error("comm", found, "1 to 16 (char array)"))
            }
            Some(found) => Ok(Some(FieldSpan::of(found))),
        }
    }
}

impl EventDecoder {
    fn new(event_type: BlockEventType, format: &EventFormat) -> Result<EventDecoder, DecoderError> {
        let fields = Fields {
            event: event_type.name(),
            format,
        };
        let pid = fields.integer("common_pid", &[4], "4")?;
        let dev = fields.integer("dev", &[4], "4 (dev_t)")?;
        let sector = fields.integer("sector", &[8], "8 (sector_t)")?;
        let nr_sector = fields.integer("nr_sector", &[4, 8], "4 or 8")?;
        let error = match format.field("error") {
            Some(_) => Some(fields.integer("error", &[4], "4 (int)")?),
            None => None,
        };
        let rwbs = fields.rwbs()?;
        let comm = fields.comm()?;
        let payload_bytes_min = [
            Some(pid),
            Some(dev),
            Some(sector),
            Some(nr_sector),
            Some(rwbs),
            comm,
            error,
        ]
        .into_iter()
        .flatten()
        .map(FieldSpan::end_bytes)
        .max()
        .unwrap_or(0)
        .max(2); // common_type
        Ok(EventDecoder {
            event_type,
            id: format.id,
            pid,
            dev,
            sector,
            nr_sector,
            rwbs,
            comm,
            error,
            payload_bytes_min,
        })
    }

    fn decode(&self, event: &RawEvent<'_>) -> Result<BlockEvent, PageError> {
        let payload = event.payload;
        let too_short = || PageError::PayloadTooShort {
            offset_bytes: event.offset_bytes,
            id: self.id,
            payload_bytes: payload.len(),
            needed_bytes: self.payload_bytes_min,
        };
        if payload.len() < self.payload_bytes_min {
            return Err(too_short());
        }
        let read = |span: FieldSpan| read_word(payload, span.offset_bytes, span.size_bytes);
        let pid = read(self.pid).ok_or_else(too_short)? as u32;
        let dev = read(self.dev).ok_or_else(too_short)? as u32;
        let sector_first = read(self.sector).ok_or_else(too_short)?;
        let sector_count = read(self.nr_sector).ok_or_else(too_short)?;
        let error = match self.error {
            Some(span) => read(span).ok_or_else(too_short)? as u32 as i32,
            None => 0,
        };
        let rwbs_bytes = payload
            .get(self.rwbs.offset_bytes..self.rwbs.end_bytes())
            .ok_or_else(too_short)?;
        let comm = match self.comm {
            Some(span) => Some(Comm::from_field(
                payload
                    .get(span.offset_bytes..span.end_bytes())
                    .ok_or_else(too_short)?,
            )),
            None => None,
        };
        Ok(BlockEvent {
            event_type: self.event_type,
            dev: DevT(dev),
            sector_first,
            sector_count,
            rwbs: Rwbs::from_field(rwbs_bytes),
            pid,
            comm,
            error,
            timestamp_ns: event.timestamp_ns,
        })
    }
}

// ---------------------------------------------------------------------------
// Byte helpers: host byte order (the pages come from the running kernel), and
// never past the end of the slice.

fn read_array<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    let end = offset.checked_add(N)?;
    bytes.get(offset..end)?.try_into().ok()
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    read_array::<4>(bytes, offset).map(u32::from_ne_bytes)
}

/// An unsigned integer of 1, 2, 4 or 8 bytes, zero-extended.
fn read_word(bytes: &[u8], offset: usize, size_bytes: usize) -> Option<u64> {
    match size_bytes {
        1 => read_array::<1>(bytes, offset).map(|b| u64::from(b[0])),
        2 => read_array::<2>(bytes, offset).map(|b| u64::from(u16::from_ne_bytes(b))),
        4 => read_array::<4>(bytes, offset).map(|b| u64::from(u32::from_ne_bytes(b))),
        8 => read_array::<8>(bytes, offset).map(u64::from_ne_bytes),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
