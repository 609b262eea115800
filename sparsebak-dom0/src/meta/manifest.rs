//! Manifests: one line per chunk recorded in a session, sorted by address.
//!
//! ```text
//! <hash of plaintext> <hash of stored bytes> x<16 hex digits of address>
//! 0 0 x<address>                      (an all-zero chunk, not stored)
//! <plain> <stored> x<address> S_YYYYMMDD-HHMMSS   (stored in another session first)
//! ```
//!
//! Unencrypted archives use SHA-256 for both. In an encrypted archive the
//! plaintext hash is keyed (with a subkey of the data key), so manifests
//! reveal nothing about content, and the "stored" hash is the seal's id
//! in archives made today; which hashes it uses is fixed with its key
//! (`crate::crypto::ChunkHash`). The
//! optional fourth field is the chunk's origin: the session it was first
//! stored in, whose name is bound into the chunk's seal. It is written only
//! where the origin differs from the session holding the manifest (prune
//! moves chunk files into newer sessions without rewriting them).
//!
//! The plaintext hash detects changes (and checks decompression). Before
//! decompressing a chunk from the receiver, dom0 checks it against the
//! stored hash in an unencrypted archive; in an encrypted one against the
//! AEAD tag, and the seal id too where the manifest has one (a version 1
//! or 2 manifest's hash of all the stored bytes is not computed again).
//! Manifests are read and merged as sorted streams, never as whole-volume
//! tables.

use anyhow::{anyhow, bail, Context, Result};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

pub type Hash = [u8; 32];

/// What a manifest records for one chunk address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// All zeros: nothing stored, restored as a hole.
    Zero,
    Stored {
        plain: Hash,
        stored: Hash,
        /// The session the chunk was first stored in, when it is not the
        /// session whose manifest holds this entry.
        origin: Option<Origin>,
    },
}

/// A session name (`S_YYYYMMDD-HHMMSS`) as a small copyable value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin([u8; 17]);

