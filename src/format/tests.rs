//! Format tests: round trips over random layouts, a golden image built the
//! way the original tool builds one, and every kind of bad input.

use super::*;
use crate::geom::ByteExtent;
use proptest::prelude::*;

/// A test-only restore into memory: applies every record, returns the
/// device content and the trailer (None for a legacy image).
fn apply(image: &[u8]) -> Result<(Vec<u8>, Option<Trailer>), FormatError> {
    let mut reader = ImageReader::new(image)?;
    let mut device = Vec::new();
    let mut buf = vec![0u8; 1000]; // deliberately not a divisor of the sections
    while let Some(record) = reader.next_record()? {
        match record {
            Record::Data(extent) => {
                let mut at = extent.offset_bytes as usize;
                loop {
                    let n = reader.read_data(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    if device.len() < at + n {
                        device.resize(at + n, 0);
                    }
                    device[at..at + n].copy_from_slice(&buf[..n]);
                    at += n;
                }
                let end = extent.end_bytes() as usize;
                if device.len() < end {
                    device.resize(end, 0);
                }
            }
            Record::Zero(extent) => {
                let (start, end) = (extent.offset_bytes as usize, extent.end_bytes() as usize);
                if device.len() < end {
                    device.resize(end, 0);
                }
                device[start..end].fill(0);
            }
            Record::Bad(_) | Record::State(_) | Record::End(_) => {}
        }
    }
    Ok((device, reader.trailer().copied()))
}

fn image_of(banner: &Banner, sections: &[(u64, Vec<u8>)], trailer: bool) -> Vec<u8> {
    let mut writer = ImageWriter::new(Vec::new(), banner).unwrap();
    for (sector, data) in sections {
        writer.write_section(*sector, data).unwrap();
    }
    if trailer {
        writer.finish().unwrap().0
    } else {
        writer.abandon().unwrap()
    }
}

fn err_kind(image: &[u8]) -> (u64, FormatErrorKind) {
    let err = apply(image).expect_err("image accepted");
    (err.offset, err.kind)
}

#[test]
fn crc32c_is_castagnoli() {
    // The standard check value of CRC-32C.
    assert_eq!(crc32c_append(0, b"123456789"), 0xe306_9283);
    assert_eq!(
        crc32c_append(crc32c_append(0, b"1234"), b"56789"),
        0xe306_9283
    );
}

#[test]
fn folded_crc_of_large_buffers_matches_the_instruction_loop() {
    let data: Vec<u8> = (0..(3 << 20) + 77)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for len in [
        0,
        1,
        16_383,
        16_384,
        16_385,
        65_536 + 3,
        1 << 20,
        data.len(),
    ] {
        let expected = crc32c::crc32c(&data[..len]);
        assert_eq!(crc32c_of(&data[..len]), expected, "len {len}");
        assert_eq!(crc32c_append(0, &data[..len]), expected, "len {len}");
        // Appended after a prefix, both paths.
        let split = len / 3;
        assert_eq!(
            crc32c_append(crc32c_append(0, &data[..split]), &data[split..len]),
            expected,
            "len {len} split {split}"
        );
    }
}

/// Builds, byte by byte, what the original Go tool writes: the banner, one
/// `S:0` section of the whole device, then one 512-byte section per dirty
/// sector (no trailer); and what its fork writes (the same plus a trailer).
#[test]
fn golden_images_of_the_original_and_the_fork() {
    let device_bytes = 8 * 512;
    let mut stale: Vec<u8> = (0..device_bytes).map(|i| (i % 251) as u8).collect();
    let mut golden = Vec::new();
    golden.extend_from_slice(
        b"This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone\n",
    );
    golden.extend_from_slice(format!("S:0\tL:{device_bytes}\n").as_bytes());
    golden.extend_from_slice(&stale);
    for sector in [5u64, 2] {
        let fresh = vec![sector as u8 ^ 0xa5; 512];
        golden.extend_from_slice(format!("S:{sector}\tL:512\n").as_bytes());
        golden.extend_from_slice(&fresh);
        stale[sector as usize * 512..][..512].copy_from_slice(&fresh);
    }
    let expected_device = stale;

    // Our writer produces exactly those bytes.
    let sections = [
        (0u64, image_of_device(&golden)),
        (5, vec![5 ^ 0xa5; 512]),
        (2, vec![2 ^ 0xa5; 512]),
    ];
    assert_eq!(image_of(&Banner::plain(), &sections, false), golden);

    let (device, trailer) = apply(&golden).unwrap();
    assert_eq!(device, expected_device);
    assert_eq!(trailer, None, "the original writes no trailer");

    // The fork: same bytes, then END with CRC-32C and count of all of them.
    let mut forked = golden.clone();
    let crc = crc32c_append(0, &golden);
    forked.extend_from_slice(format!("END\tCRC:{crc:08x}\tBYTES:{}\n", golden.len()).as_bytes());
    assert_eq!(image_of(&Banner::plain(), &sections, true), forked);
    let (device, trailer) = apply(&forked).unwrap();
    assert_eq!(device, expected_device);
    assert_eq!(
        trailer,
        Some(Trailer {
            crc32c: crc,
            bytes: golden.len() as u64
        })
    );
}

/// The first section's data of a golden image (what the main pass read).
fn image_of_device(golden: &[u8]) -> Vec<u8> {
    let banner_end = golden.iter().position(|&b| b == b'\n').unwrap() + 1;
    let header_end = banner_end
        + golden[banner_end..]
            .iter()
            .position(|&b| b == b'\n')
            .unwrap()
        + 1;
    golden[header_end..header_end + 8 * 512].to_vec()
}

/// Where the last line of an image (its trailer) starts.
fn trailer_offset(image: &[u8]) -> u64 {
    image.windows(8).rposition(|w| w == b"END\tCRC:").unwrap() as u64
}

fn sections_strategy() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    // Sectors within 64 KiB, lengths from empty to several sectors, any byte
    // count (the format allows it); data mostly patterned, sometimes zero.
    proptest::collection::vec(
        (0u64..128, 0usize..3000, any::<u8>(), any::<bool>()).prop_map(
            |(sector, len, seed, zero)| {
                let data = (0..len)
                    .map(|i| {
                        if zero {
                            0
                        } else {
                            seed.wrapping_add(i as u8) | 1
                        }
                    })
                    .collect();
                (sector, data)
            },
        ),
        0..12,
    )
}

