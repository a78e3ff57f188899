//! Diagnostics through `tracing`, kept apart from the product's own output.
//!
//! The convention for every layer:
//! - `tracing::info!`: what `-v`/`--verbose` shows (the event source, each
//!   catch-up round, each switch between gentle and full speed, restore's image summary).
//! - `tracing::warn!` and `tracing::error!`: shown without `-v`, for
//!   side remarks such as a clean-up that failed. The message is the whole
//!   line as users see it, prefix included (`hot-clone: warning: ...`):
//!   lines are printed bare.
//! - `tracing::debug!` and `trace!`: only with `RUST_LOG`, e.g.
//!   `RUST_LOG=hot_clone=debug`.
//!
//! Not through here: the product's output on stderr, which no `RUST_LOG`
//! may hide or reshape — the progress lines, the summary, the verdict
//! (`Done...`), the error chain that ends a run, and restore's `WARNING`
//! lines that explain exit status 3. Those stay direct writes.
//!
//! Lines are printed bare (no time, level, target or colour), so `-v`
//! prints exactly what it printed before `tracing`. The writer is
//! `std::io::stderr`, called for each event: it writes to whatever fd 2 is
//! at that moment, so while `--freeze` holds stderr in memory
//! ([`crate::source::freeze`]) diagnostics are held with the rest.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Without `-v`: warnings and errors only, the lines printed before.
const DIRECTIVES_QUIET: &str = "warn";
/// With `-v`: also this crate's `info!`.
const DIRECTIVES_VERBOSE: &str = "warn,hot_clone=info";

/// The filter directives: `RUST_LOG` when set and not empty, else what
/// `-v` asks for.
pub fn directives(verbose: bool, rust_log: Option<&str>) -> &str {
    match rust_log.map(str::trim) {
        Some(rust_log) if !rust_log.is_empty() => rust_log,
        _ if verbose => DIRECTIVES_VERBOSE,
        _ => DIRECTIVES_QUIET,
    }
}

/// Installs the subscriber for this process, once, at the entry point (a
/// second call changes nothing). A `RUST_LOG` that does not parse is
/// ignored, with a warning.
pub fn init(verbose: bool) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, rejected) = match EnvFilter::try_new(directives(verbose, rust_log.as_deref())) {
        Ok(filter) => (filter, None),
        Err(error) => (EnvFilter::new(directives(verbose, None)), Some(error)),
    };
    let _ = tracing::subscriber::set_global_default(subscriber(filter, std::io::stderr));
    if let Some(error) = rejected {
        tracing::warn!("hot-clone: warning: RUST_LOG ignored: {error}");
    }
}

/// Bare lines through `filter` to `writer`.
fn subscriber<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[test]
    fn rust_log_overrides_verbose() {
        assert_eq!(directives(false, None), "warn");
        assert_eq!(directives(true, None), "warn,hot_clone=info");
        assert_eq!(directives(false, Some("debug")), "debug");
        assert_eq!(directives(true, Some("off")), "off");
        assert_eq!(directives(true, Some("  ")), "warn,hot_clone=info");
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the events below print under `directives`.
    fn printed(directives: &str) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let filter = EnvFilter::try_new(directives).unwrap();
        tracing::subscriber::with_default(subscriber(filter, move || writer.clone()), || {
            tracing::info!("Event source: tracefs (instance hot-clone-1)");
            tracing::warn!("hot-clone: warning: BLKTRACETEARDOWN failed: EBADF");
            tracing::debug!("relay buffers: 4 x 64 KiB");
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_bare() {
        assert_eq!(
            printed(directives(false, None)),
            "hot-clone: warning: BLKTRACETEARDOWN failed: EBADF\n"
        );
        assert_eq!(
            printed(directives(true, None)),
            "Event source: tracefs (instance hot-clone-1)\n\
             hot-clone: warning: BLKTRACETEARDOWN failed: EBADF\n"
        );
        assert_eq!(
            printed("hot_clone=debug"),
            "Event source: tracefs (instance hot-clone-1)\n\
             hot-clone: warning: BLKTRACETEARDOWN failed: EBADF\n\
             relay buffers: 4 x 64 KiB\n"
        );
        assert_eq!(printed("off"), "");
    }
}
