//! Every exchange between `sparsebak` (dom0) and `sparsebak-vm` (the
//! receiver), as typed messages. dom0 sends [`Request`]s on the receiver's
//! stdin; the receiver answers with [`Response`]s on its stdout.
//!
//! Which requests are answered:
//! - `Hello` -> `Ready` (or `Error`), always first.
//! - `ListSessions` -> `Sessions`.
//! - `BeginSession` -> `Done`; then `PutChunk` / `PutMeta` get no answer (they
//!   stream), and `Commit` -> `Done` once the session is durable and visible.
//! - `ReadChunk` -> `Chunk` or `ChunkError` (non-fatal: the stream goes on).
//! - Prune (see [`Request::PruneBegin`]): `PruneBegin` -> `Done`; then
//!   `PruneLink` and `PutMeta` stream without answers; `PruneLinked` ->
//!   `Linked`; later `PruneFinish` or `PruneAbort` -> `Done`.
//! - `DeleteVolume` -> `Done`.
//! - `ReadMeta` -> `Meta` (empty past the end) or `ChunkError`.
//! - `GetKey` -> `Key`; `PutKey` -> `Done` (refused if a key is there).
//! - `ReplaceInfo` -> `Done` (a committed session's tags changed).
//!
//! `Error` is fatal: the receiver sends it and exits. Closing the receiver's
//! stdin ends the conversation; an uncommitted session is then discarded.
//!
//! The wire format is pinned: on the wire a message's kind is its position
//! in [`Request`] or [`Response`] (bincode numbers serde variants in
//! declaration order), so reordering variants, or adding, removing or
//! changing a field, silently changes the protocol. `proto/tests/wire_format.rs`
//! checks every kind against a golden frame in `proto/tests/fixtures/` and
//! fails on any such change. A deliberate change bumps [`PROTOCOL_VERSION`]
//! and then regenerates the fixtures with
//! `cargo run -p sparsebak-proto --example gen_wire_fixtures` (which refuses
//! to change them without the bump).

use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes shape, meaning or position (the
/// wire-format fixtures then have to be regenerated, see the module doc).
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest archive chunk size (uncompressed) either side accepts.
pub const MAX_CHUNK_SIZE: u64 = 4 << 20;

/// Largest piece of a metadata file carried by one `PutMeta`.
pub const META_PIECE: usize = 1 << 20;

/// Largest key file (`PutKey`, `Key`) either side accepts.
pub const MAX_KEY_FILE: usize = 4096;

/// Where the archive lives on the receiver.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `mountpoint/dir` on a mounted filesystem.
    Mounted {
        /// Must be a mount point on the receiver, or it refuses to write.
        mountpoint: String,
        /// Relative directory under the mount point.
        dir: String,
    },
    /// Objects under `prefix/` in an S3 bucket. dom0 names the bucket only:
    /// endpoint and credentials are the receiver's (its `s3.ini`).
    S3 { bucket: String, prefix: String },
}

impl Destination {
    /// Checks every part; the receiver calls this before using any.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Destination::Mounted { mountpoint, dir } => {
                crate::names::validate_mountpoint(mountpoint)?;
                crate::names::validate_dest_dir(dir)
            }
            Destination::S3 { bucket, prefix } => {
                crate::names::validate_bucket(bucket)?;
                crate::names::validate_dest_dir(prefix)
            }
        }
    }
}

/// As users write it: `/mnt/backup/dir` or `s3://bucket/prefix`.
impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Mounted { mountpoint, dir } => {
                write!(f, "{}/{dir}", mountpoint.trim_end_matches('/'))
            }
            Destination::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A volume in the archive: `POOLDIR/NAME`, where POOLDIR is `VG%POOL`
/// (or `local%NAME` for image-file volumes).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    pub pool: String,
    pub name: String,
}

impl std::fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.name)
    }
}

/// The per-session metadata files stored beside the chunks.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaFile {
    Info,
    Manifest,
}

impl MetaFile {
    /// The file's name inside a session folder.
    pub fn file_name(self) -> &'static str {
        match self {
            MetaFile::Info => crate::layout::INFO_FILE,
            MetaFile::Manifest => crate::layout::MANIFEST_FILE,
        }
    }
}

