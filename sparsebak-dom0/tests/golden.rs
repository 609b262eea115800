//! Golden archives: archives made once by `scripts/make-golden-archives.sh`
//! with the binaries of their time and checked in under `fixtures/golden/`
//! (one encrypted, one with `encryption = off`; folder and tar sessions, a
//! pruned session merged into a newer one, a grown and a shrunk volume).
//! Today's binaries must list, restore bit-identical and verify every
//! session of them, and rebuild dom0's metadata from them with `recover`.
//! A failure here means a format change broke existing archives: keep them
//! readable or bump the format version with a migration; never regenerate
//! the fixtures to make this pass (see `fixtures/golden/README.md`).
//!
//! Every test works on a copy (archive on a fresh tmpfs, metadata in a temp
//! dir): the checked-in trees are never written to.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const VOLUMES: [&str; 2] = ["disk.img", "vol2.img"];

/// What `make-golden-archives.sh` sent, per remaining session in list order:
/// (volume, `format=` as `list` prints it).
const FORMATS: [(&str, &[&str]); 2] = [("disk.img", &["folders", "tar", "folders", "tar"]), ("vol2.img", &["tar"])];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Encrypted, key file version 1 (HMAC-SHA256 and SHA-256 chunk hashes).
    Encrypted,
    /// Encrypted, key file version 2 (keyed BLAKE3 and BLAKE3 of the stored
    /// bytes).
    EncryptedV2,
    /// Encrypted, key file version 3 (keyed BLAKE3 and seal ids).
    EncryptedV3,
    Plain,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Encrypted, Kind::EncryptedV2, Kind::EncryptedV3, Kind::Plain];

    fn dir(self) -> PathBuf {
        let name = match self {
            Kind::Encrypted => "encrypted",
            Kind::EncryptedV2 => "v2-encrypted",
            Kind::EncryptedV3 => "v3-encrypted",
            Kind::Plain => "plain",
        };
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden").join(name)
    }

    fn encrypted(self) -> bool {
        self != Kind::Plain
    }
}

/// One line of `expected.txt`: the image as it was at a session.
#[derive(Debug, Clone)]
struct Expected {
    volume: String,
    session: String,
    size: u64,
    sha256: String,
}

fn expected(kind: Kind) -> Vec<Expected> {
    let path = kind.dir().join("expected.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rows: Vec<Expected> = text
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(w.len(), 4, "expected.txt line {l:?}");
            Expected {
                volume: w[0].to_string(),
                session: w[1].to_string(),
                size: w[2].parse().expect("size"),
                sha256: w[3].to_string(),
            }
        })
        .collect();
    // The fixture holds what the generator documents: 4 sessions of disk.img
    // (6 sent, 2 pruned) and 1 of vol2.img.
    for (vol, formats) in FORMATS {
        assert_eq!(rows.iter().filter(|r| r.volume == vol).count(), formats.len(), "{vol} in {}", path.display());
    }
    rows
}

/// Copies a tree of regular files and folders.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let e = e.expect("dir entry");
        let to = dst.join(e.file_name());
        let ty = e.file_type().expect("file type");
        if ty.is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            assert!(ty.is_file(), "{}: only files and folders in a fixture", e.path().display());
            std::fs::copy(e.path(), &to).expect("copy file");
        }
    }
}

/// A test environment holding a copy of the fixture's archive on its tmpfs
/// and, with `meta`, of its dom0 metadata (else an empty metadata folder
/// beside the config, as after losing dom0).
fn golden_env(kind: Kind, meta: bool) -> Env {
    let env = Env::new(16);
    let mut extra = String::from("chunksize = 64K\n");
    if kind == Kind::Plain {
        extra.push_str("encryption = off\n");
    }
    let volumes: Vec<(&str, &str)> = VOLUMES.iter().map(|v| (*v, "enable")).collect();
    env.write_config_with(&env.mnt(), &volumes, &extra);
    if kind.encrypted() {
        std::fs::copy(kind.dir().join("passphrase"), env.passphrase_file()).expect("copy passphrase");
    }
    copy_tree(&kind.dir().join("archive"), &env.mnt());
    if meta {
        copy_tree(&kind.dir().join("meta"), &env.path("meta"));
        let key = env.path("meta/local%images/.sparsebak-key");
        if key.exists() {
            // git keeps only the x bit; dom0's key file is 0600.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        }
    }
    env
}

fn sha256_hex(path: &Path) -> String {
    let data = std::fs::read(path).expect("read restored");
    hex(&Sha256::digest(&data))
}

/// Lower-case hex, as `expected.txt` and manifests write hashes.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `list VOL` shows exactly the expected sessions, in order, with the
/// expected volume size and storage format.
fn check_list(env: &Env, want: &[Expected]) {
    for (vol, formats) in FORMATS {
        let out = env.ok(&["list", vol]);
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("20")).collect();
        let rows: Vec<&Expected> = want.iter().filter(|r| r.volume == vol).collect();
        let listed: Vec<&str> = lines.iter().filter_map(|l| l.split_whitespace().next()).collect();
        let sessions: Vec<&str> = rows.iter().map(|r| r.session.as_str()).collect();
        assert_eq!(listed, sessions, "sessions of {vol}: {out}");
        for ((line, row), format) in lines.iter().zip(&rows).zip(formats) {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(words.contains(&format!("size={}", row.size).as_str()), "{vol} {}: {line}", row.session);
            assert!(words.contains(&format!("format={format}").as_str()), "{vol} {}: {line}", row.session);
        }
    }
}

