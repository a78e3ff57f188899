//! The command line: one clap definition drives parsing and `--help`; the
//! original tool's single-dash spelling is rewritten into it first.

use crate::exit::Exit;
use crate::restore::{self, ImageSource, Options};
use crate::signals::{self, Interrupted};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    done; the result is complete and verified
  1    error (bad image, I/O failure, refused target); nothing complete-looking left behind
  2    usage error
  3    the image is intact but records that it is not a complete capture
       (imaging did not converge, or unreadable source ranges); see the warning
  130  interrupted by SIGINT/SIGTERM; cleaned up

The original tool's spelling also works:
  hot-clone -reassemble IMAGE -reassemble-output OUT";

#[derive(Parser, Debug)]
#[command(
    name = "hot-clone",
    version,
    about = "Image a live block device to a .hc stream, and restore such images",
    after_help = EXIT_STATUS_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Restore an image to a regular file or a block device.
    ///
    /// A regular file is written under a temporary name beside OUT (mode
    /// 0600, all-zero blocks left as holes) and renamed to OUT only after the
    /// whole image verified. A block device must not be mounted or otherwise
    /// in use, must be large enough, and is never truncated; an image file is
    /// checked whole before the device is written.
    Reassemble(ReassembleArgs),
    /// Read a whole image and check it, writing nothing.
    ///
    /// Prints what the image holds (sections, data bytes, extent, trailer).
    /// Exits 0 only for an image whose END trailer verified.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct ReassembleArgs {
    /// The image, or - for standard input.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The regular file (created or replaced) or block device to restore to.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Restore an image without an END trailer (as the original hot-clone
    /// writes them); a cut-short image cannot then be told from a whole one.
    #[arg(long)]
    pub allow_legacy: bool,
    /// Print a summary of the image when done.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The image, or - for standard input.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// The program: parse, run, report. Every error is printed once, with its
/// chain of causes, prefixed with the program name.
pub fn main() -> ExitCode {
    signals::install();
    let args = match seed_spelling(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("hot-clone: {message}");
            return Exit::Usage.into();
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success
            }
            .into();
        }
    };
    match run(cli) {
        Ok(exit) => exit.into(),
        Err(error) => {
            let mut chain = error.chain();
            if let Some(top) = chain.next() {
                eprintln!("hot-clone: error: {top}");
            }
            for cause in chain {
                eprintln!("  because: {cause}");
            }
            if error.chain().any(|c| c.is::<Interrupted>()) {
                Exit::Interrupted.into()
            } else {
                Exit::Failure.into()
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Reassemble(args) => {
            let source = ImageSource::from_arg(&args.image);
            let options = Options {
                allow_legacy: args.allow_legacy,
            };
            let outcome = restore::reassemble(&source, &args.output, options)?;
            if args.verbose {
                eprint!("{}", outcome.summary.describe());
            }
            eprintln!(
                "Restored {} sections ({} bytes of data) to {}",
                outcome.summary.sections,
                outcome.summary.data_bytes,
                args.output.display()
            );
            Ok(report_warnings(&outcome.warnings))
        }
        Command::Verify(args) => {
            let source = ImageSource::from_arg(&args.image);
            let outcome = restore::verify(&source)?;
            print!("{}", outcome.summary.describe());
            Ok(report_warnings(&outcome.warnings))
        }
    }
}

fn report_warnings(warnings: &[String]) -> Exit {
    for warning in warnings {
        eprintln!("hot-clone: WARNING: {warning}");
    }
    if warnings.is_empty() {
        Exit::Success
    } else {
        Exit::Incomplete
    }
}

/// The original tool's flags (Go `flag` syntax: `-name value`, `-name=value`,
/// `--name`; booleans take no value).
const SEED_VALUE_FLAGS: &[&str] = &[
    "device",
    "reassemble",
    "reassemble-output",
    "blktrace.bufsize",
    "blktrace.bufcount",
    "queue-depth",
];
const SEED_BOOL_FLAGS: &[&str] = &[
    "print-writes",
    "verbose",
    "debug",
    "reassemble-allow-legacy",
];

/// Rewrites the original tool's spelling into subcommands; any other
/// command line is returned as it is.
pub fn seed_spelling(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return Ok(args);
    };
    let Some(name) = seed_flag_name(first) else {
        return Ok(args);
    };
    if !SEED_VALUE_FLAGS.contains(&name) && !SEED_BOOL_FLAGS.contains(&name) {
        return Ok(args);
    }
    let mut values: Vec<(&str, OsString)> = Vec::new();
    let mut bools: Vec<&str> = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let text = arg
            .to_str()
            .ok_or_else(|| format!("{}: not a flag", arg.to_string_lossy()))?;
        let name = seed_flag_name(text).ok_or_else(|| {
            format!(
                "{text}: unexpected argument (the original spelling takes only -flag value pairs)"
            )
        })?;
        let inline = text.split_once('=').map(|(_, v)| OsString::from(v));
        if let Some(&flag) = SEED_VALUE_FLAGS.iter().find(|&&f| f == name) {
            let value = match inline {
                Some(v) => v,
                None => rest
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("-{flag} needs a value"))?,
            };
            values.push((flag, value));
        } else if let Some(&flag) = SEED_BOOL_FLAGS.iter().find(|&&f| f == name) {
            match inline.as_ref().and_then(|v| v.to_str()) {
                None | Some("true") | Some("1") => bools.push(flag),
                Some("false") | Some("0") => {}
                Some(v) => return Err(format!("-{flag}={v}: expected true or false")),
            }
        } else {
            return Err(format!(
                "-{name}: not a flag of hot-clone (see hot-clone --help)"
            ));
        }
    }
    let value = |flag: &str| {
        values
            .iter()
            .rev()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| v.clone())
    };
    let mut out: Vec<OsString> = vec![args[0].clone()];
    if let Some(image) = value("reassemble") {
        if let Some((flag, _)) = values.iter().find(|(f, _)| !f.starts_with("reassemble")) {
            return Err(format!("-{flag} cannot be combined with -reassemble"));
        }
        let output = value("reassemble-output")
            .ok_or("You must provide a -reassemble-output to restore to")?;
        out.extend(["reassemble".into(), image, "--output".into(), output]);
        if bools.contains(&"reassemble-allow-legacy") {
            out.push("--allow-legacy".into());
        }
        if bools.contains(&"verbose") || bools.contains(&"debug") {
            out.push("--verbose".into());
        }
        return Ok(out);
    }
    if value("device").is_some() {
        return Err(
            "-device: live imaging is not part of this build yet; this build restores and verifies images (see hot-clone --help)"
                .into(),
        );
    }
    Err(
        "nothing to do: give -reassemble IMAGE -reassemble-output OUT (see hot-clone --help)"
            .into(),
    )
}

