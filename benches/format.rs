//! Format hot paths: writing and reading sections (header parsing, CRC),
//! for large main-pass sections and for many small catch-up sections.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hot_clone::format::{Banner, ImageReader, ImageWriter};
use std::hint::black_box;

fn image(section_bytes: usize, sections: usize) -> Vec<u8> {
    let data = vec![0x5au8; section_bytes];
    let mut writer = ImageWriter::new(Vec::new(), &Banner::plain()).unwrap();
    for i in 0..sections {
        writer.write_section((i * 8) as u64, &data).unwrap();
    }
    writer.finish().unwrap().0
}

fn bench(c: &mut Criterion) {
    for (name, section_bytes, sections) in [
        ("1MiB-sections", 1 << 20, 64),
        ("4KiB-sections", 4096, 16_384),
    ] {
        let data = vec![0x5au8; section_bytes];
        let mut group = c.benchmark_group(format!("format/{name}"));
        group.throughput(Throughput::Bytes((section_bytes * sections) as u64));
        group.bench_function("encode", |b| {
            let mut out = Vec::with_capacity(section_bytes * sections + sections * 32 + 256);
            b.iter(|| {
                out.clear();
                let mut writer = ImageWriter::new(&mut out, &Banner::plain()).unwrap();
                for i in 0..sections {
                    writer.write_section((i * 8) as u64, &data).unwrap();
                }
                black_box(writer.finish().unwrap().1)
            })
        });
        let encoded = image(section_bytes, sections);
        group.bench_function("decode", |b| {
            let mut buf = vec![0u8; 1 << 20];
            b.iter(|| {
                let mut reader = ImageReader::new(&encoded[..]).unwrap();
                let mut bytes = 0usize;
                while reader.next_record().unwrap().is_some() {
                    loop {
                        let n = reader.read_data(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        bytes += n;
                    }
                }
                black_box(bytes)
            })
        });
        group.finish();
    }
}

/// The CRC-32C of one 1 MiB read: the crc32-instruction loop (`crc32c`
/// crate) against the folding implementation the writer uses for large
/// buffers (`format::crc32c_of`, `crc-fast`).
fn bench_crc(c: &mut Criterion) {
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut group = c.benchmark_group("crc32c_1mib");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("crc32_instruction_loop", |b| {
        b.iter(|| crc32c::crc32c(black_box(&data)))
    });
    group.bench_function("folded", |b| {
        b.iter(|| hot_clone::format::crc32c_of(black_box(&data)))
    });
    group.finish();
}

criterion_group!(benches, bench, bench_crc);
criterion_main!(benches);
