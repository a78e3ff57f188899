//! `reassemble` and `verify`: read an image, check all of it, and write it
//! out to a regular file (sparse, atomically renamed into place) or a block
//! device (refused while in use or too small) — or nowhere, for `verify`.

use crate::dropbehind::{DropBehind, DropFailed};
use crate::format::{Banner, FormatError, ImageReader, Record, RunState, Trailer};
use crate::geom::{ByteExtent, SECTOR_BYTES};
use crate::signals;
use crate::source::blockdev::{self, DevNum};
use crate::units::{Bytes, Rate};
use anyhow::{Context, anyhow, bail};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes of section data read and written per request.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Buffer in front of the image, from which record lines are parsed; data
/// reads of a whole chunk bypass it.
const INPUT_BUFFER_BYTES: usize = 1 << 20;
/// Granularity of holes in a restored file: the usual filesystem block.
const SPARSE_BLOCK_BYTES: u64 = 4096;
/// How many bad ranges a summary lists (the rest are only counted).
const BAD_RANGES_LISTED_MAX: usize = 64;
/// How many of them the warning names.
const BAD_RANGES_WARNED_MAX: usize = 16;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the restore looks at the signal flag while its input is silent.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

const _: () = assert!((CHUNK_BYTES as u64).is_multiple_of(SPARSE_BLOCK_BYTES));
const _: () = assert!(SPARSE_BLOCK_BYTES.is_multiple_of(SECTOR_BYTES));

/// Standard input, unbuffered by std: a read that a signal interrupts
/// (EINTR; the handlers have no `SA_RESTART`) ends the restore instead of
/// being retried, so a stalled producer cannot pin it.
struct StdinReader(File);

impl Read for StdinReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    if signals::interrupted() {
                        return Err(io::Error::other(signals::Interrupted));
                    }
                }
                result => return result,
            }
        }
    }
}

/// Where an image is read from: a path, or `-` for standard input.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Stdin,
    File(PathBuf),
}

impl ImageSource {
    pub fn from_arg(arg: &Path) -> ImageSource {
        if arg == Path::new("-") {
            ImageSource::Stdin
        } else {
            ImageSource::File(arg.to_path_buf())
        }
    }

    fn open(&self) -> anyhow::Result<(Box<dyn BufRead + Send>, Option<u64>)> {
        match self {
            ImageSource::Stdin => {
                let stdin = io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("cannot use standard input")?;
                let input: Box<dyn Read + Send> = Box::new(StdinReader(File::from(stdin)));
                Ok((
                    Box::new(BufReader::with_capacity(INPUT_BUFFER_BYTES, input)),
                    None,
                ))
            }
            ImageSource::File(path) => {
                let file = File::open(path)
                    .with_context(|| format!("cannot open image {}", path.display()))?;
                let len = file.metadata().ok().map(|m| m.len());
                // Only a hint: a failure changes nothing.
                let _ = nix::fcntl::posix_fadvise(
                    &file,
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
                );
                let input: Box<dyn Read + Send> = Box::new(file);
                Ok((
                    Box::new(BufReader::with_capacity(INPUT_BUFFER_BYTES, input)),
                    len,
                ))
            }
        }
    }

    fn name(&self) -> String {
        match self {
            ImageSource::Stdin => "standard input".into(),
            ImageSource::File(path) => path.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Restore an image without an END trailer, whose completeness cannot
    /// be checked.
    pub allow_legacy: bool,
}

/// What an image held, as found by reading all of it.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub banner: Banner,
    pub sections: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Bad ranges, the first [`BAD_RANGES_LISTED_MAX`] of them.
    pub bad_ranges: Vec<ByteExtent>,
    pub bad_range_count: u64,
    pub bad_bytes: u64,
    /// The size the restored device or file has: the largest section end,
    /// or the size the banner declares if larger.
    pub extent_bytes: u64,
    pub image_bytes: u64,
    pub trailer: Option<Trailer>,
    pub state: Option<RunState>,
}

impl Summary {
    /// Why the image, intact as it is, is not a complete capture.
    pub fn incomplete_reasons(&self) -> Vec<Warning> {
        let mut reasons = Vec::new();
        if let Some(RunState::Unconverged { changed_bytes }) = self.state {
            reasons.push(Warning::Unconverged { changed_bytes });
        }
        if self.bad_range_count > 0 {
            reasons.push(Warning::BadRanges {
                count: self.bad_range_count,
                bytes: self.bad_bytes,
                listed: self.bad_ranges.clone(),
            });
        }
        reasons
    }

    /// Lines for `verify` and `--verbose`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let meta = &self.banner.meta;
        out.push_str(&format!("format revision: {}\n", self.banner.revision));
        if let Some(source) = meta.source_printable() {
            out.push_str(&format!("source: {source}\n"));
        }
        if let Some(bytes) = meta.device_bytes {
            out.push_str(&format!("device size: {bytes} bytes ({})\n", Bytes(bytes)));
        }
        if let Some(bytes) = meta.logical_block_bytes {
            out.push_str(&format!("logical block size: {bytes} bytes\n"));
        }
        if let Some(tool) = meta.tool_printable() {
            out.push_str(&format!("written by: {tool}\n"));
        }
        out.push_str(&format!("sections: {}\n", self.sections));
        out.push_str(&format!(
            "data bytes: {} ({})\n",
            self.data_bytes,
            Bytes(self.data_bytes)
        ));
        if self.zero_bytes > 0 {
            out.push_str(&format!("zero-extent bytes: {}\n", self.zero_bytes));
        }
        if self.bad_range_count > 0 {
            out.push_str(&format!(
                "unreadable: {} ranges, {} bytes (restored as zeros)\n",
                self.bad_range_count, self.bad_bytes
            ));
        }
        out.push_str(&format!(
            "extent: {} bytes ({})\n",
            self.extent_bytes,
            Bytes(self.extent_bytes)
        ));
        out.push_str(&format!("image bytes: {}\n", self.image_bytes));
        match self.trailer {
            Some(t) => out.push_str(&format!(
                "trailer: verified (CRC-32C {:08x} over {} bytes)\n",
                t.crc32c, t.bytes
            )),
            None => out.push_str("trailer: none (legacy image; completeness cannot be checked)\n"),
        }
        match self.state {
            Some(RunState::Converged) => out.push_str("run state: converged\n"),
            Some(RunState::Unconverged { changed_bytes }) => out.push_str(&format!(
                "run state: NOT converged ({changed_bytes} bytes changed in the last round)\n"
            )),
            None => {}
        }
        out
    }
}

