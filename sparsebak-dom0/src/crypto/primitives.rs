//! The cryptographic primitives of an encrypted archive, in one place.
//!
//! - The **data key** (32 random bytes) lives in dom0's metadata; it never
//!   leaves dom0 except wrapped under a passphrase (see `keyfile`).
//! - Two **subkeys** are derived from it with HMAC-SHA256 and fixed labels, so
//!   the key that authenticates manifests' content hashes is never the one
//!   that encrypts: one for XChaCha20-Poly1305, one for the keyed hash of
//!   plaintext chunks.
//! - The **chunk hashes** ([`ChunkHash`]) of an archive are fixed when its
//!   key is made and recorded with the key, which it keeps for good (an
//!   incremental send compares against hashes already in the manifests):
//!   since key file version 3, keyed BLAKE3 for the plaintext and, for the
//!   stored bytes, the seal's id (BLAKE3 of its nonce and tag); in version 2
//!   BLAKE3 of all the stored bytes; in version 1 HMAC-SHA256 and SHA-256.
//!   BLAKE3 is four times faster than SHA-256 with the CPU's SHA
//!   instructions (the two hashes were a fifth of a send's CPU time); the
//!   seal id saves hashing the stored bytes at all (~4% of a full send's
//!   CPU), which the AEAD tag authenticates already: see [`ChunkHash`].
//! - **Sealed** bytes are `nonce (24 random bytes) || ciphertext || tag`.
//!   Random 192-bit nonces never repeat in practice, so no counter has to
//!   survive crashes or restores.
//! - The **associated data** ([`Aad`]) names what the sealed bytes are: the
//!   kind of object, the volume, the session and the chunk address or
//!   metadata piece. The receiver therefore cannot move, swap, replay or
//!   truncate anything without the tag failing.

use crate::crypto::xchacha::{XChaCha20Poly1305, NONCE_LEN, TAG_LEN};
use crate::meta::Hash;
use anyhow::{anyhow, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sparsebak_proto::{MetaFile, VolumeRef};
use zeroize::Zeroizing;

/// Bytes a sealed object has beyond its plaintext: nonce and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The data key: random, 32 bytes, wiped from memory when dropped.
pub type DataKey = Zeroizing<[u8; 32]>;

/// Fills a fresh array from the OS's random source.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| anyhow!("reading random bytes from the OS: {e}"))?;
    Ok(out)
}

/// A new random data key.
fn new_data_key() -> Result<DataKey> {
    Ok(Zeroizing::new(random()?))
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hash {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The hashes an encrypted archive's manifests record for each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    /// Key file version 1: HMAC-SHA256 of the plaintext, SHA-256 of the
    /// stored bytes.
    HmacSha256,
    /// Key file version 2: keyed BLAKE3 of the plaintext, BLAKE3 of the
    /// stored bytes.
    Blake3,
    /// Key file version 3: keyed BLAKE3 of the plaintext; for the stored
    /// bytes, their seal's id: BLAKE3 of the nonce and the tag only. The
    /// tag is a MAC of every stored byte under dom0's key, bound to volume,
    /// origin session and address, and dom0 checks it before anything is
    /// decompressed; a hash of all the stored bytes added nothing to that.
    /// The id still pins the one sealing of the chunk that dom0 recorded,
    /// and costs nothing to check.
    Blake3SealId,
}

impl ChunkHash {
    /// What new archives use.
    pub const NEW: ChunkHash = ChunkHash::Blake3SealId;

    pub const ALL: [ChunkHash; 3] = [ChunkHash::HmacSha256, ChunkHash::Blake3, ChunkHash::Blake3SealId];

    /// The name written in key files (`chunk_hash=`).
    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::HmacSha256 => "hmac-sha256",
            ChunkHash::Blake3 => "blake3",
            ChunkHash::Blake3SealId => "blake3-seal-id",
        }
    }

    pub fn from_name(name: &str) -> Option<ChunkHash> {
        ChunkHash::ALL.into_iter().find(|h| h.name() == name)
    }

    /// The manifest's hash of the bytes as stored in the archive (they are
    /// ciphertext, so no key is needed to hide anything).
    pub fn stored(self, sealed: &[u8]) -> Hash {
        match self {
            ChunkHash::HmacSha256 => <Sha256 as sha2::Digest>::digest(sealed).into(),
            ChunkHash::Blake3 => blake3::hash(sealed).into(),
            ChunkHash::Blake3SealId => {
                // Bytes too short to be sealed get an id too (they fail to
                // open anyway).
                let nonce = &sealed[..NONCE_LEN.min(sealed.len())];
                let tag = &sealed[sealed.len().saturating_sub(TAG_LEN)..];
                let mut h = blake3::Hasher::new();
                h.update(nonce);
                h.update(tag);
                h.finalize().into()
            }
        }
    }

    /// Whether checking a chunk's stored bytes against the manifest costs
    /// next to nothing: then `receive` and `verify` check it before opening
    /// the seal (which they always do). Hashing all the stored bytes again
    /// would cost a third of the hashing, for what the tag checks already.
    pub fn stored_is_cheap(self) -> bool {
        self == ChunkHash::Blake3SealId
    }
}