/// Restores every expected session and compares size and sha256.
fn check_restores(env: &Env, want: &[Expected]) {
    for row in want {
        let dest = env.path("out").join(format!("{}@{}", row.volume, row.session));
        let save = format!("--save-to={}", dest.display());
        env.ok(&["receive", &row.volume, "--session", &row.session, &save, "-u"]);
        let size = std::fs::metadata(&dest).expect("stat restored").len();
        assert_eq!(size, row.size, "size of {} at {}", row.volume, row.session);
        assert_eq!(sha256_hex(&dest), row.sha256, "sha256 of {} at {}", row.volume, row.session);
        std::fs::remove_file(&dest).expect("remove restored");
    }
}

fn check_verifies(env: &Env, want: &[Expected]) {
    for row in want {
        env.ok(&["verify", &row.volume, "--session", &row.session]);
    }
    env.ok(&["verify"]);
}

fn restores_and_verifies(kind: Kind) {
    let want = expected(kind);
    let env = golden_env(kind, true);
    // The fixture is what it says: its sessions stored as folders record
    // the stored hashes of its key's version.
    let disk = want.iter().filter(|r| r.volume == "disk.img");
    for (row, format) in disk.zip(FORMATS[0].1) {
        if *format == "folders" {
            check_stored_hashes(&env, kind, &row.session);
        }
    }
    check_list(&env, &want);
    check_restores(&env, &want);
    check_verifies(&env, &want);
}

fn recovers(kind: Kind) {
    let want = expected(kind);
    let env = golden_env(kind, false);
    assert!(!env.path("meta/local%images").exists(), "metadata starts empty");
    let out = env.ok(&["recover"]);
    for (vol, formats) in FORMATS {
        let line = format!("{vol}: recovered {} session(s)", formats.len());
        assert!(out.contains(&line), "{line:?} in {out}");
    }
    if kind.encrypted() {
        // dom0's key comes back as the archive made it: the same key, and
        // the same version and chunk hashes (never today's newer ones).
        let key = std::fs::read_to_string(env.path("meta/local%images/.sparsebak-key")).expect("dom0's key rebuilt");
        let fixture = std::fs::read_to_string(kind.dir().join("meta/local%images/.sparsebak-key")).expect("key");
        let hex = fixture.lines().find_map(|l| l.strip_prefix("key=")).unwrap_or(fixture.trim());
        assert!(key.contains(&format!("key={hex}\n")), "{key}");
        let header = |t: &str| t.lines().filter(|l| !l.starts_with("key=")).map(String::from).collect::<Vec<_>>();
        if fixture.starts_with("version=") {
            assert_eq!(header(&key), header(&fixture));
        } else {
            assert_eq!(header(&key), ["version=1"], "a version 1 key from before versions");
        }
    }
    check_list(&env, &want);
    check_restores(&env, &want);
    check_verifies(&env, &want);
}

#[test]
fn encrypted_golden_archive_restores_and_verifies() {
    restores_and_verifies(Kind::Encrypted);
}

#[test]
fn v2_encrypted_golden_archive_restores_and_verifies() {
    restores_and_verifies(Kind::EncryptedV2);
}

#[test]
fn v3_encrypted_golden_archive_restores_and_verifies() {
    restores_and_verifies(Kind::EncryptedV3);
}

#[test]
fn plain_golden_archive_restores_and_verifies() {
    restores_and_verifies(Kind::Plain);
}

#[test]
fn encrypted_golden_archive_recovers_into_empty_metadata() {
    recovers(Kind::Encrypted);
}