/// Something about a finished restore or verify that the operator must
/// know before trusting the result. Any warning makes the exit status 3
/// (`Exit::Incomplete`): the work was done, but not to the "complete and
/// trustworthy" standard that status 0 promises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// The image's `STATE:unconverged` record: writes had not quiesced.
    Unconverged { changed_bytes: u64 },
    /// `B:` records: ranges the source could not read (restored as zeros).
    BadRanges {
        count: u64,
        bytes: u64,
        /// The first [`BAD_RANGES_LISTED_MAX`] of them.
        listed: Vec<ByteExtent>,
    },
    /// Restored with `--allow-legacy`: no END trailer, so a cut-short image
    /// cannot be told from a whole one.
    Legacy,
    /// The image's `lbs=` differs from the target device's logical block size.
    LogicalBlockMismatch {
        target: String,
        image_bytes: u64,
        target_bytes: u64,
    },
    /// BLKRRPART failed after a whole-disk restore (other than EINVAL, which
    /// devices without partition support return).
    PartitionRereadFailed { target: String, error: String },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::Unconverged { changed_bytes } => write!(
                f,
                "the imaging run stopped before writes quiesced: {} ({changed_bytes} bytes) changed during its last round and may be older than the source",
                Bytes(*changed_bytes)
            ),
            Warning::BadRanges {
                count,
                bytes,
                listed,
            } => {
                let shown: Vec<String> = listed
                    .iter()
                    .take(BAD_RANGES_WARNED_MAX)
                    .map(|e| format!("bytes {}..{}", e.offset_bytes, e.end_bytes()))
                    .collect();
                write!(
                    f,
                    "{count} range(s), {} ({bytes} bytes), could not be read from the source; the image holds nothing for them and the restored bytes there are zeros (a hole in a file, zeros written on a device): {}{}",
                    Bytes(*bytes),
                    shown.join(", "),
                    if *count > shown.len() as u64 {
                        format!(", ... ({} more)", count - shown.len() as u64)
                    } else {
                        String::new()
                    }
                )
            }
            Warning::Legacy => write!(
                f,
                "the image has no END trailer (--allow-legacy): every section it holds was restored, but whether sections are missing from its end cannot be checked"
            ),
            Warning::LogicalBlockMismatch {
                target,
                image_bytes,
                target_bytes,
            } => write!(
                f,
                "the image was taken from a device with {image_bytes}-byte logical blocks, {target} has {target_bytes}-byte blocks: the bytes are restored exactly, but a partition table counts in logical blocks, so one written for {image_bytes}-byte sectors is misplaced on this device (its partitions and GPT header are looked for at other offsets), and filesystems made for {image_bytes}-byte sectors may not mount"
            ),
            Warning::PartitionRereadFailed { target, error } => write!(
                f,
                "the image was restored, but the kernel could not re-read the partition table of {target} ({error}): its partition devices may show the old layout until it is re-read (blockdev --rereadpt {target}, or a reboot)"
            ),
        }
    }
}

/// The outcome of a command that read a whole image.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    /// Empty when the result is complete.
    pub warnings: Vec<Warning>,
}

/// Reads the whole image, checks it, writes nothing.
pub fn verify(source: &ImageSource) -> anyhow::Result<Outcome> {
    let summary = read_image(source, &mut NullSink, "Verified")?;
    if summary.trailer.is_none() {
        bail!(
            "{}: the image has no END trailer (written by the original hot-clone, or cut short at a section boundary): its structure is sound but its completeness cannot be verified",
            source.name()
        );
    }
    Ok(Outcome {
        warnings: summary.incomplete_reasons(),
        summary,
    })
}

/// Restores `source` to `output`: a regular file (created or replaced) or
/// a block device.
pub fn reassemble(
    source: &ImageSource,
    output: &Path,
    options: Options,
) -> anyhow::Result<Outcome> {
    let target_is_device = fs::metadata(output)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let (summary, device_warnings) = if target_is_device {
        reassemble_to_device(source, output, options)?
    } else {
        (reassemble_to_file(source, output, options)?, Vec::new())
    };
    let mut warnings = summary.incomplete_reasons();
    if summary.trailer.is_none() {
        // Only reached with --allow-legacy: both targets refuse otherwise.
        assert!(
            options.allow_legacy,
            "a legacy image restored without --allow-legacy"
        );
        warnings.push(Warning::Legacy);
    }
    warnings.extend(device_warnings);
    Ok(Outcome { warnings, summary })
}

fn legacy_refusal(source: &ImageSource) -> anyhow::Error {
    anyhow!(
        "{}: the image has no END trailer, so a cut-short image cannot be told from a complete one (images of the original hot-clone have none). Pass --allow-legacy to restore it anyway",
        source.name()
    )
}

fn reassemble_to_file(
    source: &ImageSource,
    output: &Path,
    options: Options,
) -> anyhow::Result<Summary> {
    if output.exists() && !output.is_file() {
        bail!(
            "{}: not a regular file or a block device; refusing to write there",
            output.display()
        );
    }
    let temp = TempFile::create_beside(output)?;
    let mut sink = FileSink::new(temp.file.try_clone()?);
    let summary = read_image(source, &mut sink, "Restored").with_context(|| {
        format!(
            "restoring {} to {} failed; {} was not created or changed",
            source.name(),
            output.display(),
            output.display()
        )
    })?;
    if summary.trailer.is_none() && !options.allow_legacy {
        return Err(legacy_refusal(source))
            .context(format!("nothing was written to {}", output.display()));
    }
    sink.finish(summary.extent_bytes)
        .with_context(|| format!("finishing {}", temp.describe()))?;
    temp.persist(output)?;
    Ok(summary)
}

