//! The receiver's side of the conversation: one request at a time from
//! stdin, answers on stdout. It exits on end of input or a broken pipe
//! (qrexec does not kill a service whose caller died), and any fatal error is
//! sent to dom0 as `Response::Error` before exiting non-zero.

use crate::archive::Archive;
use crate::chunk_source::ChunkSource;
use crate::prune::{self, Prune};
use crate::session_writer::SessionWriter;
use crate::writer_thread::QueuedSession;
use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::msg::{MAX_KEY_FILE, META_PIECE};
use sparsebak_proto::{read_msg, write_msg, MetaFile, Request, Response, PROTOCOL_VERSION};
use std::io::{BufReader, BufWriter, Read, Seek, Write};

/// A failed conversation; `reported` when dom0 already got the message (so
/// it is not printed twice on the user's terminal).
pub struct ServeError {
    pub error: anyhow::Error,
    pub reported: bool,
}

pub fn serve_stdio() -> Result<(), ServeError> {
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    serve(BufReader::with_capacity(1 << 20, stdin), BufWriter::with_capacity(1 << 20, stdout))
}

pub fn serve<R: Read, W: Write>(mut input: R, mut output: W) -> Result<(), ServeError> {
    let mut server = Server { archive: None, writer: None, prune: None, chunks: ChunkSource::default() };
    loop {
        let req: Request = match read_msg(&mut input) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()), // dom0 closed the conversation
            Err(e) => return fail(&mut output, anyhow!("reading request: {e}")),
        };
        let flush_after =
            !matches!(req, Request::PutChunk { .. } | Request::PutMeta { .. } | Request::PruneLink { .. });
        match server.handle(req) {
            Ok(Some(resp)) => {
                if write_msg(&mut output, &resp).is_err() {
                    return Ok(()); // dom0 went away: nothing more to do
                }
            }
            Ok(None) => {}
            Err(e) => return fail(&mut output, e),
        }
        if flush_after && output.flush().is_err() {
            return Ok(());
        }
    }
}

/// Tells dom0 why we stop, then returns the error for our exit status.
fn fail<W: Write>(output: &mut W, error: anyhow::Error) -> Result<(), ServeError> {
    let reported = write_msg(output, &Response::Error(format!("{error:#}"))).is_ok() && output.flush().is_ok();
    Err(ServeError { error, reported })
}

struct Server {
    archive: Option<Archive>,
    writer: Option<QueuedSession>,
    /// A prune between `PruneBegin` and `PruneLinked`.
    prune: Option<Prune>,
    chunks: ChunkSource,
}

impl Server {
    fn archive(&self) -> Result<&Archive> {
        self.archive.as_ref().context("protocol error: request before Hello")
    }

    fn writer(&mut self) -> Result<&mut QueuedSession> {
        self.writer.as_mut().context("protocol error: no open session")
    }

