//! Reading one stored chunk of a committed session, whatever its format: a
//! chunk file, or a member of the session's tar. A tar session's index
//! (`tar.rs`: a sorted file beside the tar, searched on disk) is opened on
//! first use and kept open for the next requests. An open index holds two
//! files and a few numbers, never anything per chunk, so memory stays
//! bounded whatever the volume's size; a few sessions are kept at once, so
//! it stays bounded however many sessions a restore touches.

use crate::archive::{chunk_path, MAX_CHUNK_FILE};
use crate::tar::TarIndex;
use anyhow::{bail, Context, Result};
use sparsebak_proto::layout::TAR_FILE;
use std::io::Read;
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
    /// The stored bytes of chunk `addr` of the session in `session_dir`,
    /// in `buf` if they come from a chunk file (its content is replaced).
    /// A tar session's chunk files (merged in by prune) are looked at when
    /// its tar lacks the address.
    pub fn read(&mut self, session_dir: &Path, addr: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        if let Some(tar) = self.tar_of(session_dir)? {
            if let Some(data) = tar.read(addr) {
                return data;
            }
        }
        read_chunk_file(&chunk_path(session_dir, addr), buf)
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

/// Reads a chunk file into `data` (its content is replaced), refusing one
/// larger than any chunk.
pub fn read_chunk_file(path: &Path, mut data: Vec<u8>) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().with_context(|| format!("stat {}", path.display()))?.len();
    if len > MAX_CHUNK_FILE {
        bail!("{} is {len} bytes, larger than any chunk", path.display());
    }
    data.clear();
    data.reserve(len as usize);
    f.take(MAX_CHUNK_FILE).read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reused buffer holds exactly the file afterwards, whatever it held.
    #[test]
    fn a_reused_buffer_holds_only_the_chunk_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x");
        std::fs::write(&path, b"short").expect("write");
        let dirty = vec![0xee; 4096];
        assert_eq!(read_chunk_file(&path, dirty).expect("reads"), b"short");
        assert_eq!(read_chunk_file(&path, Vec::new()).expect("reads"), b"short");
        assert!(read_chunk_file(&tmp.path().join("missing"), vec![1, 2, 3]).is_err());
    }
}