/// Writes the image onto a block device. An image file is verified whole
/// first; an image on stdin can only be verified as it is written, so the
/// banner's `size=` is checked against the device before the first write,
/// each extent as it comes, and the device's first and last MiB — where
/// partition tables, filesystem superblocks and the GPT backup live — are
/// held in memory and written only once the trailer verified. A stream that
/// fails midway therefore leaves the device's ends as they were: a partial
/// middle, never a disk that looks bootable or mountable but is half old.
fn reassemble_to_device(
    source: &ImageSource,
    output: &Path,
    options: Options,
) -> anyhow::Result<(Summary, Vec<Warning>)> {
    let name = output.display();
    let target = Target::open(output)?;
    // A file image is checked whole before the device is touched; a stream
    // can only be checked as it is written.
    if let ImageSource::File(_) = source {
        check_before_writing(source, options, &name.to_string(), target.device_bytes)?;
    }

    let mut sink = DeviceSink::new(target.file, target.device_bytes, output);
    let result = read_image(source, &mut sink, "Restored");
    let summary = result.map_err(|e| {
        if sink.bytes_written == 0 {
            // Held bytes are written only after the image verified.
            return e.context(format!("nothing was written to {name}"));
        }
        e.context(format!(
            "restore to {name} stopped after {} complete sections (the last complete one ended at device byte {}), with {} bytes written to {name}; its first and last MiB (partition tables, superblocks, the GPT backup) were held back and still hold what they held before, and the bytes between hold a partial image. Restore a complete image before using {name}",
            sink.sections_done, sink.last_section_end_bytes, sink.bytes_written
        ))
    })?;
    sink.file
        .sync_all()
        .with_context(|| format!("flushing {name}"))?;
    if summary.trailer.is_none() && !options.allow_legacy {
        return Err(legacy_refusal(source)).context(format!(
            "the stream was written onto {name} except its first and last MiB, which were held back and not written"
        ));
    }
    sink.write_held()?;
    sink.file
        .sync_all()
        .with_context(|| format!("flushing {name}"))?;
    sink.drop_synced();
    let warnings = target_warnings(
        &name.to_string(),
        target.dev,
        &summary,
        target.logical_block_bytes,
        &sink.file,
    );
    Ok((summary, warnings))
}

/// The block device a restore writes: refused while anything uses it or
/// one of its partitions, then opened exclusively.
struct Target {
    dev: DevNum,
    /// Read as well as write: the held ranges start as the device's content.
    file: File,
    device_bytes: u64,
    logical_block_bytes: u32,
}

impl Target {
    fn open(output: &Path) -> anyhow::Result<Target> {
        let name = output.display();
        let dev = DevNum::of_path(output)?.expect("checked to be a block device");
        let uses = blockdev::uses_with_partitions(dev);
        if !uses.is_empty() {
            bail!(
                "{name} is in use, refusing to restore onto it: {}",
                uses.join("; ")
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(output)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => anyhow!(
                    "{name} is in use (the kernel holds it: mounted, swap, RAID or LVM member); refusing to restore onto it"
                ),
                _ => anyhow!(e).context(format!("cannot open {name} for writing")),
            })?;
        let device_bytes = blockdev::size_bytes(&file)
            .with_context(|| format!("cannot read the size of {name}"))?;
        let logical_block_bytes = blockdev::logical_block_bytes(&file)
            .with_context(|| format!("cannot read the logical block size of {name}"))?;
        Ok(Target {
            dev,
            file,
            device_bytes,
            logical_block_bytes,
        })
    }
}

/// An image file, read whole before the device `name` is written: it must verify
/// (or be a legacy image the caller allowed) and fit.
fn check_before_writing(
    source: &ImageSource,
    options: Options,
    name: &str,
    device_bytes: u64,
) -> anyhow::Result<()> {
    let checked = read_image(source, &mut NullSink, "Checked").with_context(|| {
        format!(
            "checking {} before writing; nothing was written to {name}",
            source.name()
        )
    })?;
    if checked.trailer.is_none() && !options.allow_legacy {
        return Err(legacy_refusal(source)).context(format!("nothing was written to {name}"));
    }
    if checked.extent_bytes > device_bytes {
        bail!(
            "{name} holds {device_bytes} bytes ({}), the image needs {} ({}); nothing was written",
            Bytes(device_bytes),
            checked.extent_bytes,
            Bytes(checked.extent_bytes)
        );
    }
    Ok(())
}

/// What a finished restore onto a device warns about: a logical block size
/// other than the imaged device's, and a partition table the kernel could
/// not re-read.
fn target_warnings(
    name: &str,
    dev: DevNum,
    summary: &Summary,
    logical_block_bytes: u32,
    file: &File,
) -> Vec<Warning> {
    let mut warnings = Vec::new();
    if let Some(image_bytes) = summary.banner.meta.logical_block_bytes
        && image_bytes != u64::from(logical_block_bytes)
    {
        warnings.push(Warning::LogicalBlockMismatch {
            target: name.to_string(),
            image_bytes,
            target_bytes: u64::from(logical_block_bytes),
        });
    }
    // A whole disk's partition devices still show the layout the kernel
    // read before; a partition has no table of its own.
    if !blockdev::is_partition(dev)
        && let Err(e) = blockdev::reread_partitions(file)
        && e.raw_os_error() != Some(libc::EINVAL)
    {
        warnings.push(Warning::PartitionRereadFailed {
            target: name.to_string(),
            error: e.to_string(),
        });
    }
    warnings
}

/// Image buffers in flight between the parsing thread and the sink.
const PIPELINE_BUFFERS: usize = 4;

/// What the parsing thread hands to the sink side, in image order.
enum Step {
    Record(Record),
    /// Section data for device byte `offset_bytes`; the image reader stood
    /// at `image_offset` after reading it.
    Data {
        offset_bytes: u64,
        buf: Vec<u8>,
        len: usize,
        image_offset: u64,
    },
    SectionDone(ByteExtent),
    Finished {
        image_bytes: u64,
    },
}

/// Reads every record of the image at `source` and hands its content to
/// `sink`, with a progress line on stderr.
fn read_image(
    source: &ImageSource,
    sink: &mut dyn Sink,
    verb: &'static str,
) -> anyhow::Result<Summary> {
    let (input, total_bytes) = source.open()?;
    let mut progress = Progress::new(verb, total_bytes);
    let summary = read_stream_with(
        input,
        &source.name(),
        sink,
        CHUNK_BYTES,
        Some(&mut progress),
    )?;
    progress.done(summary.image_bytes);
    Ok(summary)
}

/// Reads every record of the image `input` (named `name` in errors) and
/// hands its content to `sink`, section data in chunks of at most
/// `chunk_bytes`. The path `reassemble` and `verify` take, without the
/// progress line; public so that tests and fuzz targets can drive it from
/// memory into a sink of their own.
pub fn read_stream(
    input: Box<dyn BufRead + Send>,
    name: &str,
    sink: &mut dyn Sink,
    chunk_bytes: usize,
) -> anyhow::Result<Summary> {
    read_stream_with(input, name, sink, chunk_bytes, None)
}

