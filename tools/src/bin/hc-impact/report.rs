//! Medians of the runs, one row per imager: the table and the JSON.

use crate::Window;
use crate::foreground::{Kind, Stats};
use crate::imager::Imager;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Serialize)]
pub struct Setup {
    pub device: PathBuf,
    pub scheduler: String,
    pub foreground: Kind,
    /// The foreground in words (none when idle).
    pub describe: Option<String>,
    /// The scratch device's backing file, when hc-impact made the device
    /// (detached and removed at the end).
    pub scratch_file: Option<PathBuf>,
    /// --foreground cached: the hot file (removed at the end).
    pub cached_file: Option<PathBuf>,
    pub read_percent: u32,
    pub rate: u32,
    pub seconds: f64,
    pub runs: u32,
    /// Given, or measured: 1 MiB O_DIRECT reads, one at a time.
    pub device_speed_bytes_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    setup: Setup,
    /// Median of the alone runs (none when idle).
    alone: Option<Stats>,
    alone_runs: Vec<Stats>,
    rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    command: String,
    command_resolved: String,
    hot_clone: bool,
    /// Median of the runs with this imager (none when idle).
    with: Option<Stats>,
    runs: Vec<Stats>,
    /// Median with / median alone, of the p99 latency of reads, writes
    /// and all requests.
    read_p99_inflation: Option<f64>,
    write_p99_inflation: Option<f64>,
    p99_inflation: Option<f64>,
    /// The device's reads over the window, less the foreground's, per
    /// second: median, and each run's.
    imaging_bytes_per_second: f64,
    imaging_runs: Vec<f64>,
    /// Built-in hot-clone: median main-pass throughput of the instances
    /// whose main pass ended (from --stats-json), and how many.
    main_pass_bytes_per_second: Option<f64>,
    main_passes: usize,
    /// Instances started over all runs (restarts included).
    instances: u32,
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn median_stats(runs: &[Stats]) -> Option<Stats> {
    let m = |f: fn(&Stats) -> f64| median(runs.iter().map(f).collect());
    // A kind of request some run did not issue has no p99.
    let m_opt = |f: fn(&Stats) -> Option<f64>| {
        runs.iter()
            .map(f)
            .collect::<Option<Vec<_>>>()
            .and_then(median)
    };
    Some(Stats {
        p50_us: m(|r| r.p50_us)?,
        p99_us: m(|r| r.p99_us)?,
        p99_9_us: m(|r| r.p99_9_us)?,
        max_us: m(|r| r.max_us)?,
        read_p99_us: m_opt(|r| r.read_p99_us),
        write_p99_us: m_opt(|r| r.write_p99_us),
        iops: m(|r| r.iops)?,
        device_read_bytes: m(|r| r.device_read_bytes as f64)? as u64,
    })
}

fn ratio(with: Option<f64>, alone: Option<f64>) -> Option<f64> {
    Some(with? / alone?.max(1.0))
}

impl Report {
    pub fn new(setup: Setup, alone_runs: Vec<Stats>, rows: Vec<(Imager, Vec<Window>)>) -> Report {
        let alone = median_stats(&alone_runs);
        let rows = rows
            .into_iter()
            .map(|(imager, windows)| {
                let runs: Vec<Stats> = windows
                    .iter()
                    .filter_map(|w| w.foreground.clone())
                    .collect();
                let with = median_stats(&runs);
                let imaging_runs: Vec<f64> =
                    windows.iter().map(|w| w.imaging_bytes_per_second).collect();
                let main_passes: Vec<f64> = windows
                    .iter()
                    .flat_map(|w| w.outcome.main_pass_bytes_per_second.iter().copied())
                    .collect();
                let pick = |f: fn(&Stats) -> Option<f64>| {
                    ratio(with.as_ref().and_then(f), alone.as_ref().and_then(f))
                };
                Row {
                    read_p99_inflation: pick(|s| s.read_p99_us),
                    write_p99_inflation: pick(|s| s.write_p99_us),
                    p99_inflation: pick(|s| Some(s.p99_us)),
                    hot_clone: imager.is_hot_clone(),
                    name: imager.name,
                    command: imager.command,
                    command_resolved: imager.command_resolved,
                    with,
                    runs,
                    imaging_bytes_per_second: median(imaging_runs.clone()).unwrap_or(0.0),
                    imaging_runs,
                    main_pass_bytes_per_second: median(main_passes.clone()),
                    main_passes: main_passes.len(),
                    instances: windows.iter().map(|w| w.outcome.instances).sum(),
                }
            })
            .collect();
        Report {
            setup,
            alone,
            alone_runs,
            rows,
        }
    }

    /// A markdown table, ready for PERF.md, and the commands of its rows.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let s = &self.setup;
        let speed = s.device_speed_bytes_per_second;
        writeln!(
            out,
            "{} (scheduler {}; full read speed {:.0} MB/s): {} s windows, median of {} runs",
            s.device.display(),
            s.scheduler,
            speed / 1e6,
            s.seconds,
            s.runs,
        )?;
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let mbs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}", v / 1e6));
        let imaging = |row: &Row| {
            format!(
                "{:.0} ({:.0} %)",
                row.imaging_bytes_per_second / 1e6,
                100.0 * row.imaging_bytes_per_second / speed.max(1.0)
            )
        };
        match &s.describe {
            Some(describe) => {
                writeln!(
                    out,
                    "foreground {}: {} req/s, {describe}, one at a time",
                    format!("{:?}", s.foreground).to_lowercase(),
                    s.rate
                )?;
                writeln!(out)?;
                writeln!(
                    out,
                    "| imager | read p99 alone (us) | read p99 with (us) | read p99 x | write p99 alone (us) | write p99 with (us) | write p99 x | all p99 x | IOPS with | imaging MB/s (% of full) | main pass MB/s |"
                )?;
                writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
                let alone = self.alone.as_ref();
                for row in &self.rows {
                    let with = row.with.as_ref();
                    writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        row.name,
                        us(alone.and_then(|a| a.read_p99_us)),
                        us(with.and_then(|w| w.read_p99_us)),
                        x(row.read_p99_inflation),
                        us(alone.and_then(|a| a.write_p99_us)),
                        us(with.and_then(|w| w.write_p99_us)),
                        x(row.write_p99_inflation),
                        x(row.p99_inflation),
                        us(with.map(|w| w.iops)),
                        imaging(row),
                        mbs(row.main_pass_bytes_per_second),
                    )?;
                }
                if let Some(alone) = alone {
                    writeln!(out)?;
                    writeln!(out, "IOPS alone {:.0}", alone.iops)?;
                }
            }
            None => {
                writeln!(out, "no foreground (idle device)")?;
                writeln!(out)?;
                let first = self.rows.first().and_then(|r| r.main_pass_bytes_per_second);
                writeln!(
                    out,
                    "| imager | imaging MB/s (% of full) | main pass MB/s | main pass x first row | main passes |"
                )?;
                writeln!(out, "|---|---|---|---|---|")?;
                for row in &self.rows {
                    writeln!(
                        out,
                        "| {} | {} | {} | {} | {} |",
                        row.name,
                        imaging(row),
                        mbs(row.main_pass_bytes_per_second),
                        x(ratio(row.main_pass_bytes_per_second, first)),
                        row.main_passes,
                    )?;
                }
            }
        }
        writeln!(out)?;
        for row in &self.rows {
            if row.name != row.command_resolved {
                writeln!(out, "- {}: `{}`", row.name, row.command_resolved)?;
            }
        }
        Ok(())
    }
}
