//! `sparsebak export` with real NBD clients from Debian's packages
//! (qemu-utils: qemu-img, qemu-io; libnbd-bin: nbdinfo, nbdcopy): every
//! session reads back bit-identical, encrypted or not, folders or tar; the
//! export is read-only; a tampered chunk fails exactly its range.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const CHUNK: u64 = 128 * 1024;

/// A running `sparsebak export`; stopped with SIGTERM when dropped.
struct Export {
    child: Option<Child>,
    socket: PathBuf,
}

impl Export {
    fn start(env: &Env, extra: &[&str]) -> Export {
        let socket = env.path("nbd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_sparsebak"))
            .arg("--config")
            .arg(env.config())
            .args(["export", VOL, "--socket"])
            .arg(&socket)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn export");
        wait_for_socket(&socket);
        Export { child: Some(child), socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{VOL}?socket={}", self.socket.display())
    }

    /// SIGTERM; returns the exit code and stderr.
    fn stop(&mut self) -> (Option<i32>, String) {
        let child = self.child.take().expect("running");
        let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(st.success());
        let out = child.wait_with_output().expect("wait");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} (qemu-utils / libnbd-bin): {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = tool(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two sessions of an image with random, text, zero and hole regions; the
/// second changes some chunks and grows the volume. Returns copies of the
/// image as each session holds it.
fn two_sessions(env: &Env, tar: bool) -> (PathBuf, PathBuf) {
    let img = env.image();
    write_at(&img, 0, &random_bytes(1, 3 * MIB as usize));
    write_at(&img, 3 * MIB, &text_bytes(2, MIB as usize));
    write_at(&img, 4 * MIB, &vec![0u8; MIB as usize]);
    write_at(&img, 7 * MIB, &random_bytes(3, MIB as usize + 777)); // 5..7 MiB: a hole
    let send: &[&str] = if tar { &["send", "--tarfile"] } else { &["send"] };
    env.ok(send);
    let first = env.snapshot_image("first");
    write_at(&img, CHUNK + 5, &random_bytes(4, 3000));
    write_at(&img, 9 * MIB, &random_bytes(5, MIB as usize));
    env.ok(send);
    (first, env.snapshot_image("second"))
}

fn compare(copy: &Path, export: &Export) {
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &copy.display().to_string(), &export.uri()]);
}

fn check_export(env: &Env, tar: bool) {
    let (first, second) = two_sessions(env, tar);
    // The latest session, several clients in sequence.
    let mut export = Export::start(env, &[]);
    compare(&second, &export);
    let info = ok("nbdinfo", &["--json", &export.uri()]);
    let doc: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo --json");
    let e = &doc["exports"][0];
    assert_eq!(e["export-size"], std::fs::metadata(&second).expect("stat").len(), "{info}");
    assert_eq!(e["is_read_only"], true, "{info}");
    let copy = env.path("out/nbdcopy.img");
    ok("nbdcopy", &[&export.uri(), &copy.display().to_string()]);
    assert_same_file(&copy, &second);
    // Writes are refused.
    let out = tool("qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 4k", &export.uri()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() || text.contains("Operation not permitted") || text.contains("read-only"),
        "a write must be refused: {text}"
    );
    compare(&second, &export);
    let (code, err) = export.stop();
    assert_eq!(code, Some(143), "{err}");
    assert!(!env.path("nbd.sock").exists(), "socket removed on exit");
    // An older session, one client (--once).
    let sessions = env.sessions();
    let mut export = Export::start(env, &[&format!("--session={}", sessions[0]), "--once"]);
    compare(&first, &export);
    let child = export.child.take().expect("running");
    let out = child.wait_with_output().expect("--once ends after the client");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!env.path("nbd.sock").exists(), "socket removed on exit");
}

#[test]
fn encrypted_folder_sessions_export_bit_identical() {
    let env = Env::new(64);
    check_export(&env, false);
}

#[test]
fn unencrypted_tar_sessions_export_bit_identical() {
    let env = Env::new(64);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "encryption = off\n");
    check_export(&env, true);
}

#[test]
fn a_tampered_chunk_fails_exactly_its_range() {
    let env = Env::new(64);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "encryption = off\n");
    let (_, second) = two_sessions(&env, false);
    // Flip a byte of the chunk at 2 MiB (first session, still current).
    let victim = env
        .archive_chunk_files()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with("0200000")))
        .expect("the chunk at 2 MiB");
    let mut bytes = std::fs::read(&victim).expect("read chunk");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&victim, bytes).expect("write chunk");
    let mut export = Export::start(&env, &[]);
    let out = tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 0 128k", "-c", "read 2M 128k", "-c", "read 3M 128k", &export.uri()],
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("read 131072/131072 bytes").count(), 2, "the good ranges read: {text}");
    assert!(text.contains("Input/output error"), "the bad range fails: {text}");
    let (_, err) = export.stop();
    assert!(err.contains("chunk x0000000000200000"), "logged with volume, session and address: {err}");
    let _ = second;
}
