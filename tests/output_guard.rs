//! The output guard through the real binary, as root (issue 9): every way
//! the image could land on the device being imaged is refused, naming the
//! relation; a block output in use is refused; `-o FILE` appears only
//! complete, mode 0600; loop sources with a second way in are refused; and
//! `--force` gets past a refusal.

use hc_test_kit::run::LiveRun;
use hc_test_kit::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `hot-clone image -d DEVICE` plus `args`, stdout to /dev/null.
fn image(device: &Path, args: &[&str]) -> Output {
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"]).arg(device).args(args);
    run(cmd, None)
}

fn image_to(device: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(device)
        .arg("-o")
        .arg(output)
        .args(extra);
    run(cmd, None)
}

/// Asserts a refusal: status 1, and each of `words` in the message.
fn assert_refused(result: &Output, words: &[&str]) -> String {
    let message = stderr(result);
    assert_eq!(result.status.code(), Some(1), "{message}");
    assert!(message.contains("refusing"), "{message}");
    for word in words {
        assert!(message.contains(word), "{word:?} not in: {message}");
    }
    assert!(message.contains("--force"), "{message}");
    message
}

fn checksum(device: &Path) -> u32 {
    crc32c::crc32c(&read_device(device))
}

/// A 64 MiB loop disk filled with data, with partition 1 (sectors 2048 to
/// 43007, 20 MiB) and partition 2 (43008 to the end, 43 MiB: room for an
/// image of partition 1).
fn partitioned_disk() -> (LoopDevice, PathBuf, PathBuf) {
    let mut disk = LoopDevice::new(64 << 20);
    fill_device(&disk.path, 9);
    let p1 = disk.add_partition(1, 2048, 40960);
    let p2 = disk.add_partition(2, 43008, 88064);
    (disk, p1, p2)
}

#[test]
fn the_disk_of_the_imaged_partition_is_refused() {
    let (disk, p1, _p2) = partitioned_disk();
    let before = checksum(&disk.path);
    let result = image_to(&p1, &disk.path, &[]);
    let disk_name = disk.path.display().to_string();
    assert_refused(
        &result,
        &[
            &format!("refusing to write the image to {disk_name}"),
            &format!("the whole disk that holds {}", p1.display()),
            "the device being imaged",
        ],
    );
    assert_eq!(checksum(&disk.path), before, "the disk was written");
}

#[test]
fn a_partition_of_the_imaged_disk_is_refused_and_left_unchanged() {
    let (disk, p1, _p2) = partitioned_disk();
    let before = checksum(&disk.path);
    let result = image_to(&disk.path, &p1, &[]);
    assert_refused(
        &result,
        &[&format!("a partition of {}", disk.path.display())],
    );
    assert_eq!(checksum(&disk.path), before, "the disk was written");
}

#[test]
fn standard_output_on_the_disk_or_a_partition_is_refused() {
    let (disk, p1, _p2) = partitioned_disk();
    let before = checksum(&disk.path);
    for (source, target, relation) in [
        (&p1, &disk.path, "the whole disk that holds"),
        (&disk.path, &p1, "a partition of"),
    ] {
        let stdout = fs::OpenOptions::new().write(true).open(target).unwrap();
        let result = hot_clone()
            .args(["image", "--device"])
            .arg(source)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_refused(
            &result,
            &["refusing to write the image to standard output", relation],
        );
    }
    assert_eq!(checksum(&disk.path), before, "the disk was written");
}

#[test]
fn the_other_partition_of_the_same_disk_is_fine() {
    let (_disk, p1, p2) = partitioned_disk();
    let result = image_to(&p1, &p2, &[]);
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    let written = read_device(&p2);
    assert!(written.starts_with(b"This-Is-A-Hot-Clone-Image"));
}

