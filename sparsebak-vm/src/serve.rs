//! The receiver's side of the conversation: one request at a time from
//! stdin, answers on stdout. It exits on end of input or a broken pipe
//! (qrexec does not kill a service whose caller died), and any fatal error is
//! sent to dom0 as `Response::Error` before exiting non-zero.

use crate::archive::{chunk_path, Archive};
use crate::session_writer::SessionWriter;
use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::{read_msg, write_msg, Request, Response, PROTOCOL_VERSION};
use std::io::{BufReader, BufWriter, Read, Write};

/// Largest chunk file the receiver will send back; matches the frame cap
/// with room for the message header.
const MAX_CHUNK_FILE: u64 = (sparsebak_proto::MAX_FRAME - 64) as u64;

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
    let mut server = Server { archive: None, writer: None };
    loop {
        let req: Request = match read_msg(&mut input) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()), // dom0 closed the conversation
            Err(e) => return fail(&mut output, anyhow!("reading request: {e}")),
        };
        let flush_after = !matches!(req, Request::PutChunk { .. } | Request::PutMeta { .. });
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
    writer: Option<SessionWriter>,
}

impl Server {
    fn archive(&self) -> Result<&Archive> {
        self.archive.as_ref().context("protocol error: request before Hello")
    }

    fn writer(&mut self) -> Result<&mut SessionWriter> {
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
            Request::BeginSession { volume, session } => {
                if self.writer.is_some() {
                    bail!("protocol error: a session is already open");
                }
                self.writer = Some(SessionWriter::begin(self.archive()?, &volume, &session)?);
                Some(Response::Done)
            }
            Request::PutChunk { addr, data } => {
                self.writer()?.put_chunk(addr, &data)?;
                None
            }
            Request::PutMeta { file, data } => {
                if data.len() > sparsebak_proto::msg::META_PIECE {
                    bail!("metadata piece of {} bytes is too large", data.len());
                }
                self.writer()?.put_meta(file, &data)?;
                None
            }
            Request::Commit => {
                self.writer.take().context("protocol error: commit without a session")?.commit()?;
                Some(Response::Done)
            }
            Request::ReadChunk { volume, session, addr } => {
                let dir = self.archive()?.session_dir(&volume, &session)?;
                Some(match read_chunk_file(&chunk_path(&dir, addr)) {
                    Ok(data) => Response::Chunk(data),
                    Err(e) => Response::ChunkError(format!("{e:#}")),
                })
            }
        })
    }
}

fn read_chunk_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().with_context(|| format!("stat {}", path.display()))?.len();
    if len > MAX_CHUNK_FILE {
        bail!("{} is {len} bytes, larger than any chunk", path.display());
    }
    let mut data = Vec::with_capacity(len as usize);
    f.take(MAX_CHUNK_FILE).read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
    Ok(data)
}
