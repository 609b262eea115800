//! What happens to one chunk on its way into the archive (`pack`) and back
//! out (`unpack`): zero detection, plaintext hash, zstd, and for encrypted
//! archives sealing (compression first: ciphertext does not compress). Both
//! run on worker threads of the pipeline.

use super::ChunkBuf;
use crate::crypto::{Aad, Keys, OpenError, SealBuf, SEAL_OVERHEAD};
use crate::meta::{ChunkState, Hash};
use anyhow::{bail, Result};
use sha2::{Digest, Sha256};
use sparsebak_proto::VolumeRef;
use std::cell::RefCell;

/// zstd level: fast enough to keep up with two cores' worth of reading,
/// and dom0 -> VM bandwidth makes compressing in dom0 pay off.
const ZSTD_LEVEL: i32 = 1;

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The most bytes a chunk of `len` bytes can take when stored: zstd's worst
/// case, and the nonce and tag of an encrypted archive.
pub fn max_stored_len(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len).saturating_add(SEAL_OVERHEAD)
}

pub fn is_zero(data: &[u8]) -> bool {
    let (words, tail) = data.split_at(data.len() - data.len() % 16);
    words.chunks_exact(16).all(|w| w == [0u8; 16]) && tail.iter().all(|&b| b == 0)
}

/// How the chunks of one volume are hashed and sealed: plain SHA-256 and no
/// sealing for an unencrypted archive; the archive's keyed hash and chunk
/// hashes ([`crate::crypto::ChunkHash`]) and XChaCha20-Poly1305 bound to
/// volume, origin session and address for an encrypted one.
#[derive(Clone, Copy)]
pub struct ChunkCodec<'a> {
    pub keys: Option<&'a Keys>,
    pub volume: &'a VolumeRef,
}

impl ChunkCodec<'_> {
    pub fn plain_hash(&self, data: &[u8]) -> Hash {
        match self.keys {
            Some(k) => k.plain_hash(data),
            None => sha256(data),
        }
    }

    /// The hash of the bytes as stored, for the manifest.
    fn stored_hash(&self, data: &[u8]) -> Hash {
        match self.keys {
            Some(k) => k.stored_hash(data),
            None => sha256(data),
        }
    }

    /// Whether `unpack` checks the stored bytes against the manifest's
    /// stored hash: where nothing else authenticates them (unencrypted),
    /// and where the check costs nothing (seal ids, key file version 3).
    fn checks_stored_hash(&self) -> bool {
        self.keys.is_none_or(Keys::stored_hash_is_cheap)
    }

    /// Compresses `data` and, in an encrypted archive, seals it: the bytes
    /// to store, in a buffer from `data`'s pool. Both happen in that one
    /// buffer, with no copy between them.
    fn compress_and_seal(&self, origin: &str, addr: u64, data: &ChunkBuf) -> Result<ChunkBuf> {
        let bound = zstd::zstd_safe::compress_bound(data.len());
        let mut out = data.sibling();
        let vec = std::mem::take(out.vec_mut());
        *out.vec_mut() = match self.keys {
            Some(k) => {
                let mut buf = SealBuf::reusing(vec, bound);
                compress_into(data, buf.plain_mut(), SealBuf::PLAIN_AT)?;
                k.seal_buf(&Aad::Chunk { volume: self.volume, origin, addr }, buf)?
            }
            None => {
                let mut vec = vec;
                compress_into(data, &mut vec, 0)?;
                vec
            }
        };
        Ok(out)
    }

    /// Authenticates and opens stored bytes where they are: the compressed
    /// plaintext's range in `data`.
    fn open_in_place(&self, origin: &str, addr: u64, data: &mut [u8]) -> Result<std::ops::Range<usize>, OpenError> {
        match self.keys {
            Some(k) => k.open_in_place(&Aad::Chunk { volume: self.volume, origin, addr }, data),
            None => Ok(0..data.len()),
        }
    }
}

/// A chunk read from the source, with what the archive holds for it.
///
/// An address with no manifest entry in any session is all zeros: this is
/// what lets a sparse 1 TiB image cost what its data costs. So a zero chunk
/// needs an entry only where an older session stored data.
pub struct ChunkJob {
    pub addr: u64,
    /// `None` when the source knows the range is a hole (all zeros).
    pub data: Option<ChunkBuf>,
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
    /// `data` goes back to the scan's buffer pool once sent.
    Stored {
        plain: Hash,
        stored: Hash,
        data: ChunkBuf,
    },
}

