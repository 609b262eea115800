//! Image volumes on Btrfs and XFS (reflink=1), tracked by reflink copies:
//! on real filesystems made on loop devices (root, btrfs-progs, xfsprogs).
//! Every session must restore bit-identical whatever was done to the image
//! between sends (a missed change would show as a wrong restore), a send
//! must read only what changed, and a send or monitor killed at any step
//! must leave a state the next run recovers from.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const CHUNK: u64 = 128 * 1024;

/// An environment whose `localdir` (`images/`) is a fresh filesystem.
struct ReflinkEnv {
    env: Env,
    _fs: LoopFs,
}

impl ReflinkEnv {
    fn new(fs: ReflinkFs, fs_mib: u64) -> ReflinkEnv {
        let env = Env::new(512);
        let loopfs = LoopFs::new(fs, fs_mib, &env.path("images"));
        ReflinkEnv { env, _fs: loopfs }
    }

    fn copies_dir(&self) -> PathBuf {
        self.env.path("images/.sparsebak")
    }

    /// Sends, checks that the send was a tracked one, and keeps a copy of
    /// the image for the restore checks; returns the session (if one was made).
    fn send(&self, copies: &mut Vec<(String, PathBuf)>) -> String {
        let before = self.env.sessions();
        let err = self.env.ok(&["send"]);
        assert!(!err.contains("comparing the whole volume"), "a tracked send: {err}");
        assert!(self.copies_dir().join(format!("{VOL}.tick")).is_file(), "tick kept");
        assert!(!self.copies_dir().join(format!("{VOL}.tock")).exists(), "no tock left");
        let after = self.env.sessions();
        if after.len() > before.len() {
            let s = after.last().expect("a session").clone();
            copies.push((s.clone(), self.env.snapshot_image(&s)));
        }
        err
    }

    fn check_all(&self, copies: &[(String, PathBuf)]) {
        for (s, copy) in copies {
            let restored = self.env.receive(Some(s), &format!("check-{s}"));
            assert_same_file(&restored, copy);
            std::fs::remove_file(&restored).expect("remove restored");
        }
    }
}

/// A small deterministic generator (xorshift): the seed in a failure
/// message reproduces the run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

/// Applies one random operation to the image; returns what it did.
fn random_op(rng: &mut Rng, img: &Path, scratch: &Path) -> String {
    let len = file_len(img).max(1);
    let max = 24 * MIB;
    let off = rng.below(len) & !0xfff;
    let n = 1 + rng.below(3 * CHUNK);
    let p = img.display().to_string();
    match rng.below(10) {
        0 => {
            write_at(img, off, &random_bytes(rng.next(), n as usize));
            format!("overwrite {n} bytes at {off}")
        }
        1 => {
            let mut data = vec![0u8; n.min(len - off.min(len)) as usize];
            let f = std::fs::File::open(img).expect("open");
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut data, off).expect("read");
            write_at(img, off, &data);
            format!("rewrite {} identical bytes at {off}", data.len())
        }
        2 => {
            let at = len + rng.below(2 * CHUNK);
            write_at(img, at.min(max), &random_bytes(rng.next(), n as usize));
            format!("write {n} bytes past the end at {}", at.min(max))
        }
        3 => {
            let new_len = match rng.below(2) {
                0 => rng.below(len),
                _ => (len + rng.below(4 * MIB)).min(max),
            };
            set_len(img, new_len);
            format!("truncate to {new_len}")
        }
        4 => {
            punch_hole(img, off, n);
            format!("punch {n} bytes at {off}")
        }
        5 => {
            run("fallocate", &["--offset", &off.to_string(), "--length", &n.to_string(), &p]);
            format!("fallocate {n} bytes at {off}")
        }
        6 => {
            // Reflink a block-aligned range in from another file.
            let src = scratch.join("donor.img");
            if !src.exists() {
                write_at(&src, 0, &random_bytes(rng.next(), 4 * MIB as usize));
            }
            let (soff, dlen) = (rng.below(4 * MIB - 256 * 1024) & !0xffff, (1 + rng.below(4)) * 65536);
            let doff = off & !0xffff;
            let cmd = format!("reflink {} {soff} {doff} {dlen}", src.display());
            run("xfs_io", &["-c", &cmd, &p]);
            format!("reflink {dlen} bytes from the donor's {soff} to {doff}")
        }
        8 => {
            // Keep a revision (a reflink copy, as Qubes keeps `*.img.N~`).
            let rev = scratch.join(format!("revision-{}", rng.below(3)));
            run("cp", &["--reflink=always", &p, &rev.display().to_string()]);
            format!("keep a revision as {}", rev.display())
        }
        9 => {
            // Revert: rename a kept revision over the image. Its extents are
            // those the image had back then, maybe tick's own.
            let revs: Vec<PathBuf> = std::fs::read_dir(scratch)
                .expect("scratch")
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("revision-"))
                .collect();
            match revs.get(rng.below(revs.len() as u64) as usize) {
                Some(rev) => {
                    std::fs::rename(rev, img).expect("revert");
                    format!("revert to {}", rev.display())
                }
                None => "no revision to revert to".to_string(),
            }
        }
        _ => {
            // Replace the whole file by renaming a modified copy over it.
            let tmp = scratch.join("replacement.img");
            run("cp", &["--reflink=always", &p, &tmp.display().to_string()]);
            write_at(&tmp, off, &random_bytes(rng.next(), n as usize));
            std::fs::rename(&tmp, img).expect("rename over the image");
            format!("replace the file by a copy changed at {off}")
        }
    }
}

