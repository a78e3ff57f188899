//! The lints run as tests, so the one test command checks them too.

use std::process::Command;

fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // A target directory of its own: the test build holds the usual one.
        .env(
            "CARGO_TARGET_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/lints"),
        )
        .output()
        .expect("cannot run cargo");
    assert!(
        output.status.success(),
        "cargo {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn rustfmt_is_clean() {
    cargo(&["fmt", "--all", "--check"]);
}

/// Every member, every target, with the `[workspace.lints]` table
/// (undocumented unsafe blocks, unsafe operations in unsafe fns) denied
/// along with clippy's warnings; then the build a user makes (no
/// dev-dependencies, so no test hooks), whose code differs by them.
#[test]
fn clippy_is_clean() {
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    cargo(&["clippy", "--workspace", "--", "-D", "warnings"]);
}

/// The test hooks are on only through the test kit, a dev-dependency: the
/// features a build without dev-dependencies (`cargo build --release`,
/// `cargo install`) resolves for the product have none of them, while the
/// test build's do.
#[test]
fn test_hooks_are_only_in_test_builds() {
    let hook = "hot-clone feature \"test-hooks\"";
    let user_build = cargo(&[
        "tree",
        "--workspace",
        "-e",
        "no-dev,features",
        "--prefix",
        "none",
    ]);
    assert!(
        !user_build.contains(hook),
        "a build without dev-dependencies turns on the test hooks:\n{user_build}"
    );
    let test_build = cargo(&["tree", "--workspace", "-e", "features", "--prefix", "none"]);
    assert!(
        test_build.contains(hook),
        "the test build lost its hooks (the kit's `test-hooks` feature):\n{test_build}"
    );
}
