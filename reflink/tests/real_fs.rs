//! On real filesystems: Btrfs and XFS (`reflink=1`) on loop devices, an XFS
//! without reflink, and tmpfs. Needs root, `losetup`, `mkfs.btrfs`
//! (btrfs-progs) and `mkfs.xfs` (xfsprogs); without them these tests fail,
//! they are never skipped.
//!
//! Every change case checks the ground truth: each byte where tick and
//! tock really differ (read and compared in 4 KiB blocks) is inside the
//! ranges `compare_stable` returned.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::fcntl::{copy_file_range, fallocate, FallocateFlags};
use sparsebak_reflink::{
    compare_stable, extent_map, filesystem_kind, reflink_copy, supports_reflink, CopyError, Extent, FsKind,
    FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_SHARED, FIEMAP_EXTENT_UNWRITTEN,
};
use tempfile::TempDir;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
/// The image: not a multiple of the block size, so its last extent runs
/// past its end.
const IMAGE_LEN: u64 = 24 * M + 1234;

// ---- helpers: commands, loop devices, mounts ----

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd} (is it installed?)"))?;
    ensure!(
        out.status.success(),
        "{cmd} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A filesystem made on a loop device over a sparse file and mounted in a
/// temporary folder; unmounted and detached when dropped, test failed or
/// not.
struct Mounted {
    mnt: PathBuf,
    dev: Option<String>,
    mounted: bool,
    _work: TempDir,
}

impl Mounted {
    /// `mkfs` is the command and its options; the device is appended.
    fn loop_fs(size: u64, mkfs: &[&str], mount_opts: Option<&str>) -> Result<Mounted> {
        let work = tempfile::tempdir()?;
        let backing = work.path().join("fs.img");
        File::create(&backing)?.set_len(size)?;
        let mnt = work.path().join("mnt");
        fs::create_dir(&mnt)?;
        let mut me = Mounted { mnt, dev: None, mounted: false, _work: work };
        let backing = backing.to_str().context("temp path not UTF-8")?;
        me.dev = Some(run("losetup", &["--find", "--show", backing])?);
        let dev = me.dev.clone().unwrap_or_default();
        let (prog, opts) = mkfs.split_first().context("no mkfs command")?;
        let mut args = opts.to_vec();
        args.push(&dev);
        run(prog, &args)?;
        me.mount(&["-t", "auto"], &dev, mount_opts)?;
        Ok(me)
    }

    fn tmpfs() -> Result<Mounted> {
        let work = tempfile::tempdir()?;
        let mnt = work.path().join("mnt");
        fs::create_dir(&mnt)?;
        let mut me = Mounted { mnt, dev: None, mounted: false, _work: work };
        me.mount(&["-t", "tmpfs"], "sparsebak-reflink-test", Some("size=16m"))?;
        Ok(me)
    }

    fn mount(&mut self, kind: &[&str], what: &str, opts: Option<&str>) -> Result<()> {
        let mnt = self.mnt.to_str().context("temp path not UTF-8")?.to_string();
        let mut args = kind.to_vec();
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend([what, &mnt]);
        run("mount", &args)?;
        self.mounted = true;
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.mnt.to_string_lossy().to_string();
            let mut done = false;
            for _ in 0..10 {
                if run("umount", &[&mnt]).is_ok() {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !done {
                let _ = run("umount", &["-l", &mnt]);
            }
        }
        if let Some(dev) = &self.dev {
            let _ = run("losetup", &["-d", dev]);
        }
    }
}

fn btrfs(mount_opts: Option<&str>) -> Result<Mounted> {
    Mounted::loop_fs(256 * M, &["mkfs.btrfs", "-q", "-f"], mount_opts)
}

fn xfs(reflink: bool) -> Result<Mounted> {
    let m = if reflink { "reflink=1" } else { "reflink=0" };
    Mounted::loop_fs(400 * M, &["mkfs.xfs", "-q", "-f", "-m", m], None)
}

// ---- helpers: data and ranges ----

/// xorshift64*: fast, reproducible "random" bytes.
struct Rng(u64);

impl Rng {
    fn bytes(&mut self, n: u64) -> Vec<u8> {
        let mut out = vec![0u8; n as usize];
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        out
    }
}

fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

/// Whether `[start, end)` lies inside one of the (merged) ranges.
fn covers(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    start >= end || ranges.iter().any(|&(s, n)| s <= start && end <= s + n)
}

fn pwrite(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    Ok(())
}

fn pread(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn fallocate_range(path: &Path, flags: FallocateFlags, offset: u64, len: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    fallocate(f.as_raw_fd(), flags, offset as i64, len as i64)?;
    Ok(())
}

/// Ground truth: every byte where the two files differ is in `ranges`.
/// Returns how many 4 KiB blocks really differ.
fn check_ground_truth(tick: &Path, tock: &Path, ranges: &[(u64, u64)]) -> Result<usize> {
    let a = fs::read(tick)?;
    let b = fs::read(tock)?;
    let min = a.len().min(b.len());
    let mut differing = 0;
    for start in (0..min).step_by(4096) {
        let end = (start + 4096).min(min);
        let (x, y) = (&a[start..end], &b[start..end]);
        if x != y {
            differing += 1;
            let first = start + x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
            let last = start + x.iter().zip(y).rposition(|(p, q)| p != q).unwrap_or(0);
            ensure!(
                covers(ranges, first as u64, last as u64 + 1),
                "MISSED CHANGE: bytes {first}..={last} differ but are not in {ranges:?}"
            );
        }
    }
    ensure!(
        covers(ranges, min as u64, a.len().max(b.len()) as u64),
        "size change {}..{} not in {ranges:?}",
        a.len(),
        b.len()
    );
    Ok(differing)
}

fn flags_of(map: &[Extent]) -> u32 {
    map.iter().fold(0, |acc, e| acc | e.flags)
}

/// The tick/tock cycle on one file, as the backup tool runs it.
struct Tracker {
    label: String,
    image: PathBuf,
    tick: PathBuf,
    tock: PathBuf,
}

impl Tracker {
    /// Writes `len` random bytes to `name` in `dir` (if `len` is given;
    /// else it is there) and makes its tick.
    fn new(label: &str, dir: &Path, name: &str, len: Option<u64>, rng: &mut Rng) -> Result<Tracker> {
        let image = dir.join(name);
        if let Some(len) = len {
            fs::write(&image, rng.bytes(len))?;
        }
        let t = Tracker {
            label: label.to_string(),
            tick: dir.join(format!("{name}.tick")),
            tock: dir.join(format!("{name}.tock")),
            image,
        };
        reflink_copy(&t.image, &t.tick)?;
        Ok(t)
    }

    /// Changes the image with `change`, makes tock, compares, checks the
    /// ground truth, and makes tock the next tick.
    fn step(&self, case: &str, change: impl FnOnce(&Path) -> Result<()>) -> Result<Vec<(u64, u64)>> {
        let what = format!("{}: {case}", self.label);
        change(&self.image).with_context(|| format!("{what}: changing the image"))?;
        reflink_copy(&self.image, &self.tock).with_context(|| format!("{what}: making tock"))?;
        let t0 = Instant::now();
        let ranges = compare_stable(&self.tick, &self.tock).with_context(|| format!("{what}: comparing"))?;
        let took = t0.elapsed();
        let differing = check_ground_truth(&self.tick, &self.tock, &ranges).with_context(|| what.clone())?;
        let tick_map = extent_map(&File::open(&self.tick)?)?;
        let tock_map = extent_map(&File::open(&self.tock)?)?;
        eprintln!(
            "{what}: {} range(s), {} bytes marked, {differing} block(s) really differ; extents tick {} (flags {:#x}) \
             tock {} (flags {:#x}); compare took {took:?}",
            ranges.len(),
            total(&ranges),
            tick_map.len(),
            flags_of(&tick_map),
            tock_map.len(),
            flags_of(&tock_map),
        );
        fs::remove_file(&self.tick)?;
        fs::rename(&self.tock, &self.tick)?;
        Ok(ranges)
    }
}

fn len_of(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)?.len())
}

/// The change cases (a)..(h), in order, each compared with the state
/// before it; then a file of many extents and a tiny one.
fn exercise(label: &str, dir: &Path) -> Result<()> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let donor = dir.join("donor");
    fs::write(&donor, rng.bytes(2 * M))?;
    let t = Tracker::new(label, dir, "image", Some(IMAGE_LEN), &mut rng)?;

    // The fresh copy shares every extent of the image.
    let image_map = extent_map(&File::open(&t.image)?)?;
    let tick_map = extent_map(&File::open(&t.tick)?)?;
    let strip = |m: &[Extent]| m.iter().map(|e| (e.logical, e.physical, e.length)).collect::<Vec<_>>();
    ensure!(strip(&image_map) == strip(&tick_map), "{label}: a fresh reflink copy maps differently");
    ensure!(tick_map.iter().all(|e| e.flags & FIEMAP_EXTENT_SHARED != 0), "{label}: copy's extents not SHARED");

    // (a) Nothing changed.
    let r = t.step("no change", |_| Ok(()))?;
    ensure!(r.is_empty(), "{label}: no change reported as {r:?}");

    // (b) 64 KiB overwritten in place, not block-aligned.
    let off = 3 * M + 1000;
    let data = rng.bytes(64 * K);
    let r = t.step("overwrite 64 KiB", |img| pwrite(img, off, &data))?;
    ensure!(covers(&r, off, off + 64 * K) && total(&r) <= 256 * K, "{label}: overwrite gave {r:?}");

    // (c) The same bytes written again: a new extent, reported.
    let off = 5 * M;
    let r = t.step("identical rewrite", |img| pwrite(img, off, &pread(img, off, 64 * K)?))?;
    ensure!(covers(&r, off, off + 64 * K) && total(&r) <= 256 * K, "{label}: identical rewrite gave {r:?}");

    // (d) Size changes: truncate down, extend (a hole), write past the end.
    let old = len_of(&t.image)?;
    let new = old - M - 77;
    let r = t.step("truncate down", |img| Ok(OpenOptions::new().write(true).open(img)?.set_len(new)?))?;
    ensure!(covers(&r, new, old) && total(&r) <= old - new + 256 * K, "{label}: truncate gave {r:?}");
    let ext = new + 2 * M + 5;
    let r = t.step("extend with set_len", |img| Ok(OpenOptions::new().write(true).open(img)?.set_len(ext)?))?;
    ensure!(covers(&r, new, ext) && total(&r) <= ext - new + 256 * K, "{label}: extend gave {r:?}");
    let data = rng.bytes(8 * K);
    let off = ext + 100 * K;
    let r = t.step("write past the end", |img| pwrite(img, off, &data))?;
    ensure!(covers(&r, ext, off + 8 * K) && total(&r) <= off + 8 * K - ext + 256 * K, "{label}: {r:?}");

    // (e) Holes punched, one block-aligned and one not.
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let (h1, h2) = (7 * M, 9 * M + 100);
    let r = t.step("punch holes", |img| {
        fallocate_range(img, punch, h1, 128 * K)?;
        fallocate_range(img, punch, h2, 50_000)
    })?;
    ensure!(covers(&r, h1, h1 + 128 * K) && covers(&r, h2, h2 + 50_000), "{label}: punch gave {r:?}");
    ensure!(total(&r) <= 512 * K, "{label}: punch gave {r:?}");

    // (f) Preallocation: inside the punched hole (reads as zeros, as the
    // hole did), and past the end without changing the size. btrfs shares
    // the unwritten extent with the copy (flag UNWRITTEN: marked); XFS
    // leaves a hole in the copy where the source has an unwritten extent
    // (nothing to mark: a hole on both sides).
    let end = len_of(&t.image)?;
    let r = t.step("preallocate", |img| {
        fallocate_range(img, FallocateFlags::empty(), h1, 64 * K)?;
        fallocate_range(img, FallocateFlags::FALLOC_FL_KEEP_SIZE, end, M)
    })?;
    let image_map = extent_map(&File::open(&t.image)?)?;
    ensure!(flags_of(&image_map) & FIEMAP_EXTENT_UNWRITTEN != 0, "{label}: no UNWRITTEN extent after fallocate");
    let copy_map = extent_map(&File::open(&t.tick)?)?;
    if flags_of(&copy_map) & FIEMAP_EXTENT_UNWRITTEN != 0 {
        ensure!(covers(&r, h1, h1 + 64 * K), "{label}: preallocate gave {r:?}");
    } else {
        eprintln!("{label}: the copy has no unwritten extent, {} extents", copy_map.len());
    }
    ensure!(total(&r) <= 256 * K, "{label}: preallocate gave {r:?}");

    // (g) Ranges copied in from another file with copy_file_range (a
    // reflink on btrfs/XFS when aligned; a copy when not).
    let (c1, c2) = (11 * M, 13 * M + 7);
    let r = t.step("copy_file_range", |img| {
        let src = File::open(&donor)?;
        let dst = OpenOptions::new().write(true).open(img)?;
        for (mut from, mut to, mut left) in [(0i64, c1 as i64, M as usize), (3, c2 as i64, 10_000)] {
            while left > 0 {
                let n = copy_file_range(&src, Some(&mut from), &dst, Some(&mut to), left)?;
                ensure!(n > 0, "copy_file_range copied nothing");
                left -= n;
            }
        }
        Ok(())
    })?;
    ensure!(covers(&r, c1, c1 + M) && covers(&r, c2, c2 + 10_000), "{label}: copy_file_range gave {r:?}");
    ensure!(total(&r) <= M + 512 * K, "{label}: copy_file_range gave {r:?}");

    // (h) The whole file replaced by renaming a modified copy over it:
    // first a plain copy (all new extents: everything marked), then a
    // reflink copy (only the modified part is new).
    let len = len_of(&t.image)?;
    let r = t.step("rename a plain copy over it", |img| {
        let mut content = fs::read(img)?;
        content[2 * M as usize..(2 * M + 4 * K) as usize].fill(0xA5);
        let new = img.with_extension("new");
        fs::write(&new, &content)?;
        File::open(&new)?.sync_all()?;
        fs::rename(&new, img)?;
        Ok(())
    })?;
    ensure!(r == vec![(0, len)], "{label}: plain copy renamed over gave {r:?}");
    let off = 4 * M + 512;
    let data = rng.bytes(16 * K);
    let r = t.step("rename a modified reflink copy over it", |img| {
        let new = img.with_extension("new");
        reflink_copy(img, &new)?;
        fs::set_permissions(&new, fs::Permissions::from_mode(0o600))?;
        pwrite(&new, off, &data)?;
        fs::rename(&new, img)?;
        Ok(())
    })?;
    ensure!(covers(&r, off, off + 16 * K) && total(&r) <= 256 * K, "{label}: reflink copy renamed gave {r:?}");

    // And at rest again.
    let r = t.step("no change at the end", |_| Ok(()))?;
    ensure!(r.is_empty(), "{label}: no change reported as {r:?}");

    // A file of many extents (data blocks between holes): FIEMAP is read
    // in calls of 512 extents, so this crosses several.
    let holey = dir.join("holey");
    let blocks = 1500u64;
    {
        let f = File::create(&holey)?;
        for i in 0..blocks {
            f.write_all_at(&rng.bytes(4 * K), i * 8 * K)?;
        }
    }
    let map = extent_map(&File::open(&holey)?)?;
    // XFS may fill the gaps with unwritten extents (its speculative
    // preallocation, converted at writeback): only written ones are data.
    ensure!(map.windows(2).all(|w| w[0].logical + w[0].length <= w[1].logical), "{label}: unsorted or overlapping");
    let data: Vec<&Extent> = map.iter().filter(|e| e.flags & FIEMAP_EXTENT_UNWRITTEN == 0).collect();
    ensure!(data.len() as u64 == blocks, "{label}: {} data extents for {blocks} separate blocks", data.len());
    for (i, e) in data.iter().enumerate() {
        ensure!(e.logical == i as u64 * 8 * K && e.length == 4 * K, "{label}: extent {i} is {e:?}");
    }
    eprintln!("{label}: file of {blocks} separate blocks has {} extents", map.len());
    let t = Tracker::new(label, dir, "holey", None, &mut rng)?;
    let r = t.step("many extents, no change", |_| Ok(()))?;
    ensure!(r.is_empty(), "{label}: {r:?}");
    let off = 1000 * 8 * K + 100;
    let data = rng.bytes(2 * K);
    let r = t.step("many extents, one block changed", |img| pwrite(img, off, &data))?;
    ensure!(covers(&r, off, off + 2 * K) && total(&r) <= 64 * K, "{label}: {r:?}");

    // A tiny file (btrfs keeps it inline in metadata, flag DATA_INLINE at
    // physical 0: always marked; XFS gives it a block).
    let tiny = Tracker::new(label, dir, "tiny", Some(100), &mut rng)?;
    let r = tiny.step("tiny file, no change", |_| Ok(()))?;
    eprintln!("{label}: tiny file unchanged -> {r:?}");
    let r = tiny.step("tiny file, 10 bytes changed", |img| pwrite(img, 40, b"0123456789"))?;
    ensure!(covers(&r, 40, 50), "{label}: tiny file change gave {r:?}");
    Ok(())
}

