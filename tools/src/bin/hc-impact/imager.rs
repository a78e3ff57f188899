//! The imagers: the built-in `hot-clone image` or any shell command, kept
//! imaging the device for the whole foreground window.
//!
//! Each runs in its own process group, restarted whenever it finishes
//! before the window ends, and at the end the whole group is stopped and
//! reaped, so that a pipeline (`dd ... | pv -qL 100M > /dev/null`) dies
//! with its shell. hc-impact is a child subreaper (`main`), so members
//! orphaned by their shell come back to it to be reaped.

use anyhow::{Context, bail};
use serde::Serialize;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time a stopped group gets after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Time a stopped group gets after SIGKILL before hc-impact gives up on it.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// A built-in hot-clone past its main pass converges once its hold file
/// goes; past this it is stopped instead.
const CONVERGE_MAX: Duration = Duration::from_secs(60);
/// How often a supervisor looks at its child.
const POLL: Duration = Duration::from_millis(5);

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Imager {
    pub name: String,
    /// As given, placeholders and all.
    pub command: String,
    /// With the rates of `{rate:P%}` filled in (set once the device's
    /// speed is known).
    pub command_resolved: String,
    #[serde(skip)]
    pub kind: ImagerKind,
}

#[derive(Clone, Debug)]
pub enum ImagerKind {
    /// `hot-clone image -d DEV --hold-file H --stats-json S [-o /dev/null] ARGS`.
    HotClone { args: Vec<String> },
    /// `sh -c COMMAND`.
    Shell,
}

impl Imager {
    /// `[NAME=]CMD`. NAME is what precedes the first `=` if it has no
    /// space, quote or brace in it. CMD `hot-clone [ARGS]` without `{dev}`
    /// is the built-in path; anything else a shell command.
    pub fn parse(spec: &str) -> anyhow::Result<Imager> {
        let (name, command) = match spec.split_once('=') {
            Some((name, command))
                if !name.is_empty()
                    && !name.contains(|c: char| c.is_whitespace() || "{}'\"$".contains(c)) =>
            {
                (name.to_string(), command.trim().to_string())
            }
            _ => (spec.trim().to_string(), spec.trim().to_string()),
        };
        if command.is_empty() {
            bail!("--imager {spec:?}: no command");
        }
        let mut words = command.split_whitespace();
        let kind = if words.next() == Some("hot-clone") && !command.contains("{dev}") {
            ImagerKind::HotClone {
                args: words.map(str::to_string).collect(),
            }
        } else {
            ImagerKind::Shell
        };
        Ok(Imager {
            name,
            command_resolved: command.clone(),
            command,
            kind,
        })
    }

    /// The built-in path with `args` (the default row).
    pub fn hot_clone(args: &[String]) -> Imager {
        let command = std::iter::once("hot-clone".to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        Imager {
            name: command.clone(),
            command_resolved: command.clone(),
            command,
            kind: ImagerKind::HotClone {
                args: args.to_vec(),
            },
        }
    }

    pub fn is_hot_clone(&self) -> bool {
        matches!(self.kind, ImagerKind::HotClone { .. })
    }
}

/// What the placeholders stand for.
pub struct Places {
    pub device: PathBuf,
    /// The device's full read speed, for `{rate:P%}`.
    pub speed_bytes_per_second: f64,
    pub hot_clone: PathBuf,
}

/// `{rate:P%}` replaced, for the record of what ran.
pub fn resolve_rates(text: &str, speed_bytes_per_second: f64) -> anyhow::Result<String> {
    replace_rates(text.to_string(), speed_bytes_per_second)
}

/// `{dev}`, `{out}` and `{rate:P%}` (P % of the device's full read speed,
/// in whole bytes per second) replaced.
pub fn substitute(text: &str, ctx: &Places, out: &Path) -> anyhow::Result<String> {
    let result = text
        .replace("{dev}", &ctx.device.to_string_lossy())
        .replace("{out}", &out.to_string_lossy());
    replace_rates(result, ctx.speed_bytes_per_second)
}

fn replace_rates(mut result: String, speed_bytes_per_second: f64) -> anyhow::Result<String> {
    let text = result.clone();
    while let Some(start) = result.find("{rate:") {
        let end = result[start..]
            .find('}')
            .map(|end| start + end)
            .with_context(|| format!("{text:?}: {{rate: without }}"))?;
        let percent: f64 = result[start + 6..end]
            .trim_end_matches('%')
            .parse()
            .with_context(|| format!("{text:?}: {{rate:P%}} wants a number P"))?;
        let bytes = (speed_bytes_per_second * percent / 100.0).round() as u64;
        result.replace_range(start..=end, &bytes.to_string());
    }
    Ok(result)
}

/// What one window of an imager did, beyond the device's read counter.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Instances started in the window (restarts + 1).
    pub instances: u32,
    /// Built-in: main-pass bytes per second of every instance whose main
    /// pass ended (from its --stats-json).
    pub main_pass_bytes_per_second: Vec<f64>,
}

