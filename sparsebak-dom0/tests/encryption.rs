//! Encrypted archives (the default): the receiver sees only ciphertext and
//! keyed hashes, and whatever it does to the archive (swap, move, truncate,
//! replay, roll back) is detected by dom0. dom0's metadata can be rebuilt
//! from the archive with the passphrase.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MARKER: &[u8] = b"SPARSEBAK-SECRET-MARKER-7f3a";

/// Two sessions of an image holding the marker; returns the session names.
fn two_sessions(env: &Env) -> Vec<String> {
    let mut text = Vec::new();
    while text.len() < MIB as usize {
        text.extend_from_slice(MARKER);
        text.extend_from_slice(b" some compressible text around the marker\n");
    }
    write_at(&env.image(), 0, &text);
    write_at(&env.image(), 2 * MIB, &random_bytes(3, MIB as usize));
    env.ok(&["send"]);
    write_at(&env.image(), 2 * MIB, &random_bytes(4, 256 * 1024));
    env.ok(&["send"]);
    let sessions = env.sessions();
    assert_eq!(sessions.len(), 2);
    sessions
}

fn session_dir(env: &Env, session: &str) -> PathBuf {
    env.archive_volume_dir().join(format!("S_{session}"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn marker_and_plain_hashes_never_reach_the_archive() {
    let env = Env::new(64);
    let sessions = two_sessions(&env);
    let first_chunk = std::fs::read(env.image()).expect("read image")[..128 * 1024].to_vec();
    let plain_sha = hex(&Sha256::digest(&first_chunk));
    let files = env.archive_files();
    assert!(files.iter().any(|p| p.ends_with("manifest")) && files.iter().any(|p| p.ends_with("info")));
    let mut chunk_bytes = 0;
    for f in &files {
        let data = std::fs::read(f).expect("read archive file");
        assert!(!contains(&data, MARKER), "marker found in {}", f.display());
        assert!(!contains(&data, plain_sha.as_bytes()), "plain SHA-256 of a chunk found in {}", f.display());
        assert!(!contains(&data, b"chunksize="), "info readable in {}", f.display());
        if f.file_name().is_some_and(|n| n.to_string_lossy().starts_with('x')) {
            chunk_bytes += data.len();
        }
    }
    // Compression happens before encryption: the text MiB shrinks.
    assert!(chunk_bytes < (MIB as usize) * 3 / 2 + 200 * 1024, "chunks take {chunk_bytes} bytes");
    // dom0's own manifests hold keyed hashes too (the chunk is in the first).
    let first = env.meta_volume_dir().join(format!("S_{}", sessions[0])).join("manifest");
    let text = std::fs::read_to_string(first).expect("manifest");
    assert!(text.contains(" x0000000000000000") && !text.contains(&plain_sha), "{text}");
    assert_same_file(&env.image(), &env.receive(None, "r.img"));
}

/// Verify and receive of the newest session both fail, with `expect` in
/// verify's message.
fn detected(env: &Env, expect: &str) -> String {
    let err = env.fails(&["verify", VOL]);
    assert!(err.contains(expect), "verify should report {expect:?}: {err}");
    err
}

#[test]
fn moving_a_chunk_between_sessions_is_detected() {
    let env = Env::new(64);
    let s = two_sessions(&env);
    let newer = session_dir(&env, &s[1]);
    let newer_chunk =
        env.archive_chunk_files().into_iter().find(|p| p.starts_with(&newer)).expect("a chunk in the newer session");
    let rel = newer_chunk.strip_prefix(&newer).expect("relative");
    let older_chunk = session_dir(&env, &s[0]).join(rel);
    std::fs::copy(&older_chunk, &newer_chunk).expect("replay the older chunk in the newer session");
    let name = newer_chunk.file_name().expect("name").to_string_lossy().into_owned();
    let err = detected(&env, &name);
    assert!(err.contains(&s[1]), "{err}");
    let dest = env.path("out/r.img");
    env.fails(&["receive", VOL, "-u", &format!("--save-to={}", dest.display())]);
    assert!(!dest.exists());
}

#[test]
fn truncated_manifest_is_detected() {
    let env = Env::new(64);
    let s = two_sessions(&env);
    let manifest = session_dir(&env, &s[0]).join("manifest");
    let len = std::fs::metadata(&manifest).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&manifest).expect("open").set_len(len - 1).expect("truncate");
    let err = detected(&env, "manifest of disk.img session S_");
    assert!(err.contains(&s[0]) && err.contains("authentication failed"), "{err}");
}

#[test]
fn replayed_info_file_is_detected() {
    let env = Env::new(64);
    let s = two_sessions(&env);
    std::fs::copy(session_dir(&env, &s[0]).join("info"), session_dir(&env, &s[1]).join("info")).expect("replay");
    let err = detected(&env, "info of disk.img session S_");
    assert!(err.contains(&s[1]) && err.contains("authentication failed"), "{err}");
    // The untouched older session still verifies.
    env.ok(&["verify", VOL, &format!("--session={}", s[0])]);
}

#[test]
fn an_older_copy_of_the_whole_archive_is_detected() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(5, MIB as usize));
    env.ok(&["send"]);
    let old_copy = env.path("copies/archive");
    copy_tree(&env.mnt().join("backups"), &old_copy);
    write_at(&env.image(), 0, &random_bytes(6, 128 * 1024));
    env.ok(&["send"]);
    std::fs::remove_dir_all(env.mnt().join("backups")).expect("remove archive");
    copy_tree(&old_copy, &env.mnt().join("backups"));
    detected(&env, "rolled back");
    let dest = env.path("out/r.img");
    let err = env.fails(&["receive", VOL, "-u", &format!("--save-to={}", dest.display())]);
    assert!(err.contains("rolled back"), "{err}");
    write_at(&env.image(), 0, &random_bytes(7, 128 * 1024));
    let err = env.fails(&["send"]);
    assert!(err.contains("rolled back"), "{err}");
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(st.success());
}

