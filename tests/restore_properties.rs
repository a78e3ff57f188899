//! Structure-aware property tests of the restore read path: images with a
//! *valid* trailer (right CRC-32C and byte count) around hostile records —
//! huge lengths, overlaps, `Z:`/`B:` extents up to the 64-bit limit, `size=`
//! at its edges — fed through a reader that returns 1..7 bytes at a time,
//! so that record lines split across every buffer refill and the code after
//! the checks runs. The sink checks every call against the image; a global
//! allocator records the largest allocation, so that a buffer sized from a
//! length in the image would show.
//!
//! This binary has no other tests: the allocator sees every thread in it.

use hot_clone::format::{Banner, RunState};
use hot_clone::geom::ByteExtent as Extent;
use hot_clone::restore::{self, Sink, Summary};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Tracking;

static LARGEST_ALLOCATION_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION_BYTES.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION_BYTES.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// No allocation may come near this: the inputs are at most tens of KiB
/// and the pipeline's buffers are at most 4 KiB here.
const ALLOCATION_BYTES_MAX: usize = 1 << 20;

const BANNER: &str = "This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone";

#[derive(Debug, Clone)]
enum Rec {
    /// `S:` with `data_len` bytes of data that really follow.
    Data {
        sector: u64,
        data_len: usize,
    },
    Zero {
        sector: u64,
        len_bytes: u64,
    },
    Bad {
        sector: u64,
        len_bytes: u64,
    },
    State(RunState),
}

/// The last record may claim more data than the image holds: the filler
/// and the (valid) trailer line are then read as its data.
#[derive(Debug, Clone)]
struct Hostile {
    device_bytes: Option<u64>,
    records: Vec<Rec>,
    huge: Option<(u64, u64, usize)>,
}

fn sector() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..64,
        1 => proptest::sample::select(vec![
            u64::MAX,
            u64::MAX / 512,
            u64::MAX / 512 - 1,
            (1 << 63) / 512,
            (1 << 54) + 3,
        ]),
        1 => any::<u64>(),
    ]
}

fn extent_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..70_000,
        1 => proptest::sample::select(vec![
            u64::MAX,
            u64::MAX - 511,
            1 << 63,
            u64::MAX / 2,
            (1 << 32) + 1,
        ]),
        1 => any::<u64>(),
    ]
}

fn device_bytes() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0)),
        1 => Just(Some(1000)),
        1 => Just(Some(u64::MAX)),
        2 => (1u64..40_000).prop_map(Some),
        1 => any::<u64>().prop_map(Some),
    ]
}

fn record() -> impl Strategy<Value = Rec> {
    prop_oneof![
        3 => (sector(), 0usize..3000).prop_map(|(sector, data_len)| Rec::Data { sector, data_len }),
        2 => (sector(), extent_len()).prop_map(|(sector, len_bytes)| Rec::Zero { sector, len_bytes }),
        2 => (sector(), extent_len()).prop_map(|(sector, len_bytes)| Rec::Bad { sector, len_bytes }),
        1 => Just(Rec::State(RunState::Converged)),
        1 => any::<u64>().prop_map(|changed_bytes| Rec::State(RunState::Unconverged { changed_bytes })),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (
        device_bytes(),
        proptest::collection::vec(record(), 0..10),
        proptest::option::weighted(0.25, (sector(), extent_len(), 0usize..2000)),
    )
        .prop_map(|(device_bytes, records, huge)| Hostile {
            device_bytes,
            records,
            huge,
        })
}

/// What the image should do: the offset of the first error, or the summary.
#[derive(Debug)]
enum Expected {
    ErrorAt(u64),
    Ok {
        extent_bytes: u64,
        sections: u64,
        data_bytes: u64,
        zero_bytes: u64,
        bad_range_count: u64,
        state: Option<RunState>,
        data_crc32c: u32,
    },
}

fn data_of(index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ index as u8)
        .collect()
}