fn random_operations_then_every_session_restores(fs: ReflinkFs, fs_mib: u64, seed: u64) {
    let r = ReflinkEnv::new(fs, fs_mib);
    let img = r.env.image();
    let scratch = r.env.path("images/scratch");
    std::fs::create_dir(&scratch).expect("mkdir scratch");
    write_at(&img, 0, &random_bytes(seed, 6 * MIB as usize));
    write_at(&img, 8 * MIB, &text_bytes(seed, 2 * MIB as usize));
    let mut copies = Vec::new();
    r.send(&mut copies);
    let mut rng = Rng(seed | 1);
    let mut log = Vec::new();
    for round in 0..14 {
        for _ in 0..1 + rng.below(3) {
            log.push(format!("round {round}: {}", random_op(&mut rng, &img, &scratch)));
        }
        r.send(&mut copies);
        // Every few rounds: `monitor` folds changes in between sends too.
        if round % 4 == 1 {
            write_at(&img, rng.below(file_len(&img).max(1)), &random_bytes(rng.next(), 5000));
            log.push(format!("round {round}: overwrite before monitor"));
            r.env.ok(&["monitor"]);
        }
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.check_all(&copies)));
    if result.is_err() {
        panic!("{fs:?}, seed {seed}: a session did not restore; operations:\n{}", log.join("\n"));
    }
}

#[test]
fn btrfs_random_operations_then_every_session_restores() {
    for seed in [1, 2] {
        random_operations_then_every_session_restores(ReflinkFs::Btrfs, 256, seed);
    }
}

#[test]
fn xfs_random_operations_then_every_session_restores() {
    for seed in [3, 4] {
        random_operations_then_every_session_restores(ReflinkFs::Xfs, 320, seed);
    }
}

/// What the sparsebak process (and its children) read from disk, with the
/// page cache dropped first and the binaries and dom0's metadata read back
/// in, so that only the volume's reads count.
fn send_read_bytes(env: &Env) -> u64 {
    run("sync", &[]);
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
    let sparsebak = env!("CARGO_BIN_EXE_sparsebak");
    let receiver = PathBuf::from(sparsebak).with_file_name("sparsebak-vm");
    let meta = env.path("meta").display().to_string();
    for f in [sparsebak.to_string(), receiver.display().to_string()] {
        run("cat", &[&f]);
    }
    run("sh", &["-c", &format!("find '{meta}' -type f -exec cat {{}} + >/dev/null")]);
    let script = r#""$0" --config "$1" --passphrase-file "$2" send >/dev/null 2>&1 || exit 1; cat /proc/$$/io"#;
    let out = Command::new("bash")
        .args(["-c", script, sparsebak])
        .arg(env.config())
        .arg(env.passphrase_file())
        .output()
        .expect("run send");
    assert!(out.status.success(), "send failed");
    let io = String::from_utf8_lossy(&out.stdout);
    io.lines().find_map(|l| l.strip_prefix("read_bytes: ")).and_then(|v| v.trim().parse().ok()).expect("read_bytes")
}

