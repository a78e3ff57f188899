//! The command line: one clap definition drives parsing and `--help`; the
//! original tool's single-dash spelling is rewritten into it first.

use crate::demo::{self, DemoOptions};
use crate::engine::{Choice, EngineConfig};
use crate::exit::Exit;
use crate::image::{self, DirtyMapMemory, ImageOptions, Output};
use crate::restore::{self, ImageSource, Options};
use crate::signals;
use crate::trace::live::{SourceConfig, SourceKind};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    done; the result is complete and verified (image: every write made
       while imaging is in the image)
  1    error (bad image, I/O failure, refused target); an image being written
       is left without its END trailer, so nothing complete-looking remains
  2    usage error
  3    image: writes did not quiesce within --max-rounds; the image is
       complete but marked NOT converged. reassemble/verify: the image is
       intact but records that it is not a complete capture, or reassemble
       restored it with a caveat (--allow-legacy, a logical block size that
       differs from the target's, a partition table the kernel could not
       re-read); see the warning
  4    image: the trace lost write events; the image has no END trailer
  5    image: the device does not report where its writes complete and
       --freeze was not given (or its freeze ended early); no END trailer
  130  interrupted by SIGINT, SIGTERM, SIGHUP or SIGQUIT; filesystems
       thawed, tracing removed, image has no trailer (a second signal
       thaws and switches tracing off at once, and exits)

The original tool's spelling also works:
  hot-clone -device DEV [-queue-depth N] [-blktrace.bufsize B -blktrace.bufcount N] > out.hc
  hot-clone -reassemble IMAGE -reassemble-output OUT";

#[derive(Parser, Debug)]
#[command(
    name = "hot-clone",
    version,
    about = "Image a live block device to a .hc stream, and restore such images",
    after_help = EXIT_STATUS_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Image a live block device to a .hc stream (root).
    ///
    /// Traces the device's writes, reads all of it, then re-reads what was
    /// written meanwhile in catch-up rounds until a round finds nothing new
    /// with no write in flight. The image goes to standard output (or -o)
    /// and ends with an END trailer only when the run can vouch for it.
    /// Nothing is ever written to the device.
    Image(ImageArgs),
    /// Show the whole product on a scratch loop device (root).
    ///
    /// Makes a loop device over a file in the temp directory, writes to it
    /// while imaging it, restores the image and checks it equals the device
    /// byte for byte; removes everything it made.
    Demo(DemoArgs),
    /// Restore an image to a regular file or a block device.
    ///
    /// A regular file is written under a temporary name beside OUT (mode
    /// 0600, all-zero blocks left as holes) and renamed to OUT only after the
    /// whole image verified. A block device must not be mounted or otherwise
    /// in use, must be large enough, and is never truncated; an image file is
    /// checked whole before the device is written.
    Reassemble(ReassembleArgs),
    /// Read a whole image and check it, writing nothing.
    ///
    /// Prints what the image holds (sections, data bytes, extent, trailer).
    /// Exits 0 only for an image whose END trailer verified.
    Verify(VerifyArgs),
    /// Internal: started by `image --freeze`; thaws the frozen filesystems
    /// if the imager dies (src/source/freeze.rs).
    ///
    /// Product mechanism, not a test hook: the imager re-executes its own
    /// binary as the guardian, so the subcommand must be in every build.
    /// Hidden because no user has a reason to start it by hand.
    #[command(hide = true)]
    FreezeGuardian(GuardianArgs),
}

impl Command {
    /// `-v`: diagnostics at `info` ([`crate::logging`]).
    fn verbose(&self) -> bool {
        match self {
            Command::Image(args) => args.verbose,
            Command::Demo(args) => args.verbose,
            Command::Reassemble(args) => args.verbose,
            Command::Verify(_) | Command::FreezeGuardian(_) => false,
        }
    }
}

