//! Trace parsing throughput, in events per second.
//!
//! - `tracefs/decode_page`: a real full ring-buffer page captured on this
//!   kernel (tests/fixtures/trace/overrun.cpu1.page1.bin, 70 block events),
//!   decoded into write events through the format tables.
//! - `blktrace/parse_write_events`: a buffer of version 7 `blk_io_trace`
//!   records (queue and completion of writes, some reads, some with a pdu),
//!   parsed into write events.
//!
//! Run with `cargo bench --bench trace_parse`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hot_clone::trace::tracefs::{
    BlockDecoder, PageLayout, parse_event_format, parse_header_event, parse_header_page,
};
use hot_clone::trace::{blktrace, classify_rwbs};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/trace");

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{FIXTURES}/{name}");
    std::fs::read(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).expect("fixture text is UTF-8")
}

fn bench_tracefs(c: &mut Criterion) {
    let layout = PageLayout::new(
        &parse_header_page(&fixture_text("header_page")).unwrap(),
        &parse_header_event(&fixture_text("header_event")).unwrap(),
    )
    .unwrap();
    let formats: Vec<_> = [
        "block_bio_queue",
        "block_bio_complete",
        "block_rq_issue",
        "block_rq_complete",
    ]
    .iter()
    .map(|name| parse_event_format(&fixture_text(&format!("{name}.format"))).unwrap())
    .collect();
    let decoder = BlockDecoder::new(&formats).unwrap();
    let page = fixture("overrun.cpu1.page1.bin");

    let mut writes = Vec::with_capacity(layout.events_per_page_max());
    let events_per_page = decoder
        .decode_page(&layout, 1, &page, &mut writes)
        .unwrap()
        .events_total;

    let mut group = c.benchmark_group("tracefs");
    group.throughput(Throughput::Elements(events_per_page as u64));
    group.bench_function("decode_page", |b| {
        b.iter(|| {
            writes.clear();
            let summary = decoder
                .decode_page(&layout, 1, black_box(&page), &mut writes)
                .unwrap();
            black_box(summary.events_write)
        })
    });
    group.finish();
}

fn blk_record(sector: u64, bytes: u32, action: u32, pdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blktrace::HEADER_BYTES_V1 + pdu.len());
    out.extend_from_slice(&(blktrace::MAGIC | u32::from(blktrace::VERSION_1)).to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&123_456_789u64.to_ne_bytes()); // time
    out.extend_from_slice(&sector.to_ne_bytes());
    out.extend_from_slice(&bytes.to_ne_bytes());
    out.extend_from_slice(&action.to_ne_bytes());
    out.extend_from_slice(&4242u32.to_ne_bytes()); // pid
    out.extend_from_slice(&(7u32 << 20).to_ne_bytes()); // device
    out.extend_from_slice(&0u32.to_ne_bytes()); // cpu
    out.extend_from_slice(&0u16.to_ne_bytes()); // error
    out.extend_from_slice(&(pdu.len() as u16).to_ne_bytes());
    out.extend_from_slice(pdu);
    out
}

fn bench_blktrace(c: &mut Criterion) {
    use blktrace::{CATEGORY_SHIFT, action, category};
    let act =
        |code: u16, categories: u64| (u64::from(code) | (categories << CATEGORY_SHIFT)) as u32;
    const RECORD_COUNT: usize = 10_000;
    let mut buf = Vec::new();
    for index in 0..RECORD_COUNT as u64 {
        let record = match index % 4 {
            0 => blk_record(
                index * 8,
                4096,
                act(action::QUEUE, category::WRITE | category::QUEUE),
                &[],
            ),
            1 => blk_record(
                index * 8,
                4096,
                act(action::COMPLETE, category::WRITE | category::COMPLETE),
                &[],
            ),
            2 => blk_record(
                index * 8,
                4096,
                act(action::QUEUE, category::READ | category::QUEUE),
                &[],
            ),
            _ => blk_record(
                index * 8,
                4096,
                act(action::ISSUE, category::WRITE | category::ISSUE),
                &[0; 16],
            ),
        };
        buf.extend(record);
    }
    let mut writes = Vec::with_capacity(RECORD_COUNT);

    let mut group = c.benchmark_group("blktrace");
    group.throughput(Throughput::Elements(RECORD_COUNT as u64));
    group.bench_function("parse_write_events", |b| {
        b.iter(|| {
            writes.clear();
            let progress =
                blktrace::parse_write_events(black_box(&buf), &mut writes, RECORD_COUNT).unwrap();
            assert_eq!(progress.records_parsed, RECORD_COUNT);
            black_box(progress.events_write)
        })
    });
    group.finish();
}

fn bench_classify(c: &mut Criterion) {
    let samples: [&[u8]; 8] = [b"WS", b"RS", b"FWS", b"WFS", b"DS", b"NS", b"FF", b"RA"];
    let mut group = c.benchmark_group("rwbs");
    group.throughput(Throughput::Elements(samples.len() as u64));
    group.bench_function("classify_rwbs", |b| {
        b.iter(|| {
            let mut writes = 0usize;
            for rwbs in black_box(&samples) {
                writes += usize::from(classify_rwbs(rwbs).is_some());
            }
            writes
        })
    });
    group.finish();
}

criterion_group!(benches, bench_tracefs, bench_blktrace, bench_classify);
criterion_main!(benches);