/// Two threads: one parses the image and checks its CRC, the calling one
/// writes, so that reading and writing overlap (the machine has two cores
/// and a restore is a copy). Buffers go round a fixed pool, allocated here
/// and sized by `chunk_bytes`, never by the image.
fn read_stream_with(
    input: Box<dyn BufRead + Send>,
    name: &str,
    sink: &mut dyn Sink,
    chunk_bytes: usize,
    mut progress: Option<&mut Progress>,
) -> anyhow::Result<Summary> {
    assert!(
        (1..=CHUNK_BYTES).contains(&chunk_bytes),
        "chunk of {chunk_bytes} bytes"
    );
    let mut reader = ImageReader::new(input).map_err(|e| match signals::check() {
        Err(interrupted) => anyhow::Error::from(interrupted),
        Ok(()) => at_image(name, e),
    })?;
    let mut summary = Summary {
        banner: reader.banner().clone(),
        extent_bytes: reader.banner().meta.device_bytes.unwrap_or(0),
        ..Summary::default()
    };
    sink.begin(&summary.banner)?;
    let (step_tx, step_rx) = sync_channel::<anyhow::Result<Step>>(PIPELINE_BUFFERS + 2);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(PIPELINE_BUFFERS);
    for _ in 0..PIPELINE_BUFFERS {
        free_tx
            .send(vec![0u8; chunk_bytes])
            .expect("room for the pool");
    }
    let parser_name = name.to_string();
    // On an error on this side the channels close and the parser stops at
    // its next send or receive; it is not joined (it may be blocked reading
    // stdin), and the process exits soon after.
    let parser = thread::Builder::new()
        .name("image-parser".into())
        .spawn(move || {
            if let Err(e) = parse_steps(&mut reader, &step_tx, &free_rx, &parser_name) {
                let _ = step_tx.send(Err(e));
            }
        })
        .context("cannot start the image parsing thread")?;

    loop {
        match next_step(&step_rx)? {
            Step::Record(record) => summary.count(record, sink)?,
            Step::Data {
                offset_bytes,
                buf,
                len,
                image_offset,
            } => {
                sink.write(offset_bytes, &buf[..len])?;
                let _ = free_tx.send(buf);
                if let Some(progress) = progress.as_deref_mut() {
                    progress.tick(image_offset);
                }
            }
            Step::SectionDone(extent) => {
                sink.section_done(extent);
                summary.sections = summary.sections.saturating_add(1);
                summary.data_bytes = summary.data_bytes.saturating_add(extent.len_bytes);
            }
            Step::Finished { image_bytes } => {
                summary.image_bytes = image_bytes;
                break;
            }
        }
    }
    parser
        .join()
        .map_err(|_| anyhow!("the image parsing thread panicked"))?;
    Ok(summary)
}

/// The parser's next step. Woken at least every [`SIGNAL_CHECK_INTERVAL`],
/// so that a signal ends a restore whose input stalls (the parser thread may
/// sit in a read of stdin).
fn next_step(steps: &Receiver<anyhow::Result<Step>>) -> anyhow::Result<Step> {
    let step = loop {
        match steps.recv_timeout(SIGNAL_CHECK_INTERVAL) {
            Ok(step) => {
                signals::check()?;
                break step?;
            }
            Err(RecvTimeoutError::Timeout) => signals::check()?,
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the image parsing thread stopped unexpectedly")
            }
        }
    };
    signals::check()?;
    Ok(step)
}

impl Summary {
    /// Hands one record to `sink` (an extent is admitted; a `Z:` or `B:`
    /// one is zeroed whole) and counts it.
    fn count(&mut self, record: Record, sink: &mut dyn Sink) -> anyhow::Result<()> {
        match record {
            Record::Data(extent) => sink.admit(extent)?,
            Record::Zero(extent) => {
                sink.admit(extent)?;
                sink.zero(extent.offset_bytes, extent.len_bytes)?;
                self.zero_bytes = self.zero_bytes.saturating_add(extent.len_bytes);
            }
            Record::Bad(extent) => {
                sink.admit(extent)?;
                sink.zero(extent.offset_bytes, extent.len_bytes)?;
                self.bad_range_count = self.bad_range_count.saturating_add(1);
                self.bad_bytes = self.bad_bytes.saturating_add(extent.len_bytes);
                if self.bad_ranges.len() < BAD_RANGES_LISTED_MAX {
                    self.bad_ranges.push(extent);
                }
            }
            Record::State(state) => self.state = Some(state),
            Record::End(trailer) => self.trailer = Some(trailer),
        }
        if let Record::Data(e) | Record::Zero(e) | Record::Bad(e) = record {
            self.extent_bytes = self.extent_bytes.max(e.end_bytes());
        }
        Ok(())
    }
}

/// The parsing thread: every record and every chunk of section data, in order.
fn parse_steps(
    reader: &mut ImageReader<Box<dyn BufRead + Send>>,
    steps: &SyncSender<anyhow::Result<Step>>,
    free: &Receiver<Vec<u8>>,
    source: &str,
) -> anyhow::Result<()> {
    // A closed channel means the sink side stopped; it reports why.
    let closed = || anyhow!("the restore stopped");
    // The buffer that found a section's end is kept for the next section.
    let mut spare: Option<Vec<u8>> = None;
    while let Some(record) = reader.next_record().map_err(|e| at_image(source, e))? {
        signals::check()?;
        steps.send(Ok(Step::Record(record))).map_err(|_| closed())?;
        let Record::Data(extent) = record else {
            continue;
        };
        let mut offset_bytes = extent.offset_bytes;
        loop {
            let mut buf = match spare.take() {
                Some(buf) => buf,
                None => free.recv().map_err(|_| closed())?,
            };
            let len = reader
                .read_data(&mut buf)
                .map_err(|e| at_image(source, e))?;
            if len == 0 {
                spare = Some(buf);
                break;
            }
            let step = Step::Data {
                offset_bytes,
                buf,
                len,
                image_offset: reader.offset(),
            };
            steps.send(Ok(step)).map_err(|_| closed())?;
            offset_bytes += len as u64;
            signals::check()?;
        }
        steps
            .send(Ok(Step::SectionDone(extent)))
            .map_err(|_| closed())?;
    }
    let finished = Step::Finished {
        image_bytes: reader.offset(),
    };
    steps.send(Ok(finished)).map_err(|_| closed())
}

fn at_image(source: &str, error: FormatError) -> anyhow::Error {
    anyhow!(error).context(format!("bad image {source}"))
}