/// No probe files left behind by `supports_reflink`.
fn no_probe_left(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        ensure!(!name.to_string_lossy().contains("probe"), "probe file left: {name:?}");
    }
    Ok(())
}

// ---- the tests ----

#[test]
fn btrfs_every_change_is_found() -> Result<()> {
    let fs = btrfs(None)?;
    assert_eq!(filesystem_kind(&fs.mnt)?, FsKind::Btrfs);
    assert!(supports_reflink(&fs.mnt)?);
    no_probe_left(&fs.mnt)?;
    exercise("btrfs", &fs.mnt)
}

#[test]
fn xfs_every_change_is_found() -> Result<()> {
    let fs = xfs(true)?;
    assert_eq!(filesystem_kind(&fs.mnt)?, FsKind::Xfs);
    assert!(supports_reflink(&fs.mnt)?);
    no_probe_left(&fs.mnt)?;
    exercise("xfs", &fs.mnt)
}

/// btrfs with compression: compressed extents are ENCODED, their addresses
/// not comparable: the whole file is marked even when nothing changed.
#[test]
fn btrfs_compressed_extents_are_always_marked() -> Result<()> {
    let fs = btrfs(Some("compress-force=zstd"))?;
    let mut rng = Rng(7);
    // Compressible: random 4 KiB blocks each repeated 16 times.
    let len = 8 * M + 300;
    let image = fs.mnt.join("image");
    let block = rng.bytes(4 * K);
    let content: Vec<u8> = block.iter().cycle().take(len as usize).copied().collect();
    fs::write(&image, &content)?;
    let t = Tracker { label: "btrfs compressed".into(), tick: fs.mnt.join("tick"), tock: fs.mnt.join("tock"), image };
    reflink_copy(&t.image, &t.tick)?;
    let map = extent_map(&File::open(&t.tick)?)?;
    ensure!(flags_of(&map) & FIEMAP_EXTENT_ENCODED != 0, "no ENCODED extent with compress-force: {map:?}");
    let r = t.step("no change", |_| Ok(()))?;
    // Every compressed extent is marked; the last block was too small to
    // compress, and is shared as it is.
    ensure!(covers(&r, 0, 8 * M) && total(&r) <= 8 * M + 4 * K, "compressed, unchanged: {r:?}");
    let r = t.step("overwrite 64 KiB", |img| pwrite(img, M + 5, &rng.bytes(64 * K)))?;
    ensure!(covers(&r, M + 5, M + 5 + 64 * K), "compressed overwrite: {r:?}");
    Ok(())
}

