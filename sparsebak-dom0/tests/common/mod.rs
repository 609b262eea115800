//! Test harness: the real `sparsebak` spawning the real `sparsebak-vm` over
//! pipes, with volumes as image files in a temp dir and the archive on a
//! tmpfs mounted for the test (tests run as root; the receiver refuses an
//! unmounted destination, which is one of the things tested).
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const VOL: &str = "disk.img";
/// The passphrase every test archive is created with (`Env::run` passes
/// `--passphrase-file` on every command).
pub const PASSPHRASE: &str = "test passphrase 1234";
pub const MIB: u64 = 1 << 20;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub mounted: bool,
}

impl Env {
    /// A fresh environment with an archive tmpfs of `archive_mib` MiB.
    pub fn new(archive_mib: u64) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["images", "meta", "mnt", "out", "copies"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let env = Env { dir, mounted: false };
        env.write_config(&env.mnt(), &[(VOL, "enable")]);
        std::fs::write(env.passphrase_file(), format!("{PASSPHRASE}\n")).expect("write passphrase");
        let mut env = env;
        env.mount(archive_mib);
        env
    }

    /// Removes dom0's metadata of the pool (key, sessions, manifests),
    /// keeping the config file.
    pub fn lose_dom0_metadata(&self) {
        std::fs::remove_dir_all(self.path("meta/local%images")).expect("remove metadata");
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn mnt(&self) -> PathBuf {
        self.path("mnt")
    }
    pub fn image(&self) -> PathBuf {
        self.path("images").join(VOL)
    }
    pub fn passphrase_file(&self) -> PathBuf {
        self.path("passphrase")
    }
    pub fn config(&self) -> PathBuf {
        self.path("meta/sparsebak.ini")
    }
    pub fn archive_volume_dir(&self) -> PathBuf {
        self.mnt().join("backups/local%images").join(VOL)
    }
    pub fn meta_volume_dir(&self) -> PathBuf {
        self.path("meta/local%images").join(VOL)
    }

    pub fn mount(&mut self, mib: u64) {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(self.mnt())
            .status()
            .expect("run mount");
        assert!(st.success(), "mounting tmpfs (tests must run as root)");
        self.mounted = true;
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.mnt()).status();
            self.mounted = false;
        }
    }

    pub fn write_config(&self, mountpoint: &Path, volumes: &[(&str, &str)]) {
        self.write_config_with(mountpoint, volumes, "");
    }

    /// `extra_var` lines go into `[var]` (e.g. `"encryption = off\n"`).
    pub fn write_config_with(&self, mountpoint: &Path, volumes: &[(&str, &str)], extra_var: &str) {
        let mut text = format!(
            "[var]\nlocaldir = {}\ndestvm = none\ndestmountpoint = {}\ndestdir = backups\n{extra_var}\n[volumes]\n",
            self.path("images").display(),
            mountpoint.display()
        );
        for (v, state) in volumes {
            text.push_str(&format!("{v} = {state}\n"));
        }
        std::fs::write(self.config(), text).expect("write config");
    }

    /// Runs sparsebak with `--config`, `--passphrase-file` and the given
    /// arguments.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_sparsebak"))
            .arg("--config")
            .arg(self.config())
            .arg("--passphrase-file")
            .arg(self.passphrase_file())
            .args(args)
            .output()
            .expect("spawn sparsebak");
        assert_receiver_built();
        out
    }

    /// Runs sparsebak with `--config` only (no passphrase file).
    pub fn run_bare(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_sparsebak"))
            .arg("--config")
            .arg(self.config())
            .args(args)
            .output()
            .expect("spawn sparsebak")
    }

    /// Every file under the archive's mount point.
    pub fn archive_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.mnt(), &mut out);
        out.sort();
        out
    }

    /// Runs and asserts success; returns stderr (where progress goes).
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "sparsebak {args:?} failed: {stderr}");
        stderr + &String::from_utf8_lossy(&out.stdout)
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "sparsebak {args:?} should have failed; stderr: {stderr}");
        stderr
    }

    /// Sessions (`YYYYMMDD-HHMMSS`) as `list VOL` prints them.
    pub fn sessions(&self) -> Vec<String> {
        let out = self.run(&["list", VOL]);
        assert!(out.status.success(), "list failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// The `chunks=` figure of the last `list` line.
    pub fn last_stored_chunks(&self) -> u64 {
        let out = self.run(&["list", VOL]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().last().expect("a session");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("chunks="))
            .and_then(|n| n.parse().ok())
            .expect("chunks= field")
    }

    /// Receives `session` (or latest) into out/NAME and returns its path.
    pub fn receive(&self, session: Option<&str>, name: &str) -> PathBuf {
        let dest = self.path("out").join(name);
        let save = format!("--save-to={}", dest.display());
        let mut args = vec!["receive", VOL, "-u", save.as_str()];
        let opt;
        if let Some(s) = session {
            opt = format!("--session={s}");
            args.push(&opt);
        }
        self.ok(&args);
        dest
    }

    /// Keeps a copy of the image as it is now (to compare restores with).
    pub fn snapshot_image(&self, tag: &str) -> PathBuf {
        let dest = self.path("copies").join(tag);
        std::fs::copy(self.image(), &dest).expect("copy image");
        dest
    }

    /// Chunk files stored in the archive, across all sessions.
    pub fn archive_chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.archive_volume_dir(), &mut out);
        out.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('x')));
        out.sort();
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn assert_receiver_built() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sparsebak"));
    let vm = bin.with_file_name("sparsebak-vm");
    assert!(vm.is_file(), "{} is missing: run `cargo build --workspace` before the tests", vm.display());
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `seq`-like text.
pub fn text_bytes(start: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut n = start;
    while out.len() < len {
        out.extend_from_slice(format!("{n}\n").as_bytes());
        n += 1;
    }
    out.truncate(len);
    out
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(path).expect("open image");
    f.write_all_at(data, offset).expect("write image");
}