/// Where restored bytes go. Called in image order: `begin` once, then for
/// each extent record `admit`, then its data (`write`, in order, within the
/// extent) or its zeros (`zero`, the whole extent at once), and
/// `section_done` after the last byte of an `S:` section. Every extent has
/// been checked by the reader (its end fits in 64 bits and does not pass the
/// banner's `size=`); nothing is known to be verified until the call
/// returns Ok — the trailer comes last.
pub trait Sink {
    /// Refuses an image the target cannot take, before anything is written.
    fn begin(&mut self, _banner: &Banner) -> anyhow::Result<()> {
        Ok(())
    }
    /// Refuses an extent the target cannot hold, before any of it is written.
    fn admit(&mut self, _extent: ByteExtent) -> anyhow::Result<()> {
        Ok(())
    }
    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> anyhow::Result<()>;
    fn zero(&mut self, offset_bytes: u64, len_bytes: u64) -> anyhow::Result<()>;
    fn section_done(&mut self, _extent: ByteExtent) {}
}

/// `verify`: everything is read and checked, nothing is written.
pub struct NullSink;

impl Sink for NullSink {
    fn write(&mut self, _: u64, _: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
    fn zero(&mut self, _: u64, _: u64) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A new regular file, written sparsely: all-zero 4 KiB blocks are never
/// written, and zeros over earlier data are punched out. What is written
/// leaves the page cache behind the writer ([`DropBehind`]).
struct FileSink {
    file: File,
    drop_behind: Option<DropBehind>,
    /// No byte at or past this offset has been written: it reads as zero.
    high_water_bytes: u64,
    extent_bytes: u64,
    punch_hole_works: bool,
}

impl FileSink {
    fn new(file: File) -> Self {
        FileSink {
            drop_behind: DropBehind::for_file(&file),
            file,
            high_water_bytes: 0,
            extent_bytes: 0,
            punch_hole_works: true,
        }
    }

    fn finish(&mut self, extent_bytes: u64) -> io::Result<()> {
        let extent_bytes = extent_bytes.max(self.extent_bytes);
        assert!(self.high_water_bytes <= extent_bytes);
        self.file.set_len(extent_bytes)?;
        self.file.sync_all()?;
        if self.drop_behind.is_some() {
            // Advice: a failure only leaves pages cached.
            let _ = DropBehind::drop_synced(&self.file);
        }
        Ok(())
    }

    fn wrote(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), DropFailed> {
        match &mut self.drop_behind {
            Some(drop_behind) => drop_behind.wrote_at(&self.file, offset_bytes, len_bytes),
            None => Ok(()),
        }
    }

    fn write_zeros(&mut self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let zeros = vec![0u8; CHUNK_BYTES.min(len_bytes as usize)];
        let mut done = 0;
        while done < len_bytes {
            let n = zeros.len().min((len_bytes - done) as usize);
            self.file.write_all_at(&zeros[..n], offset_bytes + done)?;
            self.wrote(offset_bytes + done, n as u64)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> anyhow::Result<()> {
        // Runs of whole-or-partial 4 KiB blocks, split at absolute block
        // boundaries, alternating between data and zeros.
        let block_end = |at: usize| {
            let to_boundary = SPARSE_BLOCK_BYTES - (offset_bytes + at as u64) % SPARSE_BLOCK_BYTES;
            data.len().min(at + to_boundary as usize)
        };
        let mut start = 0;
        while start < data.len() {
            let mut end = block_end(start);
            let zero = is_zero(&data[start..end]);
            while end < data.len() {
                let next = block_end(end);
                if is_zero(&data[end..next]) != zero {
                    break;
                }
                end = next;
            }
            let at = offset_bytes + start as u64;
            if zero {
                self.zero(at, (end - start) as u64)?;
            } else {
                self.file
                    .write_all_at(&data[start..end], at)
                    .with_context(|| format!("writing {} bytes at byte {at}", end - start))?;
                self.wrote(at, (end - start) as u64)?;
                self.high_water_bytes = self.high_water_bytes.max(at + (end - start) as u64);
            }
            start = end;
        }
        self.extent_bytes = self.extent_bytes.max(offset_bytes + data.len() as u64);
        Ok(())
    }

    fn zero(&mut self, offset_bytes: u64, len_bytes: u64) -> anyhow::Result<()> {
        let end_bytes = offset_bytes + len_bytes;
        self.extent_bytes = self.extent_bytes.max(end_bytes);
        // Past the high-water mark the file already reads as zeros.
        let written_end = end_bytes.min(self.high_water_bytes);
        if written_end <= offset_bytes {
            return Ok(());
        }
        let len = written_end - offset_bytes;
        if self.punch_hole_works {
            use nix::fcntl::{FallocateFlags, fallocate};
            match fallocate(
                &self.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset_bytes as libc::off_t,
                len as libc::off_t,
            ) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EOPNOTSUPP) => {}
                Err(errno) => {
                    return Err(anyhow!(io::Error::from(errno)).context(format!(
                        "punching a hole of {len} bytes at byte {offset_bytes}"
                    )));
                }
            }
            self.punch_hole_works = false;
        }
        self.write_zeros(offset_bytes, len)
            .with_context(|| format!("writing {len} zero bytes at byte {offset_bytes}"))
    }
}

/// True when every byte is zero; written so that it vectorises.
fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// Bytes at each end of a target device held in memory until the image
/// verified: covers the MBR and the primary GPT (sectors 0..34 with 512-byte
/// sectors, 0..6 with 4 KiB ones), the usual 1 MiB partition alignment gap,
/// ext4/XFS/btrfs superblocks at the start of a whole-disk filesystem, and
/// the backup GPT and MD/ZFS labels at the end.
const HELD_BYTES: u64 = 1 << 20;
/// The target's first and last MiB, and the last MiB of the device the
/// image was taken from when that was smaller (its backup GPT lands there).
const HELD_RANGES_MAX: usize = 3;
/// A write splits into at most one piece per held range and one before
/// each, plus one after the last.
const PIECES_MAX: usize = 2 * HELD_RANGES_MAX + 1;

/// Where a piece of a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Device,
    /// Into the held range of this index.
    Held(usize),
}

/// One held range: the bytes the device will have there once the image
/// verified (its old content, overwritten by the image as it arrives).
struct HeldRange {
    start_bytes: u64,
    data: Vec<u8>,
}

impl HeldRange {
    fn end_bytes(&self) -> u64 {
        self.start_bytes + self.data.len() as u64
    }
}

/// The ranges to hold for a device of `device_bytes` and an image of a
/// device of `image_device_bytes` (its `size=`, if any): sorted, disjoint,
/// none empty, at most [`HELD_RANGES_MAX`].
fn held_ranges(device_bytes: u64, image_device_bytes: Option<u64>) -> Vec<(u64, u64)> {
    let mut ranges = Vec::with_capacity(HELD_RANGES_MAX);
    ranges.push((0, HELD_BYTES.min(device_bytes)));
    ranges.push((device_bytes.saturating_sub(HELD_BYTES), device_bytes));
    if let Some(image_bytes) = image_device_bytes.filter(|&b| b < device_bytes) {
        ranges.push((image_bytes.saturating_sub(HELD_BYTES), image_bytes));
    }
    ranges.retain(|&(start, end)| start < end);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(HELD_RANGES_MAX);
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    assert!(merged.len() <= HELD_RANGES_MAX);
    merged
}

/// Splits `len_bytes` at `offset_bytes` at the edges of `held` (sorted and
/// disjoint) into pieces `(offset, len, place)`, in order. The caller
/// guarantees the range fits in 64 bits (the reader checked the extent).
fn pieces(
    held: &[HeldRange],
    offset_bytes: u64,
    len_bytes: u64,
) -> ([(u64, u64, Place); PIECES_MAX], usize) {
    let end_bytes = offset_bytes
        .checked_add(len_bytes)
        .expect("the reader checked the extent");
    let mut out = [(0, 0, Place::Device); PIECES_MAX];
    let mut count = 0;
    let mut at = offset_bytes;
    for (index, range) in held.iter().enumerate() {
        if range.end_bytes() <= at {
            continue;
        }
        if range.start_bytes >= end_bytes {
            break;
        }
        if at < range.start_bytes {
            out[count] = (at, range.start_bytes - at, Place::Device);
            count += 1;
            at = range.start_bytes;
        }
        let stop = range.end_bytes().min(end_bytes);
        out[count] = (at, stop - at, Place::Held(index));
        count += 1;
        at = stop;
    }
    if at < end_bytes {
        out[count] = (at, end_bytes - at, Place::Device);
        count += 1;
    }
    (out, count)
}

/// A block device: every byte written, zeros included; extents past its end
/// refused before any of their bytes is written; its ends held back until
/// [`write_held`](Self::write_held).
struct DeviceSink {
    file: File,
    /// The device's page cache is dropped behind the writer too.
    drop_behind: Option<DropBehind>,
    name: String,
    device_bytes: u64,
    /// Empty until `begin`; then sorted, disjoint, at most
    /// [`HELD_RANGES_MAX`] of at most [`HELD_BYTES`] each.
    held: Vec<HeldRange>,
    /// Bytes that reached the device (held ones once written).
    bytes_written: u64,
    sections_done: u64,
    last_section_end_bytes: u64,
    zeros: Vec<u8>,
}

impl DeviceSink {
    fn new(file: File, device_bytes: u64, path: &Path) -> Self {
        DeviceSink {
            drop_behind: DropBehind::for_file(&file),
            file,
            name: path.display().to_string(),
            device_bytes,
            held: Vec::new(),
            bytes_written: 0,
            sections_done: 0,
            last_section_end_bytes: 0,
            zeros: Vec::new(),
        }
    }

