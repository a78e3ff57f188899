//! Hand-made tracefs instances that look like a killed run's, for the
//! stale-instance cleanup tests (trace_live.rs, trace_integrity.rs).

use hot_clone::trace::live::{self, InstanceName, TRACEFS_ROOT};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// A pid no process has: probed downwards from the top of the pid space.
pub fn dead_pid() -> u32 {
    let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(32_768);
    (2..pid_max)
        .rev()
        .find(|pid| {
            // SAFETY: signal 0 only checks for existence.
            let rc = unsafe { libc::kill(*pid as libc::pid_t, 0) };
            rc != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
                && !Path::new(&format!("/proc/{pid}")).exists()
        })
        .expect("a free pid")
}

/// A tracefs instance made by hand, removed on drop (with its events off
/// first, should a test fail while they are on).
pub struct HandMadeInstance {
    pub path: PathBuf,
}

impl HandMadeInstance {
    /// The instance's directory name.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .expect("an instance path has a name")
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for HandMadeInstance {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("events/block/block_bio_queue/enable"), "0");
        let _ = fs::remove_dir(&self.path);
    }
}

/// A stale-looking instance (new-format name of this boot and pid
/// namespace, a dead pid) with its cpu0 `trace_pipe_raw` held open, an
/// event enabled and tracing on. Between `mkdir` and the `open` it really
/// is stale, and a concurrent test's cleanup may remove it: then it is
/// made again under another name. `tag` keeps the names of one test
/// process's callers apart.
pub fn held_stale_instance(tag: u64) -> (HandMadeInstance, File) {
    let mut identity = live::current_identity().expect("identity");
    identity.pid = dead_pid();
    for attempt in 0..20 {
        // Counter: our pid, a tag and the attempt: unique among parallel
        // tests and processes.
        let counter = u64::from(std::process::id()) * 1000 + tag * 100 + attempt;
        let instance = HandMadeInstance {
            path: Path::new(TRACEFS_ROOT)
                .join("instances")
                .join(InstanceName::format(&identity, counter)),
        };
        fs::create_dir(&instance.path).expect("create the instance");
        let Ok(pipe) = File::open(instance.path.join("per_cpu/cpu0/trace_pipe_raw")) else {
            continue; // removed by a concurrent cleanup before we held it
        };
        fs::write(
            instance.path.join("events/block/block_bio_queue/enable"),
            "1",
        )
        .unwrap();
        fs::write(instance.path.join("tracing_on"), "1").unwrap();
        return (instance, pipe);
    }
    panic!("20 instances were removed by concurrent cleanups before they could be held");
}