impl Origin {
    pub fn new(session: &str) -> Result<Origin> {
        sparsebak_proto::names::validate_session_name(session)?;
        let bytes: [u8; 17] = session.as_bytes().try_into().map_err(|_| anyhow!("bad session name {session:?}"))?;
        Ok(Origin(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Validated ASCII on construction.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestEntry {
    pub addr: u64,
    pub state: ChunkState,
}

impl ManifestEntry {
    pub fn to_line(self) -> String {
        let addr = sparsebak_proto::layout::addr_token(self.addr);
        match self.state {
            ChunkState::Zero => format!("0 0 {addr}\n"),
            ChunkState::Stored { plain, stored, origin: None } => {
                format!("{} {} {addr}\n", hex(&plain), hex(&stored))
            }
            ChunkState::Stored { plain, stored, origin: Some(o) } => {
                format!("{} {} {addr} {}\n", hex(&plain), hex(&stored), o.as_str())
            }
        }
    }

    pub fn parse_line(line: &str) -> Result<ManifestEntry> {
        let mut parts = line.split(' ');
        let (Some(plain), Some(stored), Some(addr), origin, None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("bad manifest line {line:?}");
        };
        let addr = sparsebak_proto::layout::parse_addr_token(addr)
            .ok_or_else(|| anyhow!("bad chunk address in manifest line {line:?}"))?;
        let origin = origin.map(Origin::new).transpose().with_context(|| format!("manifest line {line:?}"))?;
        let state = match (plain, stored, origin) {
            ("0", "0", None) => ChunkState::Zero,
            ("0", "0", Some(_)) => bail!("zero chunk with an origin in manifest line {line:?}"),
            _ => ChunkState::Stored { plain: unhex(plain)?, stored: unhex(stored)?, origin },
        };
        Ok(ManifestEntry { addr, state })
    }
}

pub fn hex(h: &Hash) -> String {
    crate::hex::encode(h)
}

fn unhex(s: &str) -> Result<Hash> {
    crate::hex::decode(s)
        .ok()
        .and_then(|v| Hash::try_from(v.as_slice()).ok())
        .ok_or_else(|| anyhow!("bad hash {s:?} in manifest"))
}

/// Writes a manifest, enforcing strictly increasing addresses.
pub struct ManifestWriter {
    out: BufWriter<File>,
    last: Option<u64>,
    path: std::path::PathBuf,
}

impl ManifestWriter {
    pub fn create(path: &Path) -> Result<ManifestWriter> {
        let f = File::create(path).with_context(|| format!("creating manifest {}", path.display()))?;
        Ok(ManifestWriter { out: BufWriter::with_capacity(1 << 16, f), last: None, path: path.to_path_buf() })
    }

    pub fn push(&mut self, e: &ManifestEntry) -> Result<()> {
        if self.last.is_some_and(|l| l >= e.addr) {
            bail!("manifest {}: address {:#x} out of order", self.path.display(), e.addr);
        }
        self.last = Some(e.addr);
        self.out.write_all(e.to_line().as_bytes()).with_context(|| format!("writing manifest {}", self.path.display()))
    }

    /// Flushes and fsyncs.
    pub fn finish(self) -> Result<()> {
        let f =
            self.out.into_inner().map_err(|e| anyhow!("writing manifest {}: {}", self.path.display(), e.error()))?;
        f.sync_all().with_context(|| format!("syncing manifest {}", self.path.display()))
    }
}

/// Streams the entries of one manifest file, checking their order.
pub struct ManifestReader {
    lines: std::io::Lines<BufReader<File>>,
    last: Option<u64>,
    path: std::path::PathBuf,
}

impl ManifestReader {
    pub fn open(path: &Path) -> Result<ManifestReader> {
        let f = File::open(path).with_context(|| format!("opening manifest {}", path.display()))?;
        Ok(ManifestReader { lines: BufReader::with_capacity(1 << 16, f).lines(), last: None, path: path.to_path_buf() })
    }
}

impl Iterator for ManifestReader {
    type Item = Result<ManifestEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        let line = self.lines.next()?;
        let parsed = line
            .map_err(anyhow::Error::from)
            .and_then(|l| ManifestEntry::parse_line(&l))
            .and_then(|e| {
                if self.last.is_some_and(|l| l >= e.addr) {
                    bail!("address {:#x} out of order", e.addr);
                }
                self.last = Some(e.addr);
                Ok(e)
            })
            .with_context(|| format!("manifest {}", self.path.display()));
        Some(parsed)
    }
}

/// An entry of a merged view, with the index of the session that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergedEntry {
    pub entry: ManifestEntry,
    pub session: usize,
}

/// K-way merge of sorted manifests, oldest first: for each address the
/// newest session's entry wins. Memory is one entry per session.
pub struct ManifestMerge<I> {
    sources: Vec<I>,
    /// (address, newest first, source index); min-heap via Reverse.
    heap: BinaryHeap<Reverse<(u64, Reverse<usize>)>>,
    heads: Vec<Option<ManifestEntry>>,
    failed: bool,
}

impl<I: Iterator<Item = Result<ManifestEntry>>> ManifestMerge<I> {
    /// `sources[i]` is session i; higher index = newer.
    pub fn new(sources: Vec<I>) -> Result<Self> {
        let mut m = ManifestMerge { heads: vec![None; sources.len()], sources, heap: BinaryHeap::new(), failed: false };
        for i in 0..m.sources.len() {
            m.advance(i)?;
        }
        Ok(m)
    }

    fn advance(&mut self, i: usize) -> Result<()> {
        self.heads[i] = self.sources[i].next().transpose()?;
        if let Some(e) = &self.heads[i] {
            self.heap.push(Reverse((e.addr, Reverse(i))));
        }
        Ok(())
    }

    fn next_merged(&mut self) -> Result<Option<MergedEntry>> {
        let Some(Reverse((addr, Reverse(winner)))) = self.heap.pop() else {
            return Ok(None);
        };
        // Heap order puts the highest index (newest) first among equal addresses.
        let entry = self.heads[winner].take().context("merge head missing")?;
        self.advance(winner)?;
        while let Some(Reverse((a, Reverse(older)))) = self.heap.peek().copied() {
            if a != addr {
                break;
            }
            self.heap.pop();
            self.heads[older] = None;
            self.advance(older)?;
        }
        Ok(Some(MergedEntry { entry, session: winner }))
    }
}

impl<I: Iterator<Item = Result<ManifestEntry>>> Iterator for ManifestMerge<I> {
    type Item = Result<MergedEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.next_merged().transpose();
        if matches!(r, Some(Err(_))) {
            self.failed = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(addr: u64, tag: u8) -> ManifestEntry {
        ManifestEntry { addr, state: ChunkState::Stored { plain: [tag; 32], stored: [tag ^ 0xff; 32], origin: None } }
    }

    fn zero(addr: u64) -> ManifestEntry {
        ManifestEntry { addr, state: ChunkState::Zero }
    }

    #[test]
    fn lines_round_trip_and_reject_garbage() {
        let mut moved = stored(0x40000, 9);
        if let ChunkState::Stored { origin, .. } = &mut moved.state {
            *origin = Some(Origin::new("S_20261129-083000").expect("valid"));
        }
        assert!(moved.to_line().ends_with(" S_20261129-083000\n"));
        for e in [stored(0x20000, 7), zero(0), moved] {
            let line = e.to_line();
            assert_eq!(ManifestEntry::parse_line(line.trim_end()).expect("parses"), e);
        }
        for bad in [
            "",
            "0 0",
            "0 0 x12",
            "0 0 x000000000000000g",
            "zz 0 x0000000000000000",
            "0 0 x0000000000000000 extra",
            "0 0 x0000000000000000 S_20261129-083000",
        ] {
            assert!(ManifestEntry::parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn merge_newest_wins() {
        let s0 = vec![stored(0, 1), stored(10, 1), stored(20, 1)];
        let s1 = vec![zero(10), stored(30, 2)];
        let s2 = vec![stored(20, 3), stored(30, 3)];
        let sources = [s0, s1, s2].into_iter().map(|v| v.into_iter().map(Ok)).collect();
        let got: Vec<MergedEntry> = ManifestMerge::new(sources).expect("merge").collect::<Result<_>>().expect("ok");
        let want = vec![
            MergedEntry { entry: stored(0, 1), session: 0 },
            MergedEntry { entry: zero(10), session: 1 },
            MergedEntry { entry: stored(20, 3), session: 2 },
            MergedEntry { entry: stored(30, 3), session: 2 },
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn writer_and_reader_enforce_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("manifest");
        let mut w = ManifestWriter::create(&path).expect("create");
        w.push(&stored(0, 1)).expect("push");
        w.push(&zero(0x20000)).expect("push");
        assert!(w.push(&zero(0x20000)).is_err());
        w.finish().expect("finish");
        let got: Vec<_> = ManifestReader::open(&path).expect("open").collect::<Result<_>>().expect("read");
        assert_eq!(got, vec![stored(0, 1), zero(0x20000)]);

        std::fs::write(&path, format!("{}{}", zero(5).to_line(), zero(1).to_line())).expect("write");
        let r: Result<Vec<_>> = ManifestReader::open(&path).expect("open").collect();
        assert!(format!("{:#}", r.expect_err("out of order")).contains("out of order"));
    }
}