    fn write_direct(&mut self, offset_bytes: u64, data: &[u8]) -> anyhow::Result<()> {
        self.file
            .write_all_at(data, offset_bytes)
            .with_context(|| {
                format!(
                    "writing {} bytes at byte {offset_bytes} of {}",
                    data.len(),
                    self.name
                )
            })?;
        self.bytes_written = self.bytes_written.saturating_add(data.len() as u64);
        self.wrote(offset_bytes, data.len() as u64)
    }

    fn wrote(&mut self, offset_bytes: u64, len_bytes: u64) -> anyhow::Result<()> {
        if let Some(drop_behind) = &mut self.drop_behind {
            drop_behind
                .wrote_at(&self.file, offset_bytes, len_bytes)
                .with_context(|| format!("writing to {}", self.name))?;
        }
        Ok(())
    }

    /// After the last sync: the restored device leaves the page cache.
    fn drop_synced(&self) {
        if self.drop_behind.is_some() {
            // Advice: a failure only leaves pages cached.
            let _ = DropBehind::drop_synced(&self.file);
        }
    }

    fn zero_direct(&mut self, offset_bytes: u64, len_bytes: u64) -> anyhow::Result<()> {
        if self.zeros.is_empty() {
            self.zeros = vec![0u8; CHUNK_BYTES];
        }
        let mut done = 0;
        while done < len_bytes {
            let n = CHUNK_BYTES.min((len_bytes - done) as usize);
            let at = offset_bytes + done;
            self.file
                .write_all_at(&self.zeros[..n], at)
                .with_context(|| format!("writing {n} zero bytes at byte {at} of {}", self.name))?;
            self.bytes_written = self.bytes_written.saturating_add(n as u64);
            self.wrote(at, n as u64)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Writes the held ranges: called once the image verified.
    fn write_held(&mut self) -> anyhow::Result<()> {
        let held = std::mem::take(&mut self.held);
        for range in &held {
            self.write_direct(range.start_bytes, &range.data)
                .context("writing the held-back first and last MiB after the image verified")?;
        }
        Ok(())
    }
}

impl Sink for DeviceSink {
    fn begin(&mut self, banner: &Banner) -> anyhow::Result<()> {
        if let Some(image_bytes) = banner.meta.device_bytes
            && image_bytes > self.device_bytes
        {
            bail!(
                "the image is of a device of {image_bytes} bytes ({}, the size= in its banner), {} holds only {} bytes ({}); nothing was written. Restore it onto a device at least that large",
                Bytes(image_bytes),
                self.name,
                self.device_bytes,
                Bytes(self.device_bytes)
            );
        }
        for (start, end) in held_ranges(self.device_bytes, banner.meta.device_bytes) {
            let mut data = vec![0u8; (end - start) as usize];
            self.file.read_exact_at(&mut data, start).with_context(|| {
                format!(
                    "reading bytes {start}..{end} of {} to hold them until the image verified; nothing was written",
                    self.name
                )
            })?;
            self.held.push(HeldRange {
                start_bytes: start,
                data,
            });
        }
        Ok(())
    }

    fn admit(&mut self, extent: ByteExtent) -> anyhow::Result<()> {
        let end = extent.end_bytes();
        if end > self.device_bytes {
            bail!(
                "the image has a section at sector {} of {} bytes, ending at byte {end}, past the end of {} ({} bytes)",
                extent.sector_first(),
                extent.len_bytes,
                self.name,
                self.device_bytes
            );
        }
        Ok(())
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> anyhow::Result<()> {
        let (pieces, count) = pieces(&self.held, offset_bytes, data.len() as u64);
        for &(at, len, place) in &pieces[..count] {
            let from = (at - offset_bytes) as usize;
            let part = &data[from..from + len as usize];
            match place {
                Place::Device => self.write_direct(at, part)?,
                Place::Held(index) => {
                    let range = &mut self.held[index];
                    let into = (at - range.start_bytes) as usize;
                    range.data[into..into + part.len()].copy_from_slice(part);
                }
            }
        }
        Ok(())
    }

    fn zero(&mut self, offset_bytes: u64, len_bytes: u64) -> anyhow::Result<()> {
        let (pieces, count) = pieces(&self.held, offset_bytes, len_bytes);
        for &(at, len, place) in &pieces[..count] {
            match place {
                Place::Device => self.zero_direct(at, len)?,
                Place::Held(index) => {
                    let range = &mut self.held[index];
                    let into = (at - range.start_bytes) as usize;
                    range.data[into..into + len as usize].fill(0);
                }
            }
        }
        Ok(())
    }

    fn section_done(&mut self, extent: ByteExtent) {
        self.sections_done = self.sections_done.saturating_add(1);
        self.last_section_end_bytes = extent.end_bytes();
    }
}

/// The file a restore writes before it is complete. Where the filesystem
/// offers `O_TMPFILE` it is unnamed — an inode in the output's directory
/// with no name, freed by the kernel when the process ends however it ends,
/// so even a SIGKILL leaves no multi-GiB leftover — and gets a name only
/// once the image verified. Elsewhere it is `.NAME.hc-partial-PID`, removed
/// on every path this process survives.
struct TempFile {
    file: File,
    dir: PathBuf,
    /// The name it has on disk, if any: the named fallback from the start,
    /// the unnamed file once linked. Removed on drop unless persisted.
    path: Option<PathBuf>,
    /// Where the unnamed file is linked before the rename.
    named_path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn create_beside(output: &Path) -> anyhow::Result<TempFile> {
        let name = output
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a file name", output.display()))?;
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".hc-partial-{}", std::process::id()));
        let named_path = dir.join(temp_name);
        match Self::create_unnamed(&dir) {
            Ok(file) => Ok(TempFile {
                file,
                dir,
                path: None,
                named_path,
                persisted: false,
            }),
            // The filesystem (or kernel) has no O_TMPFILE.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                Self::create_named(dir, named_path)
            }
            Err(e) => Err(anyhow!(e).context(format!(
                "cannot create a temporary file in {}",
                dir.display()
            ))),
        }
    }