/// How a session's chunks are stored in the archive.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFormat {
    /// One file per chunk, in sub-folders by address prefix.
    Folders,
    /// One tar stream holding every chunk of the session (`--tarfile`).
    Tar,
}

/// What dom0 asks. The order of the variants is part of the wire format:
/// add, remove or move no variant without bumping [`PROTOCOL_VERSION`] (see
/// the module doc).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        version: u32,
        dest: Destination,
    },
    ListSessions {
        volume: VolumeRef,
    },
    /// Opens `S_...-tmp` for writing, discarding any stale one of this volume.
    BeginSession {
        volume: VolumeRef,
        session: String,
        format: StoreFormat,
    },
    /// One stored chunk of the open session, already compressed by dom0.
    PutChunk {
        addr: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Appends a piece (at most [`META_PIECE`] bytes) to a metadata file of
    /// the open session.
    PutMeta {
        file: MetaFile,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Makes the open session durable and visible under its final name.
    Commit,
    ReadChunk {
        volume: VolumeRef,
        session: String,
        addr: u64,
    },
    /// Starts merging session `pruned` into the next newer session `into`.
    /// The receiver journals it before changing anything; it refuses while
    /// another prune of the volume is unsettled.
    PruneBegin {
        volume: VolumeRef,
        pruned: String,
        into: String,
    },
    /// Addresses (increasing) of chunks of `pruned` that survive in `into`.
    /// Every other chunk of `pruned` goes when the prune finishes.
    PruneLink {
        addrs: Vec<u64>,
    },
    /// Every address and `into`'s new manifest copy (`PutMeta`) is sent:
    /// make the chunks appear in `into` (hard links,
    /// or extraction from a tar session) and make that durable. Answered
    /// with `Linked`. Until `PruneFinish`, `pruned` stays intact.
    PruneLinked,
    /// dom0 committed the merge: install `into`'s new manifest copy (sent
    /// by `PutMeta` before `PruneLinked`) and `info` (at most
    /// [`META_PIECE`] bytes), delete `pruned`, drop the journal. Also
    /// answered `Done` when that already happened.
    PruneFinish {
        volume: VolumeRef,
        pruned: String,
        into: String,
        #[serde(with = "serde_bytes")]
        info: Vec<u8>,
    },
    /// dom0 did not commit: undo whatever the volume's unsettled prune did
    /// (remove the added chunks of `into`), drop the journal. `Done` also
    /// when there is nothing to undo.
    PruneAbort {
        volume: VolumeRef,
    },
    /// Removes the volume and every session of it from the archive.
    DeleteVolume {
        volume: VolumeRef,
    },
    /// Up to [`META_PIECE`] bytes of a committed session's metadata file,
    /// from `offset` (for `verify` and `recover`).
    ReadMeta {
        volume: VolumeRef,
        session: String,
        file: MetaFile,
        offset: u64,
    },
    /// The pool folder's wrapped key file, if any.
    GetKey {
        pool: String,
    },
    /// Stores the pool folder's wrapped key file durably; an existing one is
    /// never replaced.
    PutKey {
        pool: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Replaces a committed session's `info` durably (at most
    /// [`META_PIECE`] bytes, sealed by dom0 like every metadata file): its
    /// tags changed. The session's chunks and manifest are not touched.
    ReplaceInfo {
        volume: VolumeRef,
        session: String,
        #[serde(with = "serde_bytes")]
        info: Vec<u8>,
    },
}

/// What the receiver answers. As for [`Request`], the order of the variants
/// is part of the wire format.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ready {
        version: u32,
    },
    Done,
    /// Committed session names, sorted.
    Sessions(Vec<String>),
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The chunk or metadata file could not be read (missing, unreadable);
    /// the receiver goes on.
    ChunkError(String),
    /// Answer to `PruneLinked`: bytes of the chunks added to `into`. dom0
    /// uses it only for the `bytes` figure that `list` shows.
    Linked {
        bytes: u64,
    },
    /// A piece of a metadata file; empty at or past its end.
    Meta(#[serde(with = "serde_bytes")] Vec<u8>),
    Key(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Fatal: the receiver stops after sending this.
    Error(String),
}
