//! The receiver's side of the conversation: one request at a time from
//! stdin, answers on stdout. It exits on end of input or a broken pipe
//! (qrexec does not kill a service whose caller died), and any fatal error is
//! sent to dom0 as `Response::Error` before exiting non-zero.
//!
//! Here the order of requests is checked; the archive itself is a
//! [`Store`]: a mounted folder or an S3 bucket, as `Hello` names it.

use crate::answers::AnswerStream;
use crate::archive::Archive;
use crate::chunk_buffers;
use crate::local_store::LocalStore;
use crate::store::{ChunkRef, Store, StoredChunk};
use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::frame::{holds_whole_frame, read_request_into};
use sparsebak_proto::msg::{MAX_CHUNK_SIZE, MAX_KEY_FILE, META_PIECE};
use sparsebak_proto::{read_msg, write_msg, Destination, FrameError, Request, Response, PROTOCOL_VERSION};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;

/// Chunk reads answered together at most: the requests dom0 already sent
/// are batched so that a store with latency (S3) fetches them at once.
const READ_BATCH: usize = 16;
/// Bytes of chunks a batch may hold in memory. Until the conversation has
/// seen a chunk, batches assume the largest there can be; then the largest
/// seen so far: 16 chunks of 128 KiB, 4 of 4 MiB (16 of those, as before,
/// took the receiver to 68 MiB).
const READ_BATCH_BYTES: usize = 16 << 20;

/// How many chunk reads the next batch may take, given the largest chunk
/// answered so far.
fn read_batch_limit(largest_seen: Option<usize>) -> usize {
    let largest = largest_seen.unwrap_or(MAX_CHUNK_SIZE as usize + MAX_CHUNK_OVERHEAD).max(1);
    (READ_BATCH_BYTES / largest).clamp(1, READ_BATCH)
}

/// What a stored chunk may hold beyond its plaintext (compression's worst
/// case, nonce and tag) for the first batch's estimate.
const MAX_CHUNK_OVERHEAD: usize = 64 << 10;

/// A failed conversation; `reported` when dom0 already got the message (so
/// it is not printed twice on the user's terminal).
pub struct ServeError {
    pub error: anyhow::Error,
    pub reported: bool,
}

pub fn serve_stdio() -> Result<(), ServeError> {
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    make_blocking(stdin.as_fd());
    make_blocking(stdout.as_fd());
    serve(BufReader::with_capacity(REQUEST_BUFFER, stdin), AnswerStream::new(stdout))
}

/// The buffer on dom0's requests: small next to a chunk on purpose. A
/// `BufReader` passes a read through only while it is empty and the read
/// is at least its size, so with a bigger one (it was 1 MiB) every chunk
/// dom0 sends was copied through it; now all but the first few KiB of a
/// chunk go from the pipe straight into the chunk's buffer, and small
/// requests (a restore's `ReadChunk`s) are still read many at a time.
const REQUEST_BUFFER: usize = 8 << 10;

pub fn serve<R: Read, W: Write + AsFd>(mut input: BufReader<R>, mut output: AnswerStream<W>) -> Result<(), ServeError> {
    let mut server = Server { store: None };
    let mut largest_chunk = None;
    loop {
        // A chunk dom0 sends is read into a buffer of an earlier one.
        let mut spare = chunk_buffers::take();
        let read = read_request_into(&mut input, &mut spare);
        chunk_buffers::give_back(spare);
        let req = match read {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()), // dom0 closed the conversation
            Err(e) => return fail(&mut output, anyhow!("reading request: {e}")),
        };
        if let Request::ReadChunk { volume, session, addr } = req {
            let mut batch = vec![ChunkRef { volume, session, addr }];
            let mut next = None;
            let limit = read_batch_limit(largest_chunk);
            while batch.len() < limit && holds_whole_frame(input.buffer()) {
                match read_msg(&mut input) {
                    Ok(Some(Request::ReadChunk { volume, session, addr })) => {
                        batch.push(ChunkRef { volume, session, addr })
                    }
                    Ok(other) => {
                        next = other;
                        break;
                    }
                    Err(e) => return fail(&mut output, anyhow!("reading request: {e}")),
                }
            }
            let answers = match server.store() {
                Ok(store) => store.read_chunks(&batch),
                Err(e) => return fail(&mut output, e),
            };
            let largest = answers.iter().filter_map(|a| a.as_ref().ok().map(StoredChunk::len)).max();
            largest_chunk = largest_chunk.max(largest.map(|l| l as usize));
            for answer in answers {
                let sent = match answer {
                    Ok(StoredChunk::Bytes(data)) => write_msg(&mut output, &Response::Chunk(data)).map_err(io_error),
                    Ok(StoredChunk::File { file, len, path }) => output.send_chunk_file(&file, len).map(|unread| {
                        // The answer went out with zeros for what could
                        // not be read: dom0 finds that chunk bad; say why.
                        if let Some(why) = unread {
                            let _ = writeln!(std::io::stderr(), "reading {}: {why}", path.display());
                        }
                    }),
                    // A store error is the chunk's, not fatal.
                    Err(e) => write_msg(&mut output, &Response::ChunkError(format!("{e:#}"))).map_err(io_error),
                };
                match sent {
                    Ok(()) => {}
                    // dom0 is gone (or stopped reading): nothing to say.
                    Err(e) if is_gone(&e) => return Ok(()),
                    // Half an answer may be out: the conversation cannot go on.
                    Err(e) => return Err(ServeError { error: anyhow!("sending a chunk: {e}"), reported: false }),
                }
            }
            if output.flush().is_err() {
                return Ok(());
            }
            let Some(req) = next else { continue };
            if let Err(e) = server.answer(req, &mut output) {
                return e;
            }
            continue;
        }
        if let Err(e) = server.answer(req, &mut output) {
            return e;
        }
    }
}