/// A btrfs balance moves every data extent: a tick and tock made before it
/// are relocated together (shared extents stay shared), so their
/// comparison after it is the same as before.
#[test]
fn btrfs_balance_moves_shared_extents_together() -> Result<()> {
    let fs = btrfs(None)?;
    let mut rng = Rng(11);
    let image = fs.mnt.join("image");
    fs::write(&image, rng.bytes(16 * M))?;
    let (tick, tock) = (fs.mnt.join("tick"), fs.mnt.join("tock"));
    reflink_copy(&image, &tick)?;
    pwrite(&image, 5 * M, &rng.bytes(64 * K))?;
    reflink_copy(&image, &tock)?;
    let before = compare_stable(&tick, &tock)?;
    let map_before = extent_map(&File::open(&tick)?)?;
    let mnt = fs.mnt.to_str().context("temp path not UTF-8")?;
    run("btrfs", &["balance", "start", "--full-balance", mnt])?;
    let map_after = extent_map(&File::open(&tick)?)?;
    ensure!(map_before != map_after, "balance moved nothing: {map_after:?}");
    let after = compare_stable(&tick, &tock)?;
    eprintln!("balance: tick {map_before:?} -> {map_after:?}; changed {before:?} -> {after:?}");
    ensure!(before == after, "changed ranges before balance {before:?}, after {after:?}");
    check_ground_truth(&tick, &tock, &after)?;
    ensure!(covers(&after, 5 * M, 5 * M + 64 * K) && total(&after) <= 256 * K, "{after:?}");
    Ok(())
}