#[test]
fn a_loop_device_backed_by_a_file_on_the_source_is_refused() {
    let source = LoopDevice::new(64 << 20);
    let mounted = Mounted::ext4(&source.path);
    let inner_file = mounted.path().join("inner.img");
    fs::File::create(&inner_file)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let inner = LoopDevice::attach(&inner_file);
    let result = image_to(&source.path, &inner.path, &[]);
    assert_refused(
        &result,
        &[
            &format!("it is {}, a loop device backed by", inner.path.display()),
            &format!("{} itself, the device being imaged", source.path.display()),
        ],
    );
    drop(inner); // detached before the filesystem is unmounted
}

#[test]
fn a_file_on_a_filesystem_mounted_from_a_partition_of_the_source_is_refused() {
    let (disk, p1, _p2) = partitioned_disk();
    let mounted = Mounted::ext4(&p1);
    let before = listing(mounted.path());
    let result = image_to(&disk.path, &mounted.path().join("image.hc"), &[]);
    assert_refused(
        &result,
        &[
            "it is a file on the filesystem mounted on",
            &format!("a partition of {}", disk.path.display()),
        ],
    );
    assert_eq!(listing(mounted.path()), before, "something was created");
}

#[test]
fn a_mounted_block_output_is_refused() {
    let source = LoopDevice::new(8 << 20);
    let target = LoopDevice::new(32 << 20);
    let mounted = Mounted::ext4(&target.path);
    let result = image_to(&source.path, &target.path, &[]);
    assert_refused(
        &result,
        &["is mounted on", mounted.path().to_str().unwrap()],
    );

    // A disk whose partition is mounted: the disk is refused too.
    let mut disk = LoopDevice::new(32 << 20);
    let p1 = disk.add_partition(1, 2048, 40960);
    let on_p1 = Mounted::ext4(&p1);
    let result = image_to(&source.path, &disk.path, &[]);
    assert_refused(&result, &["is mounted on", on_p1.path().to_str().unwrap()]);
    drop(on_p1);
}

#[test]
fn a_mistyped_device_name_creates_nothing_in_dev() {
    let source = LoopDevice::new(4 << 20);
    let name = format!("nonexistent-xyz-{}", std::process::id());
    let result = image_to(&source.path, &Path::new("/dev").join(&name), &[]);
    assert_refused(&result, &["devtmpfs", "mistyped"]);
    let left: Vec<_> = listing(Path::new("/dev"))
        .into_iter()
        .filter(|n| n.contains(&name))
        .collect();
    assert!(left.is_empty(), "made in /dev: {left:?}");
}

#[test]
fn a_symbolic_link_is_not_followed_without_force() {
    let source = LoopDevice::new(4 << 20);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.hc");
    let link = dir.path().join("link.hc");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let result = image_to(&source.path, &link, &[]);
    assert_refused(&result, &["symbolic link", "-o does not follow links"]);
    assert!(!target.exists());

    let stats_link = dir.path().join("stats-link.json");
    std::os::unix::fs::symlink(dir.path().join("stats.json"), &stats_link).unwrap();
    let good = dir.path().join("good.hc");
    let result = image_to(
        &source.path,
        &good,
        &["--stats-json", stats_link.to_str().unwrap()],
    );
    assert_refused(&result, &["symbolic link", "--stats-json does not follow"]);
    assert!(!good.exists(), "the image was placed by a run that failed");

    // --force follows the link.
    let result = image_to(&source.path, &link, &["--force"]);
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    verify_ok(&target);
}

/// Verifies an image with the binary; returns its bytes.
fn verify_ok(image: &Path) -> Vec<u8> {
    let mut cmd = hot_clone();
    cmd.arg("verify").arg(image);
    let result = run(cmd, None);
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    fs::read(image).unwrap()
}