/// Every read and write of the conversation expects to wait (a full pipe
/// means dom0 is busy), but whoever started us (qrexec, sshd) may have
/// handed us non-blocking pipes or sockets: a `WouldBlock` would then end
/// the conversation.
fn make_blocking(fd: std::os::fd::BorrowedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    if let Ok(bits) = fcntl(fd, FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(bits);
        if flags.contains(OFlag::O_NONBLOCK) {
            let _ = fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK));
        }
    }
}

/// Whether a write failed because dom0 closed its end.
fn is_gone(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
}

fn io_error(e: FrameError) -> std::io::Error {
    match e {
        FrameError::Io(e) => e,
        e => std::io::Error::other(e.to_string()),
    }
}

/// Tells dom0 why we stop, then returns the error for our exit status.
fn fail<W: Write>(output: &mut W, error: anyhow::Error) -> Result<(), ServeError> {
    let reported = write_msg(output, &Response::Error(format!("{error:#}"))).is_ok() && output.flush().is_ok();
    Err(ServeError { error, reported })
}

struct Server {
    store: Option<Box<dyn Store>>,
}

impl Server {
    fn store(&mut self) -> Result<&mut Box<dyn Store>> {
        self.store.as_mut().context("protocol error: request before Hello")
    }

    /// Handles one request and writes its answer; `Err` holds how the
    /// conversation ends (dom0 gone: `Ok`; a fatal error: reported).
    fn answer<W: Write>(&mut self, req: Request, output: &mut W) -> Result<(), Result<(), ServeError>> {
        let flush_after =
            !matches!(req, Request::PutChunk { .. } | Request::PutMeta { .. } | Request::PruneLink { .. });
        match self.handle(req) {
            Ok(Some(resp)) => {
                if write_msg(output, &resp).is_err() {
                    return Err(Ok(())); // dom0 went away: nothing more to do
                }
            }
            Ok(None) => {}
            Err(e) => return Err(fail(output, e)),
        }
        if flush_after && output.flush().is_err() {
            return Err(Ok(()));
        }
        Ok(())
    }

    /// A session or prune must not be open.
    fn idle(&mut self) -> Result<&mut Box<dyn Store>> {
        let store = self.store()?;
        if store.session_open() || store.prune_open() {
            bail!("protocol error: a session or prune is already open");
        }
        Ok(store)
    }

