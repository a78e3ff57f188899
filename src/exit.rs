//! Exit statuses: 0 only for a complete, trustworthy result.

use crate::image::ImageError;
use crate::signals::Interrupted;
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

impl Exit {
    /// The status a command that failed with `error` exits with: the one
    /// place errors become statuses. The imaging run's own endings say
    /// theirs ([`ImageError::exit`]); a signal anywhere in the chain, also
    /// under a run's other failures, is [`Exit::Interrupted`]; anything else
    /// is [`Exit::Failure`].
    pub fn of_error(error: &anyhow::Error) -> Exit {
        let interrupted = |e: &anyhow::Error| e.chain().any(|c| c.is::<Interrupted>());
        match error.downcast_ref::<ImageError>() {
            Some(ImageError::Failed(inner)) if interrupted(inner) => Exit::Interrupted,
            Some(image_error) => image_error.exit(),
            None if interrupted(error) => Exit::Interrupted,
            None => Exit::Failure,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::CompletionsMissing;
    use anyhow::Context;

    fn failed(error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::from(ImageError::Failed(error))
    }

    #[test]
    fn errors_map_to_their_statuses() {
        let plain = anyhow::anyhow!("cannot open /dev/x");
        assert_eq!(Exit::of_error(&plain), Exit::Failure);
        assert_eq!(
            Exit::of_error(&failed(anyhow::anyhow!("EIO"))),
            Exit::Failure
        );
        let signal = anyhow::Error::from(Interrupted).context("restoring x.hc");
        assert_eq!(Exit::of_error(&signal), Exit::Interrupted);
        let image_signal = anyhow::Error::from(ImageError::Interrupted(Interrupted));
        assert_eq!(Exit::of_error(&image_signal), Exit::Interrupted);
        // A signal that reached the run inside another failure, bare or
        // under context.
        assert_eq!(
            Exit::of_error(&failed(Interrupted.into())),
            Exit::Interrupted
        );
        let deep: anyhow::Result<()> = Err(Interrupted.into());
        let deep = deep.context("reading the device").unwrap_err();
        assert_eq!(Exit::of_error(&failed(deep)), Exit::Interrupted);
        let missing = anyhow::Error::from(ImageError::from(CompletionsMissing {
            device: "/dev/x".into(),
            sector_first: None,
            waited: std::time::Duration::ZERO,
            matched_total: 0,
        }));
        assert_eq!(Exit::of_error(&missing), Exit::CompletionsMissing);
    }
}