    fn create_unnamed(dir: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
    }

    fn create_named(dir: PathBuf, path: PathBuf) -> anyhow::Result<TempFile> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempFile {
            file,
            dir,
            path: Some(path.clone()),
            named_path: path,
            persisted: false,
        })
    }

    fn is_unnamed(&self) -> bool {
        self.path.is_none()
    }

    /// For messages: the name, or what the unnamed file is.
    fn describe(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => format!(
                "the unnamed temporary file (O_TMPFILE) in {}",
                self.dir.display()
            ),
        }
    }

    /// Gives the unnamed file the name `named_path` (linkat through
    /// /proc/self/fd, which needs no privilege; AT_EMPTY_PATH where /proc
    /// is missing, which needs CAP_DAC_READ_SEARCH).
    fn link(&mut self) -> anyhow::Result<()> {
        use nix::fcntl::{AT_FDCWD, AtFlags};
        use nix::unistd::linkat;
        let target = self.named_path.as_path();
        if target.as_os_str().as_bytes().contains(&0) {
            bail!("{}: a NUL byte in the path", target.display());
        }
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let linked = match linkat(
            AT_FDCWD,
            proc_path.as_str(),
            AT_FDCWD,
            target,
            AtFlags::AT_SYMLINK_FOLLOW,
        ) {
            // No /proc: the empty path names the fd itself.
            Err(nix::errno::Errno::ENOENT) => {
                linkat(&self.file, "", AT_FDCWD, target, AtFlags::AT_EMPTY_PATH)
            }
            other => other,
        };
        if let Err(errno) = linked {
            return Err(anyhow!(io::Error::from(errno)).context(format!(
                "cannot give {} the name {}",
                self.describe(),
                self.named_path.display()
            )));
        }
        self.path = Some(self.named_path.clone());
        Ok(())
    }

    /// Puts the finished, flushed file in place at `output` (replacing any
    /// file there in one rename), then flushes the directory so that the
    /// new name survives a crash.
    fn persist(mut self, output: &Path) -> anyhow::Result<()> {
        if self.is_unnamed() {
            // Only now does the file get a name: a kill before this point
            // leaves nothing; one between here and the rename leaves it
            // under the temporary name, as the named fallback would.
            self.link()?;
        }
        let path = self.path.clone().expect("named by now");
        fs::rename(&path, output)
            .with_context(|| format!("cannot rename {} to {}", path.display(), output.display()))?;
        self.persisted = true;
        let dir_error = |e: io::Error| {
            anyhow!(e).context(format!(
                "{} is in place, but its directory {} could not be flushed: the new name may not survive a crash (run sync, or restore again)",
                output.display(),
                self.dir.display()
            ))
        };
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(dir_error)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted
            && let Some(path) = &self.path
        {
            let _ = fs::remove_file(path);
        }
    }
}

/// The once-a-second progress line on stderr.
struct Progress {
    verb: &'static str,
    total_bytes: Option<u64>,
    started: Instant,
    last_shown: Instant,
}