#[test]
fn xfs_without_reflink_is_unsupported() -> Result<()> {
    let fs = xfs(false)?;
    assert_eq!(filesystem_kind(&fs.mnt)?, FsKind::Xfs);
    assert!(!supports_reflink(&fs.mnt)?);
    no_probe_left(&fs.mnt)?;
    let src = fs.mnt.join("src");
    fs::write(&src, [1u8; 8192])?;
    let dst = fs.mnt.join("dst");
    let r = reflink_copy(&src, &dst);
    assert!(matches!(r, Err(CopyError::Unsupported { .. })), "{r:?}");
    assert!(!dst.exists());
    Ok(())
}

#[test]
fn tmpfs_is_unsupported_and_left_clean() -> Result<()> {
    let fs = Mounted::tmpfs()?;
    assert_eq!(filesystem_kind(&fs.mnt)?, FsKind::Other(0x0102_1994));
    let src = fs.mnt.join("src");
    fs::write(&src, [1u8; 8192])?;
    let dst = fs.mnt.join("dst");
    let r = reflink_copy(&src, &dst);
    match &r {
        Err(e @ CopyError::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("src") && msg.contains("dst"), "{msg}");
        }
        _ => bail!("reflink_copy on tmpfs gave {r:?}"),
    }
    assert!(fs::symlink_metadata(&dst).is_err(), "dst left behind");
    assert!(!supports_reflink(&fs.mnt)?);
    let names: Vec<_> = fs::read_dir(&fs.mnt)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    assert_eq!(names, vec!["src"]);
    Ok(())
}

