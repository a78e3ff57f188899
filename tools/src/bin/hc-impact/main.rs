//! `hc-impact`: what imaging costs a live workload.
//!
//! Runs a foreground workload (`--foreground`: 4 KiB random reads and/or
//! writes at a fixed rate, O_DIRECT, one at a time, or buffered reads of a
//! hot file in the page cache) alone and while each imager images the same
//! device — the real `hot-clone image`, or any command (`--imager`) —
//! alternated (alone, imager 1, imager 2, ... per round), several rounds
//! with the same seeds; prints the medians side by side, one row per
//! imager (or `--json`).
//!
//! Every imager is kept imaging for the whole window: a command is
//! restarted whenever it finishes, a built-in hot-clone once its main pass
//! is done (it is held in catch-up by a hold file meanwhile, so it never
//! ends on its own while the workload writes). The window starts once the
//! imager's first read reached the device. Imaging throughput is the same
//! measure for every row: the device's read counter (`/sys/class/block/
//! NAME/stat`) over the window, less the foreground's own reads, per
//! second.
//!
//! Without a DEVICE it makes a scratch loop device (as `hot-clone demo`
//! does) and removes it afterwards. On a named DEVICE the workload's writes
//! overwrite its data, so that needs `--allow-writes` (or a foreground that
//! does not write).

mod foreground;
mod imager;
mod report;

use anyhow::{Context, bail};
use clap::Parser;
use foreground::{BLOCK, Kind, Target};
use hc_test_kit::{LoopDevice, LoopOptions};
use hot_clone::cli::parse_bytes;
use hot_clone::demo::{aligned::AlignedBuf, prng::XorShift};
use imager::{Imager, Places, Running};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Longest wait for an imager's first read of the device.
const FIRST_READ_WAIT_MAX: Duration = Duration::from_secs(30);
/// Most of the device the speed probe reads.
const PROBE_BYTES_MAX: u64 = 1 << 30;
const PROBE_CHUNK: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "hc-impact",
    about = "Measure what imaging (hot-clone, or any imager command) costs a live workload on the same device",
    after_help = "IMAGERS: --imager [NAME=]CMD, repeatable, one table row each (NAME defaults to CMD).\n  \
        CMD `hot-clone [ARGS]` (no {dev}) is the built-in path: hot-clone image -d DEV -o /dev/null\n  \
        --hold-file H --stats-json S ARGS (ARGS may give -o {out}); restarted once its main pass is\n  \
        done, stopped (SIGTERM) if the window ends in one. Any other CMD runs as sh -c CMD in its own\n  \
        process group, restarted until the window ends, then the whole group is killed.\n  \
        Placeholders: {dev} the device, {out} a scratch file in the temp dir (removed after each run),\n  \
        {rate:P%} P % of the device's full read speed in bytes/s (measured first, or --device-speed).\n  \
        Without --imager: one row, hot-clone with the ARGS after --.\n\n\
        Each window starts at the imager's first read of the device. Imaging MB/s, for every row:\n  \
        the device's read counter (/sys/class/block/NAME/stat) over the window, less the\n  \
        foreground's own reads.\n\n\
        Example: hc-impact --foreground read --imager default=hot-clone \\\n  \
        --imager 'max25=hot-clone --max-rate {rate:25%}' \\\n  \
        --imager 'pv25=dd if={dev} iflag=direct bs=1M status=none | pv -qL {rate:25%} > /dev/null'"
)]
struct Args {
    /// The device to run on; without it, a scratch loop device of --scratch.
    device: Option<PathBuf>,
    /// Size of the scratch loop device made when no DEVICE is given.
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    scratch: u64,
    /// I/O scheduler for the scratch loop device (none, mq-deadline, bfq,
    /// kyber); loop devices start with none, under which --ioprio has no
    /// effect.
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    /// The foreground workload.
    #[arg(long, value_enum, default_value = "mix")]
    foreground: Kind,
    /// Foreground requests per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Share of reads among the requests of --foreground mix (the rest are
    /// writes) [default: 70].
    #[arg(long)]
    read_percent: Option<u32>,
    /// Size of --foreground cached's hot file.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    cached_size: u64,
    /// Length of each measurement window.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    seconds: f64,
    /// Rounds (alone, then each imager), alternated; medians reported.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// An imager, one row: [NAME=]CMD (see below); repeatable.
    #[arg(long = "imager", value_name = "[NAME=]CMD")]
    imagers: Vec<String>,
    /// The device's full read speed for {rate:P%}, e.g. 1G; default:
    /// measured first, 1 MiB O_DIRECT reads one at a time (as dd
    /// iflag=direct bs=1M) of up to 1 GiB of it.
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES")]
    device_speed: Option<u64>,
    /// The hot-clone binary (default: the one built beside this tool).
    #[arg(long)]
    hot_clone: Option<PathBuf>,
    /// Let the workload write to a named DEVICE (it overwrites data).
    #[arg(long)]
    allow_writes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the result as JSON to FILE (the table still printed).
    #[arg(long, value_name = "FILE")]
    json_file: Option<PathBuf>,
    /// Extra arguments for `hot-clone image` of the default row (no
    /// --imager), e.g. -- --max-rate 200M.
    #[arg(last = true)]
    image_args: Vec<String>,
}