#[derive(Args, Debug)]
pub struct GuardianArgs {
    /// The imager's pid.
    #[arg(long)]
    pub parent: u32,
    /// DEV MOUNTPOINT pairs.
    #[arg(value_name = "DEV MOUNTPOINT", num_args = 2..)]
    pub items: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct ReassembleArgs {
    /// The image, or - for standard input.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The regular file (created or replaced) or block device to restore to.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Restore an image without an END trailer (as the original hot-clone
    /// writes them); a cut-short image cannot then be told from a whole one,
    /// so the exit status is 3, with a warning.
    #[arg(long)]
    pub allow_legacy: bool,
    /// Print a summary of the image when done.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The block device to image (a whole disk or a partition).
    #[arg(short, long, value_name = "DEV")]
    pub device: PathBuf,
    /// Where the image goes: a file, written as a mode-0600 temporary
    /// beside it and renamed onto it only once the image is complete (never
    /// through a symbolic link), or a block device, opened exclusively; -
    /// or absent: standard output, which must not be a terminal. Refused
    /// anywhere that overlaps the device being imaged.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Turn every refusal off, and with it what it protects: the image may
    /// then go onto a place that overlaps the device being imaged (its
    /// disk, a partition, a filesystem or loop device on it: the image and
    /// the device corrupt each other), onto a block device that is mounted,
    /// swap or held (opened without O_EXCL), into a new regular file in
    /// /dev, or through a symbolic link; and a loop device whose backing
    /// file can also be written another way is imaged, though such writes
    /// are not captured.
    #[arg(long)]
    pub force: bool,
    /// Reader threads, one io_uring each, pinned to a CPU; 0 = the CPUs this
    /// process may run on (one when paced: --max-rate).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Reads in flight per thread; 0 = by device kind (2 on zram-like
    /// devices, 8 to 128 on queued ones to share 16 MiB; one when paced;
    /// see PERF.md).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub queue_depth: u32,
    /// Largest read, e.g. 1M; 0 = by device kind (1 MiB; when paced on a
    /// queued device, about half a millisecond of --max-rate, 64K to 1M).
    /// While yielding to other programs, reads are 128K at most.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_bytes)]
    pub chunk: u64,
    /// Read at most this many bytes per second (e.g. 200M), spread evenly
    /// over time rather than in bursts, main pass and catch-up alike, with
    /// one read in flight unless --threads/--queue-depth say otherwise
    /// (so a live request waits behind one read of ours at most); 0 = as
    /// fast as the device goes.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_bytes)]
    pub max_rate: u64,
    /// I/O priority of every read: idle (served only when the device is
    /// otherwise idle, under the BFQ and mq-deadline schedulers' rules),
    /// be:0..7 (best-effort, 0 highest), rt:0..7 (realtime), or none (the
    /// process's own).
    #[arg(long, value_name = "CLASS", default_value = "none", value_parser = parse_ioprio)]
    pub ioprio: u16,
    /// Read at full speed even while other programs use the disk. By
    /// default a run yields to them: whenever anyone else reads or writes
    /// the disk (seen by the kernel's block tracepoints), it keeps one
    /// small read in flight with a pause as long after each, so their
    /// requests wait behind one read of ours at most; once nobody else
    /// has used the disk for a second it reads at full speed again.
    /// --max-rate caps both.
    #[arg(long)]
    pub full_speed: bool,
    /// What the default does now (yield to other programs' reads and
    /// writes); accepted so that scripts passing it still run.
    #[arg(long, conflicts_with = "full_speed")]
    pub adaptive: bool,
    /// Memory the dirty map may take at most, e.g. 4M; 0 = as much as it
    /// needs (at most 34.5 MiB per TiB of device, taken as regions are
    /// written). Once it is reached, a write that finds no room in the map
    /// marks its whole region (16 MiB at 4 KiB blocks): nothing is missed,
    /// the catch-up re-reads more.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_bytes)]
    pub dirty_map_memory: u64,
    /// Where write events come from: blktrace (the classic relay files;
    /// blocked under kernel lockdown), tracefs, or auto (blktrace, else
    /// tracefs, saying why).
    #[arg(long, value_name = "SOURCE", default_value = "auto")]
    pub event_source: SourceKind,
    /// Trace buffer unit per CPU, in bytes (the original's
    /// -blktrace.bufsize); the buffer is this times --blktrace-bufcount.
    #[arg(long, value_name = "BYTES", default_value = "65536", value_parser = parse_bytes)]
    pub blktrace_bufsize: u64,
    /// Trace buffer units per CPU (the original's -blktrace.bufcount).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub blktrace_bufcount: u64,
    /// Catch-up rounds at most; if writes have not quiesced by then the image
    /// is finished, marked NOT converged, and the exit status is 3.
    #[arg(long, value_name = "N", default_value_t = image::ROUNDS_MAX_DEFAULT)]
    pub max_rounds: u32,
    /// Re-reads of each logical block that fails with a read error about
    /// its range (EIO, ENODATA, EILSEQ, EREMOTEIO) before it counts as
    /// unreadable and becomes a B: record in the image (at most 64).
    #[arg(long, value_name = "N", default_value_t = image::READ_RETRIES_DEFAULT,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::engine::RETRIES_MAX)))]
    pub read_retries: u32,
    /// End the run, with no trailer and exit 1, once more than BYTES of the
    /// device cannot be read (e.g. 64M); the default stops a dead device
    /// after 1 GiB of failing reads.
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_bytes)]
    pub max_bad_bytes: u64,
    /// Log every write event seen (Q queued, C completed) on stderr.
    #[arg(long)]
    pub print_writes: bool,
    /// Write run statistics (throughput, rounds, dirty bytes per round,
    /// events, latency percentiles) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Keep catching up, without counting rounds, while FILE exists: start
    /// the run, stop the workload, remove FILE, and the run converges.
    #[arg(long, value_name = "FILE")]
    pub hold_file: Option<PathBuf>,
    /// Freeze the filesystems mounted from the device (FIFREEZE) for the
    /// final round only, after converging as far as they let it, and thaw
    /// them on every way out: the image is then the filesystem at one
    /// instant, clean, not only crash-consistent. Writes to it block while
    /// frozen; the time is reported.
    #[arg(long)]
    pub freeze: bool,
    /// With --freeze: thaw after this long at most (e.g. 10s, 1500ms) and
    /// carry on unfrozen; the image is then not one instant of the
    /// filesystem (a loud warning says so) and the run converges, or not,
    /// by the trace alone. 10 s is the time Windows VSS gives writers to
    /// stay frozen.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub freeze_timeout: std::time::Duration,
    /// With --freeze: image bytes held in memory while frozen (nothing is
    /// written while frozen, so that no write can wait on the frozen
    /// filesystem); past it the run thaws early, says so, and carries on
    /// unfrozen. At least 1M.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_bytes)]
    pub freeze_memory: u64,
    /// Test hook: stay frozen while FILE exists; FILE.frozen is made once
    /// holding. Only in test builds (feature `test-hooks`): no binary a
    /// user builds or installs has it.
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "FILE", hide = true)]
    pub hold_frozen_file: Option<PathBuf>,
    /// Say more: the event source, every catch-up round.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the scratch disk, e.g. 256M.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_bytes)]
    pub size: u64,
    /// Seed of the demo's data and writes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Say more.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The image, or - for standard input.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// The program: parse, run, report. Every error is printed once, with its
