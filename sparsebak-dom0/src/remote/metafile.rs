//! Moving a session's metadata files (info, manifest) to and from the
//! archive, piece by piece so that no file is ever held whole.
//!
//! In an encrypted archive every piece is sealed on its own, bound to volume,
//! session, file, piece index and whether it is the last piece: a sealed
//! piece is exactly [`META_PIECE`] bytes except the last, so reading back
//! knows where each piece ends, and a file truncated anywhere (even at a
//! piece boundary) or spliced from other files fails to open. An unencrypted
//! archive stores the plain bytes.

use crate::crypto::{Aad, Keys, SEAL_OVERHEAD};
use crate::remote::Receiver;
use anyhow::{bail, Context, Result};
use sparsebak_proto::msg::META_PIECE;
use sparsebak_proto::{MetaFile, VolumeRef};
use std::io::Read;
use std::path::Path;

/// A metadata file that is missing, altered or different from dom0's: a
/// finding about the archive, after which the conversation can go on (any
/// other error means the conversation itself failed).
#[derive(Debug)]
pub struct BadMeta(pub String);

impl std::fmt::Display for BadMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadMeta {}

fn bad(msg: String) -> anyhow::Error {
    anyhow::Error::new(BadMeta(msg))
}

/// Which metadata file of which session.
#[derive(Clone, Copy)]
pub struct MetaRef<'a> {
    pub keys: Option<&'a Keys>,
    pub volume: &'a VolumeRef,
    pub session: &'a str,
    pub file: MetaFile,
}

impl MetaRef<'_> {
    fn plain_piece(&self) -> usize {
        if self.keys.is_some() {
            META_PIECE - SEAL_OVERHEAD
        } else {
            META_PIECE
        }
    }

    fn aad(&self, index: u64, last: bool) -> Aad<'_> {
        Aad::Meta { volume: self.volume, session: self.session, file: self.file, index, last }
    }

    fn label(&self) -> String {
        format!("{} of {} session {}", self.file.file_name(), self.volume.name, self.session)
    }
}

/// Sends dom0's file at `path` into the open session (at least one piece,
/// so even an empty manifest exists in the archive).
pub fn send(rx: &mut Receiver, m: MetaRef, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut read_piece = || -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(m.plain_piece());
        (&mut f)
            .take(m.plain_piece() as u64)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(buf)
    };
    let mut current = read_piece()?;
    for index in 0u64.. {
        // One piece of look-ahead tells whether `current` is the last.
        let next = if current.len() == m.plain_piece() { read_piece()? } else { Vec::new() };
        let last = next.is_empty();
        let data = match m.keys {
            Some(k) => k.seal(&m.aad(index, last), &current)?,
            None => current,
        };
        rx.put_meta(m.file, data)?;
        if last {
            break;
        }
        current = next;
    }
    Ok(())
}

/// A small metadata file (an info) as the archive stores it, in one piece:
/// for messages that carry a whole file (prune's `PruneFinish`).
pub fn seal_single(m: MetaRef, data: Vec<u8>) -> Result<Vec<u8>> {
    if data.len() > m.plain_piece() {
        bail!("{} of {} bytes does not fit in one piece", m.label(), data.len());
    }
    match m.keys {
        Some(k) => k.seal(&m.aad(0, true), &data),
        None => Ok(data),
    }
}

/// Fetches a committed session's file from the archive and hands its
/// (opened) pieces to `sink`, refusing more than `max_len` bytes.
pub fn fetch(rx: &mut Receiver, m: MetaRef, max_len: u64, sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let too_large = || bad(format!("{} is larger than {max_len} bytes", m.label()));
    fetch_bounded(rx, m, max_len, too_large, sink)
}

/// [`fetch`], with the error for a file longer than `max_len`.
fn fetch_bounded(
    rx: &mut Receiver,
    m: MetaRef,
    max_len: u64,
    too_large: impl Fn() -> anyhow::Error,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut read_at = |offset: u64| -> Result<Vec<u8>> {
        if offset > max_len + META_PIECE as u64 {
            return Err(too_large());
        }
        match rx.read_meta(m.volume, m.session, m.file, offset)? {
            Ok(d) if d.len() <= META_PIECE => Ok(d),
            Ok(d) => bail!("{}: the receiver sent a piece of {} bytes", m.label(), d.len()),
            Err(why) => Err(bad(format!("{} is missing or unreadable in the archive ({why})", m.label()))),
        }
    };
    let mut current = read_at(0)?;
    let mut total = 0u64;
    for index in 0u64.. {
        let full = current.len() == META_PIECE;
        let next = if full { read_at((index + 1) * META_PIECE as u64)? } else { Vec::new() };
        let last = next.is_empty();
        let plain = match m.keys {
            Some(k) => k.open(&m.aad(index, last), &current).map_err(|e| {
                bad(format!("{} in the archive: piece {index}: {e} (truncated, altered or replaced?)", m.label()))
            })?,
            None => current,
        };
        total += plain.len() as u64;
        if total > max_len {
            return Err(too_large());
        }
        sink(&plain)?;
        if last {
            return Ok(());
        }
        current = next;
    }
    Ok(())
}

/// Checks that the archive's copy of a metadata file says exactly what
/// dom0's own copy at `path` says.
pub fn compare(rx: &mut Receiver, m: MetaRef, path: &Path) -> Result<()> {
    let mut mine =
        std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let len = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
    let mut buf = Vec::new();
    let longer = || bad(format!("{} in the archive differs from dom0's record (it is longer)", m.label()));
    fetch_bounded(rx, m, len, longer, |piece| {
        buf.resize(piece.len(), 0);
        mine.read_exact(&mut buf).map_err(|_| longer())?;
        if buf != piece {
            return Err(bad(format!("{} in the archive differs from dom0's record", m.label())));
        }
        Ok(())
    })?;
    let mut rest = [0u8; 1];
    if mine.read(&mut rest).with_context(|| format!("reading {}", path.display()))? != 0 {
        return Err(bad(format!(
            "{} in the archive differs from dom0's record (it is shorter: truncated?)",
            m.label()
        )));
    }
    Ok(())
}
