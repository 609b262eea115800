//! Reading one stored chunk of a committed session, whatever its format: a
//! chunk file, or a member of the session's tar. A tar session's index
//! (`tar.rs`: a sorted file beside the tar, searched on disk) is opened on
//! first use and kept open for the next requests. An open index holds two
//! files and a few numbers, never anything per chunk, so memory stays
//! bounded whatever the volume's size; a few sessions are kept at once, so
//! it stays bounded however many sessions a restore touches.

use crate::archive::{chunk_path, MAX_CHUNK_FILE};
use crate::store::StoredChunk;
use crate::tar::TarIndex;
use anyhow::{bail, Context, Result};
use sparsebak_proto::layout::TAR_FILE;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Sessions kept at once (most recently used last): at most two open files
/// each. Opening an index again costs a pass over it (its check), so more
/// are kept than the in-memory indexes of before could afford.
const CACHED_SESSIONS: usize = 16;

#[derive(Default)]
pub struct ChunkSource {
    /// (session folder, its tar index if it is a tar session).
    cache: Vec<(PathBuf, Option<Rc<TarIndex>>)>,
}

impl ChunkSource {
    /// Chunk `addr` of the session in `session_dir`: its chunk file, opened,
    /// or its bytes read from the session's tar. A tar session's chunk files
    /// (merged in by prune) are looked at when its tar lacks the address.
    pub fn read(&mut self, session_dir: &Path, addr: u64) -> Result<StoredChunk> {
        if let Some(tar) = self.tar_of(session_dir)? {
            if let Some(data) = tar.read(addr) {
                return data.map(StoredChunk::Bytes);
            }
        }
        open_chunk_file(&chunk_path(session_dir, addr))
    }

    /// The tar index of a session, or `None` for a folder session.
    pub fn tar_of(&mut self, session_dir: &Path) -> Result<Option<Rc<TarIndex>>> {
        if let Some(i) = self.cache.iter().position(|(p, _)| p == session_dir) {
            let hit = self.cache.remove(i);
            let tar = hit.1.clone();
            self.cache.push(hit);
            return Ok(tar);
        }
        let path = session_dir.join(TAR_FILE);
        let tar = if path.is_file() { Some(Rc::new(TarIndex::open(&path)?)) } else { None };
        if self.cache.len() >= CACHED_SESSIONS {
            self.cache.remove(0);
        }
        self.cache.push((session_dir.to_path_buf(), tar.clone()));
        Ok(tar)
    }

    /// Drops every cached index (sessions were pruned or deleted).
    pub fn forget(&mut self) {
        self.cache.clear();
    }
}

/// Opens a chunk file for sending, refusing one larger than any chunk.
pub fn open_chunk_file(path: &Path) -> Result<StoredChunk> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("stat {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX_CHUNK_FILE {
        bail!("{} is {} bytes, larger than any chunk", path.display(), meta.len());
    }
    Ok(StoredChunk::File { file, len: meta.len(), path: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk file comes with its length; a missing one, a folder or one
    /// larger than any chunk is refused.
    #[test]
    fn chunk_files_are_opened_with_their_length() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x");
        std::fs::write(&path, b"short").expect("write");
        assert!(matches!(open_chunk_file(&path), Ok(StoredChunk::File { len: 5, .. })));
        assert!(open_chunk_file(&tmp.path().join("missing")).is_err());
        assert!(open_chunk_file(tmp.path()).is_err());
        let big = std::fs::File::create(tmp.path().join("big")).expect("create");
        big.set_len(MAX_CHUNK_FILE + 1).expect("set_len");
        let err = open_chunk_file(&tmp.path().join("big")).err().expect("refused");
        assert!(format!("{err:#}").contains("larger than any chunk"), "{err:#}");
    }
}
