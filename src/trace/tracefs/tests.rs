//! Tests of the tracefs parsers, on real pages captured from this kernel
//! (tests/fixtures/trace/, see its README) and on pages built by hand.

use super::*;
use proptest::prelude::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/trace");
const DEV_LOOP0: DevT = DevT(7 << 20);

fn fixture_bytes(name: &str) -> Vec<u8> {
    let path = format!("{FIXTURES}/{name}");
    std::fs::read(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture_bytes(name)).expect("fixture text is UTF-8")
}

fn fixture_formats() -> Vec<EventFormat> {
    BlockEventType::ALL
        .iter()
        .map(|kind| parse_event_format(&fixture_text(&format!("{}.format", kind.name()))).unwrap())
        .collect()
}

fn fixture_layout() -> PageLayout {
    let page = parse_header_page(&fixture_text("header_page")).unwrap();
    let event = parse_header_event(&fixture_text("header_event")).unwrap();
    PageLayout::new(&page, &event).unwrap()
}

/// Every page of one capture, with the CPU it came from, in file order.
fn fixture_pages(prefix: &str) -> Vec<(u32, String, Vec<u8>)> {
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with(&format!("{prefix}.cpu")) && name.ends_with(".bin"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no {prefix} pages in {FIXTURES}");
    names
        .into_iter()
        .map(|name| {
            let cpu: u32 = name[prefix.len() + 4..]
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let bytes = fixture_bytes(&name);
            (cpu, name, bytes)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Format files.

#[test]
fn parses_block_bio_queue_format() {
    let format = parse_event_format(&fixture_text("block_bio_queue.format")).unwrap();
    assert_eq!(format.name, "block_bio_queue");
    assert_eq!(format.id, 2097);
    let names: Vec<&str> = format.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "common_type",
            "common_flags",
            "common_preempt_count",
            "common_pid",
            "dev",
            "sector",
            "nr_sector",
            "rwbs",
            "comm"
        ]
    );
    let rwbs = format.field("rwbs").unwrap();
    assert_eq!(
        (
            rwbs.offset_bytes,
            rwbs.size_bytes,
            rwbs.array_len,
            rwbs.signed
        ),
        (28, 10, Some(10), false)
    );
    assert_eq!(rwbs.type_name, "char");
    let pid = format.field("common_pid").unwrap();
    assert_eq!((pid.offset_bytes, pid.size_bytes, pid.signed), (4, 4, true));
    let sector = format.field("sector").unwrap();
    assert_eq!(sector.type_name, "sector_t");
    assert_eq!((sector.offset_bytes, sector.size_bytes), (16, 8));
    let common_type = format.field("common_type").unwrap();
    assert_eq!(common_type.type_name, "unsigned short");
}

#[test]
fn parses_rq_complete_format_with_data_loc() {
    let format = parse_event_format(&fixture_text("block_rq_complete.format")).unwrap();
    assert_eq!(format.id, 2107);
    let cmd = format.field("cmd").unwrap();
    assert!(cmd.is_dynamic);
    assert_eq!(cmd.type_name, "__data_loc char[]");
    assert_eq!((cmd.offset_bytes, cmd.size_bytes), (44, 4));
    let error = format.field("error").unwrap();
    assert_eq!(
        (error.offset_bytes, error.size_bytes, error.signed),
        (28, 4, true)
    );
    let rwbs = format.field("rwbs").unwrap();
    assert_eq!(rwbs.offset_bytes, 34);
}

#[test]
fn format_errors() {
    assert_eq!(
        parse_event_format("ID: 5\nformat:\n\tfield:int a;\toffset:0;\tsize:4;\tsigned:1;\n"),
        Err(FormatError::MissingName)
    );
    assert_eq!(
        parse_event_format("name: x\nformat:\n\tfield:int a;\toffset:0;\tsize:4;\tsigned:1;\n"),
        Err(FormatError::MissingId)
    );
    assert_eq!(
        parse_event_format("name: x\nID: 70000\n"),
        Err(FormatError::BadId("70000".into()))
    );
    assert_eq!(
        parse_event_format("name: x\nID: 7\nformat:\n"),
        Err(FormatError::NoFields)
    );
    assert!(matches!(
        parse_event_format("name: x\nID: 7\n\tfield:int a;\toffset:zero;\tsize:4;\n"),
        Err(FormatError::BadField {
            line_number: 3,
            source: FieldLineError::BadNumber { key: "offset", .. },
            ..
        })
    ));
    assert!(matches!(
        parse_event_format("name: x\nID: 7\n\tfield:int a;\tsize:4;\n"),
        Err(FormatError::BadField {
            source: FieldLineError::MissingKey("offset"),
            ..
        })
    ));
    assert!(matches!(
        parse_event_format("name: x\nID: 7\n\tfield:a;\toffset:0;\tsize:4;\n"),
        Err(FormatError::BadField {
            source: FieldLineError::NoName,
            ..
        })
    ));
    assert!(matches!(
        parse_event_format(&format!(
            "name: x\nID: 7\n\tfield:int a;\toffset:{};\tsize:4;\n",
            usize::MAX
        )),
        Err(FormatError::BadField {
            source: FieldLineError::Overflow { .. },
            ..
        })
    ));
    assert_eq!(
        parse_event_format(
            "name: x\nID: 7\n\tfield:int a;\toffset:0;\tsize:4;\n\tfield:int a;\toffset:4;\tsize:4;\n"
        ),
        Err(FormatError::DuplicateField("a".into()))
    );
}

// ---------------------------------------------------------------------------
// header_page, header_event, layout.

#[test]
fn parses_header_page() {
    let page = parse_header_page(&fixture_text("header_page")).unwrap();
    assert_eq!(
        (page.timestamp.offset_bytes, page.timestamp.size_bytes),
        (0, 8)
    );
    assert_eq!(
        (
            page.commit.offset_bytes,
            page.commit.size_bytes,
            page.commit.signed
        ),
        (8, 8, true)
    );
    assert_eq!(page.commit.type_name, "local_t");
    let overwrite = page.overwrite.unwrap();
    assert_eq!((overwrite.offset_bytes, overwrite.size_bytes), (8, 1));
    assert_eq!((page.data.offset_bytes, page.data.size_bytes), (16, 4080));
}

#[test]
fn parses_header_event() {
    let event = parse_header_event(&fixture_text("header_event")).unwrap();
    assert_eq!(
        event,
        HeaderEvent {
            type_len_bits: 5,
            time_delta_bits: 27,
            array_bits: 32,
            type_padding: 29,
            type_time_extend: 30,
            type_time_stamp: 31,
            type_len_data_max: 28,
        }
    );
}

#[test]
fn layout_from_fixture() {
    let layout = fixture_layout();
    assert_eq!(layout.page_bytes(), 4096);
    assert_eq!(layout.data_offset_bytes(), 16);
    assert_eq!(layout.events_per_page_max(), 510);
}

#[test]
fn layout_rejects_unknown_encodings() {
    let page = parse_header_page(&fixture_text("header_page")).unwrap();
    let mut event = parse_header_event(&fixture_text("header_event")).unwrap();
    event.type_len_data_max = 27;
    assert!(matches!(
        PageLayout::new(&page, &event),
        Err(LayoutError::EventHeader(_))
    ));
    let event = parse_header_event(&fixture_text("header_event")).unwrap();
    let mut bad = page.clone();
    bad.commit.size_bytes = 2;
    assert_eq!(
        PageLayout::new(&bad, &event),
        Err(LayoutError::CommitSize(2))
    );
    let mut bad = page.clone();
    bad.data.offset_bytes = 8;
    assert!(matches!(
        PageLayout::new(&bad, &event),
        Err(LayoutError::Overlap { .. })
    ));
    let mut bad = page.clone();
    bad.data.size_bytes = 0;
    assert_eq!(PageLayout::new(&bad, &event), Err(LayoutError::DataSize(0)));
    assert_eq!(
        parse_header_event("type_len : 5 bits\n"),
        Err(HeaderEventError::Missing("time_delta"))
    );
    assert_eq!(
        parse_header_page("\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"),
        Err(HeaderPageError::MissingField("commit"))
    );
}

// ---------------------------------------------------------------------------
// Real pages.

/// One line of the instance's human-readable `trace` file, captured before the
/// raw pages were read: the kernel's own decoding of the same events.
#[derive(Debug, PartialEq, Eq)]
struct TextEvent {
    pid: u32,
    cpu: u32,
    timestamp_us: u64,
    event_type: BlockEventType,
    dev: DevT,
    rwbs: String,
    sector_first: u64,
    sector_count: u64,
}

fn parse_trace_text(text: &str) -> Vec<TextEvent> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            // "  dd-3652  [000] .....  475.389758: block_bio_queue: 7,0 WS 80 + 8 [dd]"
            let (task, rest) = line.split_once('[').unwrap();
            let pid = task.trim().rsplit_once('-').unwrap().1.parse().unwrap();
            let (cpu, rest) = rest.split_once(']').unwrap();
            let mut words = rest.split_whitespace();
            let _flags = words.next().unwrap();
            let timestamp = words.next().unwrap().trim_end_matches(':');
            let (seconds, micros) = timestamp.split_once('.').unwrap();
            let timestamp_us =
                seconds.parse::<u64>().unwrap() * 1_000_000 + micros.parse::<u64>().unwrap();
            let name = words.next().unwrap().trim_end_matches(':');
            let event_type = BlockEventType::from_name(name).unwrap();
            let (major, minor) = words.next().unwrap().split_once(',').unwrap();
            let dev =
                DevT::from_major_minor(major.parse().unwrap(), minor.parse().unwrap()).unwrap();
            let rwbs = words.next().unwrap().to_string();
            let mut sector_word = words.next().unwrap();
            if sector_word.starts_with('(') {
                sector_word = words.next().unwrap(); // rq events print "(cmd)" first
            }
            assert_eq!(words.next(), Some("+"));
            TextEvent {
                pid,
                cpu: cpu.trim().parse().unwrap(),
                timestamp_us,
                event_type,
                dev,
                rwbs,
                sector_first: sector_word.parse().unwrap(),
                sector_count: words.next().unwrap().parse().unwrap(),
            }
        })
        .collect()
}

