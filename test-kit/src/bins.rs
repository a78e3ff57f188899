//! The workspace's binaries, for tests in any of its packages.
//!
//! `CARGO_BIN_EXE_<name>` names only the binaries of the test's own
//! package, so a test of the product cannot reach `hc-slowdisk` that way
//! (nor a tool's test `hot-clone`). Cargo puts every binary of a build in
//! one directory, the parent of the test executable's `deps/`: the test
//! finds them there. Plain `cargo test` at the root builds them all
//! before any test runs (each package with integration tests has its
//! binaries built).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The package of each binary the tests run, for the message of a
/// missing one.
const PACKAGES: &[(&str, &str)] = &[
    ("hot-clone", "hot-clone"),
    ("hc-from-raw", "hc-tools"),
    ("hc-slowdisk", "hc-tools"),
    ("hc-writer", "hc-tools"),
    ("hc-compare", "hc-tools"),
    ("hc-impact", "hc-tools"),
    ("hc-bench-catchup", "hc-tools"),
    ("sector-pinger", "hc-tools"),
    ("sector-sprinkler", "hc-tools"),
];

/// Where cargo puts a build's binaries, given a test executable's path
/// (`target/debug/deps/live-1f2e` → `target/debug`; a binary running from
/// there itself → its own directory).
pub fn bin_dir_of(exe: &Path) -> PathBuf {
    let dir = exe.parent().expect("an executable path has a directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("deps/ has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of the workspace binary `name` of this build. Panics, saying
/// how to build it, if it is not there.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let path = bin_dir_of(&exe).join(name);
    if !path.exists() {
        let package = PACKAGES
            .iter()
            .find(|(bin, _)| *bin == name)
            .map_or("its package", |(_, package)| package);
        panic!(
            "{} is not built: run the whole suite with plain `cargo test` at the \
             workspace root (it builds every binary first), or `cargo build -p {package}` \
             before this test",
            path.display()
        );
    }
    path
}

/// A command running the workspace binary `name`.
pub fn workspace_command(name: &str) -> Command {
    Command::new(workspace_bin(name))
}

/// The product binary, as built for these tests (with the test hooks when
/// the product's own tests run).
pub fn hot_clone() -> Command {
    workspace_command("hot-clone")
}

pub fn hc_from_raw() -> Command {
    workspace_command("hc-from-raw")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_in_deps_finds_binaries_one_level_up() {
        assert_eq!(
            bin_dir_of(Path::new("/w/target/debug/deps/live-1f2e3d")),
            Path::new("/w/target/debug")
        );
    }

    #[test]
    fn a_binary_outside_deps_finds_its_own_directory() {
        assert_eq!(
            bin_dir_of(Path::new("/w/target/release/hc-impact")),
            Path::new("/w/target/release")
        );
    }

    #[test]
    fn this_test_finds_the_directory_of_its_own_build() {
        let exe = std::env::current_exe().unwrap();
        let dir = bin_dir_of(&exe);
        assert!(dir.join("deps").is_dir(), "{}", dir.display());
    }
}
