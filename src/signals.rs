//! SIGINT, SIGTERM, SIGHUP and SIGQUIT become a flag that long loops poll,
//! so that every exit path runs the same clean-up (filesystems thawed,
//! temporary files removed, tracing torn down) and exits 130.
//!
//! A second signal means the clean-up itself is stuck (or the operator will
//! not wait for it): the handler then does, with raw system calls only
//! (async-signal-safe), what must not be left behind — FITHAW on every
//! filesystem the run holds frozen, and tracing switched off — and exits at
//! once with status 130. What it cannot do there (remove the tracefs
//! instance, whose files this process still holds open; remove a temporary
//! image file) the next run, or the operator, does: a stale instance is
//! removed by the next run, and a temporary is named `.FILE.hc-partial-PID`.
//!
//! The emergency actions live in a fixed table of [`EMERGENCY_SLOTS`]
//! entries, registered by whoever sets up the state ([`Emergency::register`])
//! and cleared when it is undone, so the handler never allocates or locks.

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNALS_SEEN: AtomicU32 = AtomicU32::new(0);

/// The signals that stop a run.
pub const STOP_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Emergency actions at most: a frozen filesystem or a trace each take one.
pub const EMERGENCY_SLOTS: usize = 32;

/// What the second signal's handler does for one registered piece of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Empty = 0,
    /// `ioctl(fd, request, 0)`: FITHAW, BLKTRACESTOP, BLKTRACETEARDOWN.
    Ioctl = 1,
    /// `open(path, O_WRONLY)`, `write("0")`, `close`: tracefs `tracing_on`.
    WriteZero = 2,
}

struct Slot {
    action: AtomicU32,
    fd: AtomicI32,
    request: AtomicUsize,
    /// A leaked `CString`, for [`Action::WriteZero`] (never freed: see Drop).
    path: AtomicPtr<libc::c_char>,
}

#[allow(clippy::declare_interior_mutable_const)] // the array initializer only
const SLOT_EMPTY: Slot = Slot {
    action: AtomicU32::new(Action::Empty as u32),
    fd: AtomicI32::new(-1),
    request: AtomicUsize::new(0),
    path: AtomicPtr::new(std::ptr::null_mut()),
};

static SLOTS: [Slot; EMERGENCY_SLOTS] = [SLOT_EMPTY; EMERGENCY_SLOTS];

/// A registered emergency action; dropping it unregisters it. Drop it
/// before the descriptor it names is closed, so that the handler never acts
/// on a reused descriptor number.
#[derive(Debug)]
pub struct Emergency {
    slot: Option<usize>,
}

impl Emergency {
    /// On a second signal: `ioctl(fd, request, 0)`. `fd` must stay open
    /// while the returned value lives.
    pub fn ioctl(fd: libc::c_int, request: libc::c_ulong) -> Emergency {
        Emergency::register(Action::Ioctl, fd, request, std::ptr::null_mut())
    }

    /// On a second signal: write "0" to the file at `path` (a tracefs
    /// `tracing_on`).
    pub fn write_zero(path: &std::path::Path) -> Emergency {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            return Emergency { slot: None };
        };
        Emergency::register(Action::WriteZero, -1, 0, c.into_raw())
    }

    fn register(
        action: Action,
        fd: i32,
        request: libc::c_ulong,
        path: *mut libc::c_char,
    ) -> Emergency {
        for (index, slot) in SLOTS.iter().enumerate() {
            // Claimed by moving Empty -> a busy marker, filled, then published.
            if slot
                .action
                .compare_exchange(
                    Action::Empty as u32,
                    u32::MAX,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                slot.fd.store(fd, Ordering::SeqCst);
                slot.request.store(request as usize, Ordering::SeqCst);
                slot.path.store(path, Ordering::SeqCst);
                slot.action.store(action as u32, Ordering::SeqCst);
                return Emergency { slot: Some(index) };
            }
        }
        // Full: the ordinary clean-up still runs; only the second-signal
        // shortcut is missing for this piece of state.
        if !path.is_null() {
            // SAFETY: `path` came from `CString::into_raw` above, unshared.
            drop(unsafe { CString::from_raw(path) });
        }
        Emergency { slot: None }
    }
}

impl Drop for Emergency {
    fn drop(&mut self) {
        let Some(index) = self.slot else { return };
        let slot = &SLOTS[index];
        slot.action.store(u32::MAX, Ordering::SeqCst);
        slot.fd.store(-1, Ordering::SeqCst);
        // The path string is left allocated (one short string per trace
        // set up): a handler on another thread may have loaded it just
        // before, and must never read freed memory.
        slot.path.store(std::ptr::null_mut(), Ordering::SeqCst);
        slot.action.store(Action::Empty as u32, Ordering::SeqCst);
    }
}

/// Runs every registered action: raw system calls, no allocation, no lock.
fn run_emergency_actions() {
    for slot in &SLOTS {
        let action = slot.action.load(Ordering::SeqCst);
        if action == Action::Ioctl as u32 {
            let fd = slot.fd.load(Ordering::SeqCst);
            let request = slot.request.load(Ordering::SeqCst) as libc::c_ulong;
            if fd >= 0 {
                // SAFETY: ioctl is a system call (async-signal-safe); the
                // registered requests take an int argument they ignore.
                unsafe { libc::ioctl(fd, request as _, 0) };
            }
        } else if action == Action::WriteZero as u32 {
            let path = slot.path.load(Ordering::SeqCst);
            if !path.is_null() {
                // SAFETY: `path` is a NUL-terminated string from
                // `CString::into_raw`, never freed (see Drop).
                let path = unsafe { CStr::from_ptr(path) };
                // open/write/close are async-signal-safe; nix passes the
                // `CStr` through without allocating.
                use nix::fcntl::{OFlag, open};
                if let Ok(fd) = open(
                    path,
                    OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                ) {
                    let _ = nix::unistd::write(&fd, b"0");
                }
            }
        }
    }
}

extern "C" fn on_signal(_signal: libc::c_int) {
    // Atomics and system calls only: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
    if SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) >= 1 {
        run_emergency_actions();
        const MESSAGE: &[u8] =
            b"hot-clone: second signal: thawed and switched tracing off; exiting now\n";
        // write is async-signal-safe; `Stderr::as_fd` names fd 2 and takes
        // no lock.
        let _ = nix::unistd::write(std::io::stderr(), MESSAGE);
        // SAFETY: _exit is async-signal-safe and runs no destructors or
        // atexit handlers (what `std::process::exit` would).
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handlers. Without `SA_RESTART`: a blocking system call
/// on the thread that takes the signal returns EINTR, and the loops around
/// such calls check the flag ([`check`]).
pub fn install() {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in STOP_SIGNALS {
        // SAFETY: the handler only touches atomics and makes
        // async-signal-safe system calls (see `on_signal`); no other handler
        // of these signals is replaced that Rust code relies on.
        let _ = unsafe { nix::sys::signal::sigaction(signal, &action) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// The error a loop returns when it stops for a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by a signal")]
pub struct Interrupted;

/// `Err(Interrupted)` once a signal has arrived.
pub fn check() -> Result<(), Interrupted> {
    if interrupted() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}
