//! `DeltaMap`: which archive chunks of a volume changed since the last send.
//!
//! One bit per archive chunk (chunk `i` covers bytes `i*chunk_size ..
//! (i+1)*chunk_size`). `monitor` and `send` OR the ranges that `thin_delta`
//! reports into it; `send` sends exactly the marked chunks and clears the map
//! only once the receiver committed the session. A 1 TiB volume with 128 KiB
//! chunks needs 1 MiB, so the map is kept whole in memory.
//!
//! On disk (`VG%POOL/VOLUME.deltamap`), little-endian:
//!
//! ```text
//! 8  magic "SBDMAP" + the format version as two decimal digits ("01")
//! 8  chunk size in bytes
//! 8  chunk count
//! n  bitmap, n = ceil(count / 8); bit i is bit (i % 8) of byte (i / 8);
//!    unused bits of the last byte are zero
//! 32 SHA-256 of everything above
//! ```
//!
//! A map that is missing, half written or damaged would silently lose changed
//! data if trusted, so [`DeltaMap::load`] checks all of the above and returns
//! [`LoadError::Missing`] or [`LoadError::Corrupt`]; the caller then falls back
//! to a full comparison. A map written by a newer sparsebak (an intact map
//! whose version is above [`DELTAMAP_VERSION`]) is [`LoadError::Newer`]: an
//! error that names the file and both versions. [`DeltaMap::save`] writes it
//! durably (`sparsebak_fsutil::write_file_durably`), so a crash leaves either
//! the old or the new map.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Version of the delta map format (the last two bytes of the magic).
pub const DELTAMAP_VERSION: u32 = 1;
const _: () = assert!(DELTAMAP_VERSION >= 1 && DELTAMAP_VERSION < 100, "two decimal digits in the magic");
const MAGIC_PREFIX: &[u8; 6] = b"SBDMAP";
const HEADER_LEN: usize = 24;
const SUM_LEN: usize = 32;

/// Upper bound on the number of chunks (2^33 chunks of 128 KiB = 1 PiB,
/// a 1 GiB bitmap): a bogus range must give an error, not an allocation that
/// takes dom0 down.
pub const MAX_CHUNKS: u64 = 1 << 33;

/// Why a delta map could not be loaded. `Missing` and `Corrupt` mean "the
/// change history is unknown": compare the whole volume.
#[derive(Debug)]
pub enum LoadError {
    /// There is no map file.
    Missing(PathBuf),
    /// The file exists but is not a complete, intact map (with the reason).
    Corrupt(PathBuf, String),
    /// The file could not be read (permissions, I/O error).
    Io(PathBuf, io::Error),
    /// An intact map in a newer format than this sparsebak reads.
    Newer(PathBuf, u32),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing(p) => write!(f, "delta map {} does not exist", p.display()),
            LoadError::Corrupt(p, why) => {
                write!(f, "delta map {} is damaged ({why})", p.display())
            }
            LoadError::Io(p, e) => write!(f, "reading delta map {}: {e}", p.display()),
            LoadError::Newer(p, v) => match sparsebak_proto::layout::check_format_version(p, *v, DELTAMAP_VERSION) {
                Err(e) => write!(f, "{e}"),
                Ok(()) => write!(f, "delta map {}: version {v}", p.display()),
            },
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// Bitmap of changed archive chunks; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaMap {
    chunk_size: u64,
    chunks: u64,
    bits: Vec<u8>,
}

fn bytes_for(chunks: u64) -> Result<usize> {
    if chunks > MAX_CHUNKS {
        bail!("delta map of {chunks} chunks exceeds the limit of {MAX_CHUNKS}");
    }
    Ok(usize::try_from(chunks.div_ceil(8))?)
}

