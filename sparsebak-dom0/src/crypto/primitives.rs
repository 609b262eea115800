//! The cryptographic primitives of an encrypted archive, in one place.
//!
//! - The **data key** (32 random bytes) lives in dom0's metadata; it never
//!   leaves dom0 except wrapped under a passphrase (see `keyfile`).
//! - Two **subkeys** are derived from it with HMAC-SHA256 and fixed labels, so
//!   the key that authenticates manifests' content hashes is never the one
//!   that encrypts: one for XChaCha20-Poly1305, one for the keyed hash of
//!   plaintext chunks.
//! - **Sealed** bytes are `nonce (24 random bytes) || ciphertext || tag`.
//!   Random 192-bit nonces never repeat in practice, so no counter has to
//!   survive crashes or restores.
//! - The **associated data** ([`Aad`]) names what the sealed bytes are: the
//!   kind of object, the volume, the session and the chunk address or
//!   metadata piece. The receiver therefore cannot move, swap, replay or
//!   truncate anything without the tag failing.

use crate::meta::Hash;
use anyhow::{anyhow, Result};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sparsebak_proto::{MetaFile, VolumeRef};
use zeroize::Zeroizing;

/// Bytes a sealed object has beyond its plaintext: nonce and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;
const NONCE_LEN: usize = 24;

/// The data key: random, 32 bytes, wiped from memory when dropped.
pub type DataKey = Zeroizing<[u8; 32]>;

/// Fills a fresh array from the OS's random source.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| anyhow!("reading random bytes from the OS: {e}"))?;
    Ok(out)
}

/// A new random data key.
pub fn new_data_key() -> Result<DataKey> {
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

/// The working keys of an encrypted archive.
pub struct Keys {
    aead: XChaCha20Poly1305,
    hash_key: Zeroizing<[u8; 32]>,
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
    pub fn from_data_key(key: &DataKey) -> Keys {
        let aead_key = Zeroizing::new(hmac_sha256(key.as_slice(), &[b"sparsebak v1 aead key"]));
        let hash_key = Zeroizing::new(hmac_sha256(key.as_slice(), &[b"sparsebak v1 chunk hash key"]));
        Keys { aead: XChaCha20Poly1305::new(aead_key.as_slice().into()), hash_key }
    }

    /// Keyed hash of a plaintext chunk: detects changes like SHA-256 would,
    /// but tells someone without the key nothing about the content (no
    /// "is this well-known file in the volume" guessing).
    pub fn plain_hash(&self, data: &[u8]) -> Hash {
        hmac_sha256(self.hash_key.as_slice(), &[data])
    }

    pub fn seal(&self, aad: &Aad, plain: &[u8]) -> Result<Vec<u8>> {
        seal_with(&self.aead, aad, plain)
    }

    pub fn open(&self, aad: &Aad, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        open_with(&self.aead, aad, sealed)
    }
}

pub(crate) fn seal_with(aead: &XChaCha20Poly1305, aad: &Aad, plain: &[u8]) -> Result<Vec<u8>> {
    let nonce: [u8; NONCE_LEN] = random()?;
    let aad = aad.bytes();
    let ct = aead
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &aad })
        .map_err(|_| anyhow!("encryption failed"))?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

pub(crate) fn open_with(aead: &XChaCha20Poly1305, aad: &Aad, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(OpenError::TooShort);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let aad = aad.bytes();
    aead.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad }).map_err(|_| OpenError::Forged)
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
    /// The data key wrapped under the passphrase, for one pool folder.
    WrappedKey { pool: &'a str },
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
            Aad::WrappedKey { pool } => {
                field(b"sparsebak v1 wrapped key");
                field(pool.as_bytes());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str) -> VolumeRef {
        VolumeRef { pool: "vg%pool".into(), name: name.into() }
    }

    #[test]
    fn sealed_chunks_open_only_for_their_own_place() {
        let keys = Keys::from_data_key(&new_data_key().expect("key"));
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
        let other_keys = Keys::from_data_key(&new_data_key().expect("key"));
        assert_eq!(other_keys.open(&aad, &sealed), Err(OpenError::Forged));
    }

    #[test]
    fn meta_pieces_bind_index_and_last_flag() {
        let keys = Keys::from_data_key(&new_data_key().expect("key"));
        let v = vol("a");
        let aad =
            |index, last| Aad::Meta { volume: &v, session: "S_20261129-083000", file: MetaFile::Manifest, index, last };
        let sealed = keys.seal(&aad(3, false), b"lines").expect("seals");
        assert!(keys.open(&aad(3, false), &sealed).is_ok());
        assert!(keys.open(&aad(3, true), &sealed).is_err());
        assert!(keys.open(&aad(2, false), &sealed).is_err());
    }

    #[test]
    fn keyed_hash_differs_from_sha256_and_between_keys() {
        let a = Keys::from_data_key(&new_data_key().expect("key"));
        let b = Keys::from_data_key(&new_data_key().expect("key"));
        assert_eq!(a.plain_hash(b"x"), a.plain_hash(b"x"));
        assert_ne!(a.plain_hash(b"x"), b.plain_hash(b"x"));
        assert_ne!(a.plain_hash(b"x"), <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(b"x")));
    }
}
