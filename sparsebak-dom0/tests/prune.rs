//! Prune, tar sessions and delete through the real binaries: archives with
//! many sessions (folders and tar mixed, with shrink and growth between
//! them) are pruned one session, the oldest, middle ones and ranges at a
//! time, and every remaining session must restore bit-identical after each
//! step. Prunes killed at every step of either side must be settled by the
//! next run, leaving no garbage.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const CHUNK: u64 = 128 * 1024;

/// Session date-time -> copy of the image as it was sent.
type Copies = BTreeMap<String, PathBuf>;

/// Sends (as tar when asked) and records a copy of the image under the new
/// session's name.
fn send(env: &Env, tar: bool, copies: &mut Copies) -> String {
    let before = env.sessions().len();
    if tar {
        env.ok(&["send", "--tarfile"]);
    } else {
        env.ok(&["send"]);
    }
    let sessions = env.sessions();
    assert_eq!(sessions.len(), before + 1, "send created a session");
    let name = sessions.last().expect("a session").clone();
    copies.insert(name.clone(), env.snapshot_image(&name));
    name
}

/// Every session dom0 lists is in `copies` and restores bit-identical to it.
fn check_sessions(env: &Env, copies: &Copies, which: &[String]) {
    for s in which {
        let restored = env.receive(Some(s), &format!("check-{s}"));
        assert_same_file(&restored, &copies[s]);
        std::fs::remove_file(&restored).expect("remove restored");
    }
}

fn check_all(env: &Env, copies: &Copies) {
    let listed = env.sessions();
    let want: Vec<String> = copies.keys().cloned().collect();
    assert_eq!(listed, want, "listed sessions");
    check_sessions(env, copies, &listed);
}

/// Journals, half-written metadata and half-removed sessions left behind.
fn leftovers(env: &Env) -> Vec<PathBuf> {
    env.all_files()
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s.contains("prune.") || s.contains(".prune-new") || s.contains(".merged") || s.contains("-pruned")
        })
        .collect()
}

/// Prunes and checks that the session is gone on both sides, nothing is
/// left behind and every other session restores as before.
fn prune(env: &Env, copies: &mut Copies, spec: &str, gone: &[&String]) -> String {
    let out = env.ok(&["prune", VOL, &format!("--session={spec}")]);
    for g in gone {
        copies.remove(*g);
        assert!(!env.archive_volume_dir().join(format!("S_{g}")).exists(), "{g} left in the archive");
        assert!(!env.meta_volume_dir().join(format!("S_{g}")).exists(), "{g} left in dom0");
    }
    assert_eq!(leftovers(env), Vec::<PathBuf>::new());
    check_all(env, copies);
    out
}

fn session_dir(env: &Env, s: &str) -> PathBuf {
    env.archive_volume_dir().join(format!("S_{s}"))
}

fn chunk_files_in(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("session dir").flatten() {
        if e.path().is_dir() {
            n += std::fs::read_dir(e.path()).expect("sub dir").count();
        }
    }
    n
}

