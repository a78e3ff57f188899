//! How a run fails: [`ImageError`], one variant per exit status.

use crate::exit::Exit;
use crate::signals::Interrupted;
use crate::trace::live;
use crate::units::Bytes;
use std::path::PathBuf;
use std::time::Duration;

/// Why a run ended without a trailer. The image, if any, was abandoned and
/// tracing is torn down. Each variant maps to one exit status
/// ([`ImageError::exit`]); the messages are the failures' own.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Stopped by SIGINT or SIGTERM.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
    /// Boxed: the trace's health is large, and every `Result` would carry it.
    #[error(transparent)]
    EventsLost(Box<EventsLost>),
    #[error(transparent)]
    CompletionsMissing(#[from] CompletionsMissing),
    /// Anything else: a refused target, an I/O error, more unreadable than
    /// `--max-bad-bytes` ([`TooManyUnreadable`]), with its chain of causes.
    #[error(transparent)]
    Failed(anyhow::Error),
}

impl ImageError {
    pub fn exit(&self) -> Exit {
        match self {
            ImageError::Interrupted(_) => Exit::Interrupted,
            ImageError::EventsLost(_) => Exit::EventsLost,
            ImageError::CompletionsMissing(_) => Exit::CompletionsMissing,
            ImageError::Failed(_) => Exit::Failure,
        }
    }
}

impl From<EventsLost> for ImageError {
    fn from(lost: EventsLost) -> ImageError {
        ImageError::EventsLost(Box::new(lost))
    }
}

impl From<anyhow::Error> for ImageError {
    /// The run's own endings (a signal, lost events, missing completions)
    /// are raised as an `ImageError` inside the run and pass through the
    /// rounds as `anyhow::Error` with no context put on them; they come out
    /// as themselves, everything else as [`ImageError::Failed`].
    fn from(error: anyhow::Error) -> ImageError {
        match error.downcast::<ImageError>() {
            Ok(image_error) => image_error,
            Err(error) => ImageError::Failed(error),
        }
    }
}

/// The event source cannot vouch for every write (events lost, writes it
/// cannot place, tracing changed from outside): the run cannot vouch for
/// the image, which was left without a trailer. Exit status 4.
#[derive(Debug)]
pub struct EventsLost {
    pub source_name: &'static str,
    pub health: live::TraceHealth,
    pub kept: u64,
    pub buffer: Bytes,
}

impl std::fmt::Display for EventsLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} trace cannot vouch for every write ({} seen): {}; some writes may be missing, so the image was ended without its END trailer",
            self.source_name, self.kept, self.health
        )?;
        if self.health.tampered.is_some() {
            f.write_str("; leave tracing alone while imaging (do not run `trace-cmd reset` or change tracefs) and image again")?;
        }
        if self.health.unplaceable > 0 {
            f.write_str("; stop the tool issuing passthrough commands while imaging (smartd, nvme-cli, sg3_utils, hdparm and the like; --freeze does not stop them) and image again")?;
        }
        if self.health.lost > 0 {
            write!(
                f,
                "; give the trace more buffer (e.g. -blktrace.bufsize 1048576 -blktrace.bufcount 64, now {} per CPU) or image while the disk is less busy",
                self.buffer
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for EventsLost {}

/// The device does not report where its writes complete, and `--freeze`
/// was not asked for: no round can prove that a write racing a read was
/// read again. The image was ended without a trailer. Exit status 5.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} does not report where its writes complete: {}; without that the run cannot prove that a write racing a read was read again, so the image was ended without its END trailer. Devices like this (brd, NVMe multipath heads, md/dm devices whose completions name a member) can be imaged with --freeze, which stops the filesystem's writes for the final round, or image the device underneath",
    device.display(),
    match sector_first {
        Some(sector) => format!(
            "a write at sector {sector} of it has had no completion event for {:.1}s ({matched_total} completions matched so far)",
            waited.as_secs_f64()
        ),
        None => format!("more writes were left without a completion than the run can track ({matched_total} completions matched)"),
    }
)]
pub struct CompletionsMissing {
    pub device: PathBuf,
    pub sector_first: Option<u64>,
    pub waited: Duration,
    pub matched_total: u64,
}

