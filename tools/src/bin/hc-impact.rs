//! `hc-impact`: what imaging costs a live workload.
//!
//! Runs a foreground workload — 4 KiB random reads and writes at a fixed
//! rate, O_DIRECT, every request's latency recorded in a histogram — first
//! alone, then while the real `hot-clone image` images the same device to
//! /dev/null, alternating, several times with the same seeds; prints the
//! medians side by side (or `--json`).
//!
//! The workload is open-loop: request k is due at start + k/rate, and its
//! latency counts from when it was due, so a request delayed behind a slow
//! one is charged for the wait (no coordinated omission).
//!
//! Without a DEVICE it makes a scratch loop device (as `hot-clone demo`
//! does) and removes it afterwards. On a named DEVICE the workload's writes
//! overwrite its data, so that needs `--allow-writes` (or `--read-percent
//! 100`).

use anyhow::{Context, bail};
use clap::Parser;
use hc_test_kit::{LoopDevice, LoopOptions};
use hdrhistogram::Histogram;
use hot_clone::cli::parse_bytes;
use hot_clone::demo::{aligned::AlignedBuf, prng::XorShift};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;

#[derive(Parser, Debug)]
#[command(
    name = "hc-impact",
    about = "Measure what hot-clone imaging costs a live 4 KiB random read/write workload"
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
    /// Foreground requests per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Share of reads among the requests (the rest are writes).
    #[arg(long, default_value_t = 70)]
    read_percent: u32,
    /// Length of each measurement.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    seconds: f64,
    /// Pairs of runs (alone, then with imaging), alternated; medians reported.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The hot-clone binary (default: the one built beside this tool).
    #[arg(long)]
    hot_clone: Option<PathBuf>,
    /// Let the workload write to a named DEVICE (it overwrites data).
    #[arg(long)]
    allow_writes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Extra arguments for `hot-clone image`, e.g. -- --max-rate 200M.
    #[arg(last = true)]
    image_args: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Foreground {
    p50_us: f64,
    p99_us: f64,
    p99_9_us: f64,
    max_us: f64,
    iops: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Imaging {
    main_pass_bytes_per_second: f64,
    main_pass_seconds: f64,
    rounds: f64,
    catch_up_bytes: f64,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    device: PathBuf,
    rate: u32,
    read_percent: u32,
    seconds: f64,
    runs: u32,
    image_args: Vec<String>,
    scheduler: String,
    alone: Foreground,
    with_imaging: Foreground,
    imaging: Imaging,
    p99_inflation: f64,
}

fn main() -> ExitCode {
    hot_clone::exit::tool_exit("hc-impact", run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.read_percent > 100 || args.rate == 0 || args.runs == 0 || args.seconds <= 0.0 {
        bail!("--read-percent must be 0..100; --rate, --runs and --seconds positive");
    }
    let hot_clone = match &args.hot_clone {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this executable")?
            .join("hot-clone"),
    };
    let scratch;
    let device = match &args.device {
        Some(device) => {
            if args.scheduler.is_some() {
                bail!(
                    "--scheduler is for the scratch device only; set {}'s yourself",
                    device.display()
                );
            }
            if args.read_percent < 100 && !args.allow_writes {
                bail!(
                    "the workload writes random data over {}; pass --allow-writes, or --read-percent 100",
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
            scratch.device.path.clone()
        }
    };
    let size = hot_clone::source::blockdev::size_bytes(&File::open(&device)?)?;
    let blocks = size / BLOCK as u64;
    anyhow::ensure!(blocks > 0, "{} is smaller than 4 KiB", device.display());

    let mut alone = Vec::new();
    let mut with = Vec::new();
    let mut imaging = Vec::new();
    for run in 0..args.runs {
        let seed = args.seed.wrapping_add(u64::from(run));
        eprintln!("hc-impact: run {} of {}: alone", run + 1, args.runs);
        alone.push(workload(&device, blocks, args, seed, None)?.0);
        eprintln!("hc-impact: run {} of {}: with imaging", run + 1, args.runs);
        let (fg, img) = workload(&device, blocks, args, seed, Some(&hot_clone))?;
        with.push(fg);
        imaging.push(img.expect("imaging stats"));
    }
    let alone = median_foreground(&alone);
    let with_imaging = median_foreground(&with);
    let scheduler = scheduler_of(&device);
    let report = Report {
        device,
        rate: args.rate,
        read_percent: args.read_percent,
        seconds: args.seconds,
        runs: args.runs,
        image_args: args.image_args.clone(),
        scheduler,
        p99_inflation: with_imaging.p99_us / alone.p99_us.max(1.0),
        alone,
        with_imaging,
        imaging: median_imaging(&imaging),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs the foreground workload for `args.seconds`; with `hot_clone`, images
/// the device meanwhile (kept in its catch-up by a hold file until the
/// workload ends) and returns its statistics too.
fn workload(
    device: &Path,
    blocks: u64,
    args: &Args,
    seed: u64,
    hot_clone: Option<&Path>,
) -> anyhow::Result<(Foreground, Option<Imaging>)> {
    let dir = tempfile::tempdir()?;
    let hold = dir.path().join("hold");
    let stats = dir.path().join("stats.json");
    // A file, not a pipe: nobody reads hot-clone's progress while the
    // workload runs, and a full pipe would stall it.
    let log = dir.path().join("stderr");
    let mut child = match hot_clone {
        Some(binary) => {
            fs::write(&hold, b"")?;
            let child = Command::new(binary)
                .args(["image", "-o", "/dev/null", "--device"])
                .arg(device)
                .arg("--hold-file")
                .arg(&hold)
                .arg("--stats-json")
                .arg(&stats)
                .args(&args.image_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log)?)
                .spawn()
                .with_context(|| format!("cannot run {}", binary.display()))?;
            Some(child)
        }
        None => None,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(args.read_percent < 100)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("cannot open {}", device.display()))?;
    let mut buffer = AlignedBuf::new(BLOCK);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut rng = XorShift::new(seed);
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let total = (args.seconds * f64::from(args.rate)) as u64;
    let started = Instant::now();
    for k in 0..total {
        let due = started + interval.mul_f64(k as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let rng = rng.next_u64();
        let offset = (rng % blocks) * BLOCK as u64;
        if (rng >> 40) % 100 < u64::from(args.read_percent) {
            file.read_exact_at(&mut buffer, offset)
        } else {
            buffer[..8].copy_from_slice(&k.to_le_bytes());
            file.write_all_at(&buffer, offset)
        }
        .with_context(|| format!("{} at byte {offset}", device.display()))?;
        histogram.record(due.elapsed().as_micros().max(1) as u64)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let foreground = Foreground {
        p50_us: histogram.value_at_quantile(0.5) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        p99_9_us: histogram.value_at_quantile(0.999) as f64,
        max_us: histogram.max() as f64,
        iops: total as f64 / elapsed,
    };
    let imaging = match child.take() {
        Some(mut child) => {
            let _ = fs::remove_file(&hold);
            let status = child.wait()?;
            if !status.success() {
                bail!(
                    "hot-clone failed ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let stats: serde_json::Value = serde_json::from_slice(&fs::read(&stats)?)?;
            Some(Imaging {
                main_pass_bytes_per_second: stats["main_pass"]["bytes_per_second"]
                    .as_f64()
                    .unwrap_or(0.0),
                main_pass_seconds: stats["main_pass"]["seconds"].as_f64().unwrap_or(0.0),
                rounds: stats["rounds"].as_array().map_or(0, Vec::len) as f64,
                catch_up_bytes: stats["catch_up"]["bytes"].as_f64().unwrap_or(0.0),
                seconds: stats["seconds"].as_f64().unwrap_or(0.0),
            })
        }
        None => None,
    };
    Ok((foreground, imaging))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn median_foreground(runs: &[Foreground]) -> Foreground {
    let m = |f: fn(&Foreground) -> f64| median(runs.iter().map(f).collect());
    Foreground {
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p99_9_us: m(|r| r.p99_9_us),
        max_us: m(|r| r.max_us),
        iops: m(|r| r.iops),
    }
}

fn median_imaging(runs: &[Imaging]) -> Imaging {
    let m = |f: fn(&Imaging) -> f64| median(runs.iter().map(f).collect());
    Imaging {
        main_pass_bytes_per_second: m(|r| r.main_pass_bytes_per_second),
        main_pass_seconds: m(|r| r.main_pass_seconds),
        rounds: m(|r| r.rounds),
        catch_up_bytes: m(|r| r.catch_up_bytes),
        seconds: m(|r| r.seconds),
    }
}

fn print_table(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} (scheduler {}): {} req/s of 4 KiB ({}% reads), {} s, median of {} runs{}",
        r.device.display(),
        r.scheduler,
        r.rate,
        r.read_percent,
        r.seconds,
        r.runs,
        if r.image_args.is_empty() {
            String::new()
        } else {
            format!(", hot-clone {}", r.image_args.join(" "))
        }
    );
    let _ = writeln!(out, "| foreground | alone | with imaging | ratio |");
    let _ = writeln!(out, "|---|---|---|---|");
    for (name, a, b) in [
        ("p50 latency (us)", r.alone.p50_us, r.with_imaging.p50_us),
        ("p99 latency (us)", r.alone.p99_us, r.with_imaging.p99_us),
        (
            "p99.9 latency (us)",
            r.alone.p99_9_us,
            r.with_imaging.p99_9_us,
        ),
        ("max latency (us)", r.alone.max_us, r.with_imaging.max_us),
        ("IOPS", r.alone.iops, r.with_imaging.iops),
    ] {
        let _ = writeln!(out, "| {name} | {a:.0} | {b:.0} | {:.2} |", b / a.max(1e-9));
    }
    let _ = writeln!(
        out,
        "hot-clone: main pass {:.0} MB/s in {:.2} s, {} catch-up rounds, {:.1} MiB re-read, {:.1} s in all",
        r.imaging.main_pass_bytes_per_second / 1e6,
        r.imaging.main_pass_seconds,
        r.imaging.rounds,
        r.imaging.catch_up_bytes / f64::from(1 << 20),
        r.imaging.seconds
    );
}

/// A scratch loop device over a file in the temp directory, filled with
/// data; detached and removed on drop.
struct Scratch {
    /// Detached on drop, before its backing file's directory goes.
    device: LoopDevice,
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
            rng.fill(&mut chunk);
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        let device = LoopDevice::try_attach(&backing, &LoopOptions::default())?;
        eprintln!(
            "hc-impact: scratch device {} ({} MiB)",
            device.path.display(),
            size >> 20
        );
        Ok(Scratch {
            device,
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
