//! A running child (a `hot-clone image`, typically) whose stderr lines
//! arrive on a channel as it prints them, so a test can wait for a line,
//! act, and collect the whole log. Killed and reaped on drop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct LiveRun {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl LiveRun {
    /// Spawns `command` with stdin closed and stderr captured (stdout as
    /// the caller set it).
    pub fn spawn(mut command: Command) -> LiveRun {
        let mut child = command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LiveRun {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; false if the child's
    /// stderr closed first. Panics with the log after `timeout`.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    let hit = line.starts_with(prefix);
                    self.log.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        panic!("no line {prefix:?} within {timeout:?}: {:#?}", self.log);
    }

    /// Waits for `path` to exist (a marker file the child makes where its
    /// stderr cannot say it, e.g. while it holds a filesystem frozen).
    /// Panics with `what` and the log if the child exits first or
    /// `timeout` passes.
    pub fn wait_for_file(&mut self, path: &Path, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if self.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                self.finish(Duration::from_secs(1));
                panic!("{what}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the child to exit (killing it after `timeout`, with a
    /// panic) and collects the rest of its log.
    pub fn finish(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return status;
            }
            while let Ok(line) = self.lines.try_recv() {
                self.log.push(line);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the child did not finish: {:#?}", self.log);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    pub fn log(&self) -> String {
        self.log.join("\n")
    }
}

impl Drop for LiveRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
