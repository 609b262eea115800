//! The real `sparsebak-vm serve` on a tar session of many tiny chunks: its
//! memory must not grow with the number of chunks (the tar index is a file
//! searched on disk, `src/tar.rs`). The session is sent through the
//! protocol (so the committed session carries the index the writer made),
//! then read back whole by separate conversations: with that index, without
//! it (a session from before indexes: built on first use, beside the tar),
//! and, as root, from a read-only folder (built into a temp file; without
//! root that part says it is skipped). Each
//! reading receiver's peak memory (`VmHWM`) is compared with one that read a
//! session of a hundredth of the chunks. `/` serves as the mount point.

use sparsebak_proto::frame::encode_frame;
use sparsebak_proto::layout::{TAR_FILE, TAR_INDEX_FILE};
use sparsebak_proto::{read_msg, Destination, MetaFile, Request, Response, StoreFormat, VolumeRef, PROTOCOL_VERSION};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

const BIG: u64 = 200_000;
const SMALL: u64 = 2_000;
const SESSION: &str = "S_20260101-000000";
/// How much more the big session's reader may peak at than the small one's.
/// An index in memory costs 20 to 24 bytes a chunk: 4 to 9 MiB here.
const SLACK_KIB: u64 = 1024;

fn volume(name: &str) -> VolumeRef {
    VolumeRef { pool: "local%images".into(), name: name.into() }
}

/// The bytes stored for chunk number `i` (at address `i << 17`).
fn data(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

struct Receiver {
    child: Child,
    input: BufWriter<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl Receiver {
    fn start(archive: &Path) -> Receiver {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sparsebak-vm"))
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sparsebak-vm");
        let input = BufWriter::with_capacity(1 << 16, child.stdin.take().expect("stdin"));
        let output = BufReader::with_capacity(1 << 16, child.stdout.take().expect("stdout"));
        let mut r = Receiver { child, input, output };
        let dir = archive.strip_prefix("/").expect("absolute").to_string_lossy().into_owned();
        r.send(&Request::Hello {
            version: PROTOCOL_VERSION,
            dest: Destination::Mounted { mountpoint: "/".into(), dir },
        });
        r.input.flush().expect("flush");
        assert_eq!(r.answer(), Response::Ready { version: PROTOCOL_VERSION });
        r
    }

    fn send(&mut self, req: &Request) {
        self.input.write_all(&encode_frame(req).expect("encode")).expect("write request");
    }

    fn answer(&mut self) -> Response {
        read_msg(&mut self.output).expect("well-formed answer").expect("an answer")
    }

    /// Ends the conversation; the receiver must exit cleanly.
    fn end(self) {
        let Receiver { mut child, input, output } = self;
        drop(input);
        drop(output);
        assert!(child.wait().expect("wait").success(), "receiver failed");
    }
}

/// Sends a tar session of `n` chunks of `vol` through the protocol.
fn send_session(archive: &Path, vol: &str, n: u64) {
    let mut r = Receiver::start(archive);
    r.send(&Request::BeginSession { volume: volume(vol), session: SESSION.into(), format: StoreFormat::Tar });
    r.input.flush().expect("flush");
    assert_eq!(r.answer(), Response::Done);
    for i in 0..n {
        r.send(&Request::PutChunk { addr: i << 17, data: data(i) });
    }
    r.send(&Request::PutMeta { file: MetaFile::Info, data: b"info".to_vec() });
    r.send(&Request::PutMeta { file: MetaFile::Manifest, data: b"manifest".to_vec() });
    r.send(&Request::Commit);
    r.input.flush().expect("flush");
    assert_eq!(r.answer(), Response::Done);
    r.end();
}

/// Reads every `step`th chunk of the session of `vol` (and one missing
/// address after them) in one conversation, checking each; the receiver's
/// peak memory in KiB.
fn read_session(archive: &Path, vol: &str, n: u64, step: u64) -> u64 {
    let Receiver { child, mut input, mut output } = Receiver::start(archive);
    // Requests go out on a thread of their own while the answers come back.
    let vol = volume(vol);
    let asking = std::thread::spawn(move || {
        for addr in (0..n).step_by(step as usize).chain([n]).map(|i| i << 17) {
            let req = Request::ReadChunk { volume: vol.clone(), session: SESSION.into(), addr };
            input.write_all(&encode_frame(&req).expect("encode")).expect("write request");
        }
        input.flush().expect("flush");
        input
    });
    for i in (0..n).step_by(step as usize) {
        match read_msg(&mut output).expect("well-formed answer").expect("an answer") {
            Response::Chunk(d) => assert_eq!(d, data(i), "chunk {i}"),
            other => panic!("chunk {i}: {other:?}"),
        }
    }
    match read_msg(&mut output).expect("well-formed answer").expect("an answer") {
        Response::ChunkError(e) => assert!(e.contains("opening"), "{e}"),
        other => panic!("a missing chunk: {other:?}"),
    }
    let input = asking.join().expect("requests sent");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"));
    Receiver { child, input, output }.end();
    hwm
}

fn session_dir(archive: &Path, vol: &str) -> PathBuf {
    archive.join("local%images").join(vol).join(SESSION)
}

/// A read-only bind mount of a folder over itself, undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let st = Command::new("mount").args(args).arg(dir).arg(dir).status().expect("run mount");
            assert!(st.success(), "mount {args:?}");
        };
        run(&["--bind"]);
        let ro = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,bind,ro"]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn receiver_memory_does_not_grow_with_the_chunks_of_a_tar_session() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let archive = tmp.path().join("archive");
    send_session(&archive, "small", SMALL);
    send_session(&archive, "big", BIG);
    let big = session_dir(&archive, "big");
    let index = big.join(TAR_INDEX_FILE);
    let written = std::fs::read(&index).expect("the committed session has its index");
    assert_eq!(written.len() as u64, 24 + 20 * BIG);
    assert!(big.join(TAR_FILE).is_file());

    let small_hwm = read_session(&archive, "small", SMALL, 1);
    let with_index = read_session(&archive, "big", BIG, 1);
    eprintln!("peak memory reading {SMALL} chunks: {small_hwm} KiB; {BIG} chunks with their index: {with_index} KiB");
    assert!(with_index <= small_hwm + SLACK_KIB, "{with_index} KiB for {BIG} chunks, {small_hwm} KiB for {SMALL}");

    // A session from before indexes: built on first use, beside the tar,
    // the same bytes the writer made. (Every 10th chunk is enough: the
    // build reads every header whatever is asked, lookups cost the same.)
    std::fs::remove_file(&index).expect("rm index");
    let built = read_session(&archive, "big", BIG, 10);
    eprintln!("... building the index first: {built} KiB");
    assert!(built <= small_hwm + SLACK_KIB, "{built} KiB for {BIG} chunks, {small_hwm} KiB for {SMALL}");
    assert_eq!(std::fs::read(&index).expect("built beside the tar"), written);

    // A read-only session folder (a backup disk mounted read-only for a
    // restore): the index goes to a temp file.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED the read-only part: it needs root for a read-only bind mount");
        return;
    }
    std::fs::remove_file(&index).expect("rm index");
    let ro = ReadOnly::mount(&big);
    let fallback = read_session(&archive, "big", BIG, 10);
    eprintln!("... from a read-only folder: {fallback} KiB");
    assert!(fallback <= small_hwm + SLACK_KIB, "{fallback} KiB for {BIG} chunks, {small_hwm} KiB for {SMALL}");
    assert!(!index.exists(), "nothing written into a read-only folder");
    drop(ro);
}
