//! The real `sparsebak-vm serve` at Hello, against an archive whose format
//! marker is newer than it knows: it must answer with the one-line error of
//! `layout::check_format_version` and exit non-zero (not 125-127, which
//! qrexec reserves). `/` serves as the mount point, so no root is needed.

use sparsebak_proto::frame::encode_frame;
use sparsebak_proto::layout::{self, ARCHIVE_FORMAT_VERSION, FORMAT_MARKER};
use sparsebak_proto::{read_msg, Destination, Request, Response, PROTOCOL_VERSION};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs the receiver with one Hello for `archive` on stdin; returns its
/// answers and exit code.
fn hello(archive: &Path) -> (Vec<Response>, Option<i32>) {
    let dir = archive.strip_prefix("/").expect("absolute").to_string_lossy().into_owned();
    let req = Request::Hello { version: PROTOCOL_VERSION, dest: Destination::Mounted { mountpoint: "/".into(), dir } };
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparsebak-vm"))
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sparsebak-vm");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&encode_frame(&req).expect("encode")).expect("write Hello");
    drop(stdin); // end of input after Hello
    let out = child.wait_with_output().expect("wait");
    let mut rd = &out.stdout[..];
    let mut answers = Vec::new();
    while let Some(resp) = read_msg::<_, Response>(&mut rd).expect("well-formed answer") {
        answers.push(resp);
    }
    (answers, out.status.code())
}

#[test]
fn newer_archive_format_is_refused_at_hello() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let marker = tmp.path().join(FORMAT_MARKER);
    std::fs::write(&marker, "sparsebak archive format 99\n").expect("write marker");
    let (answers, code) = hello(tmp.path());
    let want = layout::check_format_version(&marker, 99, ARCHIVE_FORMAT_VERSION).expect_err("newer").to_string();
    assert!(!want.contains('\n'), "one line: {want}");
    assert_eq!(answers, [Response::Error(want)]);
    let code = code.expect("exited, not killed");
    assert!(code != 0 && !(125..=127).contains(&code), "exit status {code}");
}

#[test]
fn a_fresh_archive_gets_its_marker_at_hello() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (answers, code) = hello(tmp.path());
    assert_eq!(answers, [Response::Ready { version: PROTOCOL_VERSION }]);
    assert_eq!(code, Some(0));
    let text = std::fs::read_to_string(tmp.path().join(FORMAT_MARKER)).expect("marker written");
    assert_eq!(text, format!("sparsebak archive format {ARCHIVE_FORMAT_VERSION}\n"));
}
