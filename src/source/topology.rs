//! Which block devices hold a place, and whether writing there would change
//! the device being imaged.
//!
//! [`View`] is a snapshot of the machine's block-device graph — partitions
//! and their disks, sysfs `holders`/`slaves` stacking, loop devices and the
//! files behind them, mounted filesystems and what they write to — read once
//! from sysfs and mountinfo ([`View::read`]) or built by hand in tests.
//! [`find_overlap`] is pure over it.
//!
//! # The model
//!
//! The *source footprint* is every place whose bytes are the source's bytes:
//! the source itself and every device it is stacked on (raw), and, for a
//! loop device anywhere in that chain, its backing file and the devices that
//! hold that file. A raw write to a device holding a backing file can hit
//! the file; a write of some *other* file on that filesystem cannot, so a
//! device that only holds a backing file is matched by raw writes alone
//! (an image of a loop device written beside its backing file is fine).
//!
//! The *output footprint* is every place a write to the output lands: a
//! block device and what it is stacked on (raw); a file, the filesystem it
//! is on and what that filesystem writes to; through a loop device, its
//! backing file and that file's filesystem.
//!
//! Two devices overlap when they are the same device, or one is a partition
//! of the other (a disk holds its partitions; two partitions of one disk do
//! not overlap). Two files overlap when they are the same inode.

use super::DevNum;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A file's identity: the device number its filesystem reports, its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: DevNum,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &fs::Metadata) -> FileId {
        FileId {
            dev: DevNum::from_rdev(meta.dev()),
            ino: meta.ino(),
        }
    }
}

/// One block device in the graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Kernel name, e.g. `loop5p1`; named `/dev/NAME` in messages.
    pub name: String,
    /// For a partition: its whole disk.
    pub disk: Option<DevNum>,
    /// The devices this one is stacked on (its sysfs `slaves`, and every
    /// device that lists it among its `holders`).
    pub lower: Vec<DevNum>,
    /// For a loop device: the file behind it.
    pub backing: Option<Backing>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub file: FileId,
}

/// One line of mountinfo, with what the filesystem writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The `st_dev` of files on it (mountinfo's third field); not a block
    /// device on btrfs, overlay, tmpfs and the like.
    pub dev: DevNum,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The device numbers the filesystem's writes go to: its source when
    /// that is a block device, an overlay's upper directory's `st_dev`.
    pub writes_to: Vec<DevNum>,
}

/// A snapshot of the block-device graph and the mount table.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub nodes: HashMap<DevNum, Node>,
    pub mounts: Vec<MountEntry>,
}

/// Where the output's bytes go, from `fstat` of the opened descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A block device, written raw.
    Block(DevNum),
    /// A file (regular or a directory entry about to be made in a directory
    /// with this `st_dev`; `ino` 0 then).
    File(FileId),
    /// A pipe, terminal, character device: on no block device we can see.
    Elsewhere,
}

/// How the output's footprint meets the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same device.
    Same,
    /// The output's device is the whole disk of a source device.
    DiskOf,
    /// The output's device is a partition of a source device.
    PartitionOf,
    /// The same file (a loop device's backing file).
    SameFile,
}

/// An overlap found: the relation, and a clause saying how the output
/// reaches the source ("it is /dev/loop5, the whole disk that holds
/// /dev/loop5p1, the device being imaged").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub relation: Relation,
    /// Whether the path runs through stacking, a loop device or a mount
    /// (not just the device or file itself).
    pub indirect: bool,
    pub text: String,
}

/// Elements followed per side at most: the graph of a real machine has a
/// few dozen devices; a cycle in a hand-built view must not loop forever.
const ELEMENTS_MAX: usize = 512;
/// Mount-to-device hops followed at most (an overlay on an overlay ...).
const MOUNT_HOPS_MAX: u32 = 8;