#[test]
fn an_earlier_file_survives_an_interrupted_run() {
    let source = LoopDevice::new(16 << 20);
    fill_device(&source.path, 3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image.hc");
    fs::write(&out, b"an earlier image\n").unwrap();
    let hold = dir.path().join("hold");
    fs::write(&hold, b"").unwrap();
    let mut cmd = hot_clone();
    cmd.args(["image", "--device"])
        .arg(&source.path)
        .arg("-o")
        .arg(&out)
        .arg("--hold-file")
        .arg(&hold)
        .stdout(Stdio::null());
    let mut imaging = LiveRun::spawn(cmd);
    assert!(
        imaging.wait_for("Main pass done", RUN_TIMEOUT),
        "{}",
        imaging.log()
    );
    // The image is being written, under another name.
    assert_eq!(fs::read(&out).unwrap(), b"an earlier image\n");
    let partial = format!(".image.hc.hc-partial-{}", imaging.child.id());
    assert_eq!(listing(dir.path()), [partial.as_str(), "hold", "image.hc"]);
    imaging.signal(libc::SIGINT);
    let status = imaging.finish(RUN_TIMEOUT);
    assert_eq!(status.code(), Some(130), "{}", imaging.log());
    assert_eq!(fs::read(&out).unwrap(), b"an earlier image\n");
    assert_eq!(listing(dir.path()), ["hold", "image.hc"]);
}

#[test]
fn the_image_file_is_mode_0600_even_if_it_was_0644() {
    let source = LoopDevice::new(8 << 20);
    fill_device(&source.path, 5);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image.hc");
    let stats = dir.path().join("stats.json");
    for path in [&out, &stats] {
        fs::write(path, b"old\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let result = image_to(
        &source.path,
        &out,
        &["--stats-json", stats.to_str().unwrap()],
    );
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    for path in [&out, &stats] {
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    let image = verify_ok(&out);
    assert_eq!(independent_restore(&image), read_device(&source.path));
    let stats: serde_json::Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert!(stats.is_object());
    assert_eq!(listing(dir.path()), ["image.hc", "stats.json"]);
}

#[test]
fn a_second_loop_device_on_the_backing_file_is_refused() {
    let source = LoopDevice::new(8 << 20);
    let twin = LoopDevice::attach(source.backing());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image.hc");
    let result = image_to(&source.path, &out, &[]);
    let message = assert_refused(
        &result,
        &[
            &format!("refusing to image {}", source.path.display()),
            &format!("{} is attached to", twin.path.display()),
            "without passing through its queue",
        ],
    );
    assert!(!out.exists(), "{message}");

    // --force images it anyway.
    let result = image_to(&source.path, &out, &["--force"]);
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    verify_ok(&out);
}

/// Kills and reaps a child on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_process_writing_the_backing_file_is_refused() {
    let source = LoopDevice::new(8 << 20);
    let writable = fs::OpenOptions::new()
        .append(true)
        .open(source.backing())
        .unwrap();
    let holder = Reaped(
        Command::new("sleep")
            .arg("120")
            .stdin(Stdio::null())
            .stdout(writable)
            .spawn()
            .unwrap(),
    );
    let result = image(&source.path, &["-o", "/dev/null"]);
    assert_refused(
        &result,
        &[
            &format!("process {} (sleep) can write", holder.0.id()),
            &source.backing().display().to_string(),
            "(fd 1)",
        ],
    );
    drop(holder);
    // Once it is gone, the same run goes through.
    let result = image(&source.path, &["-o", "/dev/null"]);
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
}

/// `--stats-json` naming the source device (or any block device) is
/// refused, even with --force: the statistics never land on a device, and
/// the run leaves no image behind since it ended in an error.
#[test]
fn stats_json_on_a_block_device_is_refused() {
    let device = LoopDevice::new(8 << 20);
    fill_device(&device.path, 4);
    let before = checksum(&device.path);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.hc");
    let stats = device.path.to_str().unwrap();
    for extra in [
        &["--stats-json", stats][..],
        &["--stats-json", stats, "--force"],
    ] {
        let result = image_to(&device.path, &image, extra);
        let message = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{message}");
        assert!(
            message.contains(&format!(
                "refusing to write --stats-json to {stats}: it is a block device"
            )),
            "{message}"
        );
        assert_eq!(checksum(&device.path), before, "the source was written");
        assert!(!image.exists(), "an image was left after the error");
    }
}