pub fn set_len(path: &Path, len: u64) {
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(path).expect("open image");
    f.set_len(len).expect("set_len");
}

/// Punches a hole by rewriting a range as zeros through a sparse rewrite:
/// simplest portable way is fallocate(1).
pub fn punch_hole(path: &Path, offset: u64, len: u64) {
    let st = Command::new("fallocate")
        .args(["--punch-hole", "--offset", &offset.to_string(), "--length", &len.to_string()])
        .arg(path)
        .status()
        .expect("run fallocate");
    assert!(st.success(), "fallocate --punch-hole");
}

/// Compares two files byte for byte, reading only their data regions
/// (holes read as zeros in both), so huge sparse files compare quickly.
pub fn assert_same_file(a: &Path, b: &Path) {
    let (fa, fb) = (File::open(a).expect("open a"), File::open(b).expect("open b"));
    let la = fa.metadata().expect("stat a").len();
    let lb = fb.metadata().expect("stat b").len();
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut regions = data_regions(&fa, la);
    regions.extend(data_regions(&fb, lb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (start, end) in regions {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(ba.len());
            fa.read_exact_at(&mut ba[..n], off).expect("read a");
            fb.read_exact_at(&mut bb[..n], off).expect("read b");
            if ba[..n] != bb[..n] {
                let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
                panic!("{} and {} differ at byte {}", a.display(), b.display(), off + i as u64);
            }
            off += n as u64;
        }
    }
}

/// `[start, end)` ranges that may hold data, from SEEK_DATA/SEEK_HOLE.
fn data_regions(f: &File, len: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Ok(start) = lseek(f.as_raw_fd(), pos as i64, Whence::SeekData) else { break };
        let end = lseek(f.as_raw_fd(), start, Whence::SeekHole).map_or(len as i64, |e| e);
        out.push((start as u64, end as u64));
        pos = end as u64;
    }
    out
}

/// Allocated bytes of a file (to check that restores stay sparse).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

pub fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new().append(true).create(true).open(path).expect("open");
    f.write_all(data).expect("append");
}

impl Env {
    /// Runs sparsebak with extra environment variables (test hooks).
    pub fn run_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sparsebak"));
        cmd.arg("--config").arg(self.config()).args(args);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output().expect("spawn sparsebak")
    }

    /// `list VOL` lines, split into (date-time, fields by key).
    pub fn session_lines(&self) -> Vec<(String, std::collections::HashMap<String, String>)> {
        let out = self.run(&["list", VOL]);
        assert!(out.status.success(), "list failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let dt = words.next()?.to_string();
                let fields =
                    words.filter_map(|w| w.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
                Some((dt, fields))
            })
            .collect()
    }

    /// Every file under the archive's volume folder and dom0's volume
    /// folder (relative names), to look for leftovers.
    pub fn all_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.archive_volume_dir(), &mut out);
        walk(&self.meta_volume_dir(), &mut out);
        out
    }
}

/// A filesystem made on a loop device over a sparse file, mounted at a
/// folder; unmounted and detached when dropped (also when a test fails).
pub struct LoopFs {
    mnt: PathBuf,
    dev: String,
    _backing: tempfile::NamedTempFile,
}

/// The filesystems with reflinks that image volumes are tracked on.
#[derive(Debug, Clone, Copy)]
pub enum ReflinkFs {
    Btrfs,
    Xfs,
}

impl LoopFs {
    /// Makes `fs` of `mib` MiB (XFS needs at least 300) and mounts it at
    /// `mnt`, which must exist.
    pub fn new(fs: ReflinkFs, mib: u64, mnt: &Path) -> LoopFs {
        // In the temporary folder, as everything else a test makes: CI
        // points TMPDIR at a tmpfs (scripts/test-all.sh), so that the tests
        // do not depend on the machine's free disk space.
        let backing = tempfile::NamedTempFile::new().expect("backing file");
        backing.as_file().set_len(mib * MIB).expect("size backing file");
        let out = Command::new("losetup").args(["--find", "--show"]).arg(backing.path()).output().expect("losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let loopfs = LoopFs { mnt: mnt.to_path_buf(), dev, _backing: backing };
        let mkfs: &[&str] = match fs {
            ReflinkFs::Btrfs => &["mkfs.btrfs", "-q", "-f"],
            ReflinkFs::Xfs => &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        };
        let st = Command::new(mkfs[0]).args(&mkfs[1..]).arg(&loopfs.dev).status().expect("mkfs");
        assert!(st.success(), "{mkfs:?} (btrfs-progs / xfsprogs installed?)");
        let st = Command::new("mount").arg(&loopfs.dev).arg(mnt).status().expect("mount");
        assert!(st.success(), "mounting {fs:?}");
        loopfs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Waits (at most a minute) until a server's socket appears.
pub fn wait_for_socket(socket: &Path) {
    let started = std::time::Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the socket {} never appeared",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