/// A file reached through a partition of the loop device it backs: only
/// that partition's range of the file. Two partitions of one loop disk
/// share its backing file but not their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slice {
    loop_disk: DevNum,
    partition: DevNum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OutAt {
    /// Written raw.
    Raw(DevNum),
    /// Written through a filesystem on it (only its files' blocks).
    Fs(DevNum),
    File(FileId, Option<Slice>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SrcAt {
    /// Its bytes are the source's bytes.
    Raw(DevNum),
    /// It holds a file whose bytes are the source's.
    Holding(DevNum),
    File(FileId, Option<Slice>),
}

impl View {
    /// `/dev/NAME` for a known device, else its number.
    fn name(&self, dev: DevNum) -> String {
        match self.nodes.get(&dev) {
            Some(node) => format!("/dev/{}", node.name),
            None => format!("device {dev}"),
        }
    }

    /// The filesystem type of the mount whose files have `st_dev`.
    pub fn fs_type_of(&self, st_dev: DevNum) -> Option<&str> {
        self.mounts
            .iter()
            .find(|m| m.dev == st_dev)
            .map(|m| m.fs_type.as_str())
    }

    /// The block devices a file with `st_dev` is written to, each with a
    /// phrase naming the way there ("the filesystem mounted on /mnt from
    /// /dev/sdb1"), the device named last. Empty for tmpfs, proc and such.
    fn devices_of_file(&self, st_dev: DevNum, hops_left: u32) -> Vec<(DevNum, String)> {
        let mount = self.mounts.iter().find(|m| m.dev == st_dev);
        if self.nodes.contains_key(&st_dev) {
            let phrase = match mount {
                Some(m) => format!(
                    "the filesystem mounted on {} from {}",
                    m.mount_point.display(),
                    self.name(st_dev)
                ),
                None => self.name(st_dev),
            };
            return vec![(st_dev, phrase)];
        }
        // Not a block device (btrfs, overlay): what the mount says it writes to.
        let mut found = Vec::new();
        if hops_left == 0 {
            return found;
        }
        for m in self.mounts.iter().filter(|m| m.dev == st_dev) {
            for &target in &m.writes_to {
                for (dev, phrase) in self.devices_of_file(target, hops_left - 1) {
                    if found.iter().all(|(d, _)| *d != dev) {
                        found.push((
                            dev,
                            format!(
                                "the {} filesystem mounted on {}, which writes to {phrase}",
                                m.fs_type,
                                m.mount_point.display()
                            ),
                        ));
                    }
                }
            }
        }
        found
    }

    fn lower(&self, dev: DevNum) -> &[DevNum] {
        self.nodes.get(&dev).map_or(&[], |n| n.lower.as_slice())
    }

    fn backing(&self, dev: DevNum) -> Option<&Backing> {
        self.nodes.get(&dev).and_then(|n| n.backing.as_ref())
    }

    fn disk_of(&self, dev: DevNum) -> Option<DevNum> {
        self.nodes.get(&dev).and_then(|n| n.disk)
    }

    /// How device `out` relates to device `src`, if they overlap.
    fn device_relation(&self, out: DevNum, src: DevNum) -> Option<Relation> {
        if out == src {
            Some(Relation::Same)
        } else if self.disk_of(src) == Some(out) {
            Some(Relation::DiskOf)
        } else if self.disk_of(out) == Some(src) {
            Some(Relation::PartitionOf)
        } else {
            None
        }
    }
}

/// Whether writing to `place` would change `source` (named `source_name`,
/// the path the user gave), and how. Pure over `view`.
pub fn find_overlap(
    view: &View,
    place: Place,
    source: DevNum,
    source_name: &str,
) -> Option<Overlap> {
    let name = |dev: DevNum| {
        if dev == source {
            source_name.to_string()
        } else {
            view.name(dev)
        }
    };
    let source_side = source_footprint(view, source, &name);
    // Breadth first, so the shortest explanation is the one given.
    let mut queue: VecDeque<(OutAt, String, bool)> = VecDeque::new();
    match place {
        Place::Block(dev) => {
            queue.push_back((OutAt::Raw(dev), format!("it is {}", name(dev)), false))
        }
        Place::File(file) => {
            if file.ino != 0 {
                queue.push_back((OutAt::File(file, None), "it is ".to_string(), false));
            }
            for (dev, phrase) in view.devices_of_file(file.dev, MOUNT_HOPS_MAX) {
                let indirect = dev != file.dev;
                queue.push_back((
                    OutAt::Fs(dev),
                    format!("it is a file on {phrase}"),
                    indirect,
                ));
            }
        }
        Place::Elsewhere => return None,
    }
    let mut seen = HashSet::new();
    while let Some((at, trail, indirect)) = queue.pop_front() {
        if !seen.insert(at) || seen.len() > ELEMENTS_MAX {
            continue;
        }
        for (src_at, desc, root) in &source_side {
            if let Some(overlap) = meet(view, at, &trail, *src_at, desc, *root, indirect, &name) {
                return Some(overlap);
            }
        }
        let (dev, raw) = match at {
            OutAt::Raw(dev) => (dev, true),
            OutAt::Fs(dev) => (dev, false),
            OutAt::File(..) => continue,
        };
        // A partition's bytes are its disk's: what the disk is stacked on or
        // backed by is written too (but not the disk's other partitions).
        let mut via = vec![(dev, trail.clone(), None)];
        if let Some(disk) = view.disk_of(dev) {
            let trail = format!("{trail}, a partition of {}", name(disk));
            let slice = Slice {
                loop_disk: disk,
                partition: dev,
            };
            via.push((disk, trail, Some(slice)));
        }
        for (dev, trail, slice) in via {
            for &lower in view.lower(dev) {
                let next = if raw {
                    OutAt::Raw(lower)
                } else {
                    OutAt::Fs(lower)
                };
                queue.push_back((next, format!("{trail}, stacked on {}", name(lower)), true));
            }
            if let Some(backing) = view.backing(dev) {
                queue.push_back((
                    OutAt::File(backing.file, slice),
                    format!("{trail}, a loop device backed by "),
                    true,
                ));
                for (holder, phrase) in view.devices_of_file(backing.file.dev, MOUNT_HOPS_MAX) {
                    queue.push_back((
                        OutAt::Fs(holder),
                        format!(
                            "{trail}, a loop device backed by {}, a file on {phrase}",
                            backing.path.display()
                        ),
                        true,
                    ));
                }
            }
        }
    }
    None
}

/// Every place whose bytes are the source's: (place, a phrase saying how,
/// whether it is the source itself).
fn source_footprint(
    view: &View,
    source: DevNum,
    name: &dyn Fn(DevNum) -> String,
) -> Vec<(SrcAt, String, bool)> {
    let mut found: Vec<(SrcAt, String, bool)> = Vec::new();
    let mut queue = VecDeque::from([(
        SrcAt::Raw(source),
        "the device being imaged".to_string(),
        true,
    )]);
    while let Some((at, desc, root)) = queue.pop_front() {
        if found.len() >= ELEMENTS_MAX || found.iter().any(|(a, _, _)| *a == at) {
            continue;
        }
        found.push((at, desc.clone(), root));
        let (dev, raw) = match at {
            SrcAt::Raw(dev) => (dev, true),
            SrcAt::Holding(dev) => (dev, false),
            SrcAt::File(..) => continue,
        };
        // A partition's bytes are its disk's: they also lie under what the
        // disk is stacked on, and in the file behind a loop disk.
        let mut via = vec![(dev, name(dev), desc.clone(), None)];
        if let Some(disk) = view.disk_of(dev) {
            let desc = format!("the whole disk that holds {}, {desc}", name(dev));
            let slice = Slice {
                loop_disk: disk,
                partition: dev,
            };
            via.push((disk, name(disk), desc, Some(slice)));
        }
        for (dev, dev_name, desc, slice) in via {
            for &lower in view.lower(dev) {
                let next = if raw {
                    SrcAt::Raw(lower)
                } else {
                    SrcAt::Holding(lower)
                };
                queue.push_back((next, format!("which lies under {dev_name}, {desc}"), false));
            }
            if let Some(backing) = view.backing(dev) {
                let path = backing.path.display();
                queue.push_back((
                    SrcAt::File(backing.file, slice),
                    format!("{path}, the file behind {dev_name}, {desc}"),
                    false,
                ));
                for (holder, _) in view.devices_of_file(backing.file.dev, MOUNT_HOPS_MAX) {
                    queue.push_back((
                        SrcAt::Holding(holder),
                        format!("which holds {path}, the file behind {dev_name}, {desc}"),
                        false,
                    ));
                }
            }
        }
    }
    found
}

/// Two partitions of one loop disk: different ranges of its file.
fn disjoint(a: Option<Slice>, b: Option<Slice>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.loop_disk == b.loop_disk && a.partition != b.partition)
}

#[allow(clippy::too_many_arguments)]
fn meet(
    view: &View,
    out: OutAt,
    trail: &str,
    src: SrcAt,
    desc: &str,
    root: bool,
    indirect: bool,
    name: &dyn Fn(DevNum) -> String,
) -> Option<Overlap> {
    let (relation, text) = match (out, src) {
        (OutAt::File(a, a_slice), SrcAt::File(b, b_slice))
            if a == b && !disjoint(a_slice, b_slice) =>
        {
            (Relation::SameFile, format!("{trail}{desc}"))
        }
        (OutAt::Raw(a) | OutAt::Fs(a), SrcAt::Raw(b)) | (OutAt::Raw(a), SrcAt::Holding(b)) => {
            let relation = view.device_relation(a, b)?;
            let text = match relation {
                Relation::Same if root => format!("{trail} itself, {desc}"),
                Relation::Same => format!("{trail}, {desc}"),
                Relation::DiskOf => {
                    format!("{trail}, the whole disk that holds {}, {desc}", name(b))
                }
                Relation::PartitionOf => format!("{trail}, a partition of {}, {desc}", name(b)),
                Relation::SameFile => unreachable!("devices are not files"),
            };
            (relation, text)
        }
        _ => return None,
    };
    Some(Overlap {
        relation,
        indirect: indirect || !root,
        text,
    })
}

impl View {
    /// Reads the graph from `/sys/class/block` and the mount table from
    /// `/proc/self/mountinfo`. What cannot be read is left out: a device
    /// that vanishes while we look cannot hold the output.
    pub fn read() -> View {
        let mut view = View::default();
        let mut by_name: HashMap<String, DevNum> = HashMap::new();
        let mut stacking: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
        let Ok(entries) = fs::read_dir("/sys/class/block") else {
            return view;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let Some(dev) = read_devnum(&dir.join("dev")) else {
                continue;
            };
            let disk = if dir.join("partition").exists() {
                fs::canonicalize(&dir)
                    .ok()
                    .and_then(|real| read_devnum(&real.parent()?.join("dev")))
            } else {
                None
            };
            let backing = fs::read_to_string(dir.join("loop/backing_file"))
                .ok()
                .and_then(|text| {
                    let path = PathBuf::from(text.trim_end_matches('\n'));
                    let meta = fs::metadata(&path).ok()?;
                    Some(Backing {
                        file: FileId::of(&meta),
                        path,
                    })
                });
            stacking.push((
                name.clone(),
                dir_names(&dir.join("slaves")),
                dir_names(&dir.join("holders")),
            ));
            by_name.insert(name.clone(), dev);
            view.nodes.insert(
                dev,
                Node {
                    name,
                    disk,
                    lower: Vec::new(),
                    backing,
                },
            );
        }
        for (name, slaves, holders) in stacking {
            let dev = by_name[&name];
            for slave in slaves.iter().filter_map(|s| by_name.get(s)) {
                view.add_lower(dev, *slave);
            }
            for holder in holders.iter().filter_map(|h| by_name.get(h)) {
                view.add_lower(*holder, dev);
            }
        }
        if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
            view.mounts = parse_mountinfo(&text)
                .into_iter()
                .map(|line| line.resolve())
                .collect();
        }
        view
    }

    fn add_lower(&mut self, upper: DevNum, lower: DevNum) {
        if let Some(node) = self.nodes.get_mut(&upper)
            && !node.lower.contains(&lower)
        {
            node.lower.push(lower);
        }
    }
}

