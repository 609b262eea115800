//! The session writer on a thread of its own: the conversation thread reads
//! and decodes the next frames while this one writes the chunks it already
//! has, so the pipe from dom0 does not wait on the page cache. The queue
//! between them is short ([`QUEUE`] chunks), which bounds the receiver's
//! memory in bytes. Commit stays on the conversation thread, after every
//! queued write is done: durable, then visible, as before.

use crate::chunk_buffers;
use crate::session_writer::SessionWriter;
use anyhow::{anyhow, Result};
use sparsebak_proto::MetaFile;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

/// Writes queued between the two threads.
const QUEUE: usize = 4;

enum Write {
    Chunk(u64, Vec<u8>),
    Meta(MetaFile, Vec<u8>),
}

/// An open session whose writes happen on the writer thread. Dropped
/// without [`QueuedSession::finish`], it waits for the thread, which drops
/// the session (removing its `-tmp` folder).
pub struct QueuedSession {
    queue: Option<SyncSender<Write>>,
    thread: Option<JoinHandle<Result<SessionWriter>>>,
}

impl QueuedSession {
    pub fn start(mut writer: SessionWriter) -> Result<QueuedSession> {
        let (queue, writes) = sync_channel::<Write>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("session writer".into())
            .spawn(move || {
                for w in writes {
                    match w {
                        Write::Chunk(addr, data) => {
                            writer.put_chunk(addr, &data)?;
                            chunk_buffers::give_back(data);
                        }
                        Write::Meta(file, data) => writer.put_meta(file, &data)?,
                    }
                }
                Ok(writer)
            })
            .map_err(|e| anyhow!("starting the session writer thread: {e}"))?;
        Ok(QueuedSession { queue: Some(queue), thread: Some(thread) })
    }

    pub fn put_chunk(&mut self, addr: u64, data: Vec<u8>) -> Result<()> {
        self.queue_write(Write::Chunk(addr, data))
    }

    pub fn put_meta(&mut self, file: MetaFile, data: Vec<u8>) -> Result<()> {
        self.queue_write(Write::Meta(file, data))
    }

    /// Queues a write; when the writer already failed, its error.
    fn queue_write(&mut self, w: Write) -> Result<()> {
        match &self.queue {
            Some(q) if q.send(w).is_ok() => Ok(()),
            _ => Err(self.stop().err().unwrap_or_else(|| anyhow!("the session writer stopped"))),
        }
    }

    /// Waits until every queued write is done; the session, ready to commit.
    pub fn finish(mut self) -> Result<SessionWriter> {
        self.stop()
    }

    fn stop(&mut self) -> Result<SessionWriter> {
        drop(self.queue.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow!("the session writer thread panicked")),
            None => Err(anyhow!("the session writer already stopped")),
        }
    }
}

impl Drop for QueuedSession {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Archive;
    use sparsebak_proto::{StoreFormat, VolumeRef};

    fn archive(tmp: &tempfile::TempDir) -> Archive {
        // `/` is always a mount point; the archive lives below the temp dir.
        let dir = tmp.path().strip_prefix("/").expect("absolute").join("a");
        Archive::open("/", &dir.to_string_lossy()).expect("archive")
    }

    const S: &str = "S_20261130-010000";

    #[test]
    fn queued_writes_land_before_commit_and_errors_surface() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = archive(&tmp);
        let vol = VolumeRef { pool: "vg%pool".into(), name: "vol".into() };
        let mut q = QueuedSession::start(SessionWriter::begin(&a, &vol, S, StoreFormat::Folders).expect("begin"))
            .expect("start");
        for addr in 0..20u64 {
            q.put_chunk(addr << 17, vec![addr as u8; 1000]).expect("queued");
        }
        q.put_meta(MetaFile::Info, b"info".to_vec()).expect("queued");
        q.put_meta(MetaFile::Manifest, b"manifest".to_vec()).expect("queued");
        q.finish().expect("all written").commit().expect("commit");
        let dir = a.session_dir(&vol, S).expect("dir");
        for addr in 0..20u64 {
            let data = std::fs::read(crate::archive::chunk_path(&dir, addr << 17)).expect("chunk written");
            assert_eq!(data, vec![addr as u8; 1000]);
        }

        // A failing write (the same address twice) is reported, and the
        // abandoned session leaves no -tmp folder.
        let vol2 = VolumeRef { pool: "vg%pool".into(), name: "vol2".into() };
        let mut q = QueuedSession::start(SessionWriter::begin(&a, &vol2, S, StoreFormat::Folders).expect("begin"))
            .expect("start");
        let mut failed = None;
        for _ in 0..50 {
            if let Err(e) = q.put_chunk(0, vec![1; 10]) {
                failed = Some(e);
                break;
            }
        }
        let err = match failed {
            Some(e) => e,
            None => q.finish().err().expect("the duplicate chunk fails"),
        };
        assert!(format!("{err:#}").contains("creating chunk"), "{err:#}");
        let vol_dir = a.volume_dir(&vol2).expect("dir");
        let left: Vec<_> = std::fs::read_dir(&vol_dir).expect("list").flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "nothing left of the failed session: {left:?}");
    }
}