/// chain of causes, prefixed with the program name.
pub fn main() -> ExitCode {
    signals::install();
    let args = match seed_spelling(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("hot-clone: {message}");
            return Exit::Usage.into();
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success
            }
            .into();
        }
    };
    if let Command::FreezeGuardian(args) = &cli.command {
        return crate::source::freeze::guardian_main(args.parent, &args.items);
    }
    crate::logging::init(cli.command.verbose());
    match run(cli) {
        Ok(exit) => exit.into(),
        Err(error) => {
            let mut chain = error.chain();
            if let Some(top) = chain.next() {
                eprintln!("hot-clone: error: {top}");
            }
            for cause in chain {
                eprintln!("  because: {cause}");
            }
            Exit::of_error(&error).into()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Image(args) => run_image(args),
        Command::Demo(args) => {
            demo::run(&DemoOptions {
                size_bytes: args.size,
                seed: args.seed,
            })?;
            Ok(Exit::Success)
        }
        Command::Reassemble(args) => {
            let source = ImageSource::from_arg(&args.image);
            let options = Options {
                allow_legacy: args.allow_legacy,
            };
            let outcome = restore::reassemble(&source, &args.output, options)?;
            tracing::info!("{}", outcome.summary.describe().trim_end_matches('\n'));
            eprintln!(
                "Restored {} sections ({} bytes of data) to {}",
                outcome.summary.sections,
                outcome.summary.data_bytes,
                args.output.display()
            );
            Ok(report_warnings(&outcome.warnings))
        }
        Command::Verify(args) => {
            let source = ImageSource::from_arg(&args.image);
            let outcome = restore::verify(&source)?;
            print!("{}", outcome.summary.describe());
            Ok(report_warnings(&outcome.warnings))
        }
        Command::FreezeGuardian(_) => unreachable!("handled before anything else runs"),
    }
}