    fn handle(&mut self, req: Request) -> Result<Option<Response>> {
        Ok(match req {
            Request::Hello { version, dest } => {
                if version != PROTOCOL_VERSION {
                    bail!("protocol version mismatch: dom0 speaks {version}, this receiver speaks {PROTOCOL_VERSION}; install matching sparsebak versions");
                }
                if self.archive.is_some() {
                    bail!("protocol error: second Hello");
                }
                self.archive = Some(Archive::open(&dest)?);
                Some(Response::Ready { version: PROTOCOL_VERSION })
            }
            Request::ListSessions { volume } => Some(Response::Sessions(self.archive()?.list_sessions(&volume)?)),
            Request::BeginSession { volume, session, format } => {
                if self.writer.is_some() || self.prune.is_some() {
                    bail!("protocol error: a session or prune is already open");
                }
                let writer = SessionWriter::begin(self.archive()?, &volume, &session, format)?;
                self.writer = Some(QueuedSession::start(writer)?);
                Some(Response::Done)
            }
            Request::PutChunk { addr, data } => {
                self.writer()?.put_chunk(addr, data)?;
                None
            }
            Request::PutMeta { file, data } => {
                if data.len() > sparsebak_proto::msg::META_PIECE {
                    bail!("metadata piece of {} bytes is too large", data.len());
                }
                match &mut self.prune {
                    Some(p) => p.put_meta(file, &data)?,
                    None => self.writer()?.put_meta(file, data)?,
                }
                None
            }
            Request::Commit => {
                self.writer.take().context("protocol error: commit without a session")?.finish()?.commit()?;
                Some(Response::Done)
            }
            Request::ReadChunk { volume, session, addr } => {
                let dir = self.archive()?.session_dir(&volume, &session)?;
                Some(match self.chunks.read(&dir, addr) {
                    Ok(data) => Response::Chunk(data),
                    Err(e) => Response::ChunkError(format!("{e:#}")),
                })
            }
            Request::PruneBegin { volume, pruned, into } => {
                if self.writer.is_some() || self.prune.is_some() {
                    bail!("protocol error: a session or prune is already open");
                }
                self.chunks.forget();
                self.prune = Some(Prune::begin(self.archive()?, &volume, &pruned, &into)?);
                Some(Response::Done)
            }
            Request::PruneLink { addrs } => {
                self.prune.as_mut().context("protocol error: no prune open")?.add(&addrs)?;
                None
            }
            Request::PruneLinked => {
                let p = self.prune.take().context("protocol error: no prune open")?;
                let bytes = p.link(&mut self.chunks)?;
                Some(Response::Linked { bytes })
            }
            Request::PruneFinish { volume, pruned, into, info } => {
                if info.len() > sparsebak_proto::msg::META_PIECE {
                    bail!("info of {} bytes is too large", info.len());
                }
                self.chunks.forget();
                prune::finish(self.archive()?, &volume, &pruned, &into, &info)?;
                Some(Response::Done)
            }
            Request::PruneAbort { volume } => {
                self.chunks.forget();
                prune::abort(self.archive()?, &volume)?;
                Some(Response::Done)
            }
            Request::DeleteVolume { volume } => {
                self.chunks.forget();
                self.archive()?.delete_volume(&volume)?;
                Some(Response::Done)
            }
            Request::ReadMeta { volume, session, file, offset } => {
                let path = self.archive()?.session_dir(&volume, &session)?.join(file.file_name());
                Some(match read_piece(&path, offset, META_PIECE) {
                    Ok(data) => Response::Meta(data),
                    Err(e) => Response::ChunkError(format!("{e:#}")),
                })
            }
            Request::GetKey { pool } => {
                let path = self.archive()?.key_path(&pool)?;
                Some(Response::Key(match std::fs::metadata(&path) {
                    Ok(_) => Some(read_piece(&path, 0, MAX_KEY_FILE)?),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
                }))
            }
            Request::ReplaceInfo { volume, session, info } => {
                if self.writer.is_some() || self.prune.is_some() {
                    bail!("protocol error: a session or prune is open");
                }
                if info.len() > META_PIECE {
                    bail!("info of {} bytes is too large", info.len());
                }
                let dir = self.archive()?.session_dir(&volume, &session)?;
                if !dir.is_dir() {
                    bail!("{volume}: no committed session {session}");
                }
                sparsebak_fsutil::write_file_durably(&dir.join(MetaFile::Info.file_name()), &info)?;
                Some(Response::Done)
            }
            Request::PutKey { pool, data } => {
                if data.len() > MAX_KEY_FILE {
                    bail!("key file of {} bytes is too large", data.len());
                }
                sparsebak_fsutil::create_file_durably(&self.archive()?.key_path(&pool)?, &data)?;
                Some(Response::Done)
            }
        })
    }
}

/// Up to `max` bytes of a file from `offset` (empty at or past its end).
fn read_piece(path: &std::path::Path, offset: u64, max: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(std::io::SeekFrom::Start(offset)).with_context(|| format!("seeking in {}", path.display()))?;
    let mut data = Vec::new();
    f.take(max as u64).read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
    Ok(data)
}