#[test]
fn pruning_mixed_sessions_keeps_every_other_session_bit_identical() {
    let env = Env::new(256);
    let img = env.image();
    let mut copies = Copies::new();
    let d = random_bytes(20, MIB as usize);

    // s1 (folders), 28 MiB: random, text, D at 20 MiB, data at 26 MiB that
    // no later session is large enough to see.
    write_at(&img, 0, &random_bytes(1, 8 * MIB as usize));
    write_at(&img, 8 * MIB, &text_bytes(1, 4 * MIB as usize));
    write_at(&img, 20 * MIB, &d);
    write_at(&img, 26 * MIB, &random_bytes(2, MIB as usize));
    set_len(&img, 28 * MIB);
    let s1 = send(&env, false, &mut copies);
    // s2 (tar): shrink to 10 MiB + 300, one chunk changed, a hole punched.
    set_len(&img, 10 * MIB + 300);
    write_at(&img, MIB, &random_bytes(3, 4096));
    punch_hole(&img, 2 * MIB, MIB);
    let s2 = send(&env, true, &mut copies);
    // s3 (folders): grow to 24 MiB + 777 with D written back unchanged (so
    // s3 relies on s1's chunks there), new data at 16 MiB, text changed.
    set_len(&img, 24 * MIB + 777);
    write_at(&img, 20 * MIB, &d);
    write_at(&img, 16 * MIB, &random_bytes(4, MIB as usize));
    write_at(&img, 9 * MIB, &text_bytes(500, 4096));
    let s3 = send(&env, false, &mut copies);
    // s4 (tar): the chunk at 1 MiB changes again (supersedes s2's), 5 MiB.
    write_at(&img, MIB, &random_bytes(5, 4096));
    write_at(&img, 5 * MIB, &random_bytes(6, CHUNK as usize));
    let s4 = send(&env, true, &mut copies);
    // s5 (folders): a hole over s1's random data, data at 22 MiB.
    punch_hole(&img, 4 * MIB, MIB);
    write_at(&img, 22 * MIB, &random_bytes(7, 3 * CHUNK as usize));
    let s5 = send(&env, false, &mut copies);
    // s6 (tar) and s7 (folders): small changes.
    write_at(&img, 0, &random_bytes(8, 4096));
    let s6 = send(&env, true, &mut copies);
    write_at(&img, 12 * MIB, &text_bytes(9, 4096));
    let s7 = send(&env, false, &mut copies);
    check_all(&env, &copies);

    // list shows the format of each session.
    let formats: Vec<String> = env.session_lines().iter().map(|(_, f)| f["format"].clone()).collect();
    assert_eq!(formats, ["folders", "tar", "folders", "tar", "folders", "tar", "folders"]);

    // The oldest, into a smaller tar session: chunks beyond every later
    // size are trimmed, D (which s3 needs) moves into s2's folder layout.
    let files_in_s2 = chunk_files_in(&session_dir(&env, &s2));
    assert_eq!(files_in_s2, 0, "a tar session starts without chunk files");
    let out = prune(&env, &mut copies, &s1, &[&s1]);
    assert!(out.contains(" 8 trimmed"), "the 8 chunks at 26 MiB are trimmed: {out}");
    assert!(chunk_files_in(&session_dir(&env, &s2)) > 0, "surviving chunks moved into s2 as files");
    assert!(session_dir(&env, &s2).join("chunks.tar").is_file());

    // A middle tar session into a folder session: its tar goes, what
    // survives is in s5's folder layout.
    let s5_files = chunk_files_in(&session_dir(&env, &s5));
    prune(&env, &mut copies, &s4, &[&s4]);
    assert!(chunk_files_in(&session_dir(&env, &s5)) > s5_files, "s4's chunks extracted into s5");

    // A middle session whose zero entries hide older data.
    prune(&env, &mut copies, &s5, &[&s5]);

    // A range, given newest first, spanning a tar and a folder session.
    prune(&env, &mut copies, &format!("{s3},{s2}"), &[&s2, &s3]);

    // The newest session is never pruned.
    let err = env.fails(&["prune", VOL, &format!("--session={s7}")]);
    assert!(err.contains("never pruned") && err.contains("no session was pruned"), "{err}");
    check_all(&env, &copies);

    // A range including the newest prunes everything else.
    let out = prune(&env, &mut copies, &format!("{s6},{s7}"), &[&s6]);
    assert!(out.contains("never pruned"), "{out}");
    assert_eq!(env.sessions(), std::slice::from_ref(&s7));
    env.ok(&["verify", VOL]);
    // A later send still works on the pruned archive.
    write_at(&img, 3 * MIB, &random_bytes(10, 4096));
    send(&env, true, &mut copies);
    check_all(&env, &copies);
}