/// More of the device could not be read than `--max-bad-bytes` allows (or
/// than the run can track): the image was ended without a trailer. It
/// reaches the top through the engine, under the engine's context, as an
/// [`ImageError::Failed`].
#[derive(Debug, thiserror::Error)]
#[error(
    "{} could not be read in {} (more than {} in {range_count} ranges, the first at byte offset {first_offset_bytes}){}, so the image was ended without its END trailer. The device may be failing: to keep what reads, image it again with a larger --max-bad-bytes (and --read-retries 0 to spend less time on each bad block), or rescue it with GNU ddrescue first",
    device.display(),
    Bytes(*bad_bytes),
    Bytes(*max_bad_bytes),
    if *ranges_full { format!("; the run tracks at most {} separate ranges", super::bad::RANGES_MAX) } else { String::new() }
)]
pub struct TooManyUnreadable {
    pub device: PathBuf,
    pub bad_bytes: u64,
    pub max_bad_bytes: u64,
    pub range_count: usize,
    pub first_offset_bytes: u64,
    pub ranges_full: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_has_its_exit_status() {
        assert_eq!(ImageError::from(Interrupted).exit(), Exit::Interrupted);
        let missing = CompletionsMissing {
            device: "/dev/x".into(),
            sector_first: Some(8),
            waited: Duration::from_secs(2),
            matched_total: 3,
        };
        assert_eq!(ImageError::from(missing).exit(), Exit::CompletionsMissing);
        assert_eq!(
            ImageError::from(anyhow::anyhow!("no such device")).exit(),
            Exit::Failure
        );
    }

    #[test]
    fn an_ending_raised_inside_the_run_comes_out_as_itself() {
        let raised: anyhow::Error = ImageError::from(Interrupted).into();
        let error = ImageError::from(raised);
        assert!(matches!(error, ImageError::Interrupted(_)));
        assert_eq!(error.to_string(), "interrupted by a signal");
    }

    #[test]
    fn a_failure_keeps_its_message_and_causes() {
        let failure = anyhow::Error::from(TooManyUnreadable {
            device: "/dev/x".into(),
            bad_bytes: 4096,
            max_bad_bytes: 0,
            range_count: 1,
            first_offset_bytes: 512,
            ranges_full: false,
        })
        .context("delivering 4096 bytes read at byte offset 0 of /dev/x");
        let error = ImageError::from(failure);
        assert_eq!(error.exit(), Exit::Failure);
        let ImageError::Failed(inner) = &error else {
            panic!("a failure: {error:?}");
        };
        let chain: Vec<String> = inner.chain().map(ToString::to_string).collect();
        assert_eq!(chain.len(), 2);
        assert_eq!(
            chain[0],
            "delivering 4096 bytes read at byte offset 0 of /dev/x"
        );
        assert!(
            chain[1].starts_with("/dev/x could not be read in 4.0 KiB"),
            "{}",
            chain[1]
        );
    }

    #[test]
    fn the_top_level_prints_the_same_chain_through_an_image_error() {
        let failure = || {
            anyhow::anyhow!("EIO")
                .context("cannot write the image")
                .context("delivering 512 bytes")
        };
        let chain = |error: &anyhow::Error| -> Vec<String> {
            error.chain().map(ToString::to_string).collect()
        };
        let through = anyhow::Error::from(ImageError::from(failure()));
        assert_eq!(chain(&through), chain(&failure()));
        assert_eq!(
            through.downcast_ref::<ImageError>().map(ImageError::exit),
            Some(Exit::Failure)
        );
        let interrupted = anyhow::Error::from(ImageError::from(Interrupted));
        assert_eq!(chain(&interrupted), ["interrupted by a signal"]);
    }
}