impl DeltaMap {
    /// An all-clear map of `chunks` chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u64, chunks: u64) -> Result<DeltaMap> {
        if chunk_size == 0 {
            bail!("delta map chunk size must not be 0");
        }
        Ok(DeltaMap { chunk_size, chunks, bits: vec![0; bytes_for(chunks)?] })
    }

    /// An all-clear map covering a volume of `volume_bytes` bytes (the last
    /// chunk may be partial).
    pub fn for_volume(chunk_size: u64, volume_bytes: u64) -> Result<DeltaMap> {
        if chunk_size == 0 {
            bail!("delta map chunk size must not be 0");
        }
        DeltaMap::new(chunk_size, volume_bytes.div_ceil(chunk_size))
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    #[cfg(test)]
    /// Number of chunks the map covers.
    pub fn len(&self) -> u64 {
        self.chunks
    }

    #[cfg(test)]
    /// True when chunk `i` is marked; chunks past the end are unmarked.
    pub fn is_marked(&self, i: u64) -> bool {
        if i >= self.chunks {
            return false;
        }
        // i < chunks <= MAX_CHUNKS, so the index fits.
        self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Marks chunk `i`, growing the map when `i` is past the end.
    pub fn mark(&mut self, i: u64) -> Result<()> {
        self.mark_chunks(i, i)
    }

    /// Marks every chunk that the byte range `start .. start+len` touches
    /// (partially or wholly), growing the map when the range reaches past its
    /// end. Works for any relation of pool block size and chunk size: a
    /// block smaller than a chunk marks the chunk it lies in, a larger one
    /// marks every chunk it spans. `len == 0` marks nothing.
    pub fn mark_bytes(&mut self, start: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = u128::from(start) + u128::from(len); // exclusive, cannot overflow
        let cs = u128::from(self.chunk_size);
        let first = u64::try_from(u128::from(start) / cs)?;
        let last = u64::try_from((end - 1) / cs)?;
        self.mark_chunks(first, last).with_context(|| format!("marking bytes {start}+{len} in the delta map"))
    }

    /// Marks chunks `first..=last`.
    fn mark_chunks(&mut self, first: u64, last: u64) -> Result<()> {
        if last >= self.chunks {
            self.resize(last.saturating_add(1))?;
        }
        let (fb, lb) = ((first / 8) as usize, (last / 8) as usize);
        let lo = 0xffu8 << (first % 8);
        let hi = 0xffu8 >> (7 - last % 8);
        if fb == lb {
            self.bits[fb] |= lo & hi;
        } else {
            self.bits[fb] |= lo;
            self.bits[fb + 1..lb].fill(0xff);
            self.bits[lb] |= hi;
        }
        Ok(())
    }

    #[cfg(test)]
    /// Marks every chunk (e.g. when the change history was lost).
    pub fn mark_all(&mut self) {
        if self.chunks > 0 {
            // Cannot fail: within the current size.
            let last = self.chunks - 1;
            let (lb, hi) = ((last / 8) as usize, 0xffu8 >> (7 - last % 8));
            self.bits[..lb].fill(0xff);
            self.bits[lb] = hi;
        }
    }

    #[cfg(test)]
    /// Unmarks every chunk (after a committed send).
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }

    /// Changes the number of chunks. New chunks are unmarked: when a volume
    /// grows, the caller decides whether its new tail must be sent (it must,
    /// unless `thin_delta` reported it). Shrinking forgets the cut chunks.
    pub fn resize(&mut self, chunks: u64) -> Result<()> {
        let n = bytes_for(chunks)?;
        self.bits.resize(n, 0);
        self.chunks = chunks;
        if chunks & 7 != 0 {
            if let Some(b) = self.bits.last_mut() {
                *b &= 0xff >> (8 - chunks % 8);
            }
        }
        Ok(())
    }

    /// The first marked chunk at or after `from`, skipping clear bytes.
    pub fn next_marked(&self, from: u64) -> Option<u64> {
        if from >= self.chunks {
            return None;
        }
        let first_byte = (from / 8) as usize;
        let head = self.bits[first_byte] & (0xffu8 << (from % 8));
        if head != 0 {
            return Some(first_byte as u64 * 8 + u64::from(head.trailing_zeros()));
        }
        self.bits[first_byte + 1..]
            .iter()
            .position(|b| *b != 0)
            .map(|i| (first_byte + 1 + i) as u64 * 8 + u64::from(self.bits[first_byte + 1 + i].trailing_zeros()))
    }

    /// Number of marked chunks.
    pub fn count_marked(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    #[cfg(test)]
    /// Indices of the marked chunks, ascending. Skips clear bytes quickly, so
    /// a sparse map of a large volume iterates fast.
    pub fn iter_marked(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().filter(|(_, b)| **b != 0).flat_map(|(i, b)| {
            let b = *b;
            (0..8u64).filter(move |k| b & (1 << k) != 0).map(move |k| i as u64 * 8 + k)
        })
    }

    /// The serialized form (see the module documentation).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.bits.len() + SUM_LEN);
        v.extend_from_slice(MAGIC_PREFIX);
        v.extend_from_slice(format!("{DELTAMAP_VERSION:02}").as_bytes());
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&self.chunks.to_le_bytes());
        v.extend_from_slice(&self.bits);
        let sum = Sha256::digest(&v);
        v.extend_from_slice(&sum);
        v
    }

    /// Parses and checks the serialized form; the error says what is wrong.
    #[cfg(test)]
    pub fn from_bytes(data: &[u8]) -> std::result::Result<DeltaMap, String> {
        Self::parse(Path::new("delta map"), data).map_err(|e| match e {
            LoadError::Corrupt(_, why) => why,
            other => other.to_string(),
        })
    }

    fn parse(path: &Path, data: &[u8]) -> std::result::Result<DeltaMap, LoadError> {
        let corrupt = |why: String| LoadError::Corrupt(path.to_owned(), why);
        if data.len() < HEADER_LEN + SUM_LEN {
            return Err(corrupt(format!("only {} bytes long", data.len())));
        }
        // Two decimal digits, from "01" on.
        let digits = &data[6..8];
        let version = digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| u32::from(digits[0] - b'0') * 10 + u32::from(digits[1] - b'0'));
        let Some(version) = version.filter(|&v| v >= 1 && &data[..6] == MAGIC_PREFIX) else {
            return Err(corrupt("wrong magic (not a sparsebak delta map)".into()));
        };
        let (body, sum) = data.split_at(data.len() - SUM_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err(corrupt("checksum mismatch (half written or damaged)".into()));
        }
        // Only an intact map is believed to come from a newer sparsebak.
        if version > DELTAMAP_VERSION {
            return Err(LoadError::Newer(path.to_owned(), version));
        }
        let u = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&data[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let (chunk_size, chunks) = (u(8), u(16));
        if chunk_size == 0 {
            return Err(corrupt("chunk size 0".into()));
        }
        let n = bytes_for(chunks).map_err(|e| corrupt(e.to_string()))?;
        let bits = &body[HEADER_LEN..];
        if bits.len() != n {
            return Err(corrupt(format!("{} bitmap bytes for {chunks} chunks, expected {n}", bits.len())));
        }
        if chunks & 7 != 0 && bits[n - 1] >> (chunks % 8) != 0 {
            return Err(corrupt("bits set past the last chunk".into()));
        }
        Ok(DeltaMap { chunk_size, chunks, bits: bits.to_vec() })
    }

    /// Loads and verifies the map at `path`. Missing and damaged maps are
    /// distinct errors so that the caller can fall back to a full comparison
    /// (never to "nothing changed").
    pub fn load(path: &Path) -> std::result::Result<DeltaMap, LoadError> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LoadError::Missing(path.to_owned())),
            Err(e) => return Err(LoadError::Io(path.to_owned(), e)),
        };
        // Bounded read: nothing larger than the largest valid map.
        let limit = (HEADER_LEN + SUM_LEN) as u64 + MAX_CHUNKS / 8 + 1;
        let mut data = Vec::new();
        (&mut f).take(limit + 1).read_to_end(&mut data).map_err(|e| LoadError::Io(path.to_owned(), e))?;
        if data.len() as u64 > limit {
            return Err(LoadError::Corrupt(path.to_owned(), "file too large".into()));
        }
        DeltaMap::parse(path, &data)
    }

    /// Writes the map to `path` atomically and durably.
    pub fn save(&self, path: &Path) -> Result<()> {
        sparsebak_fsutil::write_file_durably(path, &self.to_bytes()).context("saving delta map")
    }
}

#[cfg(test)]
mod tests;