#[derive(Default)]
struct State {
    stop: bool,
    /// The running instance's process group.
    group: Option<i32>,
}

/// An imager kept running until `stop`.
pub struct Running {
    state: Arc<Mutex<State>>,
    kill_on_stop: bool,
    /// Taken by `end`.
    thread: Option<JoinHandle<anyhow::Result<Outcome>>>,
}

impl Running {
    /// Starts `imager` (its first instance) in a supervisor thread;
    /// `dir` holds its scratch files for the run.
    pub fn start(imager: &Imager, ctx: &Places, dir: &Path) -> anyhow::Result<Running> {
        let state = Arc::new(Mutex::new(State::default()));
        let out = dir.join("out");
        let (kill_on_stop, thread) = match &imager.kind {
            ImagerKind::Shell => {
                let command = substitute(&imager.command, ctx, &out)?;
                let state = Arc::clone(&state);
                let dir = dir.to_path_buf();
                (
                    true,
                    std::thread::spawn(move || supervise_shell(&command, &dir, &out, &state)),
                )
            }
            ImagerKind::HotClone { args } => {
                let args = args
                    .iter()
                    .map(|arg| substitute(arg, ctx, &out))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let state = Arc::clone(&state);
                let dir = dir.to_path_buf();
                let binary = ctx.hot_clone.clone();
                let device = ctx.device.clone();
                (
                    false,
                    std::thread::spawn(move || {
                        supervise_hot_clone(&binary, &device, &args, &dir, &out, &state)
                    }),
                )
            }
        };
        Ok(Running {
            state,
            kill_on_stop,
            thread: Some(thread),
        })
    }

    /// The supervisor ended early (failed): its error.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Ends the window: no more restarts; a shell imager's group is
    /// killed, a built-in hot-clone converges (past its main pass) or is
    /// stopped. Returns once every process of it is gone.
    pub fn stop(mut self) -> anyhow::Result<Outcome> {
        self.end()
    }

    fn end(&mut self) -> anyhow::Result<Outcome> {
        {
            let mut state = self.state.lock().expect("imager state");
            state.stop = true;
            if self.kill_on_stop
                && let Some(group) = state.group
            {
                signal_group(group, libc::SIGTERM);
            }
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(Outcome::default()),
        }
    }
}

/// An early return between start and stop leaves nothing running either.
impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some()
            && let Err(error) = self.end()
        {
            eprintln!("hc-impact: {error:#}");
        }
    }
}

fn stopping(state: &Mutex<State>) -> bool {
    state.lock().expect("imager state").stop
}

/// Spawns `command` as the leader of a new process group, recorded in
/// `state` unless the window already ended (then None).
fn spawn_in_group(command: &mut Command, state: &Mutex<State>) -> anyhow::Result<Option<Child>> {
    let mut state = state.lock().expect("imager state");
    if state.stop {
        return Ok(None);
    }
    // The group is set before exec (spawn returns only once the child has
    // exec'd), so a SIGTERM to it from stop() reaches the whole command.
    let child = command.process_group(0).spawn()?;
    state.group = Some(child.id() as i32);
    Ok(Some(child))
}

