//! A session's content as a readable image, for the NBD export: exactly what
//! `receive` would write, read on demand.
//!
//! - Which chunk lies where comes from dom0's own manifests, merged up to the
//!   session, written once into an index: an unnamed temporary file in the
//!   volume's metadata folder with one fixed-size record per chunk entry
//!   ([`RECORD`] bytes, sorted by address), searched with `pread`. Memory does
//!   not grow with the volume; disk use is [`RECORD`] bytes per recorded
//!   chunk while the export runs (about 77 MiB for 100 GiB at 128 KiB chunks
//!   if every chunk holds data), and the file vanishes with the process.
//! - Zero chunks and holes are served without asking the receiver.
//! - A stored chunk is asked of the receiver, its stored bytes checked before
//!   they are opened and decompressed, and its plaintext hash checked
//!   (`chunk::unpack`, as `receive` does). A bad chunk fails that read with
//!   EIO and is logged with volume, session and address; it never serves
//!   wrong data.
//! - Decoded chunks are kept in a small cache ([`CACHE_BYTES`]); reads that
//!   continue where the last one ended fetch up to [`PREFETCH`] chunks ahead
//!   in one batch (requests pipelined over the pipe), so a full sequential
//!   read costs one round trip per batch.

use super::nbd::{Export, EIO};
use crate::chunk::{self, ChunkCodec};
use crate::crypto::Keys;
use crate::meta::{ChunkState, MergedEntry, Origin, SessionId, VolumeMeta};
use crate::remote::{ChunkAnswer, Receiver};
use anyhow::{bail, Context, Result};
use sparsebak_proto::VolumeRef;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Bytes of one index record: address, session index, kind, plaintext
/// hash, stored hash, origin.
const RECORD: usize = 8 + 4 + 1 + 32 + 32 + 17;
/// Decoded chunks kept.
const CACHE_BYTES: usize = 32 << 20;
/// Chunks fetched ahead of a sequential read.
const PREFETCH: u64 = 32;

/// One index record, decoded.
struct Located {
    session: usize,
    state: ChunkState,
}

/// The merged manifests of a session, on disk.
struct ChunkIndex {
    file: File,
    records: u64,
}

impl ChunkIndex {
    fn build(vm: &VolumeMeta, merged: impl Iterator<Item = Result<MergedEntry>>, size: u64) -> Result<ChunkIndex> {
        let file = unnamed_file(vm.dir())?;
        let mut out = BufWriter::new(&file);
        let mut records = 0u64;
        for entry in merged {
            let MergedEntry { entry, session } = entry?;
            if entry.addr >= size {
                continue;
            }
            let mut rec = [0u8; RECORD];
            rec[..8].copy_from_slice(&entry.addr.to_be_bytes());
            rec[8..12].copy_from_slice(&u32::try_from(session).context("too many sessions")?.to_be_bytes());
            if let ChunkState::Stored { plain, stored, origin } = entry.state {
                rec[12] = if origin.is_some() { 2 } else { 1 };
                rec[13..45].copy_from_slice(&plain);
                rec[45..77].copy_from_slice(&stored);
                if let Some(o) = origin {
                    rec[77..].copy_from_slice(o.as_str().as_bytes());
                }
            }
            out.write_all(&rec).context("writing the export's chunk index")?;
            records += 1;
        }
        out.flush().context("writing the export's chunk index")?;
        drop(out);
        Ok(ChunkIndex { file, records })
    }

    fn record(&self, i: u64) -> Result<[u8; RECORD]> {
        let mut rec = [0u8; RECORD];
        self.file.read_exact_at(&mut rec, i * RECORD as u64).context("reading the export's chunk index")?;
        Ok(rec)
    }

