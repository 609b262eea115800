//! The sample value of every message, and the name of its golden fixture:
//! the one list shared by the wire-format test (`tests/wire_format.rs`) and
//! the fixture generator (`examples/gen_wire_fixtures.rs`), both of which
//! include this file with `#[path]`.
//!
//! The fixture names come from matches without a wildcard, so a new message
//! does not compile until it is named here; the test then fails until it
//! has a sample and a fixture.

// Each includer uses only part of this file.
#![allow(dead_code)]

use sparsebak_proto::frame::encode_frame;
use sparsebak_proto::{Destination, MetaFile, Request, Response, StoreFormat, VolumeRef, PROTOCOL_VERSION};
use std::path::PathBuf;

/// Where the fixtures are checked in.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The file recording which protocol version the fixtures were made for.
pub const VERSION_FILE: &str = "protocol-version";

fn volume() -> VolumeRef {
    VolumeRef { pool: "qubes_dom0%pool00".into(), name: "vm-work-private".into() }
}

/// One representative value of every request: every field set, and set to
/// something other than its zero value.
pub fn requests() -> Vec<Request> {
    vec![
        Request::Hello {
            version: PROTOCOL_VERSION,
            dest: Destination::Mounted { mountpoint: "/mnt/backup".into(), dir: "sparsebak/laptop".into() },
        },
        Request::ListSessions { volume: volume() },
        Request::BeginSession { volume: volume(), session: "S_20261129-083000".into(), format: StoreFormat::Tar },
        Request::PutChunk { addr: 0x1_2345_6000_0000, data: vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0xff, 7] },
        Request::PutMeta { file: MetaFile::Manifest, data: b"0 0 x0000000000020000\n".to_vec() },
        Request::Commit,
        Request::ReadChunk { volume: volume(), session: "S_20261129-083000".into(), addr: 0x40000 },
        Request::PruneBegin { volume: volume(), pruned: "S_20261128-120000".into(), into: "S_20261129-083000".into() },
        Request::PruneLink { addrs: vec![0, 0x20000, 0xffff_ffff_fffe_0000] },
        Request::PruneLinked,
        Request::PruneFinish {
            volume: volume(),
            pruned: "S_20261128-120000".into(),
            into: "S_20261129-083000".into(),
            info: b"volsize=1073741824\nchunksize=131072\n".to_vec(),
        },
        Request::PruneAbort { volume: volume() },
        Request::DeleteVolume { volume: volume() },
        Request::ReadMeta {
            volume: volume(),
            session: "S_20261129-083000".into(),
            file: MetaFile::Info,
            offset: 1 << 20,
        },
        Request::GetKey { pool: "qubes_dom0%pool00".into() },
        Request::PutKey { pool: "qubes_dom0%pool00".into(), data: vec![1, 2, 3, 250, 251, 252, 253, 254, 255] },
        Request::ReplaceInfo {
            volume: volume(),
            session: "S_20261129-083000".into(),
            info: b"version=1\nformat=folders\ntags=keep\n".to_vec(),
        },
    ]
}

/// Requests that differ from their kind's sample in a nested enum's variant
/// (each variant of a field's enum is pinned too).
pub fn nested_requests() -> Vec<Request> {
    vec![Request::Hello {
        version: PROTOCOL_VERSION,
        dest: Destination::S3 { bucket: "offsite-backups".into(), prefix: "sparsebak/laptop".into() },
    }]
}

/// One representative value of every response.
pub fn responses() -> Vec<Response> {
    vec![
        Response::Ready { version: PROTOCOL_VERSION },
        Response::Done,
        Response::Sessions(vec!["S_20261128-120000".into(), "S_20261129-083000".into()]),
        Response::Chunk(vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 0x80, 0xff]),
        Response::ChunkError("opening /mnt/backup/x: No such file or directory (os error 2)".into()),
        Response::Linked { bytes: 300_000 },
        Response::Meta(b"volsize=1073741824\n".to_vec()),
        Response::Key(Some(b"sparsebak-key v1 argon2id".to_vec())),
        Response::Error("destination /mnt/backup is not a mount point".into()),
    ]
}

/// The fixture file of a request's kind.
pub fn request_fixture(req: &Request) -> &'static str {
    match req {
        Request::Hello { dest: Destination::Mounted { .. }, .. } => "request-hello.bin",
        Request::Hello { dest: Destination::S3 { .. }, .. } => "request-hello-s3.bin",
        Request::ListSessions { .. } => "request-list-sessions.bin",
        Request::BeginSession { .. } => "request-begin-session.bin",
        Request::PutChunk { .. } => "request-put-chunk.bin",
        Request::PutMeta { .. } => "request-put-meta.bin",
        Request::Commit => "request-commit.bin",
        Request::ReadChunk { .. } => "request-read-chunk.bin",
        Request::PruneBegin { .. } => "request-prune-begin.bin",
        Request::PruneLink { .. } => "request-prune-link.bin",
        Request::PruneLinked => "request-prune-linked.bin",
        Request::PruneFinish { .. } => "request-prune-finish.bin",
        Request::PruneAbort { .. } => "request-prune-abort.bin",
        Request::DeleteVolume { .. } => "request-delete-volume.bin",
        Request::ReadMeta { .. } => "request-read-meta.bin",
        Request::GetKey { .. } => "request-get-key.bin",
        Request::PutKey { .. } => "request-put-key.bin",
        Request::ReplaceInfo { .. } => "request-replace-info.bin",
    }
}

/// The fixture file of a response's kind.
pub fn response_fixture(resp: &Response) -> &'static str {
    match resp {
        Response::Ready { .. } => "response-ready.bin",
        Response::Done => "response-done.bin",
        Response::Sessions(_) => "response-sessions.bin",
        Response::Chunk(_) => "response-chunk.bin",
        Response::ChunkError(_) => "response-chunk-error.bin",
        Response::Linked { .. } => "response-linked.bin",
        Response::Meta(_) => "response-meta.bin",
        Response::Key(_) => "response-key.bin",
        Response::Error(_) => "response-error.bin",
    }
}

/// Every fixture: its file name and the frame it must hold, requests
/// first, each list in the order of the enum.
pub fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for req in requests().into_iter().chain(nested_requests()) {
        out.push((request_fixture(&req), encode_frame(&req).expect("every sample request encodes")));
    }
    for resp in responses() {
        out.push((response_fixture(&resp), encode_frame(&resp).expect("every sample response encodes")));
    }
    out
}
