//! What the user sees: progress bars on a terminal only, syslog when stdout
//! is not a terminal, and `-q` keeping errors only, through the real binary.
//!
//! A terminal comes from `script(1)` (util-linux), which runs the command on
//! a pseudo-terminal. Syslog is a datagram socket of the test's, bind-mounted
//! over /dev/log in a private mount namespace (`unshare -m`), so the real
//! system log is never touched.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Single-quotes a word for `sh -c`.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn sparsebak_words(env: &Env, args: &[&str]) -> Vec<String> {
    let mut words = vec![env!("CARGO_BIN_EXE_sparsebak").to_string(), "--config".into()];
    words.push(env.config().display().to_string());
    words.extend(["--passphrase-file".to_string(), env.passphrase_file().display().to_string()]);
    words.extend(args.iter().map(|a| a.to_string()));
    words
}

/// Runs sparsebak on a pseudo-terminal; returns everything it drew.
fn on_terminal(env: &Env, args: &[&str]) -> String {
    let cmd = sparsebak_words(env, args).iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ");
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("run script(1) (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "sparsebak {args:?} on a terminal failed: {text}");
    text
}

fn make_image(env: &Env, seed: u64) {
    write_at(&env.image(), 0, &random_bytes(seed, 8 * MIB as usize));
}

#[test]
fn progress_bar_on_a_terminal_only_and_not_with_quiet() {
    let env = Env::new(128);
    make_image(&env, 1);
    let drawn = on_terminal(&env, &["send"]);
    assert!(drawn.contains("send disk.img [") && drawn.contains("ETA"), "no send bar: {drawn:?}");
    assert!(drawn.contains("MiB"), "the bar shows bytes: {drawn:?}");
    let save = format!("--save-to={}", env.path("out/r").display());
    let drawn = on_terminal(&env, &["receive", VOL, "-u", &save]);
    assert!(drawn.contains("disk.img session") && drawn.contains("ETA"), "no receive bar: {drawn:?}");
    let drawn = on_terminal(&env, &["verify"]);
    assert!(drawn.contains("ETA"), "no verify bar: {drawn:?}");
    assert!(drawn.contains("verified"), "summary line still printed: {drawn:?}");

    let drawn = on_terminal(&env, &["-q", "verify"]);
    assert!(!drawn.contains("ETA") && !drawn.contains("verified"), "-q shows nothing: {drawn:?}");
    make_image(&env, 2);
    let drawn = on_terminal(&env, &["send", "-q"]);
    assert!(drawn.trim().is_empty(), "-q send prints nothing: {drawn:?}");

    // Not a terminal: no bar, no control codes in the captured stderr.
    make_image(&env, 3);
    let stderr = env.ok(&["send"]);
    assert!(!stderr.contains("ETA") && !stderr.contains('\x1b'), "bar without a terminal: {stderr:?}");
    assert!(stderr.contains("sent"), "summary line: {stderr:?}");
}

/// Runs sparsebak with stdout piped and /dev/log bound to `socket`.
fn with_syslog(env: &Env, socket: &Path, args: &[&str]) -> Output {
    let script = r#"
        sock=$1; shift
        if [ ! -e /dev/log ]; then mount -t tmpfs -o size=1m sbtest /dev && : >/dev/log || exit 99; fi
        mount --bind "$sock" /dev/log || exit 99
        exec "$@""#;
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(socket)
        .args(sparsebak_words(env, args))
        .output()
        .expect("run unshare (util-linux)");
    assert_ne!(out.status.code(), Some(99), "test setup: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn datagrams(sock: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn syslog_when_stdout_is_not_a_terminal_and_quiet_keeps_errors() {
    let env = Env::new(128);
    make_image(&env, 1);
    let socket = env.path("syslog.sock");
    let sock = UnixDatagram::bind(&socket).expect("bind fake /dev/log");
    sock.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");

    let out = with_syslog(&env, &socket, &["send"]);
    assert!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    let got = datagrams(&sock);
    assert!(
        got.iter().any(|m| m.starts_with("<14>") && m.contains("sparsebak[") && m.contains("disk.img: session")),
        "info line in syslog (user.info): {got:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk.img: session"), "and on stderr too");

    // -q: a successful run logs nothing; a failure is logged as an error.
    make_image(&env, 2);
    let out = with_syslog(&env, &socket, &["-q", "send"]);
    assert!(out.status.success());
    assert_eq!(datagrams(&sock), Vec::<String>::new(), "-q send logs nothing");
    let out = with_syslog(&env, &socket, &["-q", "verify", "no-such-volume"]);
    assert!(!out.status.success());
    let got = datagrams(&sock);
    assert!(
        got.len() == 1 && got[0].starts_with("<11>") && got[0].contains("no-such-volume"),
        "the error in syslog (user.err): {got:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
    assert!(stderr.starts_with("sparsebak: error: "), "{stderr}");
}

/// Where a process's stdout or stderr goes in [`closed_or_full_output_never_panics`].
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// A pipe whose reader is gone (`sparsebak verify 2>&1 | head -1`).
    Broken,
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
    /// A pipe the test reads.
    Read,
}

fn sink(kind: Sink) -> std::process::Stdio {
    match kind {
        Sink::Broken => {
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            writer.into()
        }
        Sink::Full => std::fs::File::options().write(true).open("/dev/full").expect("open /dev/full").into(),
        Sink::Read => std::process::Stdio::piped(),
    }
}

/// Runs `bin args` with stdout and stderr going to the given sinks and
/// `input` on stdin; fails the test on a panic (exit 101, or "panicked" in
/// whatever could be read).
fn assert_no_panic(bin: &str, args: &[String], input: &[u8], out: Sink, err: Sink) -> Option<i32> {
    use std::io::Write as _;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(sink(out))
        .stderr(sink(err))
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(input);
    drop(stdin);
    let output = child.wait_with_output().expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let what = format!("{bin} {args:?} with stdout {out:?}, stderr {err:?}");
    assert_ne!(output.status.code(), Some(101), "{what} panicked: {text}");
    assert!(!text.contains("panicked"), "{what}: {text}");
    output.status.code()
}

#[test]
fn closed_or_full_output_never_panics() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(90, 2 * MIB as usize));
    env.ok(&["send"]);
    let sinks = [
        (Sink::Broken, Sink::Read),
        (Sink::Full, Sink::Read),
        (Sink::Read, Sink::Broken),
        (Sink::Read, Sink::Full),
        (Sink::Broken, Sink::Broken),
        (Sink::Full, Sink::Full),
    ];
    let sparsebak = env!("CARGO_BIN_EXE_sparsebak");
    let commands: [&[&str]; 6] =
        [&["verify"], &["list", VOL], &["send"], &["list", "no-such-volume"], &["version"], &["--help"]];
    for (out, err) in sinks {
        for args in commands {
            let code = assert_no_panic(sparsebak, &sparsebak_words(&env, args)[1..], b"", out, err);
            assert!(matches!(code, Some(0..=2)), "sparsebak {args:?} ({out:?}, {err:?}): exit {code:?}");
        }
    }
    // The receiver: garbage on stdin makes it fail and say so; with both of
    // its outputs gone (qrexec-client killed) it must still exit cleanly.
    let receiver = std::path::PathBuf::from(sparsebak).with_file_name("sparsebak-vm");
    let receiver = receiver.to_str().expect("path");
    for (out, err) in sinks {
        let code = assert_no_panic(receiver, &["serve".into()], &[0, 0, 0, 5, 1, 2, 3, 4, 5], out, err);
        assert_eq!(code, Some(1), "sparsebak-vm serve ({out:?}, {err:?})");
        assert_no_panic(receiver, &["version".into()], b"", out, err);
    }
}

/// Values from the config echoed in errors are escaped and bounded like
/// the receiver's text: one line, no raw control characters.
#[test]
fn config_values_in_errors_are_escaped_and_cut() {
    let env = Env::new(16);
    let good = std::fs::read_to_string(env.config()).expect("config");
    let long = "y".repeat(100_000);
    for value in ["a\u{1b}[2Jb", "\u{202e}evil", long.as_str()] {
        std::fs::write(env.config(), good.replace("destdir = backups", &format!("destdir = {value}"))).expect("config");
        let err = env.fails(&["list"]);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        assert!(!err.contains('\u{1b}') && !err.contains('\u{202e}'), "escaped: {err:?}");
        assert!(err.len() < 5000, "cut: {} bytes", err.len());
    }
}
