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
    if mode == "flip":
        if payload[0] == CHUNK:  # only chunk answers: the bytes of stored chunks
            payload = payload[:-1] + bytes([payload[-1] ^ 1])
        out.write(head + payload)
    elif mode == "oversize":
        out.write(struct.pack(">I", 0xFFFFFFF0)); out.flush(); break
    elif mode == "garbage":
        out.write(struct.pack(">I", 16) + bytes([250] * 16)); out.flush(); break
    elif mode == "truncate":
        out.write(head + payload[: len(payload) // 2]); out.flush(); break
    elif mode == "hang":
        continue  # swallow answers, keep the pipe open until the receiver ends
    out.flush()
"#;

struct Hostile {
    env: Env,
    bin: PathBuf,
}

impl Hostile {
    fn new(mode: &str, keep: u32) -> Hostile {
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
        let py = dir.join("tamper.py");
        std::fs::write(&py, TAMPER_PY).expect("write tamper.py");
        let script = format!(
            "#!/bin/sh\n{} \"$@\" | python3 {} {mode} {keep} {}\n",
            real_vm.display(),
            py.display(),
            chunk_kind()
        );
        let fake = dir.join("sparsebak-vm");
        std::fs::write(&fake, script).expect("write fake receiver");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Hostile { env, bin }
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.bin).arg("--config").arg(self.env.config()).args(args).output().expect("spawn");
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
    // The harness archive is encrypted: the AEAD tag is what catches it.
    Hostile::new("flip", 0).receive_fails("authentication failed");
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
    let cfg = std::fs::read_to_string(h.env.config()).expect("config");
    std::fs::write(h.env.config(), cfg.replace("destdir = backups\n", "destdir = backups\nidletimeout = 2\n"))
        .expect("config");
    let started = std::time::Instant::now();
    h.receive_fails("no progress from the receiver for 2 s");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "gave up in time");
}