proptest! {
    #[test]
    fn any_layout_round_trips(sections in sections_strategy(), with_meta in any::<bool>()) {
        let mut model = Vec::new();
        for (sector, data) in &sections {
            let at = *sector as usize * 512;
            if model.len() < at + data.len() {
                model.resize(at + data.len(), 0);
            }
            model[at..at + data.len()].copy_from_slice(data);
        }
        let banner = if with_meta {
            Banner { revision: REVISION_META, meta: Meta { device_bytes: Some(128 * 512 + 3000), ..Meta::default() } }
        } else {
            Banner::plain()
        };
        let image = image_of(&banner, &sections, true);
        let (device, trailer) = apply(&image).unwrap();
        prop_assert_eq!(device, model);
        prop_assert_eq!(trailer.unwrap().bytes, trailer_offset(&image));
    }

    #[test]
    fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = apply(&bytes);
        let mut image = BANNER_PLAIN.as_bytes().to_vec();
        image.push(b'\n');
        image.extend_from_slice(&bytes);
        let _ = apply(&image);
    }

    #[test]
    fn any_flipped_bit_is_caught(sections in sections_strategy(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
        let image = image_of(&Banner::plain(), &sections, true);
        let mut damaged = image.clone();
        let i = pick.index(image.len());
        damaged[i] ^= 1 << bit;
        // Either an error, or (a flipped banner newline) an image without a
        // trailer, which restore refuses unless told to accept legacy images.
        if let Ok((_, trailer)) = apply(&damaged) {
            prop_assert!(trailer.is_none(), "flip at byte {} accepted", i);
        }
    }

    #[test]
    fn any_truncation_is_caught(sections in sections_strategy(), pick in any::<prop::sample::Index>()) {
        let image = image_of(&Banner::plain(), &sections, true);
        let cut = pick.index(image.len());
        match apply(&image[..cut]) {
            Err(_) => {}
            Ok((_, trailer)) => prop_assert!(trailer.is_none(), "cut at {} kept a trailer", cut),
        }
    }
}

