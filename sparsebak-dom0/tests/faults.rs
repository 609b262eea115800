//! Failures that must be loud and must leave the archive and dom0's
//! metadata usable: corrupted, truncated and deleted chunks, an unmounted or
//! full destination, a send killed midway, bad configuration.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;

/// Two sessions; returns the chunk files of the second one.
fn two_sessions(env: &Env) -> (Vec<String>, Vec<PathBuf>) {
    write_at(&env.image(), 0, &random_bytes(1, 2 * MIB as usize));
    write_at(&env.image(), 2 * MIB, &text_bytes(1, MIB as usize));
    env.ok(&["send"]);
    write_at(&env.image(), MIB, &random_bytes(2, 256 * 1024));
    env.ok(&["send"]);
    let sessions = env.sessions();
    assert_eq!(sessions.len(), 2);
    let second: Vec<PathBuf> = env
        .archive_chunk_files()
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&format!("S_{}", sessions[1])))
        .collect();
    assert_eq!(second.len(), 2, "the second session stores two chunks");
    (sessions, second)
}

fn chunk_name(path: &std::path::Path) -> String {
    path.file_name().expect("name").to_string_lossy().into_owned()
}

/// Damages one chunk of the newest session with `damage`, then checks that
/// verify and receive of that session fail naming volume, session and
/// chunk, that the older session still verifies, and that receive leaves
/// no output file.
fn damaged_chunk_is_reported(damage: impl Fn(&std::path::Path)) {
    let env = Env::new(64);
    let (sessions, chunks) = two_sessions(&env);
    damage(&chunks[0]);
    let err = env.fails(&["verify", VOL]);
    assert!(err.contains(VOL), "names the volume: {err}");
    assert!(err.contains(&sessions[1]), "names the session: {err}");
    assert!(err.contains(&chunk_name(&chunks[0])), "names the chunk: {err}");
    assert!(!err.contains(&chunk_name(&chunks[1])), "only the damaged chunk is reported: {err}");

    env.ok(&["verify", VOL, &format!("--session={}", sessions[0])]);

    let dest = env.path("out/restored.img");
    let err = env.fails(&["receive", VOL, "-u", &format!("--save-to={}", dest.display())]);
    assert!(err.contains(&chunk_name(&chunks[0])), "{err}");
    assert!(!dest.exists(), "a failed receive leaves no output file");
    let leftovers: Vec<_> = std::fs::read_dir(env.path("out")).expect("out").collect();
    assert!(leftovers.is_empty(), "no temp file left: {leftovers:?}");
}

#[test]
fn corrupted_chunk_fails_verify_and_receive() {
    damaged_chunk_is_reported(|p| {
        let mut data = std::fs::read(p).expect("read chunk");
        let mid = data.len() / 2;
        data[mid] ^= 0x40;
        std::fs::write(p, data).expect("write chunk");
    });
}

#[test]
fn truncated_chunk_fails_verify_and_receive() {
    damaged_chunk_is_reported(|p| {
        let len = std::fs::metadata(p).expect("stat").len();
        set_len(p, len / 2);
    });
}

#[test]
fn deleted_chunk_fails_verify_and_receive() {
    damaged_chunk_is_reported(|p| std::fs::remove_file(p).expect("remove chunk"));
}

#[test]
fn swapped_chunks_fail_verify() {
    let env = Env::new(64);
    let (_, chunks) = two_sessions(&env);
    let (a, b) = (std::fs::read(&chunks[0]).expect("a"), std::fs::read(&chunks[1]).expect("b"));
    std::fs::write(&chunks[0], b).expect("write");
    std::fs::write(&chunks[1], a).expect("write");
    let err = env.fails(&["verify", VOL]);
    assert!(err.contains(&chunk_name(&chunks[0])) && err.contains(&chunk_name(&chunks[1])), "{err}");
}

#[test]
fn unmounted_destination_is_refused() {
    let mut env = Env::new(64);
    env.unmount();
    write_at(&env.image(), 0, &random_bytes(3, MIB as usize));
    let err = env.fails(&["send"]);
    assert!(err.contains("not a mount point"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!env.mnt().join("backups").exists(), "nothing written to the unmounted folder");
    assert!(env.sessions().is_empty(), "no session recorded in dom0");
}

#[test]
fn full_destination_fails_cleanly_and_the_next_send_recovers() {
    let env = Env::new(2);
    write_at(&env.image(), 0, &random_bytes(4, 8 * MIB as usize));
    let err = env.fails(&["send"]);
    assert!(err.contains("No space left"), "{err}");
    assert!(env.sessions().is_empty(), "dom0 recorded no session");
    let leftover = std::fs::read_dir(env.archive_volume_dir()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftover, 0, "no half-written session left in the archive");

    let st =
        std::process::Command::new("mount").args(["-o", "remount,size=64m"]).arg(env.mnt()).status().expect("remount");
    assert!(st.success());
    env.ok(&["send"]);
    assert_same_file(&env.receive(None, "after-full"), &env.image());
}

#[test]
fn killed_send_leaves_a_state_the_next_send_recovers_from() {
    let env = Env::new(256);
    write_at(&env.image(), 0, &random_bytes(5, 4 * MIB as usize));
    env.ok(&["send"]);
    let first = env.snapshot_image("first");
    write_at(&env.image(), 0, &random_bytes(6, 64 * MIB as usize));
    // Kill at several points of the second send: early, midway, late.
    for delay_ms in [30u64, 150, 400] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sparsebak"))
            .arg("--config")
            .arg(env.config())
            .arg("send")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // The receiver sees end of input and exits; give it a moment.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let sessions = env.sessions();
        assert!(!sessions.is_empty() && sessions.len() <= 2, "{sessions:?}");
        env.ok(&["verify", VOL]);
    }
    env.ok(&["send"]);
    let sessions = env.sessions();
    assert_same_file(&env.receive(Some(&sessions[0]), "first"), &first);
    assert_same_file(&env.receive(None, "latest"), &env.image());
    let tmp_left = std::fs::read_dir(env.archive_volume_dir())
        .expect("archive")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-tmp"))
        .count();
    assert_eq!(tmp_left, 0, "no stale -tmp session in the archive");
}