#[test]
fn tar_sessions_restore_verify_and_report_damage() {
    let env = Env::new(128);
    let img = env.image();
    let mut copies = Copies::new();
    write_at(&img, 0, &random_bytes(30, 3 * MIB as usize));
    write_at(&img, 6 * MIB, &text_bytes(30, MIB as usize));
    let s1 = send(&env, true, &mut copies);
    write_at(&img, MIB, &random_bytes(31, 4096));
    let s2 = send(&env, true, &mut copies);
    assert_eq!(env.last_stored_chunks(), 1);

    // One tar per session, with info and manifest, no chunk files.
    let dir = session_dir(&env, &s1);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["chunks.tar", "chunks.tar.idx", "info", "manifest"]);
    let listing = std::process::Command::new("tar").arg("-tf").arg(dir.join("chunks.tar")).output().expect("tar");
    assert!(listing.status.success());
    assert_eq!(String::from_utf8_lossy(&listing.stdout).lines().count(), 24 + 8, "tar(1) reads every chunk");
    check_all(&env, &copies);
    env.ok(&["verify", VOL, &format!("--session={s1}")]);

    // A flipped byte in s2's only chunk: verify names it; s1 still verifies.
    let tar = session_dir(&env, &s2).join("chunks.tar");
    let mut bytes = std::fs::read(&tar).expect("read tar");
    bytes[512 + 100] ^= 1;
    std::fs::write(&tar, &bytes).expect("write tar");
    let err = env.fails(&["verify", VOL]);
    assert!(err.contains("x0000000000100000") && err.contains("authentication failed"), "{err}");
    env.ok(&["verify", VOL, &format!("--session={s1}")]);
    // A damaged header makes the whole tar unreadable, loudly.
    bytes[512 + 100] ^= 1;
    bytes[20] ^= 1;
    std::fs::write(&tar, &bytes).expect("write tar");
    let err = env.fails(&["verify", VOL]);
    assert!(err.contains("bad tar header"), "{err}");
}

/// Sum of `chunks=` over all sessions must equal the chunk files in the
/// archive (folder sessions only): no chunk lost, no garbage left.
fn assert_no_garbage(env: &Env) {
    let listed: u64 = env.session_lines().iter().map(|(_, f)| f["chunks"].parse::<u64>().expect("chunks")).sum();
    assert_eq!(listed, env.archive_chunk_files().len() as u64, "chunks listed vs chunk files in the archive");
}