    /// The entry at chunk address `addr`, if any session recorded one.
    fn find(&self, addr: u64) -> Result<Option<Located>> {
        let (mut lo, mut hi) = (0, self.records);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let rec = self.record(mid)?;
            let at = u64::from_be_bytes(rec[..8].try_into().unwrap_or_default());
            if at == addr {
                return decode(&rec).map(Some);
            }
            if at < addr {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(None)
    }
}

fn decode(rec: &[u8; RECORD]) -> Result<Located> {
    let session = u32::from_be_bytes(rec[8..12].try_into().unwrap_or_default()) as usize;
    let hash = |r: std::ops::Range<usize>| -> [u8; 32] { rec[r].try_into().unwrap_or_default() };
    let state = match rec[12] {
        0 => ChunkState::Zero,
        kind => ChunkState::Stored {
            plain: hash(13..45),
            stored: hash(45..77),
            origin: match kind {
                2 => Some(Origin::new(std::str::from_utf8(&rec[77..]).context("origin in the chunk index")?)?),
                _ => None,
            },
        },
    };
    Ok(Located { session, state })
}

/// A file nobody else can open, gone when closed (O_TMPFILE; where the
/// filesystem lacks it, a named file removed at once).
fn unnamed_file(dir: &std::path::Path) -> Result<File> {
    let open =
        std::fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(nix::libc::O_TMPFILE).open(dir);
    match open {
        Ok(f) => Ok(f),
        Err(_) => {
            let path = dir.join(format!(".export-index-{}", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            Ok(f)
        }
    }
}

/// What the workers that open fetched chunks need (the image itself holds
/// the receiver, which stays on the serving thread).
struct Opener<'a> {
    keys: Option<&'a Keys>,
    volume: &'a VolumeRef,
    sessions: &'a [SessionId],
    size: u64,
    chunk_size: u64,
}

impl Opener<'_> {
    /// One fetched chunk checked and opened as `receive` does.
    fn open(&self, job: &mut ((u64, Located), ChunkAnswer)) -> (u64, Result<Vec<u8>, String>) {
        let ((addr, loc), answer) = job;
        let len = self.chunk_size.min(self.size - *addr) as usize;
        let session = self.sessions[loc.session].as_str();
        let origin = match &loc.state {
            ChunkState::Stored { origin: Some(o), .. } => o.as_str(),
            _ => session,
        };
        let codec = ChunkCodec { keys: self.keys, volume: self.volume };
        let result = match answer {
            Ok(data) => chunk::unpack(std::mem::take(data), &loc.state, len, &codec, origin, *addr, <[u8]>::to_vec)
                .map_err(|e| e.to_string()),
            Err(why) => Err(format!("missing or unreadable in the archive ({why})")),
        };
        (*addr, result)
    }
}

/// What the export serves.
pub struct SessionImage<'k> {
    name: String,
    volume: VolumeRef,
    keys: Option<&'k Keys>,
    /// Sessions up to the exported one, oldest first (index records refer
    /// to them by position).
    sessions: Vec<SessionId>,
    size: u64,
    chunk_size: u64,
    index: ChunkIndex,
    rx: Receiver,
    /// Decoded chunks, newest at the back.
    cache: VecDeque<(u64, Vec<u8>)>,
    /// Where the last read ended (for prefetching).
    last_end: u64,
}