/// `dst` is never overwritten nor followed, and failures leave no `dst`
/// (these fail before any FICLONE, on any filesystem).
#[test]
fn reflink_copy_never_overwrites_or_follows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src");
    fs::write(&src, b"source")?;

    let existing = dir.path().join("existing");
    fs::write(&existing, b"keep")?;
    let r = reflink_copy(&src, &existing);
    match &r {
        Err(CopyError::Io { source, context }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
            assert!(context.contains("src") && context.contains("existing"), "{context}");
        }
        _ => bail!("copy over an existing file gave {r:?}"),
    }
    assert_eq!(fs::read(&existing)?, b"keep");

    let target = dir.path().join("target");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link)?;
    assert!(matches!(reflink_copy(&src, &link), Err(CopyError::Io { .. })));
    assert!(!target.exists(), "a dangling symlink was followed");
    fs::write(&target, b"keep")?;
    assert!(matches!(reflink_copy(&src, &link), Err(CopyError::Io { .. })));
    assert_eq!(fs::read(&target)?, b"keep");

    let dst = dir.path().join("dst");
    assert!(matches!(reflink_copy(&dir.path().join("missing"), &dst), Err(CopyError::Io { .. })));
    assert!(matches!(reflink_copy(dir.path(), &dst), Err(CopyError::Io { .. })), "a folder as source");
    assert!(fs::symlink_metadata(&dst).is_err());
    Ok(())
}