fn main() -> ExitCode {
    hot_clone::exit::tool_exit("hc-impact", run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.runs == 0 || args.seconds <= 0.0 {
        bail!("--rate, --runs and --seconds must be positive");
    }
    let read_percent = match (args.foreground, args.read_percent) {
        (Kind::Mix, percent) => percent.unwrap_or(70),
        (kind, Some(_)) => bail!("--read-percent is for --foreground mix, not {kind:?}"),
        (Kind::Write, None) => 0,
        (Kind::Read | Kind::Cached | Kind::Idle, None) => 100,
    };
    if read_percent > 100 {
        bail!("--read-percent must be 0..100");
    }
    let writes = matches!(args.foreground, Kind::Mix | Kind::Write) && read_percent < 100;
    let imagers = if args.imagers.is_empty() {
        vec![Imager::hot_clone(&args.image_args)]
    } else {
        if !args.image_args.is_empty() {
            bail!(
                "arguments after -- are for the default row; with --imager give them in it: --imager 'NAME=hot-clone {}'",
                args.image_args.join(" ")
            );
        }
        args.imagers
            .iter()
            .map(|spec| Imager::parse(spec))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    for (i, imager) in imagers.iter().enumerate() {
        if imagers[..i].iter().any(|other| other.name == imager.name) {
            bail!("two imagers named {:?}", imager.name);
        }
    }
    set_up_process()?;
    // A signal ends the run through the same clean-up as an error: the
    // imager's process group (not the terminal's) stopped, the scratch
    // device and files removed.
    hot_clone::signals::install();
    let hot_clone = match &args.hot_clone {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this executable")?
            .join("hot-clone"),
    };
    let scratch;
    let mut scratch_file = None;
    let device = match &args.device {
        Some(device) => {
            if args.scheduler.is_some() {
                bail!(
                    "--scheduler is for the scratch device only; set {}'s yourself",
                    device.display()
                );
            }
            if writes && !args.allow_writes {
                bail!(
                    "the workload writes random data over {}; pass --allow-writes, or a --foreground that does not write",
                    device.display()
                );
            }
            device.clone()
        }
        None => {
            let mut made = Scratch::new(args.scratch, args.seed)?;
            if let Some(name) = &args.scheduler {
                made.set_scheduler(name)?;
            }
            scratch = made;
            scratch_file = Some(scratch.backing.clone());
            scratch.device.path.clone()
        }
    };
    let counter = ReadCounter::of(&device)?;
    let speed = match args.device_speed {
        Some(bytes) => bytes as f64,
        None => {
            let speed = probe_speed(&device)?;
            eprintln!(
                "hc-impact: {} reads {:.0} MB/s (1 MiB O_DIRECT reads, one at a time)",
                device.display(),
                speed / 1e6
            );
            speed
        }
    };
    let imagers = imagers
        .into_iter()
        .map(|mut imager| {
            imager.command_resolved = imager::resolve_rates(&imager.command, speed)?;
            Ok(imager)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = match args.foreground {
        Kind::Idle => None,
        Kind::Cached => Some(Target::cached(args.cached_size, args.seed)?),
        Kind::Mix | Kind::Read | Kind::Write => Some(Target::device(&device, read_percent)?),
    };
    let places = Places {
        device: device.clone(),
        speed_bytes_per_second: speed,
        hot_clone,
    };

    let mut alone = Vec::new();
    let mut with: Vec<Vec<Window>> = imagers.iter().map(|_| Vec::new()).collect();
    for run in 0..args.runs {
        hot_clone::signals::check()?;
        let seed = args.seed.wrapping_add(u64::from(run));
        if let Some(target) = &target {
            eprintln!("hc-impact: run {} of {}: alone", run + 1, args.runs);
            target.warm()?;
            alone.push(foreground::run(target, args.rate, args.seconds, seed)?);
        }
        for (imager, windows) in imagers.iter().zip(&mut with) {
            eprintln!(
                "hc-impact: run {} of {}: with {}",
                run + 1,
                args.runs,
                imager.name
            );
            windows.push(window(
                target.as_ref(),
                imager,
                &places,
                &counter,
                args,
                seed,
            )?);
        }
    }
    let report = report::Report::new(
        report::Setup {
            device,
            scheduler: scheduler_of(&places.device),
            foreground: args.foreground,
            describe: target.as_ref().map(Target::describe),
            cached_file: target.as_ref().and_then(Target::hot_file),
            scratch_file,
            read_percent,
            rate: args.rate,
            seconds: args.seconds,
            runs: args.runs,
            device_speed_bytes_per_second: speed,
        },
        alone,
        imagers.into_iter().zip(with).collect(),
    );
    if let Some(path) = &args.json_file {
        fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print(&mut std::io::stdout().lock())?;
    }
    Ok(())
}

/// One window with `imager` running: the foreground's statistics (none
/// when idle) and the imager's throughput over the window.
pub struct Window {
    pub foreground: Option<foreground::Stats>,
    pub imaging_bytes_per_second: f64,
    pub outcome: imager::Outcome,
}

fn window(
    target: Option<&Target>,
    imager: &Imager,
    places: &Places,
    counter: &ReadCounter,
    args: &Args,
    seed: u64,
) -> anyhow::Result<Window> {
    if let Some(target) = target {
        target.warm()?;
    }
    let dir = tempfile::Builder::new()
        .prefix("hc-impact-run-")
        .tempdir()?;
    let before = counter.read_bytes()?;
    let running = Running::start(imager, places, dir.path())?;
    let waited = Instant::now();
    let first_read = loop {
        if counter.read_bytes()? > before {
            break Ok(());
        }
        if hot_clone::signals::interrupted() {
            break Err(hot_clone::signals::Interrupted.into());
        }
        if running.finished() || waited.elapsed() > FIRST_READ_WAIT_MAX {
            break Err(anyhow::anyhow!(
                "imager {:?} read nothing from {} in {:.1} s",
                imager.name,
                places.device.display(),
                waited.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if let Err(error) = first_read {
        // Its own error says more, if it has one.
        running.stop()?;
        return Err(error);
    }
    // Counted from before the start: on a small device a fast imager may
    // have read all of it by the time the first read is seen.
    let start_bytes = before;
    let started = Instant::now();
    let foreground = match target {
        Some(target) => foreground::run(target, args.rate, args.seconds, seed).map(Some),
        None => idle(Duration::from_secs_f64(args.seconds)).map(|()| None),
    };
    let end_bytes = counter.read_bytes();
    let seconds = started.elapsed().as_secs_f64();
    // Stopped whatever the foreground did, so that nothing is left running.
    let outcome = running.stop();
    let foreground = foreground?;
    let outcome = outcome?;
    let own = foreground.as_ref().map_or(0, |f| f.device_read_bytes);
    let imaged = (end_bytes? - start_bytes).saturating_sub(own);
    Ok(Window {
        foreground,
        imaging_bytes_per_second: imaged as f64 / seconds,
        outcome,
    })
}

/// No foreground: waits out the window, or until a signal.
fn idle(window: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + window;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        hot_clone::signals::check()?;
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
    Ok(())
}

/// The device's count of bytes read, from its sysfs `stat` (sectors of
/// 512 bytes whatever its block size; include/linux/part_stat.h).
struct ReadCounter {
    stat: PathBuf,
}

impl ReadCounter {
    fn of(device: &Path) -> anyhow::Result<ReadCounter> {
        let real = fs::canonicalize(device)?;
        let name = real.file_name().context("device path has no name")?;
        let stat = Path::new("/sys/class/block").join(name).join("stat");
        let counter = ReadCounter { stat };
        counter
            .read_bytes()
            .with_context(|| format!("{} has no read counter", device.display()))?;
        Ok(counter)
    }

    fn read_bytes(&self) -> anyhow::Result<u64> {
        let text = fs::read_to_string(&self.stat)
            .with_context(|| format!("cannot read {}", self.stat.display()))?;
        // Documentation/block/stat.rst: the third field is sectors read.
        let sectors: u64 = text
            .split_whitespace()
            .nth(2)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("{}: {text:?}", self.stat.display()))?;
        Ok(sectors * 512)
    }
}

/// The device's sequential read speed as dd iflag=direct bs=1M sees it:
/// 1 MiB O_DIRECT reads, one at a time, of its first GiB at most.
fn probe_speed(device: &Path) -> anyhow::Result<f64> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("cannot open {}", device.display()))?;
    let size = hot_clone::source::blockdev::size_bytes(&file)?;
    let chunk = (PROBE_CHUNK as u64).min(size / BLOCK as u64 * BLOCK as u64);
    anyhow::ensure!(chunk > 0, "{} is smaller than 4 KiB", device.display());
    let chunks = size.min(PROBE_BYTES_MAX) / chunk;
    let mut buffer = AlignedBuf::new(chunk as usize);
    let started = Instant::now();
    for k in 0..chunks {
        hot_clone::signals::check()?;
        file.read_exact_at(&mut buffer, k * chunk)
            .with_context(|| format!("{} at byte {}", device.display(), k * chunk))?;
    }
    Ok((chunks * chunk) as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Orphans of the imagers' pipelines (a `dd` whose shell was killed) are
/// reparented to us rather than to init, so that reaping the group can
/// wait for them (kernel/exit.c, find_new_reaper).
fn set_up_process() -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
    }
    // The foreground sleeps until each request is due; the default 50 us
    // timer slack would add up to that much to every latency, which is
    // most of a page-cache hit's.
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes integers only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    Ok(())
}

/// A scratch loop device over a file in the temp directory, filled with
/// data; detached and removed on drop.
struct Scratch {
    /// Detached on drop, before its backing file's directory goes.
    device: LoopDevice,
    backing: PathBuf,
    _dir: tempfile::TempDir,
    /// The scheduler the loop device had before `set_scheduler`: a loop
    /// device keeps its queue settings after it is detached, so it is put
    /// back on drop.
    scheduler_before: Option<String>,
}

impl Scratch {
    fn new(size: u64, seed: u64) -> anyhow::Result<Scratch> {
        let dir = tempfile::Builder::new().prefix("hc-impact-").tempdir()?;
        let backing = dir.path().join("disk.img");
        let mut file = File::create(&backing)?;
        let mut rng = XorShift::from_state(seed);
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            hot_clone::signals::check()?;
            rng.fill(&mut chunk);
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        let device = LoopDevice::try_attach(&backing, &LoopOptions::default())?;
        eprintln!(
            "hc-impact: scratch device {} ({} MiB over {})",
            device.path.display(),
            size >> 20,
            backing.display()
        );
        Ok(Scratch {
            device,
            backing,
            _dir: dir,
            scheduler_before: None,
        })
    }
}

impl Scratch {
    fn set_scheduler(&mut self, name: &str) -> anyhow::Result<()> {
        let path = scheduler_path(&self.device.path)?;
        let before = scheduler_of(&self.device.path);
        fs::write(&path, name)
            .with_context(|| format!("cannot set the scheduler {name} in {}", path.display()))?;
        self.scheduler_before = Some(before);
        Ok(())
    }
}

fn scheduler_path(device: &Path) -> anyhow::Result<PathBuf> {
    let name = device
        .file_name()
        .context("device path has no name")?
        .to_string_lossy()
        .into_owned();
    Ok(Path::new("/sys/block").join(name).join("queue/scheduler"))
}

/// The scheduler in use, the bracketed name of `queue/scheduler`
/// ("?" where it cannot be read, e.g. a partition).
fn scheduler_of(device: &Path) -> String {
    scheduler_path(device)
        .ok()
        .and_then(|path| fs::read_to_string(path).ok())
        .and_then(|text| {
            let open = text.find('[')?;
            let close = text[open..].find(']')? + open;
            Some(text[open + 1..close].to_string())
        })
        .unwrap_or_else(|| "?".to_string())
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let (Some(before), Ok(path)) =
            (&self.scheduler_before, scheduler_path(&self.device.path))
            && let Err(err) = fs::write(&path, before)
        {
            eprintln!(
                "hc-impact: cannot put back the scheduler {before} of {}: {err}",
                self.device.path.display()
            );
        }
    }
}