/// Decodes every block event of a capture, sorted by time.
fn decode_capture(prefix: &str) -> Vec<(u32, BlockEvent)> {
    let layout = fixture_layout();
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let mut events = Vec::new();
    for (cpu, name, page) in fixture_pages(prefix) {
        let (header, raw_events) = parse_page(&layout, &page).unwrap();
        assert_eq!(header.missed, MissedEvents::None, "{name}");
        for raw in raw_events {
            let raw = raw.unwrap_or_else(|error| panic!("{name}: {error}"));
            let block = decoder
                .decode(&raw)
                .unwrap()
                .expect("only block events are enabled");
            events.push((cpu, block));
        }
    }
    events.sort_by_key(|(_, event)| event.timestamp_ns);
    events
}

#[cfg(target_endian = "little")]
#[test]
fn loop_pages_match_the_kernels_text_rendering() {
    let decoded = decode_capture("loop-ops");
    let text = parse_trace_text(&fixture_text("loop-ops.trace.txt"));
    assert_eq!(decoded.len(), 20);
    assert_eq!(decoded.len(), text.len());
    for ((cpu, event), expected) in decoded.iter().zip(&text) {
        let got = TextEvent {
            pid: event.pid,
            cpu: *cpu,
            // The text rounds to the nearest microsecond (ns2usecs adds 500).
            timestamp_us: (event.timestamp_ns + 500) / 1000,
            event_type: event.event_type,
            dev: event.dev,
            rwbs: String::from_utf8(event.rwbs.as_bytes().to_vec()).unwrap(),
            sector_first: event.sector_first,
            sector_count: event.sector_count,
        };
        assert_eq!(&got, expected);
        assert_eq!(event.error, 0);
    }
}