/// An archive's data key with the chunk hashes its archive uses: what the
/// key files hold.
pub struct ArchiveKey {
    pub data: DataKey,
    pub chunk_hash: ChunkHash,
}

/// Never prints the key itself.
impl std::fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveKey").field("chunk_hash", &self.chunk_hash).finish_non_exhaustive()
    }
}

impl ArchiveKey {
    /// A key for a new archive.
    pub fn generate() -> Result<ArchiveKey> {
        Ok(ArchiveKey { data: new_data_key()?, chunk_hash: ChunkHash::NEW })
    }
}

/// The working keys of an encrypted archive.
pub struct Keys {
    aead: XChaCha20Poly1305,
    hash_key: Zeroizing<[u8; 32]>,
    chunk_hash: ChunkHash,
}

/// Why sealed bytes were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    TooShort,
    /// Wrong key, or bytes altered, or sealed for another object.
    Forged,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::TooShort => write!(f, "too short to be sealed data"),
            OpenError::Forged => {
                write!(f, "authentication failed (altered, or moved/swapped/replayed from elsewhere in the archive)")
            }
        }
    }
}

impl Keys {
    pub fn new(key: &ArchiveKey) -> Keys {
        let data = key.data.as_slice();
        let aead_key = Zeroizing::new(hmac_sha256(data, &[b"sparsebak v1 aead key"]));
        // A new label for the new hash: one key is never used with both.
        let hash_label: &[u8] = match key.chunk_hash {
            ChunkHash::HmacSha256 => b"sparsebak v1 chunk hash key",
            // Versions 2 and 3 hash the plaintext the same way.
            ChunkHash::Blake3 | ChunkHash::Blake3SealId => b"sparsebak v2 chunk hash key",
        };
        let hash_key = Zeroizing::new(hmac_sha256(data, &[hash_label]));
        Keys { aead: XChaCha20Poly1305::new(&aead_key), hash_key, chunk_hash: key.chunk_hash }
    }

    /// Keyed hash of a plaintext chunk: detects changes like SHA-256 would,
    /// but tells someone without the key nothing about the content (no
    /// "is this well-known file in the volume" guessing).
    pub fn plain_hash(&self, data: &[u8]) -> Hash {
        match self.chunk_hash {
            ChunkHash::HmacSha256 => hmac_sha256(self.hash_key.as_slice(), &[data]),
            ChunkHash::Blake3 | ChunkHash::Blake3SealId => blake3::keyed_hash(&self.hash_key, data).into(),
        }
    }

    /// Hash of sealed bytes, as the manifest records it.
    pub fn stored_hash(&self, sealed: &[u8]) -> Hash {
        self.chunk_hash.stored(sealed)
    }

    /// See [`ChunkHash::stored_is_cheap`].
    pub fn stored_hash_is_cheap(&self) -> bool {
        self.chunk_hash.stored_is_cheap()
    }

