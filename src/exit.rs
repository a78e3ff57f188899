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
    /// The image is intact but says it is not a complete capture (the
    /// imaging run did not converge, or the source had unreadable ranges).
    /// The restore was done; the warning says which bytes to distrust.
    Incomplete = 3,
    /// Stopped by SIGINT or SIGTERM; cleaned up.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}