fn run_image(args: ImageArgs) -> anyhow::Result<Exit> {
    let output = match args.output {
        Some(path) if path.as_os_str() != "-" => Output::File(path),
        _ => {
            if std::io::stdout().is_terminal() {
                anyhow::bail!(
                    "standard output is a terminal; redirect it to a file or pipe (hot-clone image -d DEV > out.hc) or give -o FILE"
                );
            }
            Output::Stdout
        }
    };
    let chunk_bytes = u32::try_from(args.chunk)
        .map_err(|_| anyhow::anyhow!("--chunk {}: too large", args.chunk))?;
    let buffer_bytes_per_cpu = args
        .blktrace_bufsize
        .checked_mul(args.blktrace_bufcount)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "-blktrace.bufsize x -blktrace.bufcount must be positive and fit 64 bits"
            )
        })?;
    let mut options = ImageOptions::new(args.device, output);
    options.force = args.force;
    options.engine = EngineConfig {
        // The flags' documented 0 is "choose for me".
        threads: Choice::zero_is_auto(args.threads),
        queue_depth: Choice::zero_is_auto(args.queue_depth),
        chunk_bytes: Choice::zero_is_auto(chunk_bytes),
        max_rate_bytes_per_second: args.max_rate,
        ioprio: args.ioprio,
        ..EngineConfig::default()
    };
    options.source = SourceConfig {
        kind: args.event_source,
        buffer_bytes_per_cpu,
    };
    options.rounds_max = args.max_rounds;
    options.print_writes = args.print_writes;
    options.stats_json = args.stats_json;
    options.hold_file = args.hold_file;
    options.freeze = args.freeze;
    options.yield_to_foreground = !args.full_speed;
    options.dirty_map_memory = DirtyMapMemory::from_flag(args.dirty_map_memory);
    #[cfg(feature = "test-hooks")]
    {
        options.hold_frozen_file = args.hold_frozen_file;
    }
    if args.freeze_memory < FREEZE_MEMORY_MIN {
        anyhow::bail!(
            "--freeze-memory {}: too small to hold a frozen round; give at least 1M",
            args.freeze_memory
        );
    }
    options.freeze_timeout = args.freeze_timeout;
    options.freeze_memory_max = usize::try_from(args.freeze_memory)
        .map_err(|_| anyhow::anyhow!("--freeze-memory {}: too large", args.freeze_memory))?;
    options.read_retries = args.read_retries;
    options.max_bad_bytes = args.max_bad_bytes;
    let outcome = image::run(&options)?;
    image::print_summary(&outcome);
    let (last_line, exit) = image::ending(&outcome, &options.device);
    eprintln!("{last_line}");
    Ok(exit)
}

/// The smallest `--freeze-memory`: a few sections of a frozen round.
const FREEZE_MEMORY_MIN: u64 = 1 << 20;

/// `10s`, `1500ms`, `2m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 10s, 1500ms or 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !(seconds > 0.0 && seconds < 1e9) {
        return Err(format!("{text:?}: must be more than zero"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// `idle`, `be:N`, `rt:N` or `none` as an SQE I/O priority value.
pub fn parse_ioprio(text: &str) -> Result<u16, String> {
    let level = |n: &str| -> Result<u16, String> {
        n.parse::<u16>()
            .ok()
            .filter(|&l| l <= 7)
            .ok_or_else(|| format!("{text:?}: the level must be 0..7"))
    };
    match text.split_once(':') {
        None if text == "none" => Ok(0),
        None if text == "idle" => Ok(crate::engine::ioprio_value(3, 0)),
        Some(("be", n)) => Ok(crate::engine::ioprio_value(2, level(n)?)),
        Some(("rt", n)) => Ok(crate::engine::ioprio_value(1, level(n)?)),
        _ => Err(format!("{text:?}: expected idle, be:0..7, rt:0..7 or none")),
    }
}

/// `4096`, `64K`, `1M`, `2G`, `1MiB`: bytes, with binary (1024-based)
/// suffixes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number of bytes such as 4096, 64K or 1M"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {suffix:?} (use K, M, G or T)"
            ));
        }
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?}: too large"))
}

fn report_warnings(warnings: &[restore::Warning]) -> Exit {
    for warning in warnings {
        eprintln!("hot-clone: WARNING: {warning}");
    }
    if warnings.is_empty() {
        Exit::Success
    } else {
        Exit::Incomplete
    }
}