    pub fn seal(&self, aad: &Aad, plain: &[u8]) -> Result<Vec<u8>> {
        seal_with(&self.aead, aad, plain)
    }

    /// Seals the plaintext in `buf` without copying it: the sealed bytes.
    pub fn seal_buf(&self, aad: &Aad, buf: SealBuf) -> Result<Vec<u8>> {
        seal_in_place(&self.aead, aad, buf)
    }

    pub fn open(&self, aad: &Aad, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        open_with(&self.aead, aad, sealed)
    }

    /// Opens sealed bytes without copying them: the plaintext's range in
    /// `sealed`, which then holds the plaintext there.
    pub fn open_in_place(&self, aad: &Aad, sealed: &mut [u8]) -> Result<std::ops::Range<usize>, OpenError> {
        open_in_place(&self.aead, aad, sealed)
    }
}

pub(crate) fn seal_with(aead: &XChaCha20Poly1305, aad: &Aad, plain: &[u8]) -> Result<Vec<u8>> {
    let mut buf = SealBuf::with_capacity(plain.len());
    buf.plain_mut().extend_from_slice(plain);
    seal_in_place(aead, aad, buf)
}

pub(crate) fn open_with(aead: &XChaCha20Poly1305, aad: &Aad, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    let mut buf = sealed.to_vec();
    let range = open_in_place(aead, aad, &mut buf)?;
    buf.truncate(range.end);
    buf.drain(..range.start);
    Ok(buf)
}

/// A buffer that plaintext is put into with room before it for the nonce
/// and after it for the tag, so that sealing encrypts where the bytes are:
/// a chunk is compressed straight into one and then sealed without a copy.
pub struct SealBuf(Vec<u8>);

impl SealBuf {
    /// Room for `plain_len` bytes of plaintext (more may be added; the
    /// buffer then grows as a `Vec` does).
    pub fn with_capacity(plain_len: usize) -> SealBuf {
        SealBuf::reusing(Vec::new(), plain_len)
    }

    /// The same in `buf`, whose content is dropped and whose memory is
    /// kept (a pooled buffer: no fresh pages per chunk).
    pub fn reusing(mut buf: Vec<u8>, plain_len: usize) -> SealBuf {
        buf.clear();
        // Exact: a pooled buffer made for a chunk's plaintext would double.
        buf.reserve_exact(SEAL_OVERHEAD + plain_len);
        buf.resize(NONCE_LEN, 0);
        SealBuf(buf)
    }

    /// The buffer, whose bytes from [`SealBuf::PLAIN_AT`] on are the
    /// plaintext: write after that offset only.
    pub fn plain_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Where the plaintext starts in [`SealBuf::plain_mut`].
    pub const PLAIN_AT: usize = NONCE_LEN;
}

fn seal_in_place(aead: &XChaCha20Poly1305, aad: &Aad, buf: SealBuf) -> Result<Vec<u8>> {
    let mut out = buf.0;
    let nonce: [u8; NONCE_LEN] = random()?;
    let tag =
        aead.seal_in_place(&nonce, &aad.bytes(), &mut out[NONCE_LEN..]).map_err(|_| anyhow!("encryption failed"))?;
    out[..NONCE_LEN].copy_from_slice(&nonce);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decrypts sealed bytes where they are; returns the plaintext's range in
/// `sealed` (the nonce before it and the tag after it stay).
fn open_in_place(aead: &XChaCha20Poly1305, aad: &Aad, sealed: &mut [u8]) -> Result<std::ops::Range<usize>, OpenError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(OpenError::TooShort);
    }
    let end = sealed.len() - TAG_LEN;
    let (head, tag) = sealed.split_at_mut(end);
    let (nonce, ct) = head.split_at_mut(NONCE_LEN);
    let (Ok(nonce), Ok(tag)) = (<&[u8; NONCE_LEN]>::try_from(&*nonce), <&[u8; TAG_LEN]>::try_from(&*tag)) else {
        return Err(OpenError::TooShort);
    };
    aead.open_in_place(nonce, &aad.bytes(), ct, tag).map_err(|_| OpenError::Forged)?;
    Ok(NONCE_LEN..end)
}

