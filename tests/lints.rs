//! The lints run as tests, so the one test command checks them too.

use std::process::Command;

fn cargo(args: &[&str]) {
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
}

#[test]
fn rustfmt_is_clean() {
    cargo(&["fmt", "--check"]);
}

#[test]
fn clippy_is_clean() {
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]);
}