/// `-name`, `--name`, `-name=value` → `name`.
fn seed_flag_name(arg: &str) -> Option<&str> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    let name = body.split_once('=').map_or(body, |(n, _)| n);
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> Result<Vec<String>, String> {
        let args = std::iter::once("hot-clone")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        seed_spelling(args).map(|v| {
            v.into_iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn seed_reassemble_spellings() {
        let expected = ["reassemble", "x.hc", "--output", "x.img"];
        for args in [
            &["-reassemble", "x.hc", "-reassemble-output", "x.img"][..],
            &["--reassemble=x.hc", "-reassemble-output=x.img"],
            &["-reassemble-output", "x.img", "-reassemble", "x.hc"],
        ] {
            assert_eq!(rewrite(args).unwrap(), expected, "{args:?}");
        }
        assert_eq!(
            rewrite(&[
                "-reassemble",
                "-",
                "-reassemble-output",
                "o",
                "-verbose",
                "-reassemble-allow-legacy"
            ])
            .unwrap(),
            [
                "reassemble",
                "-",
                "--output",
                "o",
                "--allow-legacy",
                "--verbose"
            ]
        );
    }

    #[test]
    fn modern_spelling_passes_through() {
        for args in [
            &["reassemble", "x", "-o", "y"][..],
            &["--help"],
            &["-h"],
            &["--version"],
            &[],
        ] {
            assert_eq!(rewrite(args).unwrap(), args, "{args:?}");
        }
    }

    #[test]
    fn seed_mistakes_are_explained() {
        assert!(
            rewrite(&["-reassemble", "x.hc"])
                .unwrap_err()
                .contains("-reassemble-output")
        );
        assert!(
            rewrite(&["-reassemble"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            rewrite(&["-reassemble", "x", "-reassemble-output", "y", "-bogus"])
                .unwrap_err()
                .contains("-bogus")
        );
        assert!(rewrite(&["-verbose=maybe"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