#[test]
fn v2_encrypted_golden_archive_recovers_into_empty_metadata() {
    recovers(Kind::EncryptedV2);
}

#[test]
fn v3_encrypted_golden_archive_recovers_into_empty_metadata() {
    recovers(Kind::EncryptedV3);
}

#[test]
fn plain_golden_archive_recovers_into_empty_metadata() {
    recovers(Kind::Plain);
}

/// The checks above read the copy, and would catch a damaged chunk: one
/// flipped byte in a chunk file of the oldest session (stored as folders)
/// makes both `verify` and `receive` of that session fail.
#[test]
fn altered_chunk_in_a_golden_copy_is_detected() {
    for kind in Kind::ALL {
        let want = expected(kind);
        let env = golden_env(kind, true);
        let first = &want[0];
        assert_eq!(first.volume, "disk.img", "its oldest session (folders) comes first");
        let chunk = env.archive_volume_dir().join(format!("S_{}", first.session)).join("000000000/x0000000000000000");
        let mut data = std::fs::read(&chunk).unwrap_or_else(|e| panic!("{}: {e}", chunk.display()));
        let mid = data.len() / 2;
        data[mid] ^= 0x01;
        std::fs::write(&chunk, &data).expect("write altered chunk");

        let err = env.fails(&["verify", &first.volume, "--session", &first.session]);
        assert!(err.contains(&first.session), "{kind:?}: the error names the session: {err}");
        let dest = env.path("out/altered.img");
        let save = format!("--save-to={}", dest.display());
        env.fails(&["receive", &first.volume, "--session", &first.session, &save, "-u"]);
        assert!(!dest.exists(), "{kind:?}: no output file from a failed restore");
        // The checked-in chunk is unchanged (the test altered its copy).
        let orig = kind
            .dir()
            .join("archive/backups/local%images")
            .join(&first.volume)
            .join(format!("S_{}", first.session))
            .join("000000000/x0000000000000000");
        assert_ne!(std::fs::read(orig).expect("read fixture chunk"), data);
    }
}

/// The one `sparsebak: error:` line of a failed run's stderr.
fn single_error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("sparsebak: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    errors[0]
}

/// Files from a newer sparsebak are refused, each with one line naming the
/// file and both versions, and nothing is changed: the archive marker (the
/// receiver writes version 1 into a golden archive, which predates it), a
/// session's `info` and dom0's key file.
#[test]
fn newer_format_versions_are_refused_naming_file_and_versions() {
    let env = golden_env(Kind::Encrypted, true);
    let marker = env.mnt().join("backups/.sparsebak-format");
    assert!(!marker.exists(), "the golden archive predates the marker");
    env.ok(&["verify", "vol2.img"]);
    assert_eq!(std::fs::read_to_string(&marker).expect("marker written"), "sparsebak archive format 1\n");

    std::fs::write(&marker, "sparsebak archive format 99\n").expect("write marker");
    let line = single_error_line(&env.fails(&["verify", "vol2.img"])).to_string();
    assert!(line.contains(".sparsebak-format") && line.contains("format version 99"), "{line}");
    assert!(line.contains("(version 1)"), "{line}");
    assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "sparsebak archive format 99\n", "left as it was");
    std::fs::write(&marker, "sparsebak archive format 1\n").expect("write marker");

    let session = &expected(Kind::Encrypted).into_iter().find(|r| r.volume == "vol2.img").expect("vol2").session;
    let info = env.path("meta/local%images/vol2.img").join(format!("S_{session}")).join("info");
    let text = std::fs::read_to_string(&info).expect("read info");
    std::fs::write(&info, format!("version=7\n{text}")).expect("write info");
    let line = single_error_line(&env.fails(&["list", "vol2.img"])).to_string();
    assert!(line.contains(&info.display().to_string()) && line.contains("format version 7"), "{line}");
    assert!(line.contains("(version 1)"), "{line}");
    std::fs::write(&info, text).expect("restore info");

    let key = env.path("meta/local%images/.sparsebak-key");
    let hex = std::fs::read_to_string(&key).expect("read key");
    std::fs::write(&key, format!("version=5\nkey={}", hex.trim())).expect("write key");
    let line = single_error_line(&env.fails(&["verify", "vol2.img"])).to_string();
    assert!(line.contains(&key.display().to_string()) && line.contains("format version 5"), "{line}");
    assert!(line.contains("(version 3)"), "{line}");
    // The same key in today's form loads.
    std::fs::write(&key, format!("version=1\nkey={}", hex.trim())).expect("write key");
    env.ok(&["verify", "vol2.img"]);
}

