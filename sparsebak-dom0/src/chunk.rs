//! What happens to one chunk on its way into the archive (`pack`) and back
//! out (`unpack`): zero detection, SHA-256, zstd. Both run on worker threads
//! of the pipeline.

use crate::manifest::{ChunkState, Hash};
use anyhow::{bail, Result};
use sha2::{Digest, Sha256};
use std::cell::RefCell;

/// zstd level: fast enough to keep up with two cores' worth of reading,
/// and dom0 -> VM bandwidth makes compressing in dom0 pay off.
const ZSTD_LEVEL: i32 = 1;

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

pub fn is_zero(data: &[u8]) -> bool {
    let (words, tail) = data.split_at(data.len() - data.len() % 16);
    words.chunks_exact(16).all(|w| w == [0u8; 16]) && tail.iter().all(|&b| b == 0)
}

/// A chunk read from the source, with what the archive holds for it.
///
/// An address with no manifest entry in any session is all zeros: this is
/// what lets a sparse 1 TiB image cost what its data costs. So a zero chunk
/// needs an entry only where an older session stored data.
pub struct ChunkJob {
    pub addr: u64,
    /// `None` when the source knows the range is a hole (all zeros).
    pub data: Option<Vec<u8>>,
    /// The newest entry for this address in the sessions so far (`None`:
    /// zero, as far as the archive is concerned).
    pub previous: Option<ChunkState>,
    /// Store data even when it matches `previous` (the archive lacks
    /// sessions that `previous` may come from).
    pub force_store: bool,
}

/// The outcome for one chunk.
pub enum Packed {
    Unchanged,
    Zero,
    Stored { plain: Hash, stored: Hash, data: Vec<u8> },
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

fn compress(data: &[u8]) -> Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        match slot.as_mut() {
            Some(c) => Ok(c.compress(data)?),
            None => bail!("zstd compressor unavailable"),
        }
    })
}

/// Whether a chunk changed, judged by its plaintext hash.
enum Decision {
    Unchanged,
    Zero,
    Changed { plain: Hash, data: Vec<u8> },
}

fn decide(job: ChunkJob) -> Decision {
    let zero_or_unchanged = |previous: Option<ChunkState>| match previous {
        Some(ChunkState::Stored { .. }) => Decision::Zero,
        Some(ChunkState::Zero) | None => Decision::Unchanged,
    };
    match job.data {
        None => zero_or_unchanged(job.previous),
        Some(data) if is_zero(&data) => zero_or_unchanged(job.previous),
        Some(data) => {
            let plain = sha256(&data);
            let same = matches!(job.previous, Some(ChunkState::Stored { plain: p, .. }) if p == plain);
            if same && !job.force_store {
                Decision::Unchanged
            } else {
                Decision::Changed { plain, data }
            }
        }
    }
}

/// Decides whether a chunk changed, and if so, compresses it.
pub fn pack(job: ChunkJob) -> Result<(u64, Packed)> {
    let addr = job.addr;
    let packed = match decide(job) {
        Decision::Unchanged => Packed::Unchanged,
        Decision::Zero => Packed::Zero,
        Decision::Changed { plain, data } => {
            let data = compress(&data)?;
            Packed::Stored { plain, stored: sha256(&data), data }
        }
    };
    Ok((addr, packed))
}

/// True when the chunk differs from what the archive holds (for resync).
pub fn differs(job: ChunkJob) -> bool {
    !matches!(decide(job), Decision::Unchanged)
}

/// Why a chunk from the archive was rejected.
#[derive(Debug)]
pub enum ChunkFault {
    StoredHashMismatch,
    Undecompressable(String),
    WrongLength { got: usize, want: usize },
    PlainHashMismatch,
}

impl std::fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkFault::StoredHashMismatch => {
                write!(f, "hash mismatch (corrupted or replaced in the archive)")
            }
            ChunkFault::Undecompressable(e) => write!(f, "does not decompress: {e}"),
            ChunkFault::WrongLength { got, want } => {
                write!(f, "decompresses to {got} bytes, expected {want}")
            }
            ChunkFault::PlainHashMismatch => write!(f, "content hash mismatch after decompression"),
        }
    }
}

/// Checks stored bytes against dom0's hash *before* decompressing them, then
/// checks the plaintext. `len` is the chunk's length within the volume.
pub fn unpack(data: &[u8], state: &ChunkState, len: usize) -> Result<Vec<u8>, ChunkFault> {
    let ChunkState::Stored { plain, stored } = state else {
        return Ok(vec![0; len]);
    };
    if sha256(data) != *stored {
        return Err(ChunkFault::StoredHashMismatch);
    }
    let out = zstd::bulk::decompress(data, len).map_err(|e| ChunkFault::Undecompressable(e.to_string()))?;
    if out.len() != len {
        return Err(ChunkFault::WrongLength { got: out.len(), want: len });
    }
    if sha256(&out) != *plain {
        return Err(ChunkFault::PlainHashMismatch);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(data: Option<Vec<u8>>, previous: Option<ChunkState>) -> ChunkJob {
        ChunkJob { addr: 0x40000, data, previous, force_store: false }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 131072]));
        assert!(is_zero(&[0; 17]));
        let mut v = vec![0u8; 131072];
        v[131071] = 1;
        assert!(!is_zero(&v));
        v[131071] = 0;
        v[5] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn pack_decides_by_previous_state() {
        let data = b"hello sparsebak".repeat(1000);
        let (addr, p) = pack(job(Some(data.clone()), None)).expect("packs");
        assert_eq!(addr, 0x40000);
        let Packed::Stored { plain, stored, data: packed } = p else { panic!("must store") };
        assert!(packed.len() < data.len());
        let state = ChunkState::Stored { plain, stored };
        let outcome = |data: Option<Vec<u8>>, previous, force_store| {
            pack(ChunkJob { addr: 0, data, previous, force_store }).expect("packs").1
        };
        assert!(matches!(outcome(Some(data.clone()), Some(state), false), Packed::Unchanged));
        assert!(matches!(outcome(Some(data.clone()), Some(state), true), Packed::Stored { .. }));
        assert!(matches!(outcome(None, Some(state), false), Packed::Zero));
        assert!(matches!(outcome(Some(vec![0; 10]), Some(state), false), Packed::Zero));
        assert!(matches!(outcome(None, Some(ChunkState::Zero), false), Packed::Unchanged));
        assert!(matches!(outcome(Some(vec![0; 10]), None, true), Packed::Unchanged));
        assert_eq!(unpack(&packed, &state, data.len()).expect("unpacks"), data);
    }

    #[test]
    fn unpack_rejects_tampering() {
        let data = b"0123456789".repeat(500);
        let (_, Packed::Stored { plain, stored, data: packed }) = pack(job(Some(data.clone()), None)).expect("packs")
        else {
            panic!("must store")
        };
        let state = ChunkState::Stored { plain, stored };
        let mut bad = packed.clone();
        bad[3] ^= 1;
        assert!(matches!(unpack(&bad, &state, data.len()), Err(ChunkFault::StoredHashMismatch)));
        assert!(matches!(unpack(&packed[..packed.len() - 1], &state, data.len()), Err(ChunkFault::StoredHashMismatch)));
        // A right stored hash but the wrong plaintext expectation.
        let lying = ChunkState::Stored { plain: [0; 32], stored };
        assert!(matches!(unpack(&packed, &lying, data.len()), Err(ChunkFault::PlainHashMismatch)));
        // Decompression is bounded by the expected length.
        assert!(unpack(&packed, &state, 10).is_err());
    }
}