#[cfg(target_endian = "little")]
#[test]
fn loop_pages_report_exactly_the_writes_made() {
    // See tests/fixtures/trace/README.md for the operations behind these.
    let layout = fixture_layout();
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let mut writes = Vec::with_capacity(2 * layout.events_per_page_max());
    let mut events_total = 0;
    for (cpu, _, page) in fixture_pages("loop-ops") {
        let summary = decoder
            .decode_page(&layout, cpu, &page, &mut writes)
            .unwrap();
        assert_eq!(summary.header.missed, MissedEvents::None);
        assert_eq!(summary.events_total, summary.events_block);
        events_total += summary.events_total;
    }
    assert_eq!(events_total, 20);
    writes.sort_by_key(|write| write.timestamp_ns);
    assert!(
        writes
            .iter()
            .all(|write| write.dev == DEV_LOOP0 && write.error == 0)
    );
    let got: Vec<(Phase, WriteKind, u64, u64)> = writes
        .iter()
        .map(|w| (w.phase, w.kind, w.sector_first, w.sector_count))
        .collect();
    use Phase::{Complete, Queue};
    use WriteKind::{Discard, Other, Write};
    assert_eq!(
        got,
        [
            // 1. 4 KiB write at sector 80
            (Queue, Write, 80, 8),
            (Complete, Write, 80, 8),
            // 2. 64 KiB write at sector 2048
            (Queue, Write, 2048, 128),
            (Complete, Write, 2048, 128),
            // 3. the 4 KiB read at sector 800 is absent
            // 4. discard of 1 MiB at sector 8192 ("DS")
            (Queue, Discard, 8192, 2048),
            (Complete, Discard, 8192, 2048),
            // 5. write-zeroes of 512 KiB at sector 16384 ("NS" on 6.18)
            (Queue, Other, 16384, 1024),
            (Complete, Other, 16384, 1024),
            // 6. O_DSYNC write: queued "WFS" (FUA), completed as data, then the
            //    emulated FUA's post-flush ("FF", not a write) and the final
            //    zero-length completion of the original request.
            (Queue, Write, 24576, 8),
            (Complete, Write, 24576, 8),
            (Complete, Write, 24576, 0),
            // The O_DSYNC sync that follows the direct write even though it used
            // FUA: an empty preflush write ("FWS" 0 + 0).
            (Queue, Write, 0, 0),
            (Complete, Write, 0, 0),
            // 7. python's fsync: the same.
            (Queue, Write, 0, 0),
            (Complete, Write, 0, 0),
        ]
    );
    // Queue events carry the submitter's pid, and were pinned to CPU 0.
    let queue_cpus: Vec<u32> = writes
        .iter()
        .filter(|w| w.phase == Queue)
        .map(|w| w.cpu)
        .collect();
    assert!(queue_cpus.iter().all(|&cpu| cpu == 0));
}

