//! A hostile receiver: the real `sparsebak-vm` behind a filter that tampers
//! with every answer after the handshake. dom0 must fail with a clear error,
//! without writing a wrong byte, and without allocating what a forged frame
//! length asks for.
//!
//! The fake receiver is a script placed next to a copy of `sparsebak`
//! (which looks for `sparsebak-vm` beside itself first).

mod common;
use common::*;
use sparsebak_proto::frame::encode_frame;
use sparsebak_proto::Response;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Passes the first frame (the handshake) and `keep` more through, then
/// tampers according to MODE.
const TAMPER_PY: &str = r#"
import struct, sys
mode, keep = sys.argv[1], int(sys.argv[2])
CHUNK = int(sys.argv[3])  # first payload byte of a Response::Chunk (its kind)
inp, out = sys.stdin.buffer, sys.stdout.buffer
n = 0
while True:
    head = inp.read(4)
    if len(head) < 4:
        if mode == "hang":
            import time; time.sleep(6)  # stay silent, pipe open, then go away
        break
    (length,) = struct.unpack(">I", head)
    payload = inp.read(length)
    n += 1
    if n <= 1 + keep:
        out.write(head + payload); out.flush(); continue
    if mode in ("flip", "flipmid"):
        if payload[0] == CHUNK:  # only chunk answers: the bytes of stored chunks
            at = len(payload) - 1 if mode == "flip" else len(payload) // 2  # tag, or ciphertext
            payload = payload[:at] + bytes([payload[at] ^ 1]) + payload[at + 1:]
        out.write(head + payload)
    elif mode == "oversize":
        out.write(struct.pack(">I", 0xFFFFFFF0)); out.flush(); break
    elif mode == "garbage":
        out.write(struct.pack(">I", 16) + bytes([250] * 16)); out.flush(); break
    elif mode == "truncate":
        out.write(head + payload[: len(payload) // 2]); out.flush(); break
    elif mode == "hang":
        continue  # swallow answers, keep the pipe open until the receiver ends
    elif mode == "bloat":  # every chunk answer becomes the frame in the file named by argv[4]
        out.write(open(sys.argv[4], "rb").read() if payload[0] == CHUNK else head + payload)
    elif mode == "inject":  # answer with the frames in the file named by argv[4]
        out.write(open(sys.argv[4], "rb").read()); out.flush(); break
    out.flush()
"#;

struct Hostile {
    env: Env,
    bin: PathBuf,
}

impl Hostile {
    /// The real receiver behind the tampering filter in MODE.
    fn new(mode: &str, keep: u32) -> Hostile {
        Hostile::with_script(|real_vm, dir| {
            let py = dir.join("tamper.py");
            std::fs::write(&py, TAMPER_PY).expect("write tamper.py");
            let inject = dir.join("inject.bin");
            format!(
                "{} \"$@\" | python3 {} {mode} {keep} {} {}\n",
                real_vm.display(),
                py.display(),
                chunk_kind(),
                inject.display()
            )
        })
    }

    /// The real receiver, until it answers `frame` instead of the answer
    /// after the handshake and `keep` more.
    fn injecting(keep: u32, frame: &Response) -> Hostile {
        let h = Hostile::new("inject", keep);
        h.inject(frame);
        h
    }

    /// The answer that replaces the receiver's from then on.
    fn inject(&self, frame: &Response) {
        let bytes = encode_frame(frame).expect("encode the injected answer");
        std::fs::write(self.bin.with_file_name("inject.bin"), bytes).expect("write inject.bin");
    }

    /// A fake receiver: a shell script whose body `script(REAL_VM, DIR)`
    /// returns (DIR holds the script).
    fn with_script(script: impl FnOnce(&Path, &Path) -> String) -> Hostile {
        let env = Env::new(64);
        write_at(&env.image(), 0, &random_bytes(11, 2 * MIB as usize));
        write_at(&env.image(), 3 * MIB, &text_bytes(5, MIB as usize));
        env.ok(&["send"]);
        let dir = env.path("hostile-bin");
        std::fs::create_dir(&dir).expect("mkdir");
        let real_sparsebak = PathBuf::from(env!("CARGO_BIN_EXE_sparsebak"));
        let real_vm = real_sparsebak.with_file_name("sparsebak-vm");
        let bin = dir.join("sparsebak");
        std::fs::copy(&real_sparsebak, &bin).expect("copy sparsebak");
        let body = script(&real_vm, &dir);
        let fake = dir.join("sparsebak-vm");
        std::fs::write(&fake, format!("#!/bin/sh\n{body}")).expect("write fake receiver");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Hostile { env, bin }
    }

    fn set_idle_timeout(&self, secs: u32) {
        let cfg = std::fs::read_to_string(self.env.config()).expect("config");
        let cfg = cfg.replace("destdir = backups\n", &format!("destdir = backups\nidletimeout = {secs}\n"));
        std::fs::write(self.env.config(), cfg).expect("config");
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(self.env.config())
            .arg("--passphrase-file")
            .arg(self.env.passphrase_file())
            .args(args)
            .output()
            .expect("spawn");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn receive_fails(&self, expect: &str) {
        let dest = self.env.path("out/hostile.img");
        let save = format!("--save-to={}", dest.display());
        let (ok, err) = self.run(&["receive", VOL, "-u", &save]);
        assert!(!ok, "receive from a hostile receiver must fail");
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
        assert!(!dest.exists(), "nothing written to the destination");
        assert_no_files(&self.env.path("out"));
        let (ok, err) = self.run(&["verify", VOL]);
        assert!(!ok && err.contains(expect), "verify: {err}");
    }
}

/// The byte that opens the payload of every `Response::Chunk`: its kind as
/// the wire numbers it, taken from proto's own encoding so that the filter
/// follows the protocol instead of a copy of its numbering.
fn chunk_kind() -> u8 {
    let frame = encode_frame(&Response::Chunk(vec![1, 2, 3])).expect("encode a chunk answer");
    let kind = frame[4];
    let other = encode_frame(&Response::ChunkError("x".into())).expect("encode a chunk error");
    assert_ne!(other[4], kind, "the kind byte tells chunk answers from the others");
    kind
}

fn assert_no_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).expect("dir").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn flipped_chunk_bytes_are_caught_before_decompression() {
    // The harness archive is encrypted. A flipped byte of the tag: the
    // manifest's seal id catches it before the seal is opened.
    Hostile::new("flip", 0).receive_fails("hash mismatch");
    // A flipped byte of the ciphertext: the AEAD tag catches it.
    Hostile::new("flipmid", 0).receive_fails("authentication failed");
}

/// Chunk answers far longer than their chunk can be stored as are that
/// chunk's fault, dropped as they arrive: otherwise a pipeline's worth of
/// them (8 MiB each, the frame cap) would wait for their checks.
#[test]
fn oversize_chunk_answers_are_refused_as_they_arrive() {
    let h = Hostile::new("bloat", 0);
    h.inject(&Response::Chunk(vec![7; 4 << 20]));
    h.receive_fails("more than the chunk can take");
}

#[test]
fn forged_huge_frame_length_is_refused() {
    Hostile::new("oversize", 2).receive_fails("exceeds");
}

#[test]
fn garbage_answer_is_refused() {
    Hostile::new("garbage", 1).receive_fails("bad data from the receiver");
}

#[test]
fn receiver_dying_mid_frame_is_reported() {
    Hostile::new("truncate", 3).receive_fails("receiver");
}

#[test]
fn tampering_during_send_fails_the_send_without_recording_a_session() {
    let h = Hostile::new("garbage", 1);
    write_at(&h.env.image(), 0, &random_bytes(12, 512 * 1024));
    let before = h.env.sessions();
    let (ok, err) = h.run(&["send"]);
    assert!(!ok && err.contains("bad data from the receiver"), "{err}");
    assert_eq!(h.env.sessions(), before, "no session recorded on a failed send");
}

#[test]
fn silent_receiver_times_out_instead_of_hanging() {
    let h = Hostile::new("hang", 0);
    h.set_idle_timeout(2);
    let started = std::time::Instant::now();
    h.receive_fails("no progress from the receiver for 2 s");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "gave up in time");
}

#[test]
fn receiver_that_stops_reading_times_out_instead_of_hanging() {
    // The first 2 MiB reach the real receiver; then stdin stays open, unread
    // (the script and its `sleep` hold it), while dom0 still has chunks to send.
    let h = Hostile::with_script(|real_vm, _| format!("head -c 2097152 | {} \"$@\"\nsleep 40\n", real_vm.display()));
    h.set_idle_timeout(2);
    write_at(&h.env.image(), 0, &random_bytes(13, 16 * MIB as usize));
    let before = h.env.sessions();
    let started = std::time::Instant::now();
    let (ok, err) = h.run(&["send"]);
    assert!(!ok, "send to a receiver that stopped reading must fail");
    assert!(err.contains("no progress from the receiver for 2 s (idletimeout)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "gave up in time");
    assert_eq!(h.env.sessions(), before, "no session recorded");
    // The lock was released: the next send (to the real receiver) works.
    h.env.ok(&["send"]);
}

#[test]
fn receiver_that_never_exits_is_stopped_and_the_send_stands() {
    // Answers everything, then lingers with its pipes open.
    let h = Hostile::with_script(|real_vm, _| format!("{} \"$@\"\nsleep 40\n", real_vm.display()));
    h.set_idle_timeout(2);
    write_at(&h.env.image(), 0, &random_bytes(14, MIB as usize));
    let before = h.env.sessions().len();
    let started = std::time::Instant::now();
    let (ok, err) = h.run(&["send"]);
    assert!(ok, "the session was committed: {err}");
    assert!(err.contains("the receiver did not exit within 2 s"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "did not wait for the straggler");
    assert_eq!(h.env.sessions().len(), before + 1, "the session is recorded");
    let save = format!("--save-to={}", h.env.path("restored.img").display());
    for args in [&["verify", VOL][..], &["receive", VOL, "-u", &save][..]] {
        let started = std::time::Instant::now();
        let (ok, err) = h.run(args);
        assert!(ok && err.contains("did not exit"), "{args:?}: {err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "{args:?} waited");
    }
    assert_same_file(&h.env.image(), &h.env.path("restored.img"));
}

/// What a hostile receiver says reaches dom0's stderr on one line per
/// message, escaped and cut: no forged `sparsebak:` line, no escape sequence,
/// no megabytes of text.
fn assert_tame(err: &str) {
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "raw control characters: {err:?}");
    for line in err.lines() {
        assert!(line.len() <= 1300, "a line of {} bytes", line.len());
        assert!(!line.starts_with("sparsebak: error: forged"), "forged line: {err}");
    }
    assert!(err.len() < 64 * 1024, "{} bytes of stderr", err.len());
}

#[test]
fn receiver_error_text_is_shown_escaped_and_cut() {
    let forged = format!("bad\nsparsebak: error: forged\x1b]0;owned\x07\x1b[2J{}", "A".repeat((8 << 20) - 64));
    let h = Hostile::injecting(0, &Response::Error(forged));
    let (ok, err) = h.run(&["verify", VOL]);
    assert!(!ok, "verify must fail");
    assert!(err.contains("receiver: bad\\nsparsebak: error: forged\\x1b]0;owned\\x07\\x1b[2J"), "{err}");
    assert!(err.contains("more bytes)"), "{err}");
    assert_tame(&err);
}

#[test]
fn receiver_chunk_error_text_is_shown_escaped() {
    let h = Hostile::injecting(2, &Response::ChunkError("gone\nsparsebak: error: forged\x1b[2J".into()));
    let (ok, err) = h.run(&["verify", VOL]);
    assert!(!ok, "verify must fail");
    assert!(err.contains("gone\\nsparsebak: error: forged\\x1b[2J"), "{err}");
    assert_tame(&err);
}

#[test]
fn receiver_stderr_is_relayed_one_escaped_line_at_a_time() {
    // Writes a forged line, escape sequences, a 4 MiB line and 1000 more
    // lines to its stderr, then serves normally.
    let h = Hostile::with_script(|real_vm, _| {
        format!(
            "printf 'x\\nsparsebak: error: forged\\033[2J\\007\\n' >&2\n\
             head -c 4194304 /dev/zero | tr '\\0' B >&2\necho >&2\n\
             seq 1000 >&2\nexec {} \"$@\"\n",
            real_vm.display()
        )
    });
    let (ok, err) = h.run(&["verify", VOL]);
    assert!(ok, "the receiver served normally: {err}");
    assert!(err.contains("receiver: x\n"), "{err}");
    assert!(err.contains("receiver: sparsebak: error: forged\\x1b[2J\\x07"), "{err}");
    assert!(err.contains("receiver: BBBB") && err.contains("more bytes)"), "{err}");
    assert!(err.contains("(more lines on stderr not shown)"), "{err}");
    assert!(!err.contains("receiver: 999"), "capped at 100 lines");
    assert_tame(&err);
}

#[test]
fn recover_cut_off_halfway_can_be_run_again() {
    for keep in [1, 3, 5] {
        let h = Hostile::new("hang", keep);
        h.set_idle_timeout(2);
        write_at(&h.env.image(), MIB, &random_bytes(15, MIB as usize));
        h.env.ok(&["send"]);
        let sessions = h.env.sessions();
        h.env.lose_dom0_metadata();
        let (ok, err) = h.run(&["recover"]);
        assert!(!ok && err.contains("no progress from the receiver"), "keep={keep}: {err}");
        // Other commands say what to do instead of working on half the metadata.
        let listed = h.env.fails(&["list", VOL]);
        assert!(listed.contains("run `sparsebak recover` again"), "keep={keep}: {listed}");
        // The rerun (real receiver) finishes the job.
        let out = h.env.ok(&["recover"]);
        assert!(out.contains(&format!("recovered {} session(s)", sessions.len())), "keep={keep}: {out}");
        assert_eq!(h.env.sessions(), sessions, "keep={keep}");
        assert_same_file(&h.env.image(), &h.env.receive(None, &format!("recovered-{keep}.img")));
        h.env.ok(&["send"]);
        assert_eq!(h.env.sessions(), sessions, "keep={keep}: nothing changed, nothing sent");
    }
}

#[test]
fn receiver_listing_a_session_twice_is_refused() {
    let h = Hostile::new("inject", 1);
    let s = format!("S_{}", h.env.sessions()[0]);
    h.inject(&Response::Sessions(vec![s.clone(), s]));
    h.env.lose_dom0_metadata();
    let (ok, err) = h.run(&["recover"]);
    assert!(!ok, "recover must fail");
    assert!(err.contains("the receiver listed session") && err.contains("twice"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn qrexec_failures_are_explained() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(16, MIB as usize));
    env.ok(&["send"]);
    write_at(&env.image(), 0, &random_bytes(17, MIB as usize));
    let config = std::fs::read_to_string(env.config()).expect("config");
    std::fs::write(env.config(), config.replace("destvm = none", "destvm = backupvm")).expect("config");
    let bin = env.path("fake-qvm-run");
    std::fs::create_dir(&bin).expect("mkdir");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let cases = [
        (127, "qubes.SparsebakStore is not installed in VM backupvm (install sparsebak-vm in its template)"),
        (126, "the call of qubes.SparsebakStore in VM backupvm was refused by qrexec policy"),
        (125, "qrexec could not reach VM backupvm (is it running?)"),
        (3, "the receiver exited with exit status: 3"),
    ];
    for (code, expect) in cases {
        let fake = bin.join("qvm-run");
        std::fs::write(&fake, format!("#!/bin/sh\necho \"qvm-run: $*\" >&2\nexit {code}\n")).expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let pass = format!("--passphrase-file={}", env.passphrase_file().display());
        for args in [&["send", &pass][..], &["verify"][..]] {
            let out = env.run_env(args, &[("PATH", &path)]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{code}: {args:?}");
            assert!(err.contains(expect), "{code} {args:?}: {err}");
            assert!(err.contains("receiver: qvm-run: --pass-io --service backupvm qubes.SparsebakStore"), "{err}");
        }
    }
}

#[test]
fn a_destination_the_receiver_may_not_write_gets_a_hint() {
    // The receiver runs as an unprivileged user (as qrexec runs it in a
    // backup VM) on a root-owned destination.
    let h = Hostile::with_script(|real_vm, _| {
        format!("exec setpriv --reuid=65534 --regid=65534 --clear-groups {} \"$@\"\n", real_vm.display())
    });
    for dir in [h.env.path(""), h.env.mnt()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let config = std::fs::read_to_string(h.env.config()).expect("config");
    std::fs::write(h.env.config(), config.replace("destdir = backups", "destdir = fresh")).expect("config");
    let (ok, err) = h.run(&["send"]);
    assert!(!ok, "send must fail");
    assert!(err.contains("creating archive folder") && err.contains("Permission denied"), "{err}");
    assert!(err.contains("sparsebak-vm runs as user nobody") && err.contains("chown nobody:"), "{err}");
    assert!(err.contains("docs/INSTALL.md"), "{err}");
}
