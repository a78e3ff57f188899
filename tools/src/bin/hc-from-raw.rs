//! hc-from-raw: turn a raw image file into a `.hc` stream on stdout, laid
//! out as the original hot-clone lays out an image taken of an idle device:
//! the banner and one section of the whole file. For tests and benchmarks.
//!
//! usage: hc-from-raw [--no-trailer] [--meta] RAW > IMAGE.hc

use hot_clone::format::{Banner, ImageWriter, Meta, REVISION_META};
use hot_clone::geom::ByteExtent;
use std::fs::File;
use std::io::{self, Read, Write};
use std::process::ExitCode;

const CHUNK_BYTES: usize = 1 << 20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hc-from-raw: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut trailer = true;
    let mut meta = false;
    let mut raw = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--no-trailer" => trailer = false,
            "--meta" => meta = true,
            "-h" | "--help" => {
                println!(
                    "usage: hc-from-raw [--no-trailer] [--meta] RAW > IMAGE.hc\n\
                     Writes RAW as one section, the way the original hot-clone images an idle device.\n\
                     --no-trailer  write no END trailer (a legacy image, as the original writes)\n\
                     --meta        record RAW's size and path in the banner (format revision 1)"
                );
                return Ok(());
            }
            _ if raw.is_none() && !arg.starts_with('-') => raw = Some(arg),
            _ => return Err(format!("unexpected argument {arg} (see --help)")),
        }
    }
    let raw = raw.ok_or("give the raw file to convert (see --help)")?;
    let mut file = File::open(&raw).map_err(|e| format!("cannot open {raw}: {e}"))?;
    let len_bytes = file.metadata().map_err(|e| format!("{raw}: {e}"))?.len();
    let banner = if meta {
        Banner {
            revision: REVISION_META,
            meta: Meta {
                device_bytes: Some(len_bytes),
                source: Some(raw.clone().into()),
                tool: Some(format!("hc-from-raw/{}", env!("CARGO_PKG_VERSION"))),
                ..Meta::default()
            },
        }
    } else {
        Banner::plain()
    };
    let stdout = io::stdout().lock();
    let io_err = |e: io::Error| format!("writing the image: {e}");
    let mut writer = ImageWriter::new(stdout, &banner).map_err(io_err)?;
    writer
        .begin_section(ByteExtent {
            offset_bytes: 0,
            len_bytes,
        })
        .map_err(io_err)?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut left = len_bytes;
    while left > 0 {
        let want = buf.len().min(left as usize);
        file.read_exact(&mut buf[..want])
            .map_err(|e| format!("reading {raw} at byte {}: {e}", len_bytes - left))?;
        writer.write_data(&buf[..want]).map_err(io_err)?;
        left -= want as u64;
    }
    if trailer {
        let (_stdout, _trailer) = writer.finish().map_err(io_err)?;
    } else {
        let mut out = writer.abandon().map_err(io_err)?;
        out.flush().map_err(io_err)?;
    }
    Ok(())
}