#[cfg(target_endian = "little")]
#[test]
fn overrun_page_reports_missed_events() {
    let layout = fixture_layout();
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let pages = fixture_pages("overrun");
    let page1 = &pages
        .iter()
        .find(|(_, name, _)| name == "overrun.cpu1.page1.bin")
        .unwrap()
        .2;
    // The commit word is sign-extended: the kernel adds RB_MISSED_EVENTS as the C
    // int 1 << 31.
    assert_eq!(
        u64::from_ne_bytes(page1[8..16].try_into().unwrap()),
        0xffff_ffff_c000_0fdc
    );
    let mut writes = Vec::new();
    let summary = decoder.decode_page(&layout, 1, page1, &mut writes).unwrap();
    // overrun.cpu1.stats.txt says "overrun: 3850".
    assert_eq!(summary.header.missed, MissedEvents::Count(3850));
    assert!(summary.header.missed.any());
    assert_eq!(summary.header.data_bytes, 0xfdc);
    assert_eq!(summary.events_total, summary.events_block);
    assert!(summary.events_write > 0);
    // The unthrottled writer wrote 4 KiB blocks from sector 0 up.
    for write in &writes {
        assert_eq!(write.kind, WriteKind::Write);
        assert_eq!(write.sector_count, 8);
        assert_eq!(write.sector_first % 8, 0);
        assert!(write.sector_first < 2000 * 8);
    }
    // Timestamps never go backwards within a page.
    assert!(
        writes
            .windows(2)
            .all(|w| w[0].timestamp_ns <= w[1].timestamp_ns)
    );

    let page0 = &pages
        .iter()
        .find(|(_, name, _)| name == "overrun.cpu1.page0.bin")
        .unwrap()
        .2;
    // The page read first holds the oldest events (the reader page is never
    // overwritten); the loss shows on the page after the gap. Its header
    // timestamp is stale (from the earlier capture on this CPU), so its first
    // event follows a time-extend event, and it ends in a padding event.
    writes.clear();
    let summary = decoder.decode_page(&layout, 1, page0, &mut writes).unwrap();
    assert_eq!(summary.header.missed, MissedEvents::None);
    assert_eq!(summary.events_total, 67);
    assert_eq!(
        (
            writes[0].phase,
            writes[0].sector_first,
            writes[0].sector_count
        ),
        (Phase::Queue, 0, 8)
    );
    assert!(writes[0].timestamp_ns > summary.header.timestamp_ns + (1 << 27));
    let (_, events) = parse_page(&layout, page0).unwrap();
    let last = events.last().unwrap().unwrap();
    // 4-byte header + 56-byte payload, then 16 bytes of padding (header + array[0] = 12).
    assert_eq!(last.offset_bytes + 4 + last.payload.len() + 16, 16 + 0xf48);
}

// ---------------------------------------------------------------------------
// Hand-built pages.

/// Builds a page with the fixture's layout (8-byte timestamp, 8-byte commit,
/// data at 16).
struct PageBuilder {
    timestamp_ns: u64,
    data: Vec<u8>,
}

impl PageBuilder {
    fn new(timestamp_ns: u64) -> Self {
        PageBuilder {
            timestamp_ns,
            data: Vec::new(),
        }
    }

    fn header(&mut self, type_len: u32, time_delta: u32) {
        assert!(type_len < 32 && time_delta < (1 << 27));
        self.data
            .extend_from_slice(&(type_len | (time_delta << 5)).to_ne_bytes());
    }

    fn word(&mut self, word: u32) {
        self.data.extend_from_slice(&word.to_ne_bytes());
    }

    fn small_event(&mut self, time_delta: u32, payload: &[u8]) {
        assert!(payload.len().is_multiple_of(4) && !payload.is_empty() && payload.len() <= 112);
        self.header((payload.len() / 4) as u32, time_delta);
        self.data.extend_from_slice(payload);
    }