#[test]
fn killed_prunes_are_settled_by_the_next_run() {
    let env = Env::new(256);
    let img = env.image();
    let mut copies = Copies::new();
    write_at(&img, 0, &random_bytes(40, 4 * MIB as usize));
    send(&env, false, &mut copies);
    // Each session changes three chunks and zeroes one, overlapping the
    // changes of earlier sessions, so prunes move, supersede and keep zeros.
    let points: Vec<(&str, u32)> = (1..=10)
        .map(|k| (sparsebak_proto_vars::DOM0, k))
        .chain((1..=10).map(|k| (sparsebak_proto_vars::RECEIVER, k)))
        .collect();
    for i in 0..points.len() as u64 + 2 {
        for j in 0..3u64 {
            write_at(&img, ((i * 5 + j * 7) % 32) * CHUNK + 100, &random_bytes(100 + i * 3 + j, 4096));
        }
        punch_hole(&img, ((i * 11) % 32) * CHUNK, CHUNK);
        send(&env, false, &mut copies);
    }
    assert_no_garbage(&env);

    for (var, k) in points {
        let sessions = env.sessions();
        let (p, n) = (sessions[1].clone(), sessions[2].clone());
        let out = env.run_env(&["prune", VOL, &format!("--session={p}")], &[(var, &k.to_string())]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stopped = stderr.contains("test hook");
        // Every dom0 step point exists (a prune has 10 steps); the receiver
        // has at least 7 (journal, one link, sync, linked, three to finish).
        if var == sparsebak_proto_vars::DOM0 || k <= 7 {
            assert!(stopped, "{var}={k}: the hook did not stop the prune: {stderr}");
        }
        // The receiver exits on end of input; let it.
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The next command that talks to the receiver about the volume
        // (here verify) settles the interrupted prune first, finishing or
        // rolling it back.
        let settle = env.run(&["verify", VOL]);
        let settle_err = String::from_utf8_lossy(&settle.stderr);
        assert!(settle.status.success(), "{var}={k}: {settle_err}");
        if stopped {
            assert!(!out.status.success(), "{var}={k}: a stopped prune fails");
            // Only a dom0 stopped after its last step leaves nothing to settle.
            if !(var == sparsebak_proto_vars::DOM0 && k == 10) {
                assert!(settle_err.contains("interrupted prune"), "{var}={k}: settled: {settle_err}");
            }
        }
        assert_eq!(leftovers(&env), Vec::<PathBuf>::new(), "{var}={k}: leftovers after settling");
        assert_no_garbage(&env);
        // Whatever dom0 lists now restores bit-identical.
        let listed = env.sessions();
        assert!(listed.contains(&n), "{var}={k}: {n} must survive: {listed:?}");
        check_sessions(&env, &copies, &[n.clone(), listed.last().expect("newest").clone()]);
        if listed.contains(&p) {
            check_sessions(&env, &copies, std::slice::from_ref(&p));
        }
        // A prune that matches no session has nothing left to settle.
        let again = env.run(&["prune", VOL, "--session=19700101-000000"]);
        let again_err = String::from_utf8_lossy(&again.stderr);
        assert!(again_err.contains("no session was pruned") && !again_err.contains("interrupted"), "{again_err}");
        if listed.contains(&p) {
            env.ok(&["prune", VOL, &format!("--session={p}")]);
        }
        copies.remove(&p);
        assert!(!env.sessions().contains(&p), "{var}={k}: {p} is pruned in the end");
        assert_eq!(leftovers(&env), Vec::<PathBuf>::new(), "{var}={k}: leftovers");
        assert_no_garbage(&env);
        check_sessions(&env, &copies, &[n.clone(), env.sessions()[0].clone()]);
    }
    check_all(&env, &copies);
}

/// The test hooks' variable names (see `sparsebak_proto::testhook`).
mod sparsebak_proto_vars {
    pub const DOM0: &str = "SPARSEBAK_TEST_STOP_AFTER";
    pub const RECEIVER: &str = "SPARSEBAK_VM_TEST_STOP_AFTER";
}

#[test]
fn delete_removes_the_volume_from_archive_and_metadata() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(50, 2 * MIB as usize));
    env.ok(&["send"]);
    write_at(&env.image(), 0, &random_bytes(51, 4096));
    env.ok(&["send", "--tarfile"]);

    // No terminal to confirm on and no -u: nothing is deleted.
    let err = env.fails(&["delete", VOL]);
    assert!(err.contains("not deleting") && err.contains("-u"), "{err}");
    assert_eq!(env.sessions().len(), 2);

    let err = env.fails(&["delete", "-u", "no-such.img"]);
    assert!(err.contains("neither archived nor configured"), "{err}");

    let out = env.ok(&["delete", "-u", VOL]);
    assert!(out.contains("still enabled") && out.contains("full one"), "{out}");
    assert!(!env.archive_volume_dir().exists(), "archive folder removed");
    assert!(!env.meta_volume_dir().exists(), "metadata folder removed");
    assert!(env.sessions().is_empty());

    // The next send is a full one, and restores.
    env.ok(&["send"]);
    assert_eq!(env.last_stored_chunks(), 16);
    assert_same_file(&env.receive(None, "after-delete"), &env.image());
}

