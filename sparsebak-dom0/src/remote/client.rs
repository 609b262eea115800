//! The typed client: one method per request, each checking that the answer
//! is the one that request allows. Commands call these and never see a
//! `Response`; an unexpected answer is an error naming the request.

use super::transport::{ReceivedChunk, Receiver, RequestSink, ResponseSource};
use crate::chunk::ChunkBuf;
use crate::ui::printable::printable;
use anyhow::{bail, Result};
use sparsebak_proto::{Destination, MetaFile, Request, Response, StoreFormat, VolumeRef, PROTOCOL_VERSION};

/// A chunk as the receiver answered a read: the bytes (untrusted until
/// checked; the buffer goes back to the connection's pool when dropped),
/// or why it could not read them (missing, unreadable; the conversation
/// goes on).
pub type ChunkAnswer = std::result::Result<ChunkBuf, String>;
/// A piece of a metadata file, or why it could not be read.
pub type MetaAnswer = std::result::Result<Vec<u8>, String>;

/// "unexpected answer to WHAT: KIND".
fn unexpected(what: &str, resp: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer to {what}: {}", kind(resp))
}

/// A short name for a response, for "unexpected answer" errors.
fn kind(resp: &Response) -> &'static str {
    match resp {
        Response::Ready { .. } => "Ready",
        Response::Done => "Done",
        Response::Sessions(_) => "Sessions",
        Response::Chunk(_) => "Chunk",
        Response::ChunkError(_) => "ChunkError",
        Response::Linked { .. } => "Linked",
        Response::Meta(_) => "Meta",
        Response::Key(_) => "Key",
        Response::Error(_) => "Error",
    }
}

impl Receiver {
    /// Sends a request whose only good answer is `Done`.
    fn call_done(&mut self, req: &Request, what: &str) -> Result<()> {
        match self.call(req)? {
            Response::Done => Ok(()),
            other => Err(unexpected(what, &other)),
        }
    }

    /// The first exchange: protocol version and destination.
    pub(super) fn hello(&mut self, dest: Destination) -> Result<()> {
        match self.call(&Request::Hello { version: PROTOCOL_VERSION, dest })? {
            Response::Ready { version } if version == PROTOCOL_VERSION => Ok(()),
            Response::Ready { version } => bail!(
                "protocol version mismatch: this sparsebak speaks {PROTOCOL_VERSION}, the receiver {version}; install matching versions"
            ),
            other => Err(unexpected("hello", &other)),
        }
    }

    /// The archive's committed session names of a volume (unvalidated).
    pub fn list_sessions(&mut self, volume: &VolumeRef) -> Result<Vec<String>> {
        match self.call(&Request::ListSessions { volume: volume.clone() })? {
            Response::Sessions(s) => Ok(s),
            other => Err(unexpected("list sessions", &other)),
        }
    }

    /// Opens `session` of `volume` for writing.
    pub fn begin_session(&mut self, volume: &VolumeRef, session: &str, format: StoreFormat) -> Result<()> {
        let req = Request::BeginSession { volume: volume.clone(), session: session.to_string(), format };
        self.call_done(&req, "begin session")
    }

    /// Streams one stored chunk into the open session (no answer).
    pub fn put_chunk(&mut self, addr: u64, mut data: ChunkBuf) -> Result<()> {
        let req = Request::PutChunk { addr, data: std::mem::take(data.vec_mut()) };
        let sent = self.send(&req);
        // The buffer goes back to its pool when `data` is dropped.
        if let Request::PutChunk { data: buf, .. } = req {
            *data.vec_mut() = buf;
        }
        sent
    }

    /// Streams a piece of a metadata file into the open session or prune
    /// (no answer).
    pub fn put_meta(&mut self, file: MetaFile, data: Vec<u8>) -> Result<()> {
        self.send(&Request::PutMeta { file, data })
    }

    /// Makes the open session durable and visible.
    pub fn commit(&mut self) -> Result<()> {
        self.call_done(&Request::Commit, "commit")
    }

    /// Starts merging `pruned` into `into`.
    pub fn prune_begin(&mut self, volume: &VolumeRef, pruned: &str, into: &str) -> Result<()> {
        let req = Request::PruneBegin { volume: volume.clone(), pruned: pruned.to_string(), into: into.to_string() };
        self.call_done(&req, "prune begin")
    }

    /// Streams addresses of chunks that move into the newer session.
    pub fn prune_link(&mut self, addrs: Vec<u64>) -> Result<()> {
        self.send(&Request::PruneLink { addrs })
    }