#[test]
fn extension_records_round_trip() {
    let banner = Banner {
        revision: REVISION_EXTENDED,
        meta: Meta {
            device_bytes: Some(16 * 512),
            ..Meta::default()
        },
    };
    let mut writer = ImageWriter::new(Vec::new(), &banner).unwrap();
    writer.write_section(0, &[7u8; 16 * 512]).unwrap();
    let zero = ByteExtent {
        offset_bytes: 2 * 512,
        len_bytes: 1024,
    };
    let bad = ByteExtent {
        offset_bytes: 9 * 512,
        len_bytes: 512,
    };
    writer.write_zero(zero).unwrap();
    writer.write_bad(bad).unwrap();
    writer
        .write_state(RunState::Unconverged {
            changed_bytes: 4096,
        })
        .unwrap();
    let image = writer.finish().unwrap().0;
    let mut reader = ImageReader::new(&image[..]).unwrap();
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        records.push(r);
    }
    assert_eq!(records[1], Record::Zero(zero));
    assert_eq!(records[2], Record::Bad(bad));
    assert_eq!(
        records[3],
        Record::State(RunState::Unconverged {
            changed_bytes: 4096
        })
    );
    assert!(matches!(records[4], Record::End(_)));
    let (device, _) = apply(&image).unwrap();
    assert!(device[1024..2048].iter().all(|&b| b == 0));
    assert!(device[2048..].iter().all(|&b| b == 7));
}

fn banner_line() -> Vec<u8> {
    format!("{BANNER_PLAIN}\n").into_bytes()
}

fn with_trailer(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32c_append(0, &body);
    let len = body.len();
    body.extend_from_slice(format!("END\tCRC:{crc:08x}\tBYTES:{len}\n").as_bytes());
    body
}