    fn large_event(&mut self, time_delta: u32, payload: &[u8]) {
        self.header(0, time_delta);
        self.word(payload.len() as u32 + 4);
        self.data.extend_from_slice(payload);
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn build_with_commit(&self, commit: u64) -> Vec<u8> {
        let mut page = Vec::with_capacity(4096);
        page.extend_from_slice(&self.timestamp_ns.to_ne_bytes());
        page.extend_from_slice(&commit.to_ne_bytes());
        page.extend_from_slice(&self.data);
        page.resize(4096, 0);
        page
    }

    fn build(&self) -> Vec<u8> {
        self.build_with_commit(self.data.len() as u64)
    }
}

/// A block_bio_queue payload per the fixture format (id 2097).
fn bio_queue_payload(pid: u32, dev: u32, sector: u64, nr_sector: u32, rwbs: &str) -> Vec<u8> {
    let mut payload = vec![0u8; 56]; // 54 bytes of fields, padded to 4
    payload[0..2].copy_from_slice(&2097u16.to_ne_bytes());
    payload[4..8].copy_from_slice(&pid.to_ne_bytes());
    payload[8..12].copy_from_slice(&dev.to_ne_bytes());
    payload[16..24].copy_from_slice(&sector.to_ne_bytes());
    payload[24..28].copy_from_slice(&nr_sector.to_ne_bytes());
    payload[28..28 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
    payload[38..40].copy_from_slice(b"dd");
    payload
}

fn decode_built(page: &[u8]) -> Result<(PageSummary, Vec<WriteEvent>), PageError> {
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let mut writes = Vec::new();
    decoder
        .decode_page(&fixture_layout(), 3, page, &mut writes)
        .map(|summary| (summary, writes))
}

#[test]
fn built_page_with_every_event_type() {
    let mut builder = PageBuilder::new(1_000_000);
    builder.small_event(10, &bio_queue_payload(1, DEV_LOOP0.0, 80, 8, "WS"));
    // A discarded event turned into padding: array[0] holds the bytes after
    // the header, itself included.
    builder.header(TYPE_PADDING, 1);
    builder.word(12);
    builder.data.extend_from_slice(&[0xee; 8]);
    // A time extend of (1 << 27) + 5 ns.
    builder.header(TYPE_TIME_EXTEND, 5);
    builder.word(1);
    builder.large_event(20, &bio_queue_payload(2, DEV_LOOP0.0, 160, 16, "DS"));
    // An event of some other type: counted, skipped.
    let mut other = vec![0u8; 8];
    other[0..2].copy_from_slice(&999u16.to_ne_bytes());
    builder.small_event(1, &other);
    // An absolute time stamp, then a read.
    builder.header(TYPE_TIME_STAMP, 7);
    builder.word(3);
    builder.small_event(2, &bio_queue_payload(3, DEV_LOOP0.0, 800, 8, "RS"));
    builder.small_event(0, &bio_queue_payload(4, DEV_LOOP0.0, 1000, 8, "NS"));
    // Null padding: the rest of the page is empty, whatever follows.
    builder.header(TYPE_PADDING, 0);
    builder.word(0xffff_ffff);
    let (summary, writes) = decode_built(&builder.build()).unwrap();
    assert_eq!(summary.events_total, 5);
    assert_eq!(summary.events_block, 4);
    assert_eq!(summary.events_write, 3);
    assert_eq!(summary.header.timestamp_ns, 1_000_000);
    let got: Vec<(u64, u64, WriteKind, u64, u32)> = writes
        .iter()
        .map(|w| {
            (
                w.sector_first,
                w.sector_count,
                w.kind,
                w.timestamp_ns,
                w.pid,
            )
        })
        .collect();
    let after_extend = 1_000_000 + 10 + (1 << 27) + 5 + 20;
    let absolute = (3 << 27) | 7;
    assert_eq!(
        got,
        [
            (80, 8, WriteKind::Write, 1_000_010, 1),
            (160, 16, WriteKind::Discard, after_extend, 2),
            (1000, 8, WriteKind::Other, absolute + 2, 4),
        ]
    );
    assert!(writes.iter().all(|w| w.cpu == 3 && w.phase == Phase::Queue));
}

#[test]
fn missed_events_flags() {
    let mut builder = PageBuilder::new(5);
    builder.small_event(1, &bio_queue_payload(1, DEV_LOOP0.0, 80, 8, "WS"));
    let length = builder.data.len() as u64;
    // Missed, count not stored.
    let page = builder.build_with_commit(length | COMMIT_MISSED_EVENTS);
    let (summary, writes) = decode_built(&page).unwrap();
    assert_eq!(summary.header.missed, MissedEvents::Unknown);
    assert_eq!(writes.len(), 1);
    // Missed and stored, sign-extended as the kernel leaves it.
    let commit = (length | COMMIT_MISSED_EVENTS | COMMIT_MISSED_STORED) | 0xffff_ffff_0000_0000;
    let mut page = builder.build_with_commit(commit);
    let count_at = 16 + length as usize;
    page[count_at..count_at + 8].copy_from_slice(&1234u64.to_ne_bytes());
    let (summary, _) = decode_built(&page).unwrap();
    assert_eq!(summary.header.missed, MissedEvents::Count(1234));
    // Stored count cut off by the end of the buffer handed in.
    assert_eq!(
        decode_built(&page[..count_at + 4]).unwrap_err(),
        PageError::MissedCountTruncated
    );
}

#[test]
fn empty_and_short_pages() {
    let (summary, writes) = decode_built(&PageBuilder::new(9).build()).unwrap();
    assert_eq!(summary.events_total, 0);
    assert!(writes.is_empty());
    assert_eq!(
        decode_built(&[0; 15]).unwrap_err(),
        PageError::TooShort {
            page_bytes: 15,
            header_bytes: 16
        }
    );
    // A partially filled page may be handed in without its zero tail.
    let mut builder = PageBuilder::new(1);
    builder.small_event(1, &bio_queue_payload(1, DEV_LOOP0.0, 80, 8, "WS"));
    let page = builder.build();
    let used = 16 + builder.data.len();
    let (summary, _) = decode_built(&page[..used]).unwrap();
    assert_eq!(summary.events_write, 1);
}

#[test]
fn malformed_pages_are_errors() {
    let mut builder = PageBuilder::new(1);
    builder.small_event(1, &bio_queue_payload(1, DEV_LOOP0.0, 80, 8, "WS"));
    let length = builder.data.len() as u64;

    // Commit beyond the data area.
    assert!(matches!(
        decode_built(&builder.build_with_commit(4081)).unwrap_err(),
        PageError::CommitTooLarge {
            data_bytes: 4081,
            ..
        }
    ));
    // Commit cutting an event in half.
    assert_eq!(
        decode_built(&builder.build_with_commit(length - 4)).unwrap_err(),
        PageError::EventTruncated { offset_bytes: 16 }
    );
    // A length word that is smaller than itself.
    let mut bad = PageBuilder::new(1);
    bad.header(0, 1);
    bad.word(3);
    assert_eq!(
        decode_built(&bad.build()).unwrap_err(),
        PageError::EventLength {
            offset_bytes: 16,
            length_bytes: 3
        }
    );
    // A large event claiming more than the page holds.
    let mut bad = PageBuilder::new(1);
    bad.header(0, 1);
    bad.word(5000);
    assert_eq!(
        decode_built(&bad.build()).unwrap_err(),
        PageError::EventTruncated { offset_bytes: 16 }
    );
    // A block event whose payload is too short for its format.
    let mut bad = PageBuilder::new(1);
    bad.small_event(1, &bio_queue_payload(1, DEV_LOOP0.0, 80, 8, "WS")[..32]);
    assert!(matches!(
        decode_built(&bad.build()).unwrap_err(),
        PageError::PayloadTooShort {
            id: 2097,
            payload_bytes: 32,
            ..
        }
    ));
}

#[test]
fn decode_page_restores_output_on_error() {
    let mut builder = PageBuilder::new(1);
    builder.small_event(1, &bio_queue_payload(1, DEV_LOOP0.0, 80, 8, "WS"));
    builder.header(0, 1);
    builder.word(2); // malformed second event
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let mut writes = vec![WriteEvent {
        dev: DEV_LOOP0,
        sector_first: 1,
        sector_count: 1,
        kind: WriteKind::Write,
        phase: Phase::Queue,
        pid: 0,
        timestamp_ns: 0,
        cpu: 0,
        error: 0,
    }];
    let before = writes.clone();
    assert!(
        decoder
            .decode_page(&fixture_layout(), 0, &builder.build(), &mut writes)
            .is_err()
    );
    assert_eq!(writes, before);
}

#[test]
fn decoder_needs_block_formats_with_expected_fields() {
    assert_eq!(BlockDecoder::new(&[]), Err(DecoderError::NoBlockEvents));
    let formats = fixture_formats();
    let decoder = BlockDecoder::new(&formats).unwrap();
    assert_eq!(decoder.event_id(BlockEventType::BioQueue), Some(2097));
    assert_eq!(decoder.event_id(BlockEventType::BioComplete), Some(2100));
    assert_eq!(decoder.event_id(BlockEventType::RqIssue), Some(2104));
    assert_eq!(decoder.event_id(BlockEventType::RqComplete), Some(2107));

    let only_queue = BlockDecoder::new(&formats[..1]).unwrap();
    assert_eq!(only_queue.event_id(BlockEventType::RqComplete), None);

    let mut missing = formats[0].clone();
    missing.fields.retain(|field| field.name != "sector");
    assert_eq!(
        BlockDecoder::new(&[missing]),
        Err(DecoderError::MissingField {
            event: "block_bio_queue",
            field: "sector"
        })
    );
    let mut wrong = formats[0].clone();
    wrong
        .fields
        .iter_mut()
        .find(|field| field.name == "dev")
        .unwrap()
        .size_bytes = 8;
    assert!(matches!(
        BlockDecoder::new(&[wrong]),
        Err(DecoderError::FieldSize { field: "dev", .. })
    ));
    assert_eq!(
        BlockDecoder::new(&[formats[0].clone(), formats[0].clone()]),
        Err(DecoderError::DuplicateEvent {
            event: "block_bio_queue"
        })
    );
    let mut same_id = formats[1].clone();
    same_id.id = formats[0].id;
    assert!(matches!(
        BlockDecoder::new(&[formats[0].clone(), same_id]),
        Err(DecoderError::DuplicateId { id: 2097, .. })
    ));
}

#[test]
fn absolute_timestamp_keeps_top_bits() {
    assert_eq!(fix_absolute_timestamp(5, 3), 5);
    let top = 1u64 << 60;
    assert_eq!(fix_absolute_timestamp(5, top | 3), top | 5);
    // The low 59 bits wrapped past the clock: carry into the top bits.
    assert_eq!(fix_absolute_timestamp(2, top | 3), (top | 2) + (1 << 59));
}

// ---------------------------------------------------------------------------
// Fuzzing: no input may panic, and a page never yields more events than fit.

fn check_page_never_panics(page: &[u8]) {
    let layout = fixture_layout();
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let mut writes = Vec::new();
    if let Ok(summary) = decoder.decode_page(&layout, 0, page, &mut writes) {
        assert!(summary.events_total <= layout.events_per_page_max());
        assert_eq!(writes.len(), summary.events_write);
    }
    if let Ok((_, events)) = parse_page(&layout, page) {
        assert!(events.count() <= layout.events_per_page_max() + 1);
    }
}

proptest! {
    #[test]
    fn random_pages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4200)) {
        check_page_never_panics(&bytes);
    }