/// The image bytes, and what a correct reader makes of them, worked out
/// from the records alone.
fn build(h: &Hostile) -> (Vec<u8>, Expected) {
    let mut image = format!("{BANNER} hc=2");
    if let Some(bytes) = h.device_bytes {
        image.push_str(&format!(" size={bytes}"));
    }
    image.push_str(" lbs=512\n");
    let mut image = image.into_bytes();
    let mut error_at = None;
    let mut extent_bytes = h.device_bytes.unwrap_or(0);
    let (mut sections, mut data_bytes, mut zero_bytes, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut state = None;
    let mut data_crc32c = 0u32;
    let mut check = |line_offset: u64, sector: u64, len: u64, error_at: &mut Option<u64>| {
        let end = sector.checked_mul(512).and_then(|o| o.checked_add(len));
        match end {
            Some(end) if h.device_bytes.is_none_or(|size| end <= size) => {
                extent_bytes = extent_bytes.max(end);
                true
            }
            _ => {
                error_at.get_or_insert(line_offset);
                false
            }
        }
    };
    for (index, rec) in h.records.iter().enumerate() {
        let line_offset = image.len() as u64;
        match *rec {
            Rec::Data { sector, data_len } => {
                image.extend_from_slice(format!("S:{sector}\tL:{data_len}\n").as_bytes());
                let data = data_of(index, data_len);
                image.extend_from_slice(&data);
                if check(line_offset, sector, data_len as u64, &mut error_at) && error_at.is_none()
                {
                    sections += 1;
                    data_bytes += data_len as u64;
                    data_crc32c = crc32c::crc32c_append(data_crc32c, &data);
                }
            }
            Rec::Zero { sector, len_bytes } | Rec::Bad { sector, len_bytes } => {
                let tag = if matches!(rec, Rec::Zero { .. }) {
                    "Z"
                } else {
                    "B"
                };
                image.extend_from_slice(format!("{tag}:{sector}\tL:{len_bytes}\n").as_bytes());
                if check(line_offset, sector, len_bytes, &mut error_at) && error_at.is_none() {
                    if tag == "Z" {
                        zero_bytes = zero_bytes.saturating_add(len_bytes);
                    } else {
                        bad += 1;
                    }
                }
            }
            Rec::State(RunState::Converged) => {
                image.extend_from_slice(b"STATE:converged\n");
                state = Some(RunState::Converged);
            }
            Rec::State(RunState::Unconverged { changed_bytes }) => {
                image.extend_from_slice(
                    format!("STATE:unconverged\tCHANGED_BYTES:{changed_bytes}\n").as_bytes(),
                );
                state = Some(RunState::Unconverged { changed_bytes });
            }
        }
    }
    let mut truncated = false;
    if let Some((sector, claimed, filler)) = h.huge {
        let line_offset = image.len() as u64;
        // More than the filler and the trailer line (at most ~60 bytes).
        let claimed = claimed.max(filler as u64 + 100);
        image.extend_from_slice(format!("S:{sector}\tL:{claimed}\n").as_bytes());
        image.extend(std::iter::repeat_n(0x5a, filler));
        if check(line_offset, sector, claimed, &mut error_at) {
            truncated = true;
        }
    }
    let crc = crc32c::crc32c(&image);
    let len = image.len();
    image.extend_from_slice(format!("END\tCRC:{crc:08x}\tBYTES:{len}\n").as_bytes());
    let expected = match error_at {
        Some(offset) => Expected::ErrorAt(offset),
        None if truncated => Expected::ErrorAt(image.len() as u64),
        None => Expected::Ok {
            extent_bytes,
            sections,
            data_bytes,
            zero_bytes,
            bad_range_count: bad,
            state,
            data_crc32c,
        },
    };
    (image, expected)
}

/// Returns 1..=7 bytes per read, in a seeded pattern.
struct TinyReads {
    data: Vec<u8>,
    at: usize,
    state: u64,
}

impl Read for TinyReads {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.state = self
            .state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let want = 1 + (self.state >> 61) as usize % 7;
        let n = want.min(buf.len()).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Checks every call against the image's own promises: writes only inside
/// the extent just admitted, in order, never past `size=` or beyond the
/// bytes the image holds; zeros exactly over a `Z:`/`B:` extent.
struct CheckingSink {
    image_bytes: u64,
    device_bytes: Option<u64>,
    admitted: Option<Extent>,
    cursor_bytes: u64,
    written_bytes: u64,
    data_crc32c: u32,
}

impl Sink for CheckingSink {
    fn begin(&mut self, banner: &Banner) -> anyhow::Result<()> {
        self.device_bytes = banner.meta.device_bytes;
        Ok(())
    }

    fn admit(&mut self, extent: Extent) -> anyhow::Result<()> {
        let end = extent
            .checked_end_bytes()
            .expect("an extent past 2^64 was admitted");
        if let Some(size) = self.device_bytes {
            assert!(end <= size, "{extent:?} admitted past size={size}");
        }
        self.admitted = Some(extent);
        self.cursor_bytes = extent.offset_bytes;
        Ok(())
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> anyhow::Result<()> {
        let extent = self.admitted.expect("write without an extent");
        assert_eq!(offset_bytes, self.cursor_bytes, "write out of order");
        let end = offset_bytes + data.len() as u64;
        assert!(end <= extent.end_bytes(), "write past {extent:?}");
        assert!(!data.is_empty(), "empty write");
        self.cursor_bytes = end;
        self.written_bytes += data.len() as u64;
        assert!(
            self.written_bytes <= self.image_bytes,
            "more written than read"
        );
        self.data_crc32c = crc32c::crc32c_append(self.data_crc32c, data);
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
        assert_eq!(self.cursor_bytes, extent.end_bytes(), "section not filled");
    }
}

fn restore_through_tiny_reads(
    image: Vec<u8>,
    seed: u64,
    buffer_bytes: usize,
    chunk_bytes: usize,
) -> (anyhow::Result<Summary>, CheckingSink) {
    let mut sink = CheckingSink {
        image_bytes: image.len() as u64,
        device_bytes: None,
        admitted: None,
        cursor_bytes: 0,
        written_bytes: 0,
        data_crc32c: 0,
    };
    let input = BufReader::with_capacity(
        buffer_bytes,
        TinyReads {
            data: image,
            at: 0,
            state: seed,
        },
    );
    let result = restore::read_stream(Box::new(input), "test image", &mut sink, chunk_bytes);
    (result, sink)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn hostile_records_behind_a_valid_trailer(
        h in hostile(),
        seed in any::<u64>(),
        buffer_bytes in 1usize..16,
        chunk_bytes in 1usize..4096,
    ) {
        let (image, expected) = build(&h);
        let (result, sink) = restore_through_tiny_reads(image, seed, buffer_bytes, chunk_bytes);
        match (expected, result) {
            (Expected::ErrorAt(offset), Err(e)) => {
                let message = format!("{e:#}");
                prop_assert!(
                    message.contains(&format!("bad image test image: image byte offset {offset}: ")),
                    "expected an error at image byte {offset}, got: {message}"
                );
                prop_assert!(!message.contains("panicked") && !message.contains("unexpectedly"), "{message}");
            }
            (Expected::ErrorAt(offset), Ok(summary)) => {
                prop_assert!(false, "accepted; expected an error at {offset}: {summary:?}");
            }
            (Expected::Ok { .. }, Err(e)) => prop_assert!(false, "refused: {e:#}"),
            (
                Expected::Ok { extent_bytes, sections, data_bytes, zero_bytes, bad_range_count, state, data_crc32c },
                Ok(summary),
            ) => {
                prop_assert!(summary.trailer.is_some());
                prop_assert_eq!(summary.extent_bytes, extent_bytes);
                prop_assert_eq!(summary.sections, sections);
                prop_assert_eq!(summary.data_bytes, data_bytes);
                prop_assert_eq!(summary.zero_bytes, zero_bytes);
                prop_assert_eq!(summary.bad_range_count, bad_range_count);
                prop_assert_eq!(summary.state, state);
                prop_assert_eq!(sink.data_crc32c, data_crc32c, "data differs from the image's");
                prop_assert_eq!(sink.written_bytes, data_bytes);
            }
        }
        let largest = LARGEST_ALLOCATION_BYTES.load(Ordering::Relaxed);
        prop_assert!(largest <= ALLOCATION_BYTES_MAX, "an allocation of {largest} bytes");
    }
}

#[test]
fn zero_extents_of_u64_max_bytes_saturate_the_total() {
    let h = Hostile {
        device_bytes: None,
        records: vec![
            Rec::Zero {
                sector: 0,
                len_bytes: u64::MAX,
            },
            Rec::Bad {
                sector: 0,
                len_bytes: u64::MAX,
            },
            Rec::Zero {
                sector: 0,
                len_bytes: u64::MAX,
            },
        ],
        huge: None,
    };
    let (image, _) = build(&h);
    let (result, _) = restore_through_tiny_reads(image, 1, 7, 512);
    let summary = result.unwrap();
    assert_eq!(summary.zero_bytes, u64::MAX);
    assert_eq!(summary.extent_bytes, u64::MAX);
    assert_eq!(summary.bad_range_count, 1);
}

/// A section claiming 2^64-1 bytes at sector 0, behind a trailer whose CRC
/// and count are right for the bytes before it: read as data to the end,
/// then refused as truncated at the last byte, with nothing sized from the
/// claim.
#[test]
fn section_of_u64_max_bytes_is_truncated_not_allocated() {
    let h = Hostile {
        device_bytes: None,
        records: vec![],
        huge: Some((0, u64::MAX, 1000)),
    };
    let (image, expected) = build(&h);
    let len = image.len();
    assert!(matches!(expected, Expected::ErrorAt(at) if at == len as u64));
    let (result, sink) = restore_through_tiny_reads(image, 2, 3, 4096);
    let message = format!("{:#}", result.unwrap_err());
    assert!(
        message.contains(&format!("image byte offset {len}: truncated image")),
        "{message}"
    );
    assert!(sink.written_bytes < len as u64);
    assert!(LARGEST_ALLOCATION_BYTES.load(Ordering::Relaxed) <= ALLOCATION_BYTES_MAX);
}