// One zstd context of each kind per worker thread, made on first use:
// creating one per chunk costs more than decompressing a small chunk. And
// one buffer per worker thread that chunks are decompressed into: the
// plaintext is written out or checked and then not needed any more.
thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static PLAIN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decompresses `data` into this thread's plaintext buffer and hands
/// exactly `len` bytes of it to `use_plain`, refusing output of any other
/// length (decompression stops at `len` bytes: a hostile archive cannot
/// make it allocate more).
fn decompress_with<R>(data: &[u8], len: usize, use_plain: impl FnOnce(&[u8]) -> R) -> Result<R, ChunkFault> {
    let got = DECOMPRESSOR.with(|cell| -> std::io::Result<usize> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        let d = slot.as_mut().ok_or_else(|| std::io::Error::other("zstd decompressor unavailable"))?;
        PLAIN.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            d.decompress_to_buffer(data, &mut buf[..len])
        })
    });
    let got = got.map_err(|e| ChunkFault::Undecompressable(e.to_string()))?;
    if got != len {
        return Err(ChunkFault::WrongLength { got, want: len });
    }
    Ok(PLAIN.with(|buf| use_plain(&buf.borrow()[..len])))
}

/// Compresses `data` into `out` from offset `at` on (`out` is cut or
/// zero-filled to `at` first); `out` grows to zstd's worst case if needed.
fn compress_into(data: &[u8], out: &mut Vec<u8>, at: usize) -> Result<()> {
    out.resize(at, 0);
    // Exact: a pooled buffer made for a chunk's plaintext would double.
    out.reserve_exact(zstd::zstd_safe::compress_bound(data.len()));
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        let Some(c) = slot.as_mut() else { bail!("zstd compressor unavailable") };
        let mut cursor = std::io::Cursor::new(out);
        cursor.set_position(at as u64);
        c.compress_to_buffer(data, &mut cursor)?;
        Ok(())
    })
}

/// Whether a chunk changed, judged by its plaintext hash.
enum Decision {
    Unchanged,
    Zero,
    Changed { plain: Hash, data: ChunkBuf },
}

fn decide(job: ChunkJob, codec: &ChunkCodec) -> Decision {
    let zero_or_unchanged = |previous: Option<ChunkState>| match previous {
        Some(ChunkState::Stored { .. }) => Decision::Zero,
        Some(ChunkState::Zero) | None => Decision::Unchanged,
    };
    match job.data {
        None => zero_or_unchanged(job.previous),
        Some(data) if is_zero(&data) => zero_or_unchanged(job.previous),
        Some(data) => {
            let plain = codec.plain_hash(&data);
            let same = matches!(job.previous, Some(ChunkState::Stored { plain: p, .. }) if p == plain);
            if same && !job.force_store {
                Decision::Unchanged
            } else {
                Decision::Changed { plain, data }
            }
        }
    }
}

/// Decides whether a chunk changed, and if so, compresses (and seals) it
/// for storing in `session`.
pub fn pack(job: ChunkJob, codec: &ChunkCodec, session: &str) -> Result<(u64, Packed)> {
    let addr = job.addr;
    let packed = match decide(job, codec) {
        Decision::Unchanged => Packed::Unchanged,
        Decision::Zero => Packed::Zero,
        Decision::Changed { plain, data } => {
            let data = codec.compress_and_seal(session, addr, &data)?;
            Packed::Stored { plain, stored: codec.stored_hash(&data), data }
        }
    };
    Ok((addr, packed))
}

/// True when the chunk differs from what the archive holds (for resync).
pub fn differs(job: ChunkJob, codec: &ChunkCodec) -> bool {
    !matches!(decide(job, codec), Decision::Unchanged)
}

/// Why a chunk from the archive was rejected.
#[derive(Debug)]
pub enum ChunkFault {
    StoredHashMismatch,
    Unsealable(OpenError),
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
            ChunkFault::Unsealable(e) => write!(f, "does not decrypt: {e}"),
            ChunkFault::Undecompressable(e) => write!(f, "does not decompress: {e}"),
            ChunkFault::WrongLength { got, want } => {
                write!(f, "decompresses to {got} bytes, expected {want}")
            }
            ChunkFault::PlainHashMismatch => write!(f, "content hash mismatch after decompression"),
        }
    }
}