#[test]
fn btrfs_send_reads_only_what_changed() {
    let r = ReflinkEnv::new(ReflinkFs::Btrfs, 1400);
    let img = r.env.image();
    // 1 GiB written: 64 MiB random, the rest written zeros (real extents).
    write_at(&img, 0, &random_bytes(30, 64 * MIB as usize));
    let zeros = vec![0u8; 64 * MIB as usize];
    for i in 1..16 {
        write_at(&img, i * 64 * MIB, &zeros);
    }
    let mut copies = Vec::new();
    r.send(&mut copies);
    // 16 MiB changed in 128 chunk-aligned 128 KiB pieces all over the image.
    for i in 0..128u64 {
        write_at(&img, (i * 61 % 8192) * CHUNK, &random_bytes(1000 + i, CHUNK as usize));
    }
    run("sync", &[]);
    let read = send_read_bytes(&r.env);
    println!("incremental send of 16 MiB changed in 1 GiB read {read} bytes");
    copies.push((r.env.sessions().last().expect("session").clone(), r.env.snapshot_image("incr")));
    let read2 = send_read_bytes(&r.env);
    println!("no-change send read {read2} bytes");
    // Beyond the data, Btrfs reads its own metadata for the two extent maps
    // (FIEMAP walks the extent tree to tell shared extents) and the data's
    // checksums: measured 448 KiB for a no-change send, 860 KiB beside the
    // 16 MiB. Like the LVM test's allowance for LVM metadata.
    const FS_METADATA: u64 = MIB;
    assert!(read <= 16 * MIB + 2 * CHUNK + FS_METADATA, "read {read} bytes for 16 MiB changed");
    assert!(read2 <= CHUNK + FS_METADATA, "read {read2} bytes with nothing changed");
    r.check_all(&copies);
}

/// A send killed at each of its steps (the test hook), then a normal send:
/// every session restores as sent, and no copy is left over.
#[test]
fn killed_sends_and_monitors_are_recovered() {
    let r = ReflinkEnv::new(ReflinkFs::Btrfs, 256);
    let img = r.env.image();
    write_at(&img, 0, &random_bytes(40, 4 * MIB as usize));
    let mut copies = Vec::new();
    r.send(&mut copies);
    let mut k = 1;
    let revision = r.env.path("images/revision.img");
    loop {
        run("cp", &["--reflink=always", &img.display().to_string(), &revision.display().to_string()]);
        write_at(&img, (k % 30) * CHUNK + 77, &random_bytes(41 + k, 3000));
        let out = r.env.run_env(
            &["--passphrase-file", &r.env.passphrase_file().display().to_string(), "send"],
            &[("SPARSEBAK_TEST_STOP_AFTER", &k.to_string())],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            std::fs::remove_file(&revision).expect("remove revision");
            // Past the last step: the send simply finished.
            assert!(!err.contains("test hook"), "{err}");
            assert!(k > 5, "a tracked send has at least 5 steps, stopped only {k} times");
            copies.push((r.env.sessions().last().expect("session").clone(), r.env.snapshot_image(&format!("k{k}"))));
            break;
        }
        assert!(err.contains("test hook"), "k={k}: {err}");
        // Revert the image to what the last committed session holds (the
        // copy made before this round's change, with the same extents as
        // tick's): whatever the killed send left, the next send must see
        // that the volume is not what the archive's newest session holds
        // if the killed one committed, and must store it either way.
        std::fs::rename(&revision, &img).expect("revert");
        r.send(&mut copies);
        let newest = r.env.sessions().last().expect("a session").clone();
        let restored = r.env.receive(Some(&newest), &format!("after-kill-{k}"));
        assert_same_file(&restored, &img);
        std::fs::remove_file(&restored).expect("remove");
        k += 1;
    }
    for k in 1..=4 {
        write_at(&img, (k * 3) * CHUNK, &random_bytes(80 + k, 5000));
        let out = r.env.run_env(&["monitor"], &[("SPARSEBAK_TEST_STOP_AFTER", &k.to_string())]);
        assert!(!out.status.success(), "monitor step {k}: {}", String::from_utf8_lossy(&out.stderr));
        r.send(&mut copies);
    }
    r.check_all(&copies);
}