#[test]
fn recover_from_empty_metadata_restores_bit_identical() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(8, 2 * MIB as usize));
    env.ok(&["send"]);
    let first = env.snapshot_image("first");
    write_at(&env.image(), MIB, &text_bytes(9, MIB as usize));
    set_len(&env.image(), 5 * MIB);
    env.ok(&["send"]);
    let second = env.snapshot_image("second");
    let before = env.sessions();
    env.lose_dom0_metadata();

    let out = env.ok(&["recover"]);
    assert!(out.contains("recovered 2 session(s)"), "{out}");
    assert!(out.contains("verified"), "recover verifies: {out}");
    assert_eq!(env.sessions(), before);
    assert_same_file(&second, &env.receive(None, "latest.img"));
    assert_same_file(&first, &env.receive(Some(&before[0]), "first.img"));
    // The recovered key hashes as before: an unchanged volume sends nothing.
    env.ok(&["send"]);
    assert_eq!(env.sessions(), before);
    // And a recovered dom0 detects a later rollback again.
    env.ok(&["verify"]);
}

/// A new archive's key goes into the archive first, then into dom0. A
/// first send killed between the two leaves an archive with a key and no
/// session: the next send says to run `recover`, which brings back the key
/// (there is nothing else), and sends go on with that key.
#[test]
fn a_first_send_stopped_between_storing_its_key_in_archive_and_dom0_recovers() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(14, 3 * MIB as usize));
    let pass = format!("--passphrase-file={}", env.passphrase_file().display());
    let out = env.run_env(&[&pass, "send"], &[("SPARSEBAK_TEST_STOP_AFTER", "1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(86), "stopped by the hook: {err}");
    assert!(err.contains("new key in the archive"), "{err}");
    assert!(env.sessions().is_empty());
    assert!(env.mnt().join("backups/local%images/.sparsebak-key").exists(), "the archive has the key");
    assert!(!env.path("meta/local%images/.sparsebak-key").exists(), "dom0 has not");
    let err = env.fails(&["send"]);
    assert!(err.contains("sparsebak recover"), "{err}");
    // Named, the volume's lack of sessions is an error, though the key
    // came back; unnamed (every configured volume), the key is all there is.
    let err = env.fails(&["recover", VOL]);
    assert!(err.contains("only its key was recovered"), "{err}");
    assert!(env.path("meta/local%images/.sparsebak-key").exists(), "dom0 has the key now");
    std::fs::remove_file(env.path("meta/local%images/.sparsebak-key")).expect("lose it again");
    let out = env.ok(&["recover"]);
    assert!(out.contains("recovered the archive's key"), "{out}");
    assert!(env.path("meta/local%images/.sparsebak-key").exists(), "dom0 has the key now");
    env.ok(&["send"]);
    assert_same_file(&env.receive(None, "after-recover.img"), &env.image());
    // The archive's key is the one the session was sealed with.
    env.lose_dom0_metadata();
    env.ok(&["recover"]);
    assert_same_file(&env.receive(None, "recovered.img"), &env.image());
}

#[test]
fn wrong_passphrase_is_refused_without_a_crash() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(10, MIB as usize));
    env.ok(&["send"]);
    env.lose_dom0_metadata();
    std::fs::write(env.passphrase_file(), "not the passphrase\n").expect("write");
    let out = env.run(&["recover"]);
    assert_eq!(out.status.code(), Some(1), "a clean failure, not a crash");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!env.path("meta/local%images/.sparsebak-key").exists(), "no key kept");
    std::fs::write(env.passphrase_file(), format!("{PASSPHRASE}\n")).expect("write");
    env.ok(&["recover"]);
}