/// Authenticates the stored bytes *before* decompressing them, then checks
/// the plaintext and hands it to `use_plain` (it lives in a buffer of the
/// worker thread's, reused for the next chunk). `len` is the chunk's length
/// within the volume; `origin` the session it was first stored in. The
/// stored bytes are decrypted where they are.
///
/// In an unencrypted archive the stored bytes are checked against the
/// SHA-256 that dom0 recorded. In an encrypted one the AEAD tag does that
/// job, under dom0's key and bound to volume, origin session and address;
/// the manifest's seal id (key file version 3) is checked too, as it costs
/// nothing, but a hash of all the stored bytes (version 1 and 2 manifests)
/// is not computed again: it would cost a third of the hashing.
#[allow(clippy::too_many_arguments)]
pub fn unpack<R>(
    mut data: impl std::ops::DerefMut<Target = [u8]>,
    state: &ChunkState,
    len: usize,
    codec: &ChunkCodec,
    origin: &str,
    addr: u64,
    use_plain: impl FnOnce(&[u8]) -> R,
) -> Result<R, ChunkFault> {
    let ChunkState::Stored { plain, stored, .. } = state else {
        return Ok(use_plain(&vec![0; len]));
    };
    if codec.checks_stored_hash() && codec.stored_hash(&data) != *stored {
        return Err(ChunkFault::StoredHashMismatch);
    }
    let range = codec.open_in_place(origin, addr, &mut data).map_err(ChunkFault::Unsealable)?;
    decompress_with(&data[range], len, |out| {
        if codec.plain_hash(out) != *plain {
            return Err(ChunkFault::PlainHashMismatch);
        }
        Ok(use_plain(out))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: &str = "S_20261129-083000";
    const S2: &str = "S_20261129-083001";

    fn volume() -> VolumeRef {
        VolumeRef { pool: "vg%pool".into(), name: "vol".into() }
    }

    /// Keys of an archive with seal ids (key file version 3).
    fn seal_id_keys() -> Keys {
        use crate::crypto::{ArchiveKey, ChunkHash};
        Keys::new(&ArchiveKey { chunk_hash: ChunkHash::Blake3SealId, ..ArchiveKey::generate().expect("key") })
    }

    fn job(data: Option<Vec<u8>>, previous: Option<ChunkState>) -> ChunkJob {
        ChunkJob { addr: 0x40000, data: data.map(ChunkBuf::from), previous, force_store: false }
    }

    /// [`unpack`] with the plaintext copied out.
    fn unpack_vec(
        data: &[u8],
        state: &ChunkState,
        len: usize,
        codec: &ChunkCodec,
        origin: &str,
        addr: u64,
    ) -> Result<Vec<u8>, ChunkFault> {
        unpack(data.to_vec(), state, len, codec, origin, addr, <[u8]>::to_vec)
    }

    fn stored_state(p: Packed) -> (ChunkState, Vec<u8>) {
        let Packed::Stored { plain, stored, data } = p else { panic!("must store") };
        (ChunkState::Stored { plain, stored, origin: None }, data.to_vec())
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

    fn decides_by_previous_state(codec: &ChunkCodec) {
        let data = b"hello sparsebak".repeat(1000);
        let (addr, p) = pack(job(Some(data.clone()), None), codec, S1).expect("packs");
        assert_eq!(addr, 0x40000);
        let (state, packed) = stored_state(p);
        assert!(packed.len() < data.len());
        let outcome = |data: Option<Vec<u8>>, previous, force_store| {
            pack(ChunkJob { addr: 0, data: data.map(ChunkBuf::from), previous, force_store }, codec, S1)
                .expect("packs")
                .1
        };
        assert!(matches!(outcome(Some(data.clone()), Some(state), false), Packed::Unchanged));
        assert!(matches!(outcome(Some(data.clone()), Some(state), true), Packed::Stored { .. }));
        assert!(matches!(outcome(None, Some(state), false), Packed::Zero));
        assert!(matches!(outcome(Some(vec![0; 10]), Some(state), false), Packed::Zero));
        assert!(matches!(outcome(None, Some(ChunkState::Zero), false), Packed::Unchanged));
        assert!(matches!(outcome(Some(vec![0; 10]), None, true), Packed::Unchanged));
        assert_eq!(unpack_vec(&packed, &state, data.len(), codec, S1, 0x40000).expect("unpacks"), data);
    }

    #[test]
    fn pack_decides_by_previous_state() {
        let v = volume();
        decides_by_previous_state(&ChunkCodec { keys: None, volume: &v });
        let keys = Keys::new(&crate::crypto::ArchiveKey::generate().expect("key"));
        decides_by_previous_state(&ChunkCodec { keys: Some(&keys), volume: &v });
    }

    #[test]
    fn packs_into_a_used_buffer_of_the_chunks_pool() {
        let v = volume();
        let keys = Keys::new(&crate::crypto::ArchiveKey::generate().expect("key"));
        let data = b"pooled chunk ".repeat(8000);
        for codec in [ChunkCodec { keys: None, volume: &v }, ChunkCodec { keys: Some(&keys), volume: &v }] {
            let pool = crate::chunk::BufferPool::new();
            // Two used buffers full of old bytes wait in the pool: one for
            // the chunk read, one for what it is packed into.
            let old = [pool.take(300_000), pool.take(300_000)];
            drop(old.map(|mut b| {
                b.fill(0xAB);
                b
            }));
            let mut input = pool.take(data.len());
            input.copy_from_slice(&data);
            let job = ChunkJob { addr: 0x40000, data: Some(input), previous: None, force_store: false };
            let Packed::Stored { plain, stored, data: mut packed } = pack(job, &codec, S1).expect("packs").1 else {
                panic!("must store")
            };
            assert!(packed.vec_mut().capacity() >= 300_000, "packed into the pool's used buffer");
            let fresh = pack(self::job(Some(data.clone()), None), &codec, S1).expect("packs").1;
            let (fresh_state, fresh_bytes) = stored_state(fresh);
            if codec.keys.is_none() {
                // Same bytes as packed into a new buffer: nothing old left.
                assert_eq!(&packed[..], &fresh_bytes[..]);
                assert_eq!(ChunkState::Stored { plain, stored, origin: None }, fresh_state);
            }
            let state = ChunkState::Stored { plain, stored, origin: None };
            assert_eq!(unpack_vec(&packed, &state, data.len(), &codec, S1, 0x40000).expect("unpacks"), data);
        }
    }

    #[test]
    fn unpack_rejects_tampering() {
        let v = volume();
        let codec = ChunkCodec { keys: None, volume: &v };
        let data = b"0123456789".repeat(500);
        let (state, packed) = stored_state(pack(job(Some(data.clone()), None), &codec, S1).expect("packs").1);
        let unpack = |bytes: &[u8], state: &ChunkState, len| unpack_vec(bytes, state, len, &codec, S1, 0x40000);
        let mut bad = packed.clone();
        bad[3] ^= 1;
        assert!(matches!(unpack(&bad, &state, data.len()), Err(ChunkFault::StoredHashMismatch)));
        assert!(matches!(unpack(&packed[..packed.len() - 1], &state, data.len()), Err(ChunkFault::StoredHashMismatch)));
        // A right stored hash but the wrong plaintext expectation.
        let ChunkState::Stored { stored, .. } = state else { panic!("stored") };
        let lying = ChunkState::Stored { plain: [0; 32], stored, origin: None };
        assert!(matches!(unpack(&packed, &lying, data.len()), Err(ChunkFault::PlainHashMismatch)));
        // Decompression is bounded by the expected length.
        assert!(unpack(&packed, &state, 10).is_err());
        // The thread's plaintext buffer, grown by a bigger chunk before,
        // bounds nothing: the length asked for does.
        let big = b"abcdefghij".repeat(2000);
        let (big_state, big_packed) = stored_state(pack(job(Some(big.clone()), None), &codec, S1).expect("packs").1);
        assert_eq!(unpack(&big_packed, &big_state, big.len()).expect("unpacks"), big);
        assert!(matches!(unpack(&packed, &state, data.len() - 1), Err(ChunkFault::Undecompressable(_))));
        assert!(matches!(unpack(&packed, &state, data.len() + 1), Err(ChunkFault::WrongLength { .. })));
        assert_eq!(unpack(&packed, &state, data.len()).expect("unpacks"), data);
    }

    #[test]
    fn sealed_chunks_hide_content_and_bind_their_place() {
        let v = volume();
        let keys = seal_id_keys();
        let codec = ChunkCodec { keys: Some(&keys), volume: &v };
        let data = b"MARKER-0123456789".repeat(500);
        let (state, packed) = stored_state(pack(job(Some(data.clone()), None), &codec, S1).expect("packs").1);
        assert!(!packed.windows(6).any(|w| w == b"MARKER"));
        let ChunkState::Stored { plain, .. } = state else { panic!("stored") };
        assert_ne!(plain, sha256(&data), "the manifest hash must be keyed");
        assert!(unpack_vec(&packed, &state, data.len(), &codec, S1, 0x40000).is_ok());
        // Same bytes claimed for another session or address: refused.
        let forged = |origin, addr| unpack_vec(&packed, &state, data.len(), &codec, origin, addr);
        assert!(matches!(forged(S2, 0x40000), Err(ChunkFault::Unsealable(OpenError::Forged))));
        assert!(matches!(forged(S1, 0x60000), Err(ChunkFault::Unsealable(OpenError::Forged))));
        let other = VolumeRef { pool: "vg%pool".into(), name: "other".into() };
        let codec_other = ChunkCodec { keys: Some(&keys), volume: &other };
        assert!(unpack_vec(&packed, &state, data.len(), &codec_other, S1, 0x40000).is_err());
        // Altered ciphertext fails authentication, before decompression;
        // a cut tag fails the seal id first (key file version 3).
        let mut bad = packed.clone();
        bad[30] ^= 1;
        assert!(matches!(unpack_vec(&bad, &state, data.len(), &codec, S1, 0x40000), Err(ChunkFault::Unsealable(_))));
        let cut = &packed[..packed.len() - 1];
        assert!(matches!(
            unpack_vec(cut, &state, data.len(), &codec, S1, 0x40000),
            Err(ChunkFault::StoredHashMismatch)
        ));
    }

    /// Archives keep the chunk hashes their key was made with. In each, a
    /// chunk packs and unpacks, and altered or cut stored bytes are refused
    /// before decompression: by the stored hash where it is checked, else
    /// by the tag.
    #[test]
    fn every_kind_of_chunk_hashes_packs_and_refuses_altered_bytes() {
        use crate::crypto::{ArchiveKey, ChunkHash};
        let v = volume();
        let data = b"chunk hashes of every key version ".repeat(300);
        for chunk_hash in ChunkHash::ALL {
            let keys = Keys::new(&ArchiveKey { chunk_hash, ..ArchiveKey::generate().expect("key") });
            let codec = ChunkCodec { keys: Some(&keys), volume: &v };
            let (state, packed) = stored_state(pack(job(Some(data.clone()), None), &codec, S1).expect("packs").1);
            let ChunkState::Stored { stored, .. } = state else { panic!("stored") };
            assert_eq!(stored, chunk_hash.stored(&packed), "{chunk_hash:?}");
            let unpack = |bytes: &[u8]| unpack_vec(bytes, &state, data.len(), &codec, S1, 0x40000);
            assert_eq!(unpack(&packed).expect("unpacks"), data, "{chunk_hash:?}");
            for at in [0, packed.len() / 2, packed.len() - 1] {
                let mut bad = packed.clone();
                bad[at] ^= 1;
                let checked = chunk_hash.stored_is_cheap() && at != packed.len() / 2;
                match unpack(&bad) {
                    Err(ChunkFault::StoredHashMismatch) if checked => {}
                    Err(ChunkFault::Unsealable(OpenError::Forged)) if !checked => {}
                    other => panic!("{chunk_hash:?}, byte {at} altered: {:?}", other.map(|_| ())),
                }
            }
        }
    }

    /// A seal id pins the one sealing of a chunk that dom0 recorded: the
    /// same chunk sealed again (for the same volume, session and address,
    /// so its tag is valid) is refused in its place.
    #[test]
    fn a_seal_id_refuses_another_valid_sealing_of_the_chunk() {
        let v = volume();
        let keys = seal_id_keys();
        let codec = ChunkCodec { keys: Some(&keys), volume: &v };
        let data = b"sealed twice ".repeat(900);
        let (state, first) = stored_state(pack(job(Some(data.clone()), None), &codec, S1).expect("packs").1);
        let (_, second) = stored_state(pack(job(Some(data.clone()), None), &codec, S1).expect("packs").1);
        assert_ne!(first, second, "a new nonce each time");
        let unpack = |bytes: &[u8]| unpack_vec(bytes, &state, data.len(), &codec, S1, 0x40000);
        assert_eq!(unpack(&first).expect("unpacks"), data);
        assert!(matches!(unpack(&second), Err(ChunkFault::StoredHashMismatch)));
    }
}