#[test]
fn list_shows_sessions_and_volume_states() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(60, MIB as usize + 5));
    env.ok(&["send"]);
    write_at(&env.image(), 0, &random_bytes(61, 4096));
    env.ok(&["send", "--tarfile"]);
    let lines = env.session_lines();
    assert_eq!(lines.len(), 2);
    for (i, (dt, f)) in lines.iter().enumerate() {
        assert!(dt.len() == 15 && dt.as_bytes()[8] == b'-', "{dt}");
        assert_eq!(f["format"], ["folders", "tar"][i]);
        assert_eq!(f["size"], (MIB + 5).to_string());
        assert_eq!(f["chunks"], ["9", "1"][i]);
        let bytes: u64 = f["bytes"].parse().expect("bytes");
        assert!(bytes > 4000 && bytes < 2 * MIB, "{bytes}");
    }

    // An archived volume dropped from the config, a configured one that
    // is not on the source, the enabled one.
    env.write_config(&env.mnt(), &[("other.img", "disable")]);
    let out = env.run(&["list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(line(VOL).contains("sessions=2") && line(VOL).contains("configured=no"), "{text}");
    assert!(line(VOL).contains("present=yes"), "{text}");
    let other = line("other.img");
    assert!(other.contains("sessions=0") && other.contains("configured=yes"), "{text}");
    assert!(other.contains("enabled=no") && other.contains("present=no"), "{text}");
}

/// After a prune killed at any step of either side, the next ordinary
/// command that talks to the receiver (a timer's `send`, or `verify`,
/// `receive`) settles it first: no false "differs from dom0's record" alarm,
/// no leftovers, every session restores as it was sent.
#[test]
fn killed_prunes_are_settled_by_the_next_send_or_verify() {
    let env = Env::new(256);
    let img = env.image();
    let mut copies = Copies::new();
    write_at(&img, 0, &random_bytes(60, 2 * MIB as usize));
    send(&env, false, &mut copies);
    let points: Vec<(&str, u32)> = (1..=10)
        .map(|k| (sparsebak_proto_vars::DOM0, k))
        .chain((1..=7).map(|k| (sparsebak_proto_vars::RECEIVER, k)))
        .collect();
    for i in 0..3u64 {
        write_at(&img, (i * 3 % 16) * CHUNK + 10, &random_bytes(61 + i, 4096));
        send(&env, false, &mut copies);
    }
    for (round, (var, k)) in points.into_iter().enumerate() {
        let sessions = env.sessions();
        let p = sessions[sessions.len() - 3].clone();
        let out = env.run_env(&["prune", VOL, &format!("--session={p}")], &[(var, &k.to_string())]);
        assert!(!out.status.success(), "{var}={k}: the hook stopped the prune");
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The first command after the kill: send (as a timer would run it)
        // in most rounds, verify or receive in the others.
        match round % 3 {
            0 | 1 => {
                write_at(&img, (round as u64 % 16) * CHUNK + 20, &random_bytes(70 + round as u64, 4096));
                let before = env.sessions().len();
                let out = env.run(&["send"]);
                assert!(out.status.success(), "{var}={k}: send: {}", String::from_utf8_lossy(&out.stderr));
                let name = env.sessions().last().expect("a session").clone();
                assert!(env.sessions().len() >= before, "{var}={k}");
                copies.insert(name.clone(), env.snapshot_image(&name));
            }
            _ => {
                let restored = env.receive(None, &format!("first-{round}"));
                let newest = env.sessions().last().expect("newest").clone();
                assert_same_file(&restored, &copies[&newest]);
                std::fs::remove_file(&restored).expect("remove restored");
            }
        }
        let verified = env.run(&["verify", VOL]);
        let err = String::from_utf8_lossy(&verified.stderr);
        assert!(verified.status.success(), "{var}={k}: verify after settling: {err}");
        assert!(!err.contains("differs"), "{var}={k}: {err}");
        assert_eq!(leftovers(&env), Vec::<PathBuf>::new(), "{var}={k}: leftovers");
        assert_no_garbage(&env);
        let listed = env.sessions();
        if !listed.contains(&p) {
            copies.remove(&p);
        }
        assert_eq!(listed, copies.keys().cloned().collect::<Vec<_>>(), "{var}={k}: sessions");
        check_sessions(&env, &copies, &[listed[listed.len() - 3].clone()]);
    }
    check_all(&env, &copies);
}