impl Progress {
    fn new(verb: &'static str, total_bytes: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            verb,
            total_bytes,
            started: now,
            last_shown: now,
        }
    }

    fn tick(&mut self, image_bytes: u64) {
        if self.last_shown.elapsed() >= PROGRESS_INTERVAL {
            self.last_shown = Instant::now();
            self.show(image_bytes);
        }
    }

    fn done(&mut self, image_bytes: u64) {
        if self.started.elapsed() >= PROGRESS_INTERVAL {
            self.show(image_bytes);
        }
    }

    fn show(&self, image_bytes: u64) {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = image_bytes as f64 / seconds;
        match self.total_bytes {
            Some(total) if total > 0 => eprintln!(
                "{} {} of {} of image ({}, {:.0}%)",
                self.verb,
                Bytes(image_bytes),
                Bytes(total),
                Rate(rate),
                image_bytes as f64 * 100.0 / total as f64
            ),
            _ => eprintln!(
                "{} {} of image ({})",
                self.verb,
                Bytes(image_bytes),
                Rate(rate)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn held_ranges_are_the_ends_merged() {
        assert_eq!(held_ranges(0, None), []);
        assert_eq!(held_ranges(4096, None), [(0, 4096)]);
        assert_eq!(held_ranges(MIB + 512, None), [(0, MIB + 512)]);
        assert_eq!(held_ranges(2 * MIB, None), [(0, 2 * MIB)]);
        assert_eq!(held_ranges(8 * MIB, None), [(0, MIB), (7 * MIB, 8 * MIB)]);
        // The source device was smaller: its own last MiB is held too.
        assert_eq!(
            held_ranges(8 * MIB, Some(5 * MIB + 7)),
            [(0, MIB), (4 * MIB + 7, 5 * MIB + 7), (7 * MIB, 8 * MIB)]
        );
        assert_eq!(
            held_ranges(8 * MIB, Some(MIB / 2)),
            [(0, MIB), (7 * MIB, 8 * MIB)]
        );
        assert_eq!(
            held_ranges(8 * MIB, Some(7 * MIB + 1)),
            [(0, MIB), (6 * MIB + 1, 8 * MIB)]
        );
        assert_eq!(
            held_ranges(8 * MIB, Some(u64::MAX)),
            [(0, MIB), (7 * MIB, 8 * MIB)]
        );
    }

    /// A write or zero extent of a restore onto a device of `device_bytes`.
    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: u64, seed: u8 },
        Zero { offset: u64, len: u64 },
    }

    fn ops(device_bytes: u64) -> impl Strategy<Value = Vec<Op>> {
        // Offsets cluster round the held ranges' edges, where splitting errs.
        let edges = [
            0,
            1,
            MIB - 1,
            MIB,
            MIB + 1,
            device_bytes - MIB,
            device_bytes - 1,
        ];
        let offset = prop_oneof![proptest::sample::select(edges.to_vec()), 0..device_bytes,];
        let op = (offset, 0..(MIB + MIB / 2), any::<u8>(), any::<bool>()).prop_map(
            move |(offset, len, seed, zero)| {
                let len = len.min(device_bytes - offset);
                if zero {
                    Op::Zero { offset, len }
                } else {
                    Op::Write { offset, len, seed }
                }
            },
        );
        proptest::collection::vec(op, 0..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Until write_held, the held ranges of the target are untouched
        /// and everything else is written as it comes; after it, the target
        /// equals the writes applied in order.
        #[test]
        fn device_sink_holds_the_ends_until_the_image_verified(
            device_kib in 2048u64..4096,
            ops in ops(4096 << 10).no_shrink(),
        ) {
            let device_bytes = device_kib << 10;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("device");
            let before: Vec<u8> = (0..device_bytes).map(|i| (i % 251) as u8 | 0x80).collect();
            fs::write(&path, &before).unwrap();
            let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut sink = DeviceSink::new(file, device_bytes, &path);
            sink.begin(&Banner::plain()).unwrap();
            let held = held_ranges(device_bytes, None);
            let mut expected = before.clone();
            for op in &ops {
                match *op {
                    Op::Write { offset, len, seed } => {
                        let (offset, len) = clamp(offset, len, device_bytes);
                        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ 0x5a).collect();
                        sink.write(offset, &data).unwrap();
                        expected[offset as usize..][..len as usize].copy_from_slice(&data);
                    }
                    Op::Zero { offset, len } => {
                        let (offset, len) = clamp(offset, len, device_bytes);
                        sink.zero(offset, len).unwrap();
                        expected[offset as usize..][..len as usize].fill(0);
                    }
                }
            }
            let midway = fs::read(&path).unwrap();
            for (start, end) in &held {
                let range = *start as usize..*end as usize;
                prop_assert!(midway[range.clone()] == before[range.clone()], "held range {range:?} was written");
            }
            let mut at = 0u64;
            for &(start, end) in held.iter().chain([(device_bytes, device_bytes)].iter()) {
                let gap = at as usize..start as usize;
                prop_assert!(midway[gap.clone()] == expected[gap.clone()], "bytes in {gap:?}, outside the held ranges, differ");
                at = end;
            }
            sink.write_held().unwrap();
            prop_assert!(fs::read(&path).unwrap() == expected);
        }
    }

    #[test]
    fn unnamed_temporary_gets_a_name_only_when_persisted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.img");
        // The system temp dir here is ext4, which has O_TMPFILE.
        let temp = TempFile::create_beside(&out).unwrap();
        assert!(temp.is_unnamed(), "{}", temp.describe());
        temp.file.write_all_at(b"abandoned", 0).unwrap();
        assert!(hc_test_kit::listing(dir.path()).is_empty());
        drop(temp);
        assert!(hc_test_kit::listing(dir.path()).is_empty());

        let temp = TempFile::create_beside(&out).unwrap();
        temp.file.write_all_at(b"restored", 0).unwrap();
        temp.file.sync_all().unwrap();
        temp.persist(&out).unwrap();
        assert_eq!(hc_test_kit::listing(dir.path()), ["out.img"]);
        assert_eq!(fs::read(&out).unwrap(), b"restored");
        let mode = fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn named_temporary_is_removed_unless_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.img");
        fs::write(&out, b"old").unwrap();
        let temp_path = dir.path().join(".out.img.hc-partial-1");
        let temp = TempFile::create_named(dir.path().into(), temp_path.clone()).unwrap();
        assert!(!temp.is_unnamed());
        assert_eq!(
            hc_test_kit::listing(dir.path()),
            [".out.img.hc-partial-1", "out.img"]
        );
        drop(temp);
        assert_eq!(hc_test_kit::listing(dir.path()), ["out.img"]);

        let temp = TempFile::create_named(dir.path().into(), temp_path).unwrap();
        temp.file.write_all_at(b"new", 0).unwrap();
        temp.persist(&out).unwrap();
        assert_eq!(hc_test_kit::listing(dir.path()), ["out.img"]);
        assert_eq!(fs::read(&out).unwrap(), b"new");
    }

    fn clamp(offset: u64, len: u64, device_bytes: u64) -> (u64, u64) {
        let offset = offset.min(device_bytes);
        (offset, len.min(device_bytes - offset))
    }

    #[test]
    fn is_zero_sees_every_byte() {
        for len in [0, 1, 63, 64, 65, 4096, 4097] {
            let mut bytes = vec![0u8; len];
            assert!(is_zero(&bytes));
            for i in 0..len {
                bytes[i] = 1;
                assert!(!is_zero(&bytes), "len {len} byte {i}");
                bytes[i] = 0;
            }
        }
    }
}