impl<'k> SessionImage<'k> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        vm: &VolumeMeta,
        volume: VolumeRef,
        keys: Option<&'k Keys>,
        sessions: Vec<SessionId>,
        size: u64,
        chunk_size: u64,
        rx: Receiver,
    ) -> Result<SessionImage<'k>> {
        if chunk_size == 0 || chunk_size > sparsebak_proto::msg::MAX_CHUNK_SIZE {
            bail!("bad chunk size {chunk_size}");
        }
        let index = ChunkIndex::build(vm, vm.merged(&sessions)?, size)?;
        Ok(SessionImage {
            name: name.to_string(),
            volume,
            keys,
            sessions,
            size,
            chunk_size,
            index,
            rx,
            cache: VecDeque::new(),
            last_end: u64::MAX,
        })
    }

    /// Ends the conversation with the receiver.
    pub fn finish(self) -> Result<()> {
        self.rx.finish()
    }

    fn cached(&self, addr: u64) -> Option<&[u8]> {
        self.cache.iter().rev().find(|(a, _)| *a == addr).map(|(_, d)| d.as_slice())
    }

    fn remember(&mut self, addr: u64, data: Vec<u8>) {
        self.cache.push_back((addr, data));
        let mut total: usize = self.cache.iter().map(|(_, d)| d.len()).sum();
        while total > CACHE_BYTES {
            match self.cache.pop_front() {
                Some((_, d)) => total -= d.len(),
                None => break,
            }
        }
    }

    /// Fetches, checks and caches the stored chunks among `addrs` that are
    /// not cached yet, in one pipelined batch. Returns the first chunk of
    /// `must` (the addresses the current read needs) that failed.
    fn fetch(&mut self, addrs: &[u64], must: std::ops::Range<u64>) -> Result<Option<String>> {
        let mut wanted = Vec::new();
        for &addr in addrs {
            if self.cached(addr).is_some() {
                continue;
            }
            if let Some(loc) = self.index.find(addr)? {
                if matches!(loc.state, ChunkState::Stored { .. }) {
                    wanted.push((addr, loc));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let requests: Vec<(&str, u64)> =
            wanted.iter().map(|(addr, loc)| (self.sessions[loc.session].as_str(), *addr)).collect();
        let max_len = chunk::max_stored_len(usize::try_from(self.chunk_size).unwrap_or(usize::MAX));
        let answers = self.rx.read_chunks(&self.volume, &requests, max_len)?;
        let mut jobs: Vec<_> = wanted.into_iter().zip(answers).collect();
        // Checking, opening and decompressing is the costly part: one
        // worker per core, each on its share of the batch.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
        let per_worker = jobs.len().div_ceil(workers);
        let opener = Opener {
            keys: self.keys,
            volume: &self.volume,
            sessions: &self.sessions,
            size: self.size,
            chunk_size: self.chunk_size,
        };
        let opener = &opener;
        let results: Vec<(u64, Result<Vec<u8>, String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .chunks_mut(per_worker.max(1))
                .map(|share| scope.spawn(move || share.iter_mut().map(|job| opener.open(job)).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        let mut failure = None;
        let mut decoded = Vec::new();
        for (addr, result) in results {
            match result {
                Ok(plain) => decoded.push((addr, plain)),
                Err(why) if must.contains(&addr) => {
                    let line = format!(
                        "{} session {} chunk x{addr:016x}: {why}",
                        self.name,
                        self.sessions.last().map_or("?", |s| s.date_time())
                    );
                    log::error!("{line}");
                    failure.get_or_insert(line);
                }
                Err(_) => {} // a prefetched chunk: it fails when it is read
            }
        }
        for (addr, plain) in decoded {
            self.remember(addr, plain);
        }
        Ok(failure)
    }

    fn read_range(&mut self, offset: u64, buf: &mut [u8]) -> Result<Result<(), u32>> {
        let cs = self.chunk_size;
        let end = offset + buf.len() as u64;
        let first = offset / cs * cs;
        let mut addrs: Vec<u64> = (first..end).step_by(cs as usize).collect();
        let must = first..end;
        if offset == self.last_end {
            let after = end.div_ceil(cs) * cs;
            addrs.extend((0..PREFETCH).map(|i| after + i * cs).filter(|a| *a < self.size));
        }
        self.last_end = end;
        if self.fetch(&addrs, must)?.is_some() {
            return Ok(Err(EIO));
        }
        let mut at = offset;
        while at < end {
            let addr = at / cs * cs;
            let within = (at - addr) as usize;
            let n = ((addr + cs).min(end) - at) as usize;
            let out = &mut buf[(at - offset) as usize..][..n];
            match self.cached(addr) {
                Some(data) => out.copy_from_slice(&data[within..within + n]),
                None => match self.index.find(addr)? {
                    // Not stored: zeros (an all-zero chunk, or a hole).
                    Some(Located { state: ChunkState::Zero, .. }) | None => out.fill(0),
                    // Evicted by its own batch (a huge read): fetch alone.
                    Some(_) => {
                        if self.fetch(&[addr], addr..addr + 1)?.is_some() {
                            return Ok(Err(EIO));
                        }
                        match self.cached(addr) {
                            Some(data) => out.copy_from_slice(&data[within..within + n]),
                            None => return Ok(Err(EIO)),
                        }
                    }
                },
            }
            at += n as u64;
        }
        Ok(Ok(()))
    }
}

impl Export for SessionImage<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn preferred_block(&self) -> u32 {
        u32::try_from(self.chunk_size).unwrap_or(u32::MAX)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), u32> {
        match self.read_range(offset, buf) {
            Ok(r) => r,
            Err(e) => {
                // The receiver or the index failed: this read fails; the
                // next one will tell whether the export can go on.
                log::error!("{}: {e:#}", self.name);
                Err(EIO)
            }
        }
    }
}
