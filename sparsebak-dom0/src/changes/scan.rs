//! Which chunks of a volume a send (or resync) looks at, in address order,
//! paired with what the archive holds for each: [`ScanJobs`] feeds the chunk
//! pipeline.
//!
//! Two ways of choosing the chunks:
//! - [`Candidates::AllData`]: every chunk that may hold data (SEEK_DATA on
//!   sparse files; every chunk of a block device) plus every chunk where an
//!   older session stored data (it may have become zero). Everything else is
//!   a hole that was already a hole, so a sparse volume costs what its data
//!   costs.
//! - [`Candidates::Marked`]: the chunks marked in an LVM delta map, plus
//!   everything from the previous session's end on (a grown tail).

use crate::changes::DeltaMap;
use crate::chunk::{BufferPool, ChunkJob};
use crate::meta::{ChunkState, ManifestMerge, ManifestReader, MergedEntry};
use crate::source::ImageVolume;
use anyhow::Result;
use std::iter::Peekable;
use std::sync::Arc;

pub enum Candidates {
    AllData,
    Marked {
        map: DeltaMap,
        /// Chunks at or after this address are all candidates.
        tail_start: u64,
    },
}

pub struct ScanJobs<'a> {
    source: &'a mut ImageVolume,
    previous: PreviousLookup,
    candidates: Candidates,
    chunk_size: u64,
    size: u64,
    next: u64,
    force_store: bool,
    /// Chunks are read into these; they come back when the workers are
    /// done with them.
    buffers: Arc<BufferPool>,
}

impl<'a> ScanJobs<'a> {
    /// `previous` is the merged manifest of the sessions so far;
    /// `force_store` stores data even where it matches them.
    pub fn new(
        source: &'a mut ImageVolume,
        previous: ManifestMerge<ManifestReader>,
        candidates: Candidates,
        chunk_size: u64,
        force_store: bool,
    ) -> ScanJobs<'a> {
        let size = source.size();
        ScanJobs {
            source,
            previous: PreviousLookup { merged: previous.peekable() },
            candidates,
            chunk_size,
            size,
            next: 0,
            force_store,
            buffers: BufferPool::new(),
        }
    }

    /// The next candidate address at or after `self.next`.
    fn next_candidate(&mut self) -> Result<u64> {
        let cs = self.chunk_size;
        Ok(match &self.candidates {
            Candidates::AllData => {
                let data_at = self.source.next_data(self.next)? / cs * cs;
                data_at.min(self.previous.next_stored_from(self.next)?)
            }
            Candidates::Marked { map, tail_start } => {
                let marked = map.next_marked(self.next / cs).map_or(u64::MAX, |i| i.saturating_mul(cs));
                marked.min(*tail_start / cs * cs)
            }
        }
        .max(self.next))
    }

    fn next_job(&mut self) -> Result<Option<ChunkJob>> {
        if self.next >= self.size {
            return Ok(None);
        }
        let addr = self.next_candidate()?;
        if addr >= self.size {
            self.next = self.size;
            return Ok(None);
        }
        self.next = addr + self.chunk_size;
        let len = self.chunk_size.min(self.size - addr) as usize;
        let mut buf = self.buffers.take(len);
        let data = self.source.read_chunk_into(addr, &mut buf)?.then_some(buf);
        Ok(Some(ChunkJob { addr, data, previous: self.previous.at(addr)?, force_store: self.force_store }))
    }
}

impl Iterator for ScanJobs<'_> {
    type Item = Result<ChunkJob>;

    fn next(&mut self) -> Option<Self::Item> {
        let r = self.next_job().transpose();
        if matches!(r, Some(Err(_))) {
            self.next = self.size;
        }
        r
    }
}

/// Walks the merged manifest of the sessions so far alongside the scan.
struct PreviousLookup {
    merged: Peekable<ManifestMerge<ManifestReader>>,
}

impl PreviousLookup {
    /// Drops entries before `addr`; the next entry is then at or after it.
    fn skip_before(&mut self, addr: u64) -> Result<()> {
        while let Some(peeked) = self.merged.peek() {
            match peeked {
                Ok(m) if m.entry.addr >= addr => break,
                Ok(_) => {
                    self.merged.next();
                }
                Err(_) => {
                    if let Some(Err(e)) = self.merged.next() {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// The newest entry at exactly `addr` (`None`: zero so far).
    fn at(&mut self, addr: u64) -> Result<Option<ChunkState>> {
        self.skip_before(addr)?;
        Ok(match self.merged.peek() {
            Some(Ok(m)) if m.entry.addr == addr => Some(m.entry.state),
            _ => None,
        })
    }

    /// The address of the first stored (non-zero) entry at or after `addr`.
    fn next_stored_from(&mut self, addr: u64) -> Result<u64> {
        self.skip_before(addr)?;
        loop {
            match self.merged.peek() {
                None => return Ok(u64::MAX),
                Some(Ok(MergedEntry { entry, .. })) if matches!(entry.state, ChunkState::Stored { .. }) => {
                    return Ok(entry.addr)
                }
                Some(Ok(_)) => {
                    self.merged.next();
                }
                Some(Err(_)) => {
                    if let Some(Err(e)) = self.merged.next() {
                        return Err(e);
                    }
                }
            }
        }
    }
}