/// The original tool's flags (Go `flag` syntax: `-name value`, `-name=value`,
/// `--name`; booleans take no value).
const SEED_VALUE_FLAGS: &[&str] = &[
    "device",
    "reassemble",
    "reassemble-output",
    "blktrace.bufsize",
    "blktrace.bufcount",
    "queue-depth",
];
const SEED_BOOL_FLAGS: &[&str] = &[
    "print-writes",
    "verbose",
    "debug",
    "reassemble-allow-legacy",
];

/// The original's dotted flags, accepted anywhere (also after a
/// subcommand) as the dashed long options they map to.
const SEED_DOTTED_FLAGS: &[(&str, &str)] = &[
    ("blktrace.bufsize", "--blktrace-bufsize"),
    ("blktrace.bufcount", "--blktrace-bufcount"),
];

fn dotted_to_dashed(arg: OsString) -> OsString {
    let Some(text) = arg.to_str() else {
        return arg;
    };
    let Some(name) = seed_flag_name(text) else {
        return arg;
    };
    match SEED_DOTTED_FLAGS.iter().find(|(dotted, _)| *dotted == name) {
        Some((_, dashed)) => match text.split_once('=') {
            Some((_, value)) => format!("{dashed}={value}").into(),
            None => (*dashed).into(),
        },
        None => arg,
    }
}

/// Rewrites the original tool's spelling into subcommands; any other
/// command line is returned as it is.
pub fn seed_spelling(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let args: Vec<OsString> = args.into_iter().map(dotted_to_dashed).collect();
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return Ok(args);
    };
    let Some(name) = seed_flag_name(first) else {
        return Ok(args);
    };
    if !SEED_VALUE_FLAGS.contains(&name) && !SEED_BOOL_FLAGS.contains(&name) {
        return Ok(args);
    }
    let mut values: Vec<(&str, OsString)> = Vec::new();
    let mut bools: Vec<&str> = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let text = arg
            .to_str()
            .ok_or_else(|| format!("{}: not a flag", arg.to_string_lossy()))?;
        let name = seed_flag_name(text).ok_or_else(|| {
            format!(
                "{text}: unexpected argument (the original spelling takes only -flag value pairs)"
            )
        })?;
        let inline = text.split_once('=').map(|(_, v)| OsString::from(v));
        if let Some(&flag) = SEED_VALUE_FLAGS.iter().find(|&&f| f == name) {
            let value = match inline {
                Some(v) => v,
                None => rest
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("-{flag} needs a value"))?,
            };
            values.push((flag, value));
        } else if let Some(&flag) = SEED_BOOL_FLAGS.iter().find(|&&f| f == name) {
            match inline.as_ref().and_then(|v| v.to_str()) {
                None | Some("true") | Some("1") => bools.push(flag),
                Some("false") | Some("0") => {}
                Some(v) => return Err(format!("-{flag}={v}: expected true or false")),
            }
        } else {
            return Err(format!(
                "-{name}: not a flag of hot-clone (see hot-clone --help)"
            ));
        }
    }
    let value = |flag: &str| {
        values
            .iter()
            .rev()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| v.clone())
    };
    let mut out: Vec<OsString> = vec![args[0].clone()];
    if let Some(image) = value("reassemble") {
        if let Some((flag, _)) = values.iter().find(|(f, _)| !f.starts_with("reassemble")) {
            return Err(format!("-{flag} cannot be combined with -reassemble"));
        }
        let output = value("reassemble-output")
            .ok_or("You must provide a -reassemble-output to restore to")?;
        out.extend(["reassemble".into(), image, "--output".into(), output]);
        if bools.contains(&"reassemble-allow-legacy") {
            out.push("--allow-legacy".into());
        }
        if bools.contains(&"verbose") || bools.contains(&"debug") {
            out.push("--verbose".into());
        }
        return Ok(out);
    }
    if let Some(device) = value("device") {
        out.extend(["image".into(), "--device".into(), device]);
        for (flag, option) in [
            ("queue-depth", "--queue-depth"),
            ("blktrace.bufsize", "--blktrace-bufsize"),
            ("blktrace.bufcount", "--blktrace-bufcount"),
        ] {
            if let Some(v) = value(flag) {
                out.extend([option.into(), v]);
            }
        }
        if bools.contains(&"print-writes") {
            out.push("--print-writes".into());
        }
        if bools.contains(&"verbose") || bools.contains(&"debug") {
            out.push("--verbose".into());
        }
        if let Some((flag, _)) = values.iter().find(|(f, _)| f.starts_with("reassemble")) {
            return Err(format!("-{flag} cannot be combined with -device"));
        }
        return Ok(out);
    }
    Err(
        "nothing to do: give -device DEV, or -reassemble IMAGE -reassemble-output OUT (see hot-clone --help)"
            .into(),
    )
}