fn supervise_shell(
    command: &str,
    dir: &Path,
    out: &Path,
    state: &Mutex<State>,
) -> anyhow::Result<Outcome> {
    let log = dir.join("imager.stderr");
    let mut outcome = Outcome::default();
    loop {
        let Some(mut child) = spawn_in_group(
            Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log)?),
            state,
        )
        .with_context(|| format!("cannot run sh -c {command:?}"))?
        else {
            break;
        };
        outcome.instances += 1;
        let group = child.id() as i32;
        let status = child.wait()?;
        let stopped = {
            let mut state = state.lock().expect("imager state");
            state.group = None;
            state.stop
        };
        reap_group(group)?;
        let _ = fs::remove_file(out);
        if stopped {
            break;
        }
        if !status.success() {
            bail!(
                "imager {command:?} failed ({status}) before the window ended: {}",
                fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
    }
    Ok(outcome)
}

fn supervise_hot_clone(
    binary: &Path,
    device: &Path,
    args: &[String],
    dir: &Path,
    out: &Path,
    state: &Mutex<State>,
) -> anyhow::Result<Outcome> {
    let hold = dir.join("hold");
    let stats = dir.join("stats.json");
    // A file, not a pipe: nobody reads hot-clone's progress while the
    // workload runs, and a full pipe would stall it.
    let log = dir.join("hot-clone.stderr");
    let has_output = args
        .iter()
        .any(|arg| arg == "-o" || arg == "--output" || arg.starts_with("--output="));
    let mut outcome = Outcome::default();
    loop {
        fs::write(&hold, b"")?;
        let _ = fs::remove_file(&stats);
        let mut command = Command::new(binary);
        command.args(["image", "--device"]).arg(device);
        if !has_output {
            command.args(["-o", "/dev/null"]);
        }
        command
            .arg("--hold-file")
            .arg(&hold)
            .arg("--stats-json")
            .arg(&stats)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let Some(mut child) = spawn_in_group(&mut command, state)
            .with_context(|| format!("cannot run {}", binary.display()))?
        else {
            break;
        };
        outcome.instances += 1;
        let group = child.id() as i32;
        let (status, terminated) = watch_hot_clone(&mut child, &hold, &log, state)?;
        state.lock().expect("imager state").group = None;
        reap_group(group)?;
        let stopped = stopping(state);
        let _ = fs::remove_file(out);
        // 3: not converged within --max-rounds, with the foreground still
        // writing; 4: the trace lost events (a loaded host), so the image
        // cannot be vouched for. Either way the reads were made, and cost
        // what they cost, which is all this measures.
        if status.code() == Some(4) {
            eprintln!("hc-impact: hot-clone lost trace events (exit 4); its reads still count");
        }
        if matches!(status.code(), Some(0 | 3 | 4)) {
            if let Some(rate) = main_pass_rate(&stats) {
                outcome.main_pass_bytes_per_second.push(rate);
            }
        } else if !terminated {
            bail!(
                "hot-clone failed ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        if stopped {
            break;
        }
    }
    let _ = fs::remove_file(&hold);
    Ok(outcome)
}

/// Waits for one built-in instance: once its main pass is done the hold
/// file goes and it converges (and is restarted by the caller); when the
/// window ends before that, it is stopped with SIGTERM (hot-clone's
/// handler switches its tracing off). Returns its status and whether it
/// was stopped.
fn watch_hot_clone(
    child: &mut Child,
    hold: &Path,
    log: &Path,
    state: &Mutex<State>,
) -> anyhow::Result<(ExitStatus, bool)> {
    let group = child.id() as i32;
    let mut main_pass_done = false;
    let mut released: Option<Instant> = None;
    let mut terminated = false;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, terminated));
        }
        if !main_pass_done {
            main_pass_done =
                fs::read_to_string(log).is_ok_and(|text| text.contains("Main pass done:"));
        }
        if main_pass_done && released.is_none() {
            let _ = fs::remove_file(hold);
            released = Some(Instant::now());
        }
        let converging_too_long = released.is_some_and(|at| at.elapsed() > CONVERGE_MAX);
        if !terminated && ((!main_pass_done && stopping(state)) || converging_too_long) {
            signal_group(group, libc::SIGTERM);
            terminated = true;
        }
        std::thread::sleep(POLL);
    }
}

