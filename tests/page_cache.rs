//! Page-cache hygiene through the real binary: an image written to a file,
//! and a restore to a file or a block device, leave only a small part of
//! what they wrote in the page cache (drop-behind, src/dropbehind.rs),
//! and what they wrote is whole.
//!
//! Residency is read with mincore(2) over a shared read-only mapping: the
//! mapping faults nothing in, and mincore reports the page cache's folios
//! of the file (mm/mincore.c `mincore_page` looks them up in the mapping).

use hc_test_kit::*;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The fraction of a written file that may stay cached: drop-behind keeps
/// a few 16 MiB windows while writing and drops the rest once synced;
/// before it, all of it stayed (100% on a machine without memory pressure).
const RESIDENT_FRACTION_MAX: f64 = 0.25;

const DEVICE_BYTES: u64 = 256 * MIB;

/// The fraction of `path`'s pages in the page cache (a file or a device).
fn resident_fraction(path: &Path) -> f64 {
    let file = File::open(path).unwrap();
    let len_bytes = device_or_file_bytes(path, &file);
    assert!(len_bytes > 0, "{} is empty", path.display());
    let page_bytes = 4096usize;
    let pages = (len_bytes as usize).div_ceil(page_bytes);
    let mut vector = vec![0u8; pages];
    // SAFETY: a fresh read-only shared mapping of a file we hold open,
    // never dereferenced, unmapped below; mincore writes one byte per page
    // of it into `vector`, which has exactly that many.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len_bytes as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(
            at,
            libc::MAP_FAILED,
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let rc = libc::mincore(at, len_bytes as usize, vector.as_mut_ptr());
        let error = std::io::Error::last_os_error();
        libc::munmap(at, len_bytes as usize);
        assert_eq!(rc, 0, "mincore {}: {error}", path.display());
    }
    let resident = vector.iter().filter(|&&page| page & 1 != 0).count();
    resident as f64 / pages as f64
}

fn device_or_file_bytes(path: &Path, file: &File) -> u64 {
    use std::os::unix::fs::FileTypeExt;
    if file.metadata().unwrap().file_type().is_block_device() {
        device_size(path)
    } else {
        file.metadata().unwrap().len()
    }
}

fn assert_mostly_uncached(path: &Path, what: &str) {
    let fraction = resident_fraction(path);
    assert!(
        fraction < RESIDENT_FRACTION_MAX,
        "{what} ({}) is {:.0}% resident in the page cache afterwards; at most {:.0}% may be",
        path.display(),
        fraction * 100.0,
        RESIDENT_FRACTION_MAX * 100.0
    );
}

/// A filled scratch device imaged to a file in `dir`: the image's path.
fn image_of(device: &LoopDevice, dir: &Path) -> std::path::PathBuf {
    let image = dir.join("image.hc");
    let result = run_hot_clone(
        [
            "image".as_ref(),
            "--device".as_ref(),
            device.path.as_os_str(),
            "-o".as_ref(),
            image.as_os_str(),
        ],
        None,
    );
    assert!(result.status.success(), "{}", stderr(&result));
    image
}

#[test]
fn an_image_written_to_a_file_does_not_stay_in_the_page_cache() {
    require_root("image a loop device");
    let device = LoopDevice::new(DEVICE_BYTES);
    fill_device(&device.path, test_seed());
    let dir = tempfile::tempdir().unwrap();
    let image = image_of(&device, dir.path());
    assert!(fs::metadata(&image).unwrap().len() > DEVICE_BYTES);
    assert_mostly_uncached(&image, "the image");

    // And it is the device, whole.
    let restored = dir.path().join("restored.img");
    reassemble(&image, &restored);
    assert!(fs::read(&restored).unwrap() == read_device(&device.path));
}

#[test]
fn a_restore_to_a_file_does_not_stay_in_the_page_cache() {
    require_root("image a loop device");
    let device = LoopDevice::new(DEVICE_BYTES);
    fill_device(&device.path, test_seed() ^ 1);
    let dir = tempfile::tempdir().unwrap();
    let image = image_of(&device, dir.path());
    let restored = dir.path().join("restored.img");
    reassemble(&image, &restored);
    assert_mostly_uncached(&restored, "the restored file");
    assert!(fs::read(&restored).unwrap() == read_device(&device.path));
}

/// The same pattern works on a block device's own page cache (the bdev
/// inode's mapping): a restore onto a device leaves little of it cached.
///
/// The test holds the target open across the restore, as a live system
/// would (a udev probe, a monitoring agent): on the last close the kernel
/// flushes and drops a device's page cache itself (block/bdev.c
/// `blkdev_put_whole` → `blkdev_flush_mapping` → `kill_bdev`), which
/// would hide what the restore left behind (the whole device's worth,
/// cached until then, as the build before drop-behind does).
#[test]
fn a_restore_to_a_device_does_not_stay_in_the_page_cache() {
    require_root("image a loop device");
    let device = LoopDevice::new(DEVICE_BYTES);
    fill_device(&device.path, test_seed() ^ 2);
    let dir = tempfile::tempdir().unwrap();
    let image = image_of(&device, dir.path());
    let target = LoopDevice::new(DEVICE_BYTES);
    let _held_open = File::open(&target.path).unwrap();
    reassemble(&image, &target.path);
    assert_mostly_uncached(&target.path, "the restored device");
    assert!(read_device(&target.path) == read_device(&device.path));
}

/// `hot-clone reassemble IMAGE -o OUT`, which must succeed.
fn reassemble(image: &Path, out: &Path) {
    let result = run_hot_clone(
        [
            "reassemble".as_ref(),
            image.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ],
        None,
    );
    assert!(result.status.success(), "{}", stderr(&result));
}
