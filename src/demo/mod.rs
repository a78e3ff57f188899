//! `hot-clone demo`: the whole product on a scratch device, for a newcomer
//! with no spare disk. As root: a loop device over a file in the temp
//! directory, filled with data; a writer changing it through the main pass
//! and into the catch-up; an image; a restore; a byte-for-byte comparison
//! with the device; a summary. Everything it made is removed on every path
//! (the loop device and the directory are owned by guards).

pub mod aligned;
pub mod compare;
pub mod prng;
pub mod writer;

use crate::demo::aligned::AlignedBuf;
use crate::demo::compare::{Side, compare};
use crate::demo::prng::XorShift;
use crate::image::{self, ImageOptions, Output, Verdict};
use crate::restore::{self, ImageSource, Options};
use crate::units::{Bytes, Rate};
use anyhow::{Context, bail};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Writes per second of the demo's writer.
const WRITES_PER_SECOND: u64 = 2000;

/// How long the writer goes on after the main pass, into the catch-up.
const WRITES_AFTER_MAIN_PASS: Duration = Duration::from_millis(300);

const WRITE_BYTES: usize = 4096;

pub struct DemoOptions {
    pub size_bytes: u64,
    pub seed: u64,
}

/// Runs the demo; Ok only if the restored image equals the device.
pub fn run(options: &DemoOptions) -> anyhow::Result<()> {
    if options.size_bytes < 1 << 20 || !options.size_bytes.is_multiple_of(4096) {
        bail!("--size must be at least 1M and a multiple of 4K");
    }
    let dir = tempfile::Builder::new()
        .prefix("hot-clone-demo-")
        .tempdir()
        .context("cannot make a scratch directory")?;
    let backing = dir.path().join("disk.img");
    eprintln!(
        "Demo: filling a {} scratch disk ({})",
        Bytes(options.size_bytes),
        backing.display()
    );
    fill(&backing, options.size_bytes, options.seed)?;
    let device = LoopDevice::attach(&backing)?;
    eprintln!("Demo: scratch disk is {}", device.path.display());

    let main_pass_done = Arc::new(AtomicBool::new(false));
    let hold = dir.path().join("hold");
    fs::write(&hold, b"").context("cannot make the hold file")?;
    let image_path = dir.path().join("demo.hc");
    let mut image_options =
        ImageOptions::new(device.path.clone(), Output::File(image_path.clone()));
    image_options.hold_file = Some(hold.clone());
    image_options.main_pass_done = Some(Arc::clone(&main_pass_done));

    let writer_stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let outcome = std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_randomly(&device.path, options, &writer_stop, &writes));
        let releaser = scope.spawn(|| {
            // Keeps writing into the catch-up, then stops the writer and
            // lets the run converge.
            while !main_pass_done.load(Ordering::SeqCst) && !writer.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(WRITES_AFTER_MAIN_PASS);
            writer_stop.store(true, Ordering::SeqCst);
            let written = writer.join();
            let _ = fs::remove_file(&hold);
            written
        });
        let outcome = image::run(&image_options);
        // On an error the releaser would wait for a main pass that never ends.
        main_pass_done.store(true, Ordering::SeqCst);
        let written = releaser.join().expect("writer thread");
        (outcome, written)
    });
    let (outcome, written) = outcome;
    let outcome = outcome?;
    let writer_result = written.expect("writer thread");
    writer_result.context("the demo's writer failed")?;
    let writes = writes.load(Ordering::SeqCst);

    let restored = dir.path().join("restored.img");
    restore::reassemble(
        &ImageSource::File(image_path.clone()),
        &restored,
        Options::default(),
    )
    .context("cannot reassemble the demo image")?;
    let (restored_side, device_side) = (Side::open(&restored)?, Side::open(&device.path)?);
    if restored_side.len_bytes != device_side.len_bytes {
        bail!(
            "the restored image is {} bytes, {} is {}: this is a bug, please report it",
            restored_side.len_bytes,
            device.path.display(),
            device_side.len_bytes
        );
    }
    if let Some(&(block, _)) = compare(&restored_side, &device_side, 512)?.ranges.first() {
        bail!(
            "the restored image differs from {} at byte {}: this is a bug, please report it",
            device.path.display(),
            block * 512
        );
    }
    let stats = &outcome.stats;
    eprintln!(
        "Demo: {} writes were made while imaging, through the main pass and into the catch-up",
        writes
    );
    image::print_summary(&outcome);
    eprintln!(
        "Demo: dirty blocks re-read: {} in {} rounds; main pass {}",
        Bytes(stats.catch_up.bytes),
        stats.rounds.len(),
        Rate(stats.main_pass.bytes_per_second)
    );
    if outcome.verdict != Verdict::Converged {
        bail!("the demo run did not converge");
    }
    eprintln!(
        "Demo: the restored image equals the device byte for byte ({} compared)",
        Bytes(options.size_bytes)
    );
    drop(device);
    Ok(())
}

/// Fills `path` with `size_bytes` of patterned, incompressible data.
fn fill(path: &Path, size_bytes: u64, seed: u64) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut rng = XorShift::from_state(seed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size_bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill(&mut chunk[..n]);
        file.write_all(&chunk[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// 4 KiB O_DIRECT writes at random places, `WRITES_PER_SECOND`, until `stop`.
fn write_randomly(
    device: &Path,
    options: &DemoOptions,
    stop: &AtomicBool,
    writes: &AtomicU64,
) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("cannot open {} for the demo's writer", device.display()))?;
    let mut buffer = AlignedBuf::new(WRITE_BYTES);
    let mut rng = XorShift::new(options.seed);
    let blocks = options.size_bytes / WRITE_BYTES as u64;
    let interval = Duration::from_micros(1_000_000 / WRITES_PER_SECOND);
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let block = rng.next_u64() % blocks;
        let stamp = rng.next_u64();
        for word in buffer.chunks_exact_mut(8) {
            word.copy_from_slice(&stamp.to_le_bytes());
        }
        file.write_all_at(&buffer, block * WRITE_BYTES as u64)
            .with_context(|| format!("demo write to {} block {block}", device.display()))?;
        writes.fetch_add(1, Ordering::SeqCst);
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

/// A loop device attached for the demo; detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> anyhow::Result<LoopDevice> {
        let output = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(backing)
            .output()
            .context("cannot run losetup (util-linux) to make the scratch loop device")?;
        if !output.status.success() {
            bail!(
                "losetup could not attach {}: {}",
                backing.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let detached = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !detached.is_ok_and(|s| s.success()) {
            eprintln!(
                "hot-clone: WARNING: could not detach {}; run `losetup -d {}`",
                self.path.display(),
                self.path.display()
            );
        }
    }
}
