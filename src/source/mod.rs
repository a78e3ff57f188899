//! The device being imaged: opened read-only with O_DIRECT, and the facts
//! the engine and the trace need — size, logical block size, the largest
//! request, and (for a partition) its whole disk and start sector, since the
//! kernel reports a partition's writes against the whole disk.

pub mod alias;
pub mod blockdev;
pub mod freeze;
pub mod topology;

use anyhow::{Context, bail};
use blockdev::DevNum;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why [`SourceDevice::refuse_aliases`] did not let a loop device through.
#[derive(Debug, thiserror::Error)]
pub enum AliasError {
    /// LOOP_GET_STATUS64 failed: whether the backing file is written
    /// another way cannot be told.
    #[error(
        "cannot ask loop device {} which file is behind it (LOOP_GET_STATUS64)",
        path.display()
    )]
    LoopStatus {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// Its backing file can be written around the traced queue: each
    /// finding is one sentence of [`alias::alias_findings`].
    #[error(
        "refusing to image {}: its data can be written without passing through its queue, where the trace watches, so the image could miss those writes: {}. Or use --force to image it anyway, knowing such writes are not captured",
        path.display(),
        findings.join("; ")
    )]
    Aliased {
        path: PathBuf,
        findings: Vec<String>,
    },
}

#[derive(Debug)]
pub struct SourceDevice {
    /// The path as given.
    pub path: PathBuf,
    /// Read-only, O_DIRECT. Nothing in this program writes to it.
    pub file: File,
    pub dev: DevNum,
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    /// `max_sectors_kb` in bytes: the largest request the queue takes whole.
    pub max_request_bytes: u32,
    /// The whole disk (the device itself unless it is a partition).
    pub disk: DevNum,
    /// Kernel name of the whole disk, e.g. `loop3`.
    pub disk_name: String,
    /// First 512-byte sector of the device on its disk (0 for a whole disk).
    pub start_sector: u64,
}

impl SourceDevice {
    pub fn open(path: &Path) -> anyhow::Result<SourceDevice> {
        let meta = fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
        if !meta.file_type().is_block_device() {
            bail!("{} is not a block device", path.display());
        }
        let dev = DevNum::from_rdev(meta.rdev());
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .with_context(|| format!("cannot open {} read-only with O_DIRECT", path.display()))?;
        let size_bytes = blockdev::size_bytes(&file)
            .with_context(|| format!("cannot read the size of {}", path.display()))?;
        let logical_block_bytes = blockdev::logical_block_bytes(&file)
            .with_context(|| format!("cannot read the logical block size of {}", path.display()))?;
        let sysfs = fs::canonicalize(dev.sysfs_dir())
            .with_context(|| format!("{} has no sysfs entry", path.display()))?;
        let is_partition = sysfs.join("partition").exists();
        let (disk_dir, start_sector) = if is_partition {
            let start = read_u64(&sysfs.join("start"))?;
            (sysfs.parent().unwrap_or(&sysfs).to_path_buf(), start)
        } else {
            (sysfs.clone(), 0)
        };
        let disk_name = disk_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let disk_dev_text = fs::read_to_string(disk_dir.join("dev"))
            .with_context(|| format!("cannot read {}/dev", disk_dir.display()))?;
        let disk = DevNum::parse(&disk_dev_text)
            .with_context(|| format!("{}/dev: {disk_dev_text:?}", disk_dir.display()))?;
        let max_request_bytes = read_u64(&disk_dir.join("queue/max_sectors_kb"))
            .map(|kib| (kib * 1024).min(u64::from(u32::MAX)) as u32)
            .unwrap_or(128 * 1024);
        Ok(SourceDevice {
            path: path.to_path_buf(),
            file,
            dev,
            size_bytes,
            logical_block_bytes,
            max_request_bytes,
            disk,
            disk_name,
            start_sector,
        })
    }

    /// Refuses a loop device whose backing file can also be written
    /// another way — a second loop device on it, or a process with it open
    /// for writing or mapped shared — since those writes bypass the queue
    /// the trace watches ([`blockdev::alias`]). Other devices pass.
    pub fn refuse_aliases(&self) -> Result<(), AliasError> {
        if !self.disk_name.starts_with("loop") {
            return Ok(());
        }
        let backing = alias::loop_backing(&self.file).map_err(|error| AliasError::LoopStatus {
            path: self.path.clone(),
            error,
        })?;
        let Some(backing) = backing else {
            return Ok(());
        };
        let sysfs = format!("/sys/block/{}/loop/backing_file", self.disk_name);
        let backing_path = fs::read_to_string(&sysfs)
            .map(|text| text.trim_end_matches('\n').to_string())
            .unwrap_or_else(|_| format!("the file behind /dev/{}", self.disk_name));
        let findings = alias::alias_findings(
            &self.path.display().to_string(),
            &self.disk_name,
            &backing_path,
            backing,
            &alias::loop_attachments(),
            &alias::writers_of(backing),
        );
        if !findings.is_empty() {
            return Err(AliasError::Aliased {
                path: self.path.clone(),
                findings,
            });
        }
        Ok(())
    }

    /// `/sys/block/<disk>/inflight`: (reads, writes) in flight on the whole disk.
    pub fn inflight(&self) -> anyhow::Result<(u64, u64)> {
        let path = PathBuf::from(format!("/sys/block/{}/inflight", self.disk_name));
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(reads)), Some(Ok(writes))) => Ok((reads, writes)),
            _ => bail!("{}: unexpected content {text:?}", path.display()),
        }
    }
}

fn read_u64(path: &Path) -> anyhow::Result<u64> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a number: {text:?}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_refusal_names_each_finding() {
        let refusal = AliasError::Aliased {
            path: PathBuf::from("/dev/loop3"),
            findings: vec!["first".to_string(), "second".to_string()],
        };
        let message = refusal.to_string();
        assert!(
            message.starts_with("refusing to image /dev/loop3: its data can be written"),
            "{message}"
        );
        assert!(
            message.contains("writes: first; second. Or use --force"),
            "{message}"
        );
    }
}