/// `-name`, `--name`, `-name=value` → `name`; the dashed spellings of the
/// dotted flags give the dotted name.
fn seed_flag_name(arg: &str) -> Option<&str> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    let name = body.split_once('=').map_or(body, |(n, _)| n);
    let name = SEED_DOTTED_FLAGS
        .iter()
        .find(|(_, dashed)| &dashed[2..] == name)
        .map_or(name, |(dotted, _)| *dotted);
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> Result<Vec<String>, String> {
        let args = std::iter::once("hot-clone")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        seed_spelling(args).map(|v| {
            v.into_iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn read_retries_past_the_cap_are_refused() {
        let parse = |n: u32| {
            Cli::try_parse_from([
                "hot-clone",
                "image",
                "-d",
                "x",
                "--read-retries",
                &n.to_string(),
            ])
        };
        assert!(parse(crate::engine::RETRIES_MAX).is_ok());
        let error = parse(crate::engine::RETRIES_MAX + 1).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn seed_reassemble_spellings() {
        let expected = ["reassemble", "x.hc", "--output", "x.img"];
        for args in [
            &["-reassemble", "x.hc", "-reassemble-output", "x.img"][..],
            &["--reassemble=x.hc", "-reassemble-output=x.img"],
            &["-reassemble-output", "x.img", "-reassemble", "x.hc"],
        ] {
            assert_eq!(rewrite(args).unwrap(), expected, "{args:?}");
        }
        assert_eq!(
            rewrite(&[
                "-reassemble",
                "-",
                "-reassemble-output",
                "o",
                "-verbose",
                "-reassemble-allow-legacy"
            ])
            .unwrap(),
            [
                "reassemble",
                "-",
                "--output",
                "o",
                "--allow-legacy",
                "--verbose"
            ]
        );
    }

    #[test]
    fn modern_spelling_passes_through() {
        for args in [
            &["reassemble", "x", "-o", "y"][..],
            &["--help"],
            &["-h"],
            &["--version"],
            &[],
        ] {
            assert_eq!(rewrite(args).unwrap(), args, "{args:?}");
        }
    }

    #[test]
    fn seed_mistakes_are_explained() {
        assert!(
            rewrite(&["-reassemble", "x.hc"])
                .unwrap_err()
                .contains("-reassemble-output")
        );
        assert!(
            rewrite(&["-reassemble"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            rewrite(&["-reassemble", "x", "-reassemble-output", "y", "-bogus"])
                .unwrap_err()
                .contains("-bogus")
        );
        assert!(rewrite(&["-verbose=maybe"]).is_err());
    }

    #[test]
    fn seed_device_spellings() {
        assert_eq!(
            rewrite(&[
                "-device",
                "/dev/sdb",
                "-queue-depth=64",
                "-blktrace.bufsize",
                "1048576",
                "-blktrace.bufcount=8",
                "-print-writes",
                "-debug"
            ])
            .unwrap(),
            [
                "image",
                "--device",
                "/dev/sdb",
                "--queue-depth",
                "64",
                "--blktrace-bufsize",
                "1048576",
                "--blktrace-bufcount",
                "8",
                "--print-writes",
                "--verbose"
            ]
        );
        assert!(
            rewrite(&["-device", "/dev/sdb", "-reassemble", "x"])
                .unwrap_err()
                .contains("cannot be combined")
        );
    }

    #[test]
    fn dotted_flags_work_after_the_subcommand() {
        assert_eq!(
            rewrite(&[
                "image",
                "-d",
                "x",
                "-blktrace.bufsize",
                "4096",
                "-blktrace.bufcount=1"
            ])
            .unwrap(),
            [
                "image",
                "-d",
                "x",
                "--blktrace-bufsize",
                "4096",
                "--blktrace-bufcount=1"
            ]
        );
    }

    #[test]
    fn io_priorities() {
        assert_eq!(parse_ioprio("none"), Ok(0));
        assert_eq!(parse_ioprio("idle"), Ok(3 << 13));
        assert_eq!(parse_ioprio("be:4"), Ok((2 << 13) | 4));
        assert_eq!(parse_ioprio("rt:0"), Ok(1 << 13));
        assert!(parse_ioprio("be:8").is_err());
        assert!(parse_ioprio("bogus").is_err());
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("1X").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