#[test]
fn bad_inputs_are_errors_at_the_right_offset() {
    let banner = banner_line();
    let b = banner.len() as u64;
    let good = image_of(&Banner::plain(), &[(0, vec![1; 1024])], true);

    // Empty and not-an-image.
    assert!(matches!(err_kind(b""), (0, FormatErrorKind::Empty)));
    assert!(matches!(
        err_kind(b"GIF89a\n"),
        (0, FormatErrorKind::NotAnImage(_))
    ));
    assert!(matches!(
        err_kind(&[b'x'; 10_000]),
        (0, FormatErrorKind::LineTooLong { .. })
    ));

    // Malformed header: right after the banner.
    let mut img = banner.clone();
    img.extend_from_slice(b"S:0 L:512\n");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::MalformedRecord(_)) if o == b
    ));

    // A header that never ends.
    let mut img = banner.clone();
    img.extend_from_slice(&[b'9'; 1000]);
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::LineTooLong { .. }) if o == b
    ));

    // Truncated header line at the end.
    let mut img = banner.clone();
    img.extend_from_slice(b"S:0\tL:5");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::TruncatedLine(_)) if o == b
    ));

    // Truncated section: the offset is where the image ends.
    let cut = &good[..good.len() - 100 - 40];
    let (offset, kind) = err_kind(cut);
    assert_eq!(offset, cut.len() as u64);
    assert!(matches!(
        kind,
        FormatErrorKind::TruncatedSection {
            sector: 0,
            len_bytes: 1024,
            ..
        }
    ));

    // sector*512+len overflows.
    let mut img = banner.clone();
    img.extend_from_slice(format!("S:{}\tL:512\n", u64::MAX / 512).as_bytes());
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::ExtentOverflow { .. }) if o == b
    ));

    // Past the declared size.
    let declared = Banner {
        revision: 1,
        meta: Meta {
            device_bytes: Some(1024),
            ..Meta::default()
        },
    };
    let mut img = Vec::new();
    declared.encode(&mut img).unwrap();
    let at = img.len() as u64;
    img.extend_from_slice(b"S:1\tL:1024\n");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::PastDeclaredSize { end_bytes: 1536, device_bytes: 1024, .. }) if o == at
    ));

    // CRC mismatch: one data byte changed.
    let mut img = good.clone();
    img[b as usize + 20] ^= 0x40;
    let trailer_at = trailer_offset(&good);
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::CrcMismatch { .. }) if o == trailer_at
    ));

    // Byte count mismatch: a section spliced out, trailer kept.
    let mut img = banner.clone();
    img.extend_from_slice(b"S:0\tL:512\n");
    img.extend_from_slice(&[0; 512]);
    let mut spliced = with_trailer(img.clone());
    spliced.drain(b as usize..b as usize + 10 + 512);
    assert!(matches!(
        err_kind(&spliced),
        (o, FormatErrorKind::ByteCountMismatch { .. }) if o == b
    ));

    // Garbage after the trailer.
    let mut img = good.clone();
    img.extend_from_slice(b"x");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::DataAfterTrailer) if o == good.len() as u64
    ));

    // Malformed trailer.
    let mut img = banner.clone();
    img.extend_from_slice(b"END\tCRC:xyz\n");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::MalformedTrailer(_)) if o == b
    ));

    // Unknown record and an extension record in a plain image.
    let mut img = banner.clone();
    img.extend_from_slice(b"Q:1\tL:2\n");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::UnknownRecord(_)) if o == b
    ));
    let mut img = banner.clone();
    img.extend_from_slice(b"Z:1\tL:2\n");
    assert!(matches!(
        err_kind(&img),
        (o, FormatErrorKind::RecordNeedsRevision { .. }) if o == b
    ));

    // A newer revision is refused at the banner.
    let img = format!("{BANNER_PLAIN} hc=99\nS:0\tL:0\n");
    assert!(matches!(
        err_kind(img.as_bytes()),
        (0, FormatErrorKind::NewerRevision { declared: 99, .. })
    ));
}

#[test]
fn legacy_image_ends_at_a_record_boundary_without_trailer() {
    let img = image_of(&Banner::plain(), &[(1, vec![3; 512])], false);
    let (device, trailer) = apply(&img).unwrap();
    assert_eq!(trailer, None);
    assert_eq!(device.len(), 1024);
    // An image that is only a banner is a legacy image with no sections.
    let (device, trailer) = apply(&banner_line()).unwrap();
    assert!(device.is_empty() && trailer.is_none());
}

proptest! {
    /// Sections checksummed by the caller make the same stream and trailer.
    #[test]
    fn checksummed_sections_match_plain_ones(sections in sections_strategy()) {
        let banner = Banner::plain();
        let mut plain = ImageWriter::new(Vec::new(), &banner).unwrap();
        let mut split = ImageWriter::new(Vec::new(), &banner).unwrap();
        for (sector, data) in &sections {
            plain.write_section(*sector, data).unwrap();
            split
                .write_section_checksummed(*sector, data, crate::format::crc32c_append(0, data))
                .unwrap();
        }
        let (plain, plain_trailer) = plain.finish().unwrap();
        let (split, split_trailer) = split.finish().unwrap();
        prop_assert_eq!(plain_trailer, split_trailer);
        prop_assert_eq!(plain, split);
    }
}

#[test]
fn a_wrong_caller_checksum_fails_verification() {
    let mut writer = ImageWriter::new(Vec::new(), &Banner::plain()).unwrap();
    writer
        .write_section_checksummed(0, &[1u8; 512], 0xdead_beef)
        .unwrap();
    let (image, _) = writer.finish().unwrap();
    assert!(apply(&image).is_err());
}
