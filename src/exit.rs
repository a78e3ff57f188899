//! Exit statuses: 0 only for a complete, trustworthy result.

use std::process::ExitCode;

/// Every status the program exits with. README.md lists them for users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done, and the result is complete and verified.
    Success = 0,
    /// An error: bad image, I/O failure, refused target. Nothing that looks
    /// complete was left behind.
    Failure = 1,
    /// The command line was wrong.
    Usage = 2,
    /// Imaging: writes did not quiesce within `--max-rounds`; the image is
    /// complete but marks itself unconverged. Restore/verify: the image is
    /// intact but says it is not a complete capture (unconverged, or the
    /// source had unreadable ranges); the warning says what to distrust.
    Incomplete = 3,
    /// Imaging: the event source cannot vouch for every write (events lost,
    /// a passthrough write it cannot place, tracing changed from outside);
    /// the image has no trailer.
    EventsLost = 4,
    /// Imaging: the device does not report where its writes complete and
    /// `--freeze` was not given; the image has no trailer.
    CompletionsMissing = 5,
    /// Imaging: converged and complete except for ranges the device could
    /// not read; the image has its trailer and a `B:` record for each.
    /// (Unconverged and unreadable ranges together exit 3: the image is not
    /// even a consistent copy, the weaker promise wins.)
    Unreadable = 6,
    /// Stopped by SIGINT or SIGTERM; cleaned up.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// `main` of a bundled tool: Ok → 0; an error → "PROGRAM: error: ..." with
/// its causes on one line, and 1.
pub fn tool_exit(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: error: {error:#}");
            ExitCode::from(Exit::Failure as u8)
        }
    }
}