/// What a sealed object is, bound into its tag.
pub enum Aad<'a> {
    /// A chunk, bound to the session it was first stored in (its origin):
    /// prune moves chunk files into newer sessions without rewriting them,
    /// and manifests record the origin where it differs from the holder.
    Chunk { volume: &'a VolumeRef, origin: &'a str, addr: u64 },
    /// Piece `index` of a session's metadata file; `last` marks the final
    /// piece, so a file cut at a piece boundary is detected too.
    Meta { volume: &'a VolumeRef, session: &'a str, file: MetaFile, index: u64, last: bool },
    /// The data key wrapped under the passphrase, for one pool folder, with
    /// the chunk hashes of its archive (bound from version 2 on, so that the
    /// archive cannot change them).
    WrappedKey { pool: &'a str, chunk_hash: ChunkHash },
}

impl Aad<'_> {
    /// Unambiguous encoding: a version tag, then length-prefixed fields.
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let mut field = |b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        };
        match self {
            Aad::Chunk { volume, origin, addr } => {
                field(b"sparsebak v1 chunk");
                field(volume.pool.as_bytes());
                field(volume.name.as_bytes());
                field(origin.as_bytes());
                field(&addr.to_be_bytes());
            }
            Aad::Meta { volume, session, file, index, last } => {
                field(b"sparsebak v1 meta");
                field(volume.pool.as_bytes());
                field(volume.name.as_bytes());
                field(session.as_bytes());
                field(file.file_name().as_bytes());
                field(&index.to_be_bytes());
                field(&[u8::from(*last)]);
            }
            Aad::WrappedKey { pool, chunk_hash } => {
                field(b"sparsebak v1 wrapped key");
                field(pool.as_bytes());
                if *chunk_hash != ChunkHash::HmacSha256 {
                    field(chunk_hash.name().as_bytes());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_keys(chunk_hash: ChunkHash) -> Keys {
        Keys::new(&ArchiveKey { data: new_data_key().expect("key"), chunk_hash })
    }

    fn vol(name: &str) -> VolumeRef {
        VolumeRef { pool: "vg%pool".into(), name: name.into() }
    }

    /// Sealing and opening in place give the same bytes as the copying
    /// forms, and refuse the same forgeries.
    #[test]
    fn in_place_sealing_matches_the_copying_form() {
        let keys = new_keys(ChunkHash::NEW);
        let v = vol("a");
        let aad = Aad::Chunk { volume: &v, origin: "S_20261129-083000", addr: 0x20000 };
        let mut buf = SealBuf::with_capacity(3);
        buf.plain_mut().extend_from_slice(b"in place");
        let sealed = keys.seal_buf(&aad, buf).expect("seals");
        assert_eq!(sealed.len(), b"in place".len() + SEAL_OVERHEAD);
        assert_eq!(keys.open(&aad, &sealed).expect("opens"), b"in place");
        let mut opened = sealed.clone();
        let range = keys.open_in_place(&aad, &mut opened).expect("opens in place");
        assert_eq!(&opened[range], b"in place");
        let copied = keys.seal(&aad, b"copied").expect("seals");
        let mut opened = copied.clone();
        let range = keys.open_in_place(&aad, &mut opened).expect("opens in place");
        assert_eq!(&opened[range], b"copied");
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN] ^= 1;
        assert_eq!(keys.open_in_place(&aad, &mut flipped), Err(OpenError::Forged));
        let other = Aad::Chunk { volume: &v, origin: "S_20261129-083000", addr: 0x40000 };
        assert_eq!(keys.open_in_place(&other, &mut sealed.clone()), Err(OpenError::Forged));
        assert_eq!(keys.open_in_place(&aad, &mut sealed.clone()[..SEAL_OVERHEAD - 1]), Err(OpenError::TooShort));
    }

    #[test]
    fn sealed_chunks_open_only_for_their_own_place() {
        let keys = new_keys(ChunkHash::NEW);
        let v = vol("a");
        let aad = Aad::Chunk { volume: &v, origin: "S_20261129-083000", addr: 0x20000 };
        let sealed = keys.seal(&aad, b"secret data").expect("seals");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(keys.open(&aad, &sealed).expect("opens"), b"secret data");
        let other_vol = vol("b");
        for wrong in [
            Aad::Chunk { volume: &v, origin: "S_20261129-083000", addr: 0x40000 },
            Aad::Chunk { volume: &v, origin: "S_20261129-083001", addr: 0x20000 },
            Aad::Chunk { volume: &other_vol, origin: "S_20261129-083000", addr: 0x20000 },
        ] {
            assert_eq!(keys.open(&wrong, &sealed), Err(OpenError::Forged));
        }
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert_eq!(keys.open(&aad, &flipped), Err(OpenError::Forged));
        assert_eq!(keys.open(&aad, &sealed[..10]), Err(OpenError::TooShort));
        let other_keys = new_keys(ChunkHash::NEW);
        assert_eq!(other_keys.open(&aad, &sealed), Err(OpenError::Forged));
    }

    #[test]
    fn meta_pieces_bind_index_and_last_flag() {
        let keys = new_keys(ChunkHash::NEW);
        let v = vol("a");
        let aad =
            |index, last| Aad::Meta { volume: &v, session: "S_20261129-083000", file: MetaFile::Manifest, index, last };
        let sealed = keys.seal(&aad(3, false), b"lines").expect("seals");
        assert!(keys.open(&aad(3, false), &sealed).is_ok());
        assert!(keys.open(&aad(3, true), &sealed).is_err());
        assert!(keys.open(&aad(2, false), &sealed).is_err());
    }

    #[test]
    fn keyed_hash_differs_from_plain_hashes_and_between_keys() {
        let sha256 = |d: &[u8]| <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(d));
        for chunk_hash in ChunkHash::ALL {
            let a = new_keys(chunk_hash);
            let b = new_keys(chunk_hash);
            assert_eq!(a.plain_hash(b"x"), a.plain_hash(b"x"));
            assert_ne!(a.plain_hash(b"x"), b.plain_hash(b"x"));
            assert_ne!(a.plain_hash(b"x"), sha256(b"x"));
            assert_ne!(a.plain_hash(b"x"), <[u8; 32]>::from(blake3::hash(b"x")));
        }
        assert_eq!(ChunkHash::HmacSha256.stored(b"x"), sha256(b"x"));
        assert_eq!(ChunkHash::Blake3.stored(b"x"), <[u8; 32]>::from(blake3::hash(b"x")));
        // A seal id hashes the nonce and the tag, not what is between them.
        let sealed: Vec<u8> = (0..200u8).collect();
        let id: [u8; 32] = blake3::hash(&[&sealed[..NONCE_LEN], &sealed[200 - TAG_LEN..]].concat()).into();
        assert_eq!(ChunkHash::Blake3SealId.stored(&sealed), id);
        let mut body_altered = sealed.clone();
        body_altered[100] ^= 1;
        assert_eq!(ChunkHash::Blake3SealId.stored(&body_altered), id);
        assert_ne!(ChunkHash::Blake3SealId.stored(&sealed[..199]), id);
        assert_ne!(ChunkHash::Blake3SealId.stored(b"x"), ChunkHash::Blake3SealId.stored(b"y"));
        // The same data key gives different plaintext hashes under the two.
        let data = new_data_key().expect("key");
        let v1 = Keys::new(&ArchiveKey { data: data.clone(), chunk_hash: ChunkHash::HmacSha256 });
        let v2 = Keys::new(&ArchiveKey { data, chunk_hash: ChunkHash::Blake3 });
        assert_ne!(v1.plain_hash(b"x"), v2.plain_hash(b"x"));
        for h in ChunkHash::ALL {
            assert_eq!(ChunkHash::from_name(h.name()), Some(h));
        }
        assert_eq!(ChunkHash::from_name("md5"), None);
    }
}