    /// Every address is sent: link and sync. Returns the bytes the receiver
    /// says it added (a figure for `list` only; untrusted).
    pub fn prune_linked(&mut self) -> Result<u64> {
        match self.call(&Request::PruneLinked)? {
            Response::Linked { bytes } => Ok(bytes),
            other => Err(unexpected("prune linked", &other)),
        }
    }

    /// dom0 committed the merge: install `into`'s new files, drop `pruned`.
    pub fn prune_finish(&mut self, volume: &VolumeRef, pruned: &str, into: &str, info: Vec<u8>) -> Result<()> {
        let req =
            Request::PruneFinish { volume: volume.clone(), pruned: pruned.to_string(), into: into.to_string(), info };
        self.call_done(&req, "prune finish")
    }

    /// Undoes the volume's unsettled prune on the receiver.
    pub fn prune_abort(&mut self, volume: &VolumeRef) -> Result<()> {
        self.call_done(&Request::PruneAbort { volume: volume.clone() }, "prune abort")
    }

    /// Removes a volume and all its sessions from the archive.
    pub fn delete_volume(&mut self, volume: &VolumeRef) -> Result<()> {
        self.call_done(&Request::DeleteVolume { volume: volume.clone() }, "delete volume")
    }

    /// A piece of a committed session's metadata file from `offset`.
    pub fn read_meta(&mut self, volume: &VolumeRef, session: &str, file: MetaFile, offset: u64) -> Result<MetaAnswer> {
        let req = Request::ReadMeta { volume: volume.clone(), session: session.to_string(), file, offset };
        match self.call(&req)? {
            Response::Meta(d) => Ok(Ok(d)),
            Response::ChunkError(why) => Ok(Err(printable(&why))),
            other => Err(unexpected("read metadata", &other)),
        }
    }

    /// Reads several chunks in one pipelined batch: every request goes out
    /// first, then the answers are read in the same order (each at most
    /// `max_len` bytes, see [`ResponseSource::chunk`]).
    pub fn read_chunks(
        &mut self,
        volume: &VolumeRef,
        chunks: &[(&str, u64)],
        max_len: usize,
    ) -> Result<Vec<ChunkAnswer>> {
        for (session, addr) in chunks {
            self.requests.read_chunk(volume, session, *addr)?;
        }
        self.requests.flush()?;
        chunks.iter().map(|_| self.responses.chunk(max_len)).collect()
    }

    /// Replaces a committed session's info in the archive (sealed by the caller).
    pub fn replace_info(&mut self, volume: &VolumeRef, session: &str, info: Vec<u8>) -> Result<()> {
        let req = Request::ReplaceInfo { volume: volume.clone(), session: session.to_string(), info };
        self.call_done(&req, "replace info")
    }

    /// The pool folder's wrapped key file, if the archive has one.
    pub fn get_key(&mut self, pool: &str) -> Result<Option<Vec<u8>>> {
        match self.call(&Request::GetKey { pool: pool.to_string() })? {
            Response::Key(k) => Ok(k),
            other => Err(unexpected("read key", &other)),
        }
    }

    /// Stores the pool folder's wrapped key file (never replaces one).
    pub fn put_key(&mut self, pool: &str, data: Vec<u8>) -> Result<()> {
        self.call_done(&Request::PutKey { pool: pool.to_string(), data }, "store key")
    }
}

/// The pipelined read of chunks (receive, verify): one thread sends
/// requests, another reads the answers in the same order.
impl RequestSink {
    /// Queues a chunk read (buffered; flush before waiting on answers).
    pub fn read_chunk(&mut self, volume: &VolumeRef, session: &str, addr: u64) -> Result<()> {
        self.send(&Request::ReadChunk { volume: volume.clone(), session: session.to_string(), addr })
    }
}

impl ResponseSource {
    /// The answer to the oldest outstanding chunk read. Stored bytes longer
    /// than `max_len` (what the chunk can take when stored: see
    /// `chunk::max_stored_len`) are the chunk's fault, dropped at once: a
    /// lying archive cannot make chunks that wait for their checks hold
    /// more than that.
    pub fn chunk(&mut self, max_len: usize) -> Result<ChunkAnswer> {
        match self.recv_chunk(max_len)? {
            ReceivedChunk::Bytes(data) => Ok(Ok(data)),
            ReceivedChunk::TooLong(len) => {
                Ok(Err(format!("stored as {len} bytes, more than the chunk can take ({max_len})")))
            }
            ReceivedChunk::Other(Response::ChunkError(why)) => Ok(Err(printable(&why))),
            ReceivedChunk::Other(other) => Err(unexpected("read chunk", &other)),
        }
    }
}