fn main_pass_rate(stats: &Path) -> Option<f64> {
    let stats: serde_json::Value = serde_json::from_slice(&fs::read(stats).ok()?).ok()?;
    stats["main_pass"]["bytes_per_second"]
        .as_f64()
        .filter(|rate| *rate > 0.0)
}

fn signal_group(group: i32, signal: i32) {
    assert!(group > 1, "process group {group}");
    // SAFETY: kill(2) takes no pointers; a negative pid names the group
    // this process made for the imager (its leader's pid).
    unsafe { libc::kill(-group, signal) };
}

/// Waits until no process of `group` is left, reaping those that were
/// orphaned to us; SIGTERM to stragglers at once, SIGKILL after
/// TERM_GRACE, an error after KILL_GRACE more.
fn reap_group(group: i32) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut killed = false;
    loop {
        // SAFETY: waitpid(2) with a null status pointer writes nothing.
        while unsafe { libc::waitpid(-group, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        // SAFETY: signal 0 only checks that the group has a member.
        if unsafe { libc::kill(-group, 0) } != 0 {
            return Ok(());
        }
        let waited = started.elapsed();
        if waited > TERM_GRACE + KILL_GRACE {
            bail!("the imager's process group {group} is still running after SIGKILL");
        }
        if waited > TERM_GRACE && !killed {
            signal_group(group, libc::SIGKILL);
            killed = true;
        } else if !killed {
            signal_group(group, libc::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places() -> Places {
        Places {
            device: PathBuf::from("/dev/loop9"),
            speed_bytes_per_second: 1e9,
            hot_clone: PathBuf::from("/bin/false"),
        }
    }

    #[test]
    fn a_name_is_what_precedes_an_equals_sign_without_a_space() {
        let named = Imager::parse("pv25=dd if={dev} | pv -qL {rate:25%}").unwrap();
        assert_eq!(named.name, "pv25");
        assert_eq!(named.command, "dd if={dev} | pv -qL {rate:25%}");
        assert!(!named.is_hot_clone());
        // `if=` follows a space: no name, the command names the row.
        let unnamed = Imager::parse("dd if={dev} of=/dev/null").unwrap();
        assert_eq!(unnamed.name, "dd if={dev} of=/dev/null");
        assert!(Imager::parse("x=").is_err());
    }

    #[test]
    fn hot_clone_without_dev_is_the_built_in_path() {
        let built_in = Imager::parse("slow=hot-clone --max-rate {rate:10%} -o {out}").unwrap();
        match &built_in.kind {
            ImagerKind::HotClone { args } => {
                assert_eq!(args, &["--max-rate", "{rate:10%}", "-o", "{out}"])
            }
            ImagerKind::Shell => panic!("{built_in:?}"),
        }
        // With {dev} it is a command like any other, run by the shell.
        let shell = Imager::parse("hot-clone image -d {dev} -o /dev/null").unwrap();
        assert!(!shell.is_hot_clone());
        assert!(!Imager::parse("hot-cloner").unwrap().is_hot_clone());
    }

    #[test]
    fn placeholders_are_filled_in() {
        let text = substitute(
            "dd if={dev} of={out} | pv -qL {rate:25%} {rate:2.5%}",
            &places(),
            Path::new("/tmp/x/out"),
        )
        .unwrap();
        assert_eq!(
            text,
            "dd if=/dev/loop9 of=/tmp/x/out | pv -qL 250000000 25000000"
        );
        assert_eq!(
            resolve_rates("--max-rate {rate:10%} {dev}", 1e9).unwrap(),
            "--max-rate 100000000 {dev}"
        );
        assert!(substitute("{rate:lots%}", &places(), Path::new("o")).is_err());
        assert!(substitute("{rate:10%", &places(), Path::new("o")).is_err());
    }
}
