//! What the receiver does to an archive, whatever holds it: one method per
//! protocol operation, with two implementations, the local filesystem
//! ([`crate::local_store::LocalStore`]: folders, rename and hard links) and
//! an S3 bucket ([`crate::s3::S3Store`]: objects, create-only commit
//! objects and server-side copies). The conversation (`serve.rs`) checks
//! the order of requests; a store carries them out and keeps the archive
//! consistent across kills in its own way (each file's doc says how).

use anyhow::Result;
use sparsebak_proto::{MetaFile, StoreFormat, VolumeRef};
use std::fs::File;
use std::path::PathBuf;

/// One chunk that dom0 asks for.
pub struct ChunkRef {
    pub volume: VolumeRef,
    pub session: String,
    pub addr: u64,
}

/// A stored chunk as a store hands it out for dom0.
pub enum StoredChunk {
    /// Its bytes, in memory (an S3 object, a tar member).
    Bytes(Vec<u8>),
    /// An open chunk file of `len` bytes: the conversation has the kernel
    /// copy it to dom0 (`sendfile`), so it is never read into memory.
    /// `path` names it in messages.
    File { file: File, len: u64, path: PathBuf },
}

impl StoredChunk {
    pub fn len(&self) -> u64 {
        match self {
            StoredChunk::Bytes(data) => data.len() as u64,
            StoredChunk::File { len, .. } => *len,
        }
    }
}

pub trait Store {
    /// Committed session names of a volume, sorted (oldest first).
    fn list_sessions(&mut self, volume: &VolumeRef) -> Result<Vec<String>>;

    /// Opens a new session for writing, discarding what an interrupted
    /// earlier one of this volume left.
    fn begin_session(&mut self, volume: &VolumeRef, session: &str, format: StoreFormat) -> Result<()>;
    fn put_chunk(&mut self, addr: u64, data: Vec<u8>) -> Result<()>;
    /// A piece of the open session's metadata file, or, during a prune, of
    /// the new manifest of the session pruned into.
    fn put_meta(&mut self, file: MetaFile, data: Vec<u8>) -> Result<()>;
    /// Makes the open session durable, then visible.
    fn commit(&mut self) -> Result<()>;
    /// Whether a session is open.
    fn session_open(&self) -> bool;

    /// The stored bytes of each chunk, in order; a missing or unreadable
    /// chunk is an error of its own, not of the whole batch.
    fn read_chunks(&mut self, chunks: &[ChunkRef]) -> Vec<Result<StoredChunk>>;
    /// Up to `max` bytes of a committed session's metadata file from
    /// `offset` (empty at or past its end).
    fn read_meta(
        &mut self,
        volume: &VolumeRef,
        session: &str,
        file: MetaFile,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>>;

    /// Prune phase 1 (see `prune.rs` for the protocol): journal, then the
    /// surviving addresses, then every one of them made part of `into`.
    fn prune_begin(&mut self, volume: &VolumeRef, pruned: &str, into: &str) -> Result<()>;
    fn prune_add(&mut self, addrs: &[u64]) -> Result<()>;
    /// Ends phase 1; the bytes added to `into`.
    fn prune_link(&mut self) -> Result<u64>;
    /// Whether a prune is in phase 1.
    fn prune_open(&self) -> bool;
    /// Phase 2 after dom0 committed (fine when it already happened).
    fn prune_finish(&mut self, volume: &VolumeRef, pruned: &str, into: &str, info: &[u8]) -> Result<()>;
    /// Undoes phase 1 (fine with nothing to undo).
    fn prune_abort(&mut self, volume: &VolumeRef) -> Result<()>;

    fn delete_volume(&mut self, volume: &VolumeRef) -> Result<()>;
    /// The wrapped key of a pool folder, at most `max` bytes.
    fn get_key(&mut self, pool: &str, max: usize) -> Result<Option<Vec<u8>>>;
    /// Stores a wrapped key; refused if one is there.
    fn put_key(&mut self, pool: &str, data: &[u8]) -> Result<()>;
    /// Replaces a committed session's info (its tags changed).
    fn replace_info(&mut self, volume: &VolumeRef, session: &str, info: &[u8]) -> Result<()>;
}