#[test]
fn config_errors_name_the_key_or_volume() {
    let env = Env::new(8);
    let text = std::fs::read_to_string(env.config()).expect("config");
    std::fs::write(env.config(), text.replace("destdir", "destdri")).expect("write");
    let err = env.fails(&["send"]);
    assert!(err.contains("destdri") && err.trim().lines().count() == 1, "{err}");

    env.write_config(&env.mnt(), &[(VOL, "disable"), ("other.img", "enable")]);
    let err = env.fails(&["send", VOL]);
    assert!(err.contains(VOL) && err.contains("disabled"), "{err}");
    let err = env.fails(&["send", "nosuch.img"]);
    assert!(err.contains("nosuch.img") && err.contains("not configured"), "{err}");
    let err = env.fails(&["send"]);
    assert!(err.contains("other.img"), "a missing image is named: {err}");

    let err = env.fails(&["receive", VOL, "--save-to=/tmp/x", "--session=yesterday"]);
    assert!(err.contains("yesterday"), "{err}");
}

#[test]
fn receive_does_not_overwrite_without_consent() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(8, MIB as usize));
    env.ok(&["send"]);
    let dest = env.path("out/existing.img");
    std::fs::write(&dest, b"precious").expect("write");
    let err = env.fails(&["receive", VOL, &format!("--save-to={}", dest.display())]);
    assert!(err.contains("-u"), "{err}");
    assert_eq!(std::fs::read(&dest).expect("read"), b"precious");
    env.ok(&["receive", VOL, "-u", &format!("--save-to={}", dest.display())]);
    assert_same_file(&dest, &env.image());
}

/// The temporary file beside `--save-to` is never opened through a link; a
/// regular leftover of a killed receive is replaced.
#[test]
fn receive_never_follows_a_link_planted_at_its_temporary_file() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(80, 2 * MIB as usize));
    env.ok(&["send"]);
    let dest = env.path("out/restored.img");
    let tmp = env.path("out/.restored.img.sparsebak-tmp");
    let victim = env.path("victim");
    std::fs::write(&victim, b"precious").expect("write victim");
    std::os::unix::fs::symlink(&victim, &tmp).expect("plant link");
    let save = format!("--save-to={}", dest.display());
    let err = env.fails(&["receive", VOL, "-u", &save]);
    assert!(err.contains("is not a regular file"), "{err}");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious", "the link's target is untouched");
    assert!(!dest.exists());
    // A leftover regular file of a killed receive is simply replaced.
    std::fs::remove_file(&tmp).expect("remove link");
    std::fs::write(&tmp, b"leftover").expect("leftover");
    env.ok(&["receive", VOL, "-u", &save]);
    assert_same_file(&env.image(), &dest);
    assert!(!tmp.exists(), "temporary file renamed into place");
}

/// SIGTERM or SIGINT during a receive removes its temporary file.
#[test]
fn interrupted_receive_removes_its_temporary_file() {
    let env = Env::new(256);
    write_at(&env.image(), 0, &random_bytes(81, 96 * MIB as usize));
    env.ok(&["send"]);
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let dest = env.path("out/big.img");
        let tmp = env.path("out/.big.img.sparsebak-tmp");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sparsebak"))
            .arg("--config")
            .arg(env.config())
            .args(["receive", VOL, "-u", &format!("--save-to={}", dest.display())])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let started = std::time::Instant::now();
        while !tmp.exists() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "the temporary file never appeared");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let killed = std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {err}");
        assert!(err.contains("interrupted by SIG"), "{err}");
        assert!(!tmp.exists(), "SIG{signal}: temporary file removed");
        assert!(!dest.exists(), "SIG{signal}: nothing at --save-to");
    }
}

/// verify reports a session folder that dom0 never recorded, and an info
/// copy that is not dom0's (longer or shorter) as differing from dom0's record.
#[test]
fn verify_reports_unrecorded_sessions_and_stale_metadata() {
    let env = Env::new(64);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "encryption = off\n");
    let (sessions, _) = two_sessions(&env);
    let vol = env.archive_volume_dir();
    let planted = vol.join("S_20991231-000000");
    let copied = Command::new("cp").arg("-a").arg(vol.join(format!("S_{}", sessions[1]))).arg(&planted).status();
    assert!(copied.expect("cp").success());
    let err = env.fails(&["verify", VOL]);
    assert!(err.contains("the archive holds session 20991231-000000 that dom0 has no record of"), "{err}");
    std::fs::remove_dir_all(&planted).expect("remove planted");
    env.ok(&["verify", VOL]);

    let info = vol.join(format!("S_{}", sessions[1])).join("info");
    let original = std::fs::read(&info).expect("info");
    let mut longer = original.clone();
    longer.extend_from_slice(b"chunks=999999999\n");
    for (copy, how) in [(longer, "it is longer"), (original[..original.len() - 3].to_vec(), "it is shorter")] {
        std::fs::write(&info, &copy).expect("write info");
        let err = env.fails(&["verify", VOL]);
        assert!(err.contains("in the archive differs from dom0's record") && err.contains(how), "{err}");
        assert!(!err.contains("is larger than"), "{err}");
    }
    std::fs::write(&info, &original).expect("restore info");
    env.ok(&["verify", VOL]);
}