fn read_devnum(path: &Path) -> Option<DevNum> {
    DevNum::parse(&fs::read_to_string(path).ok()?)
}

fn dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One mountinfo line, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountLine {
    pub dev: DevNum,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl MountLine {
    /// Looks up what the filesystem writes to: its source if that is a
    /// block device, an overlay's upper directory.
    fn resolve(self) -> MountEntry {
        let mut writes_to = Vec::new();
        if self.source.starts_with('/')
            && let Ok(meta) = fs::metadata(&self.source)
            && meta.file_type().is_block_device()
        {
            writes_to.push(DevNum::from_rdev(meta.rdev()));
        }
        for option in self.super_options.split(',') {
            if let Some(dir) = option.strip_prefix("upperdir=")
                && let Ok(meta) = fs::metadata(unescape(dir))
            {
                writes_to.push(DevNum::from_rdev(meta.dev()));
            }
        }
        MountEntry {
            dev: self.dev,
            mount_point: self.mount_point,
            fs_type: self.fs_type,
            writes_to,
        }
    }
}

/// Parses `/proc/self/mountinfo`:
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
pub fn parse_mountinfo(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut rest = after.split(' ');
            Some(MountLine {
                dev: DevNum::parse(fields.get(2)?)?,
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: rest.next()?.to_string(),
                source: unescape(rest.next()?),
                super_options: rest.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let code = bytes.get(at + 1..at + 4).and_then(|digits| {
            let octal = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(octal, 8).ok()
        });
        if bytes[at] == b'\\'
            && let Some(code) = code
        {
            out.push(code);
            at += 4;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(major: u32, minor: u32) -> DevNum {
        DevNum { major, minor }
    }

    /// A machine: vda (vda1 holds / and the loop backing files), loop5
    /// with partitions loop5p1 and loop5p2, loop7 backed by a file on a
    /// filesystem on loop5p1, sda/sda1 with dm-0 and dm-1 stacked on sda1.
    const VDA: DevNum = DevNum {
        major: 252,
        minor: 0,
    };
    const VDA1: DevNum = DevNum {
        major: 252,
        minor: 1,
    };
    const LOOP5: DevNum = DevNum { major: 7, minor: 5 };
    const LOOP5P1: DevNum = DevNum {
        major: 259,
        minor: 1,
    };
    const LOOP5P2: DevNum = DevNum {
        major: 259,
        minor: 2,
    };
    const LOOP7: DevNum = DevNum { major: 7, minor: 7 };
    const SDA: DevNum = DevNum { major: 8, minor: 0 };
    const SDA1: DevNum = DevNum { major: 8, minor: 1 };
    const DM0: DevNum = DevNum {
        major: 253,
        minor: 0,
    };
    const DM1: DevNum = DevNum {
        major: 253,
        minor: 1,
    };
    const LOOP5_BACKING: FileId = FileId {
        dev: VDA1,
        ino: 1005,
    };
    const LOOP7_BACKING: FileId = FileId {
        dev: LOOP5P1,
        ino: 12,
    };

    fn node(name: &str, disk: Option<DevNum>, lower: &[DevNum]) -> Node {
        Node {
            name: name.to_string(),
            disk,
            lower: lower.to_vec(),
            backing: None,
        }
    }

    fn mount(dev: DevNum, at: &str, fs_type: &str, writes_to: &[DevNum]) -> MountEntry {
        MountEntry {
            dev,
            mount_point: PathBuf::from(at),
            fs_type: fs_type.to_string(),
            writes_to: writes_to.to_vec(),
        }
    }

    fn machine() -> View {
        let mut nodes = HashMap::new();
        nodes.insert(VDA, node("vda", None, &[]));
        nodes.insert(VDA1, node("vda1", Some(VDA), &[]));
        let mut loop5 = node("loop5", None, &[]);
        loop5.backing = Some(Backing {
            path: PathBuf::from("/var/disk.img"),
            file: LOOP5_BACKING,
        });
        nodes.insert(LOOP5, loop5);
        nodes.insert(LOOP5P1, node("loop5p1", Some(LOOP5), &[]));
        nodes.insert(LOOP5P2, node("loop5p2", Some(LOOP5), &[]));
        let mut loop7 = node("loop7", None, &[]);
        loop7.backing = Some(Backing {
            path: PathBuf::from("/mnt/p1/inner.img"),
            file: LOOP7_BACKING,
        });
        nodes.insert(LOOP7, loop7);
        nodes.insert(SDA, node("sda", None, &[]));
        nodes.insert(SDA1, node("sda1", Some(SDA), &[]));
        nodes.insert(DM0, node("dm-0", None, &[SDA1]));
        nodes.insert(DM1, node("dm-1", None, &[SDA1]));
        View {
            nodes,
            mounts: vec![
                mount(VDA1, "/", "ext4", &[VDA1]),
                mount(LOOP5P1, "/mnt/p1", "ext4", &[LOOP5P1]),
                mount(LOOP5P2, "/mnt/p2", "ext4", &[LOOP5P2]),
                mount(LOOP7, "/mnt/inner", "xfs", &[LOOP7]),
                // btrfs reports an anonymous st_dev; mountinfo names the device.
                mount(dev(0, 44), "/mnt/btrfs", "btrfs", &[DM1]),
                // An overlay whose upper directory is on loop5p2.
                mount(dev(0, 45), "/mnt/merged", "overlay", &[LOOP5P2]),
                mount(dev(0, 25), "/tmp", "tmpfs", &[]),
            ],
        }
    }

    fn file(dev: DevNum, ino: u64) -> Place {
        Place::File(FileId { dev, ino })
    }

    fn overlap(place: Place, source: DevNum, source_name: &str) -> Overlap {
        find_overlap(&machine(), place, source, source_name)
            .unwrap_or_else(|| panic!("{place:?} should overlap {source_name}"))
    }

    fn no_overlap(place: Place, source: DevNum) {
        let found = find_overlap(&machine(), place, source, "/dev/source");
        assert_eq!(found, None, "{place:?} should not overlap {source}");
    }

    #[test]
    fn the_same_device() {
        let found = overlap(Place::Block(LOOP5P1), LOOP5P1, "/dev/loop5p1");
        assert_eq!(found.relation, Relation::Same);
        assert!(!found.indirect);
        assert_eq!(
            found.text,
            "it is /dev/loop5p1 itself, the device being imaged"
        );
    }

    #[test]
    fn the_whole_disk_of_a_partition() {
        let found = overlap(Place::Block(LOOP5), LOOP5P1, "/dev/loop5p1");
        assert_eq!(found.relation, Relation::DiskOf);
        assert_eq!(
            found.text,
            "it is /dev/loop5, the whole disk that holds /dev/loop5p1, the device being imaged"
        );
    }

    #[test]
    fn a_partition_of_the_disk() {
        let found = overlap(Place::Block(LOOP5P2), LOOP5, "/dev/loop5");
        assert_eq!(found.relation, Relation::PartitionOf);
        assert_eq!(
            found.text,
            "it is /dev/loop5p2, a partition of /dev/loop5, the device being imaged"
        );
    }

    #[test]
    fn another_partition_of_the_same_disk_is_fine() {
        no_overlap(Place::Block(LOOP5P2), LOOP5P1);
        no_overlap(file(LOOP5P2, 99), LOOP5P1);
        no_overlap(Place::Block(SDA1), VDA1);
    }

    #[test]
    fn a_file_on_a_filesystem_mounted_from_the_source() {
        let found = overlap(file(LOOP5P1, 99), LOOP5P1, "/dev/loop5p1");
        assert_eq!(found.relation, Relation::Same);
        assert_eq!(
            found.text,
            "it is a file on the filesystem mounted on /mnt/p1 from /dev/loop5p1 itself, the device being imaged"
        );
        // A new file (no inode yet) in a directory there, and on a partition
        // of an imaged disk.
        assert_eq!(
            overlap(file(LOOP5P1, 0), LOOP5P1, "x").relation,
            Relation::Same
        );
        let found = overlap(file(LOOP5P2, 99), LOOP5, "/dev/loop5");
        assert_eq!(found.relation, Relation::PartitionOf);
        assert!(
            found.text.contains("a partition of /dev/loop5"),
            "{}",
            found.text
        );
    }

    #[test]
    fn a_filesystem_whose_st_dev_is_not_a_block_device() {
        // btrfs: st_dev 0:44, mountinfo's source is dm-1, stacked on sda1.
        let found = overlap(file(dev(0, 44), 5), SDA1, "/dev/sda1");
        assert_eq!(found.relation, Relation::Same);
        assert!(found.indirect);
        assert_eq!(
            found.text,
            "it is a file on the btrfs filesystem mounted on /mnt/btrfs, which writes to /dev/dm-1, stacked on /dev/sda1 itself, the device being imaged"
        );
        // overlay: the upper directory is on loop5p2.
        let found = overlap(file(dev(0, 45), 5), LOOP5, "/dev/loop5");
        assert_eq!(found.relation, Relation::PartitionOf);
        assert!(
            found
                .text
                .contains("overlay filesystem mounted on /mnt/merged"),
            "{}",
            found.text
        );
        // tmpfs writes to no block device.
        no_overlap(file(dev(0, 25), 5), VDA1);
    }

    #[test]
    fn holders_and_slaves_both_ways() {
        // The output is stacked on the source.
        let found = overlap(Place::Block(DM1), SDA1, "/dev/sda1");
        assert_eq!(found.relation, Relation::Same);
        assert_eq!(
            found.text,
            "it is /dev/dm-1, stacked on /dev/sda1 itself, the device being imaged"
        );
        // The source is stacked on the output, or on a partition of it.
        let found = overlap(Place::Block(SDA1), DM0, "/dev/dm-0");
        assert_eq!(
            found.text,
            "it is /dev/sda1, which lies under /dev/dm-0, the device being imaged"
        );
        let found = overlap(Place::Block(SDA), DM0, "/dev/dm-0");
        assert_eq!(found.relation, Relation::DiskOf);
        assert_eq!(
            found.text,
            "it is /dev/sda, the whole disk that holds /dev/sda1, which lies under /dev/dm-0, the device being imaged"
        );
        // Two devices stacked on one: writing one changes the other.
        assert_eq!(
            overlap(Place::Block(DM1), DM0, "/dev/dm-0").relation,
            Relation::Same
        );
    }

    #[test]
    fn holders_seen_from_below_only() {
        // Only sda1/holders lists dm-0 (no dm-0/slaves): View::read makes
        // the same edge from either side; here the hand-built view has it.
        let mut view = machine();
        view.nodes.get_mut(&DM0).unwrap().lower.clear();
        view.add_lower(DM0, SDA1);
        assert!(find_overlap(&view, Place::Block(SDA1), DM0, "/dev/dm-0").is_some());
    }

    #[test]
    fn a_loop_device_backed_by_a_file_on_the_source() {
        let found = overlap(Place::Block(LOOP7), LOOP5P1, "/dev/loop5p1");
        assert_eq!(found.relation, Relation::Same);
        assert_eq!(
            found.text,
            "it is /dev/loop7, a loop device backed by /mnt/p1/inner.img, a file on the filesystem mounted on /mnt/p1 from /dev/loop5p1 itself, the device being imaged"
        );
        // And a file on a filesystem on that loop device, imaging the disk.
        let found = overlap(file(LOOP7, 3), LOOP5, "/dev/loop5");
        assert_eq!(found.relation, Relation::PartitionOf);
        assert!(found.text.starts_with("it is a file on the filesystem mounted on /mnt/inner from /dev/loop7, a loop device backed by /mnt/p1/inner.img"), "{}", found.text);
        // The loop device on the other partition is fine.
        no_overlap(Place::Block(LOOP7), LOOP5P2);
        // A partition of that loop device writes to its disk's backing file.
        let mut view = machine();
        let loop7p1 = dev(259, 7);
        view.nodes
            .insert(loop7p1, node("loop7p1", Some(LOOP7), &[]));
        let found = find_overlap(&view, Place::Block(loop7p1), LOOP5P1, "/dev/loop5p1").unwrap();
        assert_eq!(found.relation, Relation::Same);
        assert!(found.text.starts_with("it is /dev/loop7p1, a partition of /dev/loop7, a loop device backed by /mnt/p1/inner.img"), "{}", found.text);
    }

    #[test]
    fn a_loop_source_and_the_filesystem_holding_its_file() {
        // Another file beside the backing file: fine (the usual case).
        no_overlap(file(VDA1, 77), LOOP5);
        no_overlap(file(VDA1, 0), LOOP5);
        // The backing file itself.
        let found = overlap(file(VDA1, LOOP5_BACKING.ino), LOOP5, "/dev/loop5");
        assert_eq!(found.relation, Relation::SameFile);
        assert_eq!(
            found.text,
            "it is /var/disk.img, the file behind /dev/loop5, the device being imaged"
        );
        // Raw writes to the device (or disk) that holds the backing file.
        let found = overlap(Place::Block(VDA1), LOOP5, "/dev/loop5");
        assert_eq!(found.relation, Relation::Same);
        assert_eq!(
            found.text,
            "it is /dev/vda1, which holds /var/disk.img, the file behind /dev/loop5, the device being imaged"
        );
        assert_eq!(
            overlap(Place::Block(VDA), LOOP5P1, "/dev/loop5p1").relation,
            Relation::DiskOf
        );
    }

    #[test]
    fn a_second_loop_device_on_the_same_file() {
        let mut view = machine();
        let twin = dev(7, 9);
        let mut loop9 = node("loop9", None, &[]);
        loop9.backing = Some(Backing {
            path: PathBuf::from("/var/disk.img"),
            file: LOOP5_BACKING,
        });
        view.nodes.insert(twin, loop9);
        let found = find_overlap(&view, Place::Block(twin), LOOP5, "/dev/loop5").unwrap();
        assert_eq!(found.relation, Relation::SameFile);
        assert_eq!(
            found.text,
            "it is /dev/loop9, a loop device backed by /var/disk.img, the file behind /dev/loop5, the device being imaged"
        );
    }

    #[test]
    fn pipes_and_unrelated_devices() {
        no_overlap(Place::Elsewhere, LOOP5);
        no_overlap(Place::Block(SDA), LOOP5);
        no_overlap(Place::Block(dev(1, 3)), LOOP5); // not in the view at all
    }

    #[test]
    fn a_cycle_in_the_graph_ends() {
        let mut view = machine();
        view.add_lower(SDA1, DM0); // dm-0 -> sda1 -> dm-0
        assert!(find_overlap(&view, Place::Block(DM0), VDA, "/dev/vda").is_none());
        assert!(find_overlap(&view, Place::Block(SDA), DM0, "/dev/dm-0").is_some());
    }

    #[test]
    fn mountinfo_lines() {
        let text = "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                    90 22 0:45 / /mnt/my\\040disk rw - overlay overlay rw,lowerdir=/l,upperdir=/u\\040x,workdir=/w\n\
                    garbage\n";
        let lines = parse_mountinfo(text);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].dev, VDA1);
        assert_eq!(lines[0].source, "/dev/vda1");
        assert_eq!(lines[1].mount_point, PathBuf::from("/mnt/my disk"));
        assert_eq!(lines[1].fs_type, "overlay");
        assert!(lines[1].super_options.contains("upperdir=/u\\040x"));
        assert_eq!(unescape("/u\\040x"), "/u x");
        assert_eq!(unescape("a\\\\b\\9"), "a\\\\b\\9");
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
