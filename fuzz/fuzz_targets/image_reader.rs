//! The image reader on arbitrary bytes: never a panic; every error at an
//! offset inside the input; a verified trailer only at the very end.

#![no_main]

use hot_clone::format::{ImageReader, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the data buffer size (1..=256), so that data
    // reads split sections at every alignment.
    let Some((&pick, image)) = data.split_first() else {
        return;
    };
    let mut buf = vec![0u8; 1 + usize::from(pick)];
    let len = image.len() as u64;
    let mut reader = match ImageReader::new(image) {
        Ok(reader) => reader,
        Err(e) => {
            assert!(e.offset <= len, "error past the input: {e}");
            return;
        }
    };
    let device_bytes = reader.banner().meta.device_bytes;
    loop {
        let record = match reader.next_record() {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(e) => {
                assert!(e.offset <= len, "error past the input: {e}");
                return;
            }
        };
        if let Record::Data(extent) | Record::Zero(extent) | Record::Bad(extent) = record {
            let end = extent.checked_end_bytes().expect("an extent past 2^64 got through");
            assert!(device_bytes.is_none_or(|size| end <= size), "past size=");
        }
        if let Record::Data(extent) = record {
            let mut got = 0u64;
            loop {
                match reader.read_data(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n as u64,
                    Err(e) => {
                        assert!(e.offset <= len, "error past the input: {e}");
                        return;
                    }
                }
            }
            assert_eq!(got, extent.len_bytes, "short section without an error");
        }
        assert!(reader.offset() <= len);
    }
    if reader.trailer().is_some() {
        assert_eq!(reader.offset(), len, "a verified trailer before the end");
    }
});