    #[test]
    fn random_event_data_never_panics(
        commit in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut page = Vec::new();
        page.extend_from_slice(&1u64.to_ne_bytes());
        page.extend_from_slice(&((commit % 700) | (commit & 0xffff_ffff_c000_0000)).to_ne_bytes());
        page.extend_from_slice(&data);
        check_page_never_panics(&page);
    }

    #[test]
    fn mutated_real_pages_never_panic(
        flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..16),
        cut in 0usize..4200,
    ) {
        let mut page = fixture_bytes("loop-ops.cpu0.page0.bin");
        for (at, value) in flips {
            page[at] = value;
        }
        page.truncate(cut);
        check_page_never_panics(&page);
    }

    #[test]
    fn random_format_text_never_panics(text in "(name: [a-z_]{0,8}\n|ID: [0-9]{0,6}\n|\tfield:[a-z \\[\\]0-9_]{0,20};\toffset:[0-9]{0,4};\tsize:[0-9]{0,3};\tsigned:[01];\n|print fmt: x\n|[^\n]{0,20}\n){0,12}") {
        let _ = parse_event_format(&text);
        let _ = parse_header_page(&text);
        let _ = parse_header_event(&text);
    }
}

// ---------------------------------------------------------------------------
// Passthrough commands.

/// A block_rq_issue payload per the fixture format (id 2104): fields up to
/// `comm` at 44..60, the `cmd` locator at 60 pointing at an empty string
/// right after the fields (the kernel writes `cmd` as "").
fn rq_issue_payload(
    pid: u32,
    sector: u64,
    nr_sector: u32,
    bytes: u32,
    rwbs: &str,
    comm: &str,
) -> Vec<u8> {
    let mut payload = vec![0u8; 68]; // 64 bytes of fields, 1 of cmd, padded to 4
    payload[0..2].copy_from_slice(&2104u16.to_ne_bytes());
    payload[4..8].copy_from_slice(&pid.to_ne_bytes());
    payload[8..12].copy_from_slice(&DEV_LOOP0.0.to_ne_bytes());
    payload[16..24].copy_from_slice(&sector.to_ne_bytes());
    payload[24..28].copy_from_slice(&nr_sector.to_ne_bytes());
    payload[28..32].copy_from_slice(&bytes.to_ne_bytes());
    payload[34..34 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
    payload[44..44 + comm.len()].copy_from_slice(comm.as_bytes());
    payload[60..64].copy_from_slice(&((1u32 << 16) | 64).to_ne_bytes());
    payload
}

/// A block_rq_complete payload per the fixture format (id 2107).
fn rq_complete_payload(pid: u32, sector: u64, nr_sector: u32, error: i32, rwbs: &str) -> Vec<u8> {
    let mut payload = vec![0u8; 52]; // 48 bytes of fields, 1 of cmd, padded to 4
    payload[0..2].copy_from_slice(&2107u16.to_ne_bytes());
    payload[4..8].copy_from_slice(&pid.to_ne_bytes());
    payload[8..12].copy_from_slice(&DEV_LOOP0.0.to_ne_bytes());
    payload[16..24].copy_from_slice(&sector.to_ne_bytes());
    payload[24..28].copy_from_slice(&nr_sector.to_ne_bytes());
    payload[28..32].copy_from_slice(&error.to_ne_bytes());
    payload[34..34 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
    payload[44..48].copy_from_slice(&((1u32 << 16) | 48).to_ne_bytes());
    payload
}

/// What an SG_IO write looks like on 6.18 (include/trace/events/block.h):
/// `block_rq_issue` with `blk_rq_trace_sector` = 0 and
/// `blk_rq_trace_nr_sectors` = 0 for a passthrough request, the submitter's
/// comm, `bytes` = the transfer; `block_rq_complete` with `blk_rq_pos` =
/// `(sector_t)-1` and `nr_bytes >> 9`, from interrupt context (pid 0).
#[test]
fn passthrough_events_are_recognised_and_name_their_submitter() {
    let mut builder = PageBuilder::new(2_000_000);
    // The completion first: the issue (on another CPU's page, say) names
    // the submitter, and a page's best-named one is kept either way.
    builder.small_event(1, &rq_complete_payload(0, u64::MAX, 8, 0, "N"));
    builder.small_event(1, &rq_issue_payload(4242, 0, 0, 4096, "N", "smartd"));
    // Write-zeroes is N with a range: an exact write.
    builder.small_event(1, &rq_complete_payload(0, 1000, 8, 0, "NS"));
    // The flush at (sector_t)-1 is not a write at all.
    builder.small_event(1, &rq_complete_payload(0, u64::MAX, 0, 0, "FF"));
    let page = builder.build();
    // Byte-exact: the issue record's comm and cmd locator where the format
    // file puts them.
    let issue_at = 16 + (4 + 52) + 4;
    assert_eq!(&page[issue_at + 44..issue_at + 50], b"smartd");
    assert_eq!(
        &page[issue_at + 16..issue_at + 24],
        &0u64.to_ne_bytes(),
        "sector"
    );
    let complete_at = 16 + 4;
    assert_eq!(
        &page[complete_at + 16..complete_at + 24],
        &u64::MAX.to_ne_bytes()
    );

    let (summary, writes) = decode_built(&page).unwrap();
    assert_eq!(summary.events_block, 4);
    assert_eq!(summary.events_write, 3);
    assert_eq!(summary.events_passthrough, 2);
    let kinds: Vec<(WriteKind, Phase, u64, u64)> = writes
        .iter()
        .map(|w| (w.kind, w.phase, w.sector_first, w.sector_count))
        .collect();
    assert_eq!(
        kinds,
        [
            (WriteKind::Passthrough, Phase::Complete, u64::MAX, 8),
            (WriteKind::Passthrough, Phase::Issue, 0, 0),
            (WriteKind::Other, Phase::Complete, 1000, 8),
        ]
    );
    let first = summary.first_passthrough.unwrap();
    assert_eq!(first.event_type, BlockEventType::RqIssue);
    assert_eq!(first.pid, 4242);
    assert_eq!(first.comm.unwrap().to_string(), "smartd");
    assert_eq!(first.rwbs.to_string(), "N");
    assert!(first.is_passthrough());

    // And the live sources' clip calls them unplaceable, not the whole disk.
    use crate::trace::live::{Clipped, TraceTarget};
    let target = TraceTarget {
        disk: DEV_LOOP0,
        sector_first: 0,
        sector_count: 131_072,
    };
    let clipped: Vec<Clipped> = writes.iter().map(|w| target.clip(w)).collect();
    assert_eq!(clipped[0], Clipped::Unplaceable);
    assert_eq!(clipped[1], Clipped::Unplaceable);
    assert_eq!(clipped[2].write().map(|w| w.sector_first), Some(1000));
}

#[test]
fn completion_events_have_no_comm_and_queue_events_do() {
    let mut builder = PageBuilder::new(1);
    builder.small_event(1, &bio_queue_payload(9, DEV_LOOP0.0, 80, 8, "WS"));
    builder.small_event(1, &rq_complete_payload(0, 80, 8, 0, "WS"));
    let decoder = BlockDecoder::new(&fixture_formats()).unwrap();
    let page = builder.build();
    let (_, events) = parse_page(&fixture_layout(), &page).unwrap();
    let blocks: Vec<BlockEvent> = events
        .map(|event| decoder.decode(&event.unwrap()).unwrap().unwrap())
        .collect();
    assert_eq!(blocks[0].comm.unwrap().to_string(), "dd");
    assert_eq!(blocks[1].comm, None);
    assert!(!blocks[0].is_passthrough() && !blocks[1].is_passthrough());
}