    fn handle(&mut self, req: Request) -> Result<Option<Response>> {
        Ok(match req {
            Request::Hello { version, dest } => {
                if version != PROTOCOL_VERSION {
                    bail!("protocol version mismatch: dom0 speaks {version}, this receiver speaks {PROTOCOL_VERSION}; install matching sparsebak versions");
                }
                if self.store.is_some() {
                    bail!("protocol error: second Hello");
                }
                dest.validate()?;
                self.store = Some(match dest {
                    Destination::Mounted { mountpoint, dir } => {
                        Box::new(LocalStore::new(Archive::open(&mountpoint, &dir)?))
                    }
                    Destination::S3 { bucket, prefix } => Box::new(crate::s3::S3Store::open(&bucket, &prefix)?),
                });
                Some(Response::Ready { version: PROTOCOL_VERSION })
            }
            Request::ListSessions { volume } => Some(Response::Sessions(self.store()?.list_sessions(&volume)?)),
            Request::BeginSession { volume, session, format } => {
                self.idle()?.begin_session(&volume, &session, format)?;
                Some(Response::Done)
            }
            Request::PutChunk { addr, data } => {
                self.store()?.put_chunk(addr, data)?;
                None
            }
            Request::PutMeta { file, data } => {
                if data.len() > META_PIECE {
                    bail!("metadata piece of {} bytes is too large", data.len());
                }
                self.store()?.put_meta(file, data)?;
                None
            }
            Request::Commit => {
                self.store()?.commit()?;
                Some(Response::Done)
            }
            // The conversation loop answers chunk reads in batches.
            Request::ReadChunk { .. } => bail!("internal error: a chunk read outside a batch"),
            Request::PruneBegin { volume, pruned, into } => {
                self.idle()?.prune_begin(&volume, &pruned, &into)?;
                Some(Response::Done)
            }
            Request::PruneLink { addrs } => {
                self.store()?.prune_add(&addrs)?;
                None
            }
            Request::PruneLinked => Some(Response::Linked { bytes: self.store()?.prune_link()? }),
            Request::PruneFinish { volume, pruned, into, info } => {
                if info.len() > META_PIECE {
                    bail!("info of {} bytes is too large", info.len());
                }
                self.store()?.prune_finish(&volume, &pruned, &into, &info)?;
                Some(Response::Done)
            }
            Request::PruneAbort { volume } => {
                self.store()?.prune_abort(&volume)?;
                Some(Response::Done)
            }
            Request::DeleteVolume { volume } => {
                self.store()?.delete_volume(&volume)?;
                Some(Response::Done)
            }
            Request::ReadMeta { volume, session, file, offset } => {
                Some(match self.store()?.read_meta(&volume, &session, file, offset, META_PIECE) {
                    Ok(data) => Response::Meta(data),
                    Err(e) => Response::ChunkError(format!("{e:#}")),
                })
            }
            Request::GetKey { pool } => Some(Response::Key(self.store()?.get_key(&pool, MAX_KEY_FILE)?)),
            Request::ReplaceInfo { volume, session, info } => {
                if info.len() > META_PIECE {
                    bail!("info of {} bytes is too large", info.len());
                }
                self.idle()?.replace_info(&volume, &session, &info)?;
                Some(Response::Done)
            }
            Request::PutKey { pool, data } => {
                if data.len() > MAX_KEY_FILE {
                    bail!("key file of {} bytes is too large", data.len());
                }
                self.store()?.put_key(&pool, &data)?;
                Some(Response::Done)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_blocking_pipes_are_made_blocking() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        let (rx, _tx) = nix::unistd::pipe().expect("pipe");
        let nonblocking = |fd: &std::os::fd::OwnedFd| {
            let bits = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).expect("F_GETFL");
            OFlag::from_bits_truncate(bits).contains(OFlag::O_NONBLOCK)
        };
        fcntl(rx.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("F_SETFL");
        assert!(nonblocking(&rx));
        make_blocking(rx.as_fd());
        assert!(!nonblocking(&rx), "O_NONBLOCK cleared");
        make_blocking(rx.as_fd());
        assert!(!nonblocking(&rx), "and left so");
    }

    #[test]
    fn read_batches_are_bounded_in_bytes() {
        let stored = |plain: usize| plain + 64; // a little compression overhead, nonce, tag
        assert_eq!(read_batch_limit(Some(stored(128 << 10))), READ_BATCH, "small chunks: the count bounds");
        for seen in [None, Some(stored(4 << 20)), Some(stored(1 << 20)), Some(1)] {
            let n = read_batch_limit(seen);
            let largest = seen.unwrap_or(MAX_CHUNK_SIZE as usize + MAX_CHUNK_OVERHEAD);
            assert!((1..=READ_BATCH).contains(&n), "{seen:?}: {n}");
            assert!(n == 1 || n * largest <= READ_BATCH_BYTES, "{seen:?}: {n} chunks of {largest} bytes");
        }
        assert!(read_batch_limit(None) < READ_BATCH, "before any chunk, the largest is assumed");
    }
}
