//! Whether a trace's setup is still the one the source made: the control
//! files it wrote, read back once after setup and compared on every
//! [`super::EventSource::health`] call.
//!
//! Why: tracing can be switched off or narrowed from outside without any
//! loss counter moving — `echo 0 > tracing_on`, `trace-cmd reset`, a script
//! that clears `events/enable` or replaces a filter, `blktrace -k`. A trace
//! that silently stopped recording would let a run end "converged" with
//! writes missing. Comparing the files' text catches every such change that
//! the kernel exposes; a file that cannot be read any more (the instance
//! was removed) counts as changed too.
//!
//! The comparison is pure ([`compare`]) so it can be tested without a
//! kernel; [`Watched::check`] does the reading.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::LiveError;
use super::sys::{io_error, read_text};

/// Bytes of a watched file we compare at most: more than any value we
/// write (a filter of ~90 bytes); a longer text differs anyway.
const WATCHED_BYTES_MAX: usize = 8 << 10;

/// A control file and the text it had right after setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub path: PathBuf,
    /// The text as read back after setup, surrounding whitespace trimmed
    /// (the kernel's normalized form: a filter as the kernel stores it,
    /// `buffer_size_kb` as rounded to pages).
    pub expected: String,
}

impl Watched {
    /// Reads `path` now and keeps its text as the expected value.
    pub fn record(path: PathBuf) -> Result<Watched, LiveError> {
        let expected = read_text(&path)?.trim().to_string();
        Ok(Watched { path, expected })
    }

    /// Reads `path` now and checks that it says `expected` (what setup
    /// wrote, such as `1` for `tracing_on`): a setup that did not take is an
    /// error, not a baseline.
    pub fn expect(path: PathBuf, expected: &str) -> Result<Watched, LiveError> {
        let watched = Watched::record(path)?;
        if watched.expected != expected {
            return Err(LiveError::Parse {
                path: watched.path.clone(),
                message: format!(
                    "reads {:?} right after setup, not {expected:?}; something else is changing it",
                    watched.expected
                ),
            });
        }
        Ok(watched)
    }

    /// `None` if the file still says what it said; otherwise what changed.
    /// `buf` is scratch space kept by the caller.
    pub fn check(&self, buf: &mut Vec<u8>) -> Option<String> {
        compare(&self.path, &self.expected, read_into(&self.path, buf))
    }
}

/// Checks every watched file; the first change found, if any.
pub fn check_all(watched: &[Watched], buf: &mut Vec<u8>) -> Option<String> {
    watched.iter().find_map(|watched| watched.check(buf))
}

/// Compares a file's text now with what it was: `None` if the same
/// (surrounding whitespace ignored), else a sentence naming the file and
/// both values.
pub fn compare(path: &Path, expected: &str, now: io::Result<&str>) -> Option<String> {
    match now {
        Ok(text) if text.trim() == expected => None,
        Ok(text) => Some(format!(
            "{} reads {:?}, it was {expected:?}",
            path.display(),
            text.trim()
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Some(format!(
            "{} is gone (it was {expected:?}): the tracing it belongs to was removed",
            path.display()
        )),
        Err(error) => Some(format!(
            "{} cannot be read any more ({error}; it was {expected:?})",
            path.display()
        )),
    }
}

/// Reads a small control file into `buf` (at most [`WATCHED_BYTES_MAX`]
/// bytes; a longer text is returned cut, which never equals a short
/// expected value).
fn read_into<'a>(path: &Path, buf: &'a mut Vec<u8>) -> io::Result<&'a str> {
    buf.clear();
    let file = File::open(path)?;
    file.take(WATCHED_BYTES_MAX as u64).read_to_end(buf)?;
    std::str::from_utf8(buf).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Checks that a directory (a tracefs instance) still exists.
pub fn check_dir(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => None,
        Ok(_) => Some(format!("{} is no longer a directory", path.display())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Some(format!(
            "the tracefs instance {} was removed",
            path.display()
        )),
        Err(error) => Some(format!(
            "the tracefs instance {} cannot be checked: {}",
            path.display(),
            io_error("cannot stat", path, error)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_text_is_fine_whatever_the_whitespace() {
        let path = Path::new("/t/tracing_on");
        assert_eq!(compare(path, "1", Ok("1\n")), None);
        assert_eq!(compare(path, "1", Ok("  1 ")), None);
        let filter = "dev == 7340032 && rwbs ~ \"N*\"";
        assert_eq!(compare(path, filter, Ok(&format!("{filter}\n"))), None);
    }

    #[test]
    fn changed_text_names_the_file_and_both_values() {
        let path = Path::new("/t/instances/x/tracing_on");
        assert_eq!(
            compare(path, "1", Ok("0\n")).unwrap(),
            "/t/instances/x/tracing_on reads \"0\", it was \"1\""
        );
        let filter = Path::new("/t/events/block/block_bio_queue/filter");
        let message = compare(filter, "dev == 7340032", Ok("none\n")).unwrap();
        assert!(message.contains("reads \"none\""), "{message}");
        // A prefix is not the same text.
        assert!(compare(filter, "dev == 7340032", Ok("dev == 73400")).is_some());
    }

    #[test]
    fn a_file_that_is_gone_or_unreadable_counts_as_changed() {
        let path = Path::new("/t/instances/x/buffer_size_kb");
        let gone = compare(path, "1024", Err(io::ErrorKind::NotFound.into())).unwrap();
        assert!(gone.contains("is gone"), "{gone}");
        let unreadable = compare(
            path,
            "1024",
            Err(io::Error::from_raw_os_error(libc::ENODEV)),
        )
        .unwrap();
        assert!(
            unreadable.contains("cannot be read any more"),
            "{unreadable}"
        );
    }

    #[test]
    fn check_reads_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enable");
        std::fs::write(&path, "1\n").unwrap();
        let watched = Watched::expect(path.clone(), "1").unwrap();
        let mut buf = Vec::new();
        assert_eq!(check_all(std::slice::from_ref(&watched), &mut buf), None);
        std::fs::write(&path, "0\n").unwrap();
        assert!(watched.check(&mut buf).unwrap().contains("reads \"0\""));
        std::fs::remove_file(&path).unwrap();
        assert!(watched.check(&mut buf).unwrap().contains("is gone"));
        assert!(Watched::expect(path, "1").is_err(), "missing file");
        assert_eq!(check_dir(dir.path()), None);
        assert!(
            check_dir(&dir.path().join("nope"))
                .unwrap()
                .contains("was removed")
        );
    }

    #[test]
    fn expect_refuses_a_setup_that_did_not_take() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overwrite");
        std::fs::write(&path, "1\n").unwrap();
        assert!(matches!(
            Watched::expect(path, "0"),
            Err(LiveError::Parse { .. })
        ));
    }
}
