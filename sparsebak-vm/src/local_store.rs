//! The archive in a folder of a mounted filesystem: sessions written to
//! `S_...-tmp` and renamed when committed (`session_writer.rs`, on a thread
//! of its own: `writer_thread.rs`), prune by hard links (`prune.rs`), reads
//! of chunk files and tar members (`chunk_source.rs`).

use crate::archive::Archive;
use crate::chunk_source::ChunkSource;
use crate::prune::{self, Prune};
use crate::session_writer::SessionWriter;
use crate::store::{ChunkRef, Store, StoredChunk};
use crate::writer_thread::QueuedSession;
use anyhow::{bail, Context, Result};
use sparsebak_proto::{MetaFile, StoreFormat, VolumeRef};
use std::io::{Read, Seek};
use std::path::Path;

pub struct LocalStore {
    archive: Archive,
    writer: Option<QueuedSession>,
    /// A prune between `prune_begin` and `prune_link`.
    prune: Option<Prune>,
    chunks: ChunkSource,
}

impl LocalStore {
    pub fn new(archive: Archive) -> LocalStore {
        LocalStore { archive, writer: None, prune: None, chunks: ChunkSource::default() }
    }

    fn writer(&mut self) -> Result<&mut QueuedSession> {
        self.writer.as_mut().context("protocol error: no open session")
    }
}

impl Store for LocalStore {
    fn list_sessions(&mut self, volume: &VolumeRef) -> Result<Vec<String>> {
        self.archive.list_sessions(volume)
    }

    fn begin_session(&mut self, volume: &VolumeRef, session: &str, format: StoreFormat) -> Result<()> {
        let writer = SessionWriter::begin(&self.archive, volume, session, format)?;
        self.writer = Some(QueuedSession::start(writer)?);
        Ok(())
    }

    fn put_chunk(&mut self, addr: u64, data: Vec<u8>) -> Result<()> {
        self.writer()?.put_chunk(addr, data)
    }

    fn put_meta(&mut self, file: MetaFile, data: Vec<u8>) -> Result<()> {
        match &mut self.prune {
            Some(p) => p.put_meta(file, &data),
            None => self.writer()?.put_meta(file, data),
        }
    }

    fn commit(&mut self) -> Result<()> {
        self.writer.take().context("protocol error: commit without a session")?.finish()?.commit()
    }

    fn session_open(&self) -> bool {
        self.writer.is_some()
    }

    fn read_chunks(&mut self, chunks: &[ChunkRef]) -> Vec<Result<StoredChunk>> {
        chunks
            .iter()
            .map(|c| {
                let dir = self.archive.session_dir(&c.volume, &c.session)?;
                self.chunks.read(&dir, c.addr)
            })
            .collect()
    }

    fn read_meta(
        &mut self,
        volume: &VolumeRef,
        session: &str,
        file: MetaFile,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>> {
        let path = self.archive.session_dir(volume, session)?.join(file.file_name());
        read_piece(&path, offset, max)
    }

    fn prune_begin(&mut self, volume: &VolumeRef, pruned: &str, into: &str) -> Result<()> {
        self.chunks.forget();
        self.prune = Some(Prune::begin(&self.archive, volume, pruned, into)?);
        Ok(())
    }

    fn prune_add(&mut self, addrs: &[u64]) -> Result<()> {
        self.prune.as_mut().context("protocol error: no prune open")?.add(addrs)
    }

    fn prune_link(&mut self) -> Result<u64> {
        let p = self.prune.take().context("protocol error: no prune open")?;
        p.link(&mut self.chunks)
    }

    fn prune_open(&self) -> bool {
        self.prune.is_some()
    }

    fn prune_finish(&mut self, volume: &VolumeRef, pruned: &str, into: &str, info: &[u8]) -> Result<()> {
        self.chunks.forget();
        prune::finish(&self.archive, volume, pruned, into, info)
    }

    fn prune_abort(&mut self, volume: &VolumeRef) -> Result<()> {
        self.chunks.forget();
        prune::abort(&self.archive, volume)
    }

    fn delete_volume(&mut self, volume: &VolumeRef) -> Result<()> {
        self.chunks.forget();
        self.archive.delete_volume(volume)
    }

    fn get_key(&mut self, pool: &str, max: usize) -> Result<Option<Vec<u8>>> {
        let path = self.archive.key_path(pool)?;
        match std::fs::metadata(&path) {
            Ok(_) => Ok(Some(read_piece(&path, 0, max)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
        }
    }

    fn put_key(&mut self, pool: &str, data: &[u8]) -> Result<()> {
        sparsebak_fsutil::create_file_durably(&self.archive.key_path(pool)?, data)
    }

    fn replace_info(&mut self, volume: &VolumeRef, session: &str, info: &[u8]) -> Result<()> {
        let dir = self.archive.session_dir(volume, session)?;
        if !dir.is_dir() {
            bail!("{volume}: no committed session {session}");
        }
        sparsebak_fsutil::write_file_durably(&dir.join(MetaFile::Info.file_name()), info)
    }
}

/// Up to `max` bytes of a file from `offset` (empty at or past its end).
fn read_piece(path: &Path, offset: u64, max: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(std::io::SeekFrom::Start(offset)).with_context(|| format!("seeking in {}", path.display()))?;
    let mut data = Vec::new();
    f.take(max as u64).read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
    Ok(data)
}