#[test]
fn unattended_creation_without_passphrase_fails_before_writing() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(11, MIB as usize));
    let out = env.run_bare(&["-u", "send"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("creating an encrypted archive needs") && err.contains("--passphrase-file"), "{err}");
    assert!(env.archive_files().is_empty(), "nothing written to the archive");
    assert!(!env.path("meta/local%images").exists(), "nothing written to dom0's metadata");
    // Once the archive exists, routine commands need no passphrase.
    env.ok(&["send"]);
    write_at(&env.image(), 0, &random_bytes(12, 128 * 1024));
    let out = env.run_bare(&["-u", "send"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.run_bare(&["verify"]).status.success());
}

#[test]
fn unencrypted_archives_keep_working_and_modes_cannot_mix() {
    let env = Env::new(64);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "encryption = off\n");
    write_at(&env.image(), 0, &text_bytes(1, MIB as usize));
    let out = env.run_bare(&["-u", "send"]);
    assert!(out.status.success(), "no passphrase needed: {}", String::from_utf8_lossy(&out.stderr));
    let first_chunk = std::fs::read(env.image()).expect("read")[..128 * 1024].to_vec();
    let plain_sha = hex(&Sha256::digest(&first_chunk));
    let s = env.sessions();
    let manifest = std::fs::read_to_string(session_dir(&env, &s[0]).join("manifest")).expect("plain manifest");
    assert!(manifest.contains(&plain_sha));
    assert_same_file(&env.image(), &env.receive(None, "r.img"));

    env.write_config(&env.mnt(), &[(VOL, "enable")]);
    let err = env.fails(&["verify"]);
    assert!(err.contains("encryption = off"), "{err}");

    // Recovering an unencrypted archive works too.
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "encryption = off\n");
    env.lose_dom0_metadata();
    env.ok(&["recover"]);
    assert_same_file(&env.image(), &env.receive(None, "r2.img"));
}

#[test]
fn encrypted_archive_refuses_encryption_off() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(13, MIB as usize));
    env.ok(&["send"]);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "encryption = off\n");
    let err = env.fails(&["send"]);
    assert!(err.contains("is encrypted"), "{err}");
    // A new dom0 cannot start a second key for the same archive either.
    env.write_config(&env.mnt(), &[(VOL, "enable")]);
    env.lose_dom0_metadata();
    let err = env.fails(&["send"]);
    assert!(err.contains("sparsebak recover"), "{err}");
}

#[test]
fn pruned_sessions_keep_their_chunks_openable_also_after_recover() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(20, 2 * MIB as usize));
    env.ok(&["send"]);
    write_at(&env.image(), 0, &random_bytes(21, 256 * 1024));
    env.ok(&["send"]);
    write_at(&env.image(), MIB, &random_bytes(22, 256 * 1024));
    env.ok(&["send"]);
    let latest = env.snapshot_image("latest");
    let s = env.sessions();
    assert_eq!(s.len(), 3);
    env.ok(&["prune", &format!("--session={},{}", s[0], s[1])]);
    assert_eq!(env.sessions(), [s[2].clone()]);
    // Chunks moved from the pruned sessions keep their seals; the merged
    // manifest names the session each was first stored in.
    let manifest = env.meta_volume_dir().join(format!("S_{}", s[2])).join("manifest");
    let text = std::fs::read_to_string(manifest).expect("manifest");
    assert!(text.lines().any(|l| l.ends_with(&format!(" S_{}", s[0]))), "{text}");
    assert!(text.lines().any(|l| l.ends_with(&format!(" S_{}", s[1]))), "{text}");
    env.ok(&["verify"]);
    assert_same_file(&latest, &env.receive(None, "after-prune.img"));
    env.lose_dom0_metadata();
    env.ok(&["recover"]);
    assert_same_file(&latest, &env.receive(None, "after-recover.img"));
}

/// A mistyped `localdir` or volume name fails before anything is written:
/// no archive key (in the archive or in dom0), no session, no metadata.
#[test]
fn missing_sources_fail_before_anything_is_written() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(12, MIB as usize));
    let good = std::fs::read_to_string(env.config()).expect("config");
    let mistakes = [
        (good.replace(&env.path("images").display().to_string(), "/nonexistent"), "localdir /nonexistent"),
        (good.replace(&format!("{VOL} = enable"), "disk.imgg = enable"), "disk.imgg"),
    ];
    for (config, expect) in mistakes {
        std::fs::write(env.config(), &config).expect("config");
        let err = env.fails(&["send"]);
        assert!(err.contains(expect), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(env.archive_files().is_empty(), "nothing in the archive: {:?}", env.archive_files());
        assert!(!env.path("meta/local%images").exists(), "nothing in dom0's metadata");
        assert!(!env.path("meta/local%nonexistent").exists(), "nothing in dom0's metadata");
    }
    std::fs::write(env.config(), &good).expect("config");
    env.ok(&["send"]);
}