#[test]
fn lost_map_resync_reflink_off_and_delete() {
    let r = ReflinkEnv::new(ReflinkFs::Xfs, 320);
    let img = r.env.image();
    write_at(&img, 0, &random_bytes(50, 3 * MIB as usize));
    let mut copies = Vec::new();
    r.send(&mut copies);
    // A lost delta map: the next send falls back to the full compare with
    // LVM's warning, and still finds the change.
    write_at(&img, MIB, &random_bytes(51, 4096));
    std::fs::remove_file(r.env.path(&format!("meta/local%images/{VOL}.deltamap"))).expect("remove map");
    let err = r.env.ok(&["send"]);
    assert!(err.contains("change history unusable") && err.contains("comparing the whole volume"), "{err}");
    copies.push((r.env.sessions().last().expect("session").clone(), r.env.snapshot_image("after-lost-map")));
    // resync marks what differs between tick and the archive.
    write_at(&img, 2 * MIB, &random_bytes(52, 4096));
    r.send(&mut copies);
    let err = r.env.ok(&["resync", VOL]);
    assert!(err.contains("0 chunks differ"), "tick matches the latest session: {err}");
    // reflink = off: compared in full, still right.
    let config = std::fs::read_to_string(r.env.config()).expect("config");
    std::fs::write(r.env.config(), config.replace("[volumes]", "reflink = off\n[volumes]")).expect("config");
    write_at(&img, 0, &random_bytes(53, 4096));
    r.env.ok(&["send"]);
    copies.push((r.env.sessions().last().expect("session").clone(), r.env.snapshot_image("reflink-off")));
    let err = r.env.fails(&["monitor"]);
    assert!(err.contains("monitor works on LVM thin volumes and on image files"), "{err}");
    r.check_all(&copies);
    // delete removes the copies too.
    r.env.ok(&["delete", "-u", VOL]);
    let left: Vec<_> = std::fs::read_dir(r.copies_dir()).expect("copies dir").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "copies left: {left:?}");
}

/// Tracking off for a while, then on again, with the image reverted to the
/// state tick holds: tick no longer matches the archive, so the send must
/// not trust it (it compares in full once).
#[test]
fn tracking_off_then_on_with_a_revert_is_sent() {
    let r = ReflinkEnv::new(ReflinkFs::Btrfs, 256);
    let img = r.env.image();
    write_at(&img, 0, &random_bytes(90, 4 * MIB as usize));
    let mut copies = Vec::new();
    r.send(&mut copies);
    let revision = r.env.path("images/revision.img");
    run("cp", &["--reflink=always", &img.display().to_string(), &revision.display().to_string()]);
    let config = std::fs::read_to_string(r.env.config()).expect("config");
    std::fs::write(r.env.config(), config.replace("[volumes]", "reflink = off\n[volumes]")).expect("config");
    write_at(&img, CHUNK, &random_bytes(91, 4096));
    r.env.ok(&["send"]);
    std::fs::write(r.env.config(), &config).expect("config");
    std::fs::rename(&revision, &img).expect("revert to the first state");
    let err = r.env.ok(&["send"]);
    assert!(err.contains("comparing the whole volume"), "history not trusted after untracked sends: {err}");
    let newest = r.env.sessions().last().expect("session").clone();
    assert_same_file(&r.env.receive(Some(&newest), "reverted.img"), &img);
}

/// A send that compares in full (tick lost) killed after it made tock:
/// the lone tock is promoted by the next run, which must not trust the old
/// map with it.
#[test]
fn a_killed_full_compare_is_not_trusted_afterwards() {
    let r = ReflinkEnv::new(ReflinkFs::Btrfs, 256);
    let img = r.env.image();
    write_at(&img, 0, &random_bytes(95, 4 * MIB as usize));
    let mut copies = Vec::new();
    r.send(&mut copies);
    write_at(&img, 2 * CHUNK, &random_bytes(96, 4096));
    std::fs::remove_file(r.copies_dir().join(format!("{VOL}.tick"))).expect("lose tick");
    let pass = format!("--passphrase-file={}", r.env.passphrase_file().display());
    let out = r.env.run_env(&[&pass, "send"], &[("SPARSEBAK_TEST_STOP_AFTER", "1")]);
    assert!(!out.status.success(), "stopped after making tock");
    let err = r.env.ok(&["send"]);
    assert!(err.contains("comparing the whole volume"), "{err}");
    let newest = r.env.sessions().last().expect("session").clone();
    assert_same_file(&r.env.receive(Some(&newest), "after.img"), &img);
}