/// A golden archive keeps working as a live one: a session pruned into a
/// newer one (its info rewritten in today's form beside version-1 ones),
/// then an incremental send on top; every remaining session restores as
/// before and the new one as the changed image.
fn takes_prune_and_new_sessions(kind: Kind) {
    let mut want = expected(kind);
    let env = golden_env(kind, true);
    let disk: Vec<String> = want.iter().filter(|r| r.volume == "disk.img").map(|r| r.session.clone()).collect();
    let pruned = disk[1].clone();
    env.ok(&["prune", "disk.img", &format!("--session={pruned}")]);
    want.retain(|r| !(r.volume == "disk.img" && r.session == pruned));
    let listed = env.sessions();
    assert!(!listed.contains(&pruned), "{pruned} pruned: {listed:?}");
    check_restores(&env, &want);
    check_verifies(&env, &want);

    // Today's image: the newest session, changed in one chunk.
    let save = format!("--save-to={}", env.image().display());
    env.ok(&["receive", "disk.img", &save, "-u"]);
    let mut data = std::fs::read(env.image()).expect("read image");
    data[70_000..74_096].fill(0xab);
    std::fs::write(env.image(), &data).expect("write image");
    env.ok(&["send", "disk.img"]);
    let newest = env.sessions().last().cloned().expect("a session");
    assert!(!disk.contains(&newest), "a new session: {newest}");
    check_stored_hashes(&env, kind, &newest);
    want.push(Expected {
        volume: "disk.img".into(),
        session: newest,
        size: data.len() as u64,
        sha256: hex(&Sha256::digest(&data)),
    });
    check_restores(&env, &want);
    check_verifies(&env, &want);
}

/// An archive keeps the chunk hashes it was made with: the manifest of a
/// session sent into it today records, for each chunk it stored, the hash
/// of the chunk file that the archive's key version calls for.
fn check_stored_hashes(env: &Env, kind: Kind, session: &str) {
    let dir = format!("S_{session}");
    let manifest = std::fs::read_to_string(env.meta_volume_dir().join(&dir).join("manifest")).expect("manifest");
    let mut checked = 0;
    for line in manifest.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        if w[0] == "0" || w.len() != 3 {
            continue; // a zero chunk, or one stored in an older session
        }
        let chunk = find_file(&env.archive_volume_dir().join(&dir), w[2]).expect("the chunk's file");
        let data = std::fs::read(&chunk).expect("read chunk");
        let want = match kind {
            Kind::Plain | Kind::Encrypted => hex(&Sha256::digest(&data)),
            Kind::EncryptedV2 => hex(blake3::hash(&data).as_bytes()),
            // The seal's id: its 24-byte nonce and 16-byte tag.
            Kind::EncryptedV3 => hex(blake3::hash(&[&data[..24], &data[data.len() - 16..]].concat()).as_bytes()),
        };
        assert_eq!(w[1], want, "{kind:?}: stored hash of {}", chunk.display());
        checked += 1;
    }
    assert!(checked > 0, "{kind:?}: the new session stored chunks: {manifest}");
}

/// The file called `name` somewhere under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let path = e.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

#[test]
fn encrypted_golden_archive_takes_prune_and_new_sessions() {
    takes_prune_and_new_sessions(Kind::Encrypted);
}

#[test]
fn v2_encrypted_golden_archive_takes_prune_and_new_sessions() {
    takes_prune_and_new_sessions(Kind::EncryptedV2);
}

#[test]
fn v3_encrypted_golden_archive_takes_prune_and_new_sessions() {
    takes_prune_and_new_sessions(Kind::EncryptedV3);
}

#[test]
fn plain_golden_archive_takes_prune_and_new_sessions() {
    takes_prune_and_new_sessions(Kind::Plain);
}

/// Restoring from a backup disk mounted read-only (the usual way on the day
/// of a restore): the archive predates the format marker, which cannot be
/// written then; reads work anyway, with a warning, and the disk is untouched.
#[test]
fn golden_archive_restores_from_a_read_only_disk() {
    let want = expected(Kind::Plain);
    let env = golden_env(Kind::Plain, true);
    let st = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(env.mnt()).status().expect("mount");
    assert!(st.success(), "remount read-only");
    let out = env.ok(&["verify", "vol2.img"]);
    assert!(out.contains("taken as format version 1"), "{out}");
    check_restores(&env, &want);
    check_verifies(&env, &want);
    assert!(!env.mnt().join("backups/.sparsebak-format").exists(), "nothing written");
}
