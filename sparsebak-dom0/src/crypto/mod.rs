//! Encryption of an archive (see the README, "Encryption").
//!
//! - `primitives.rs`: data key, subkeys, sealing with associated data;
//! - `xchacha.rs`: the AEAD itself (XChaCha20-Poly1305);
//! - [`keyfile`]: the key on disk, raw in dom0 and wrapped in the archive;
//! - [`passphrase`]: reading the passphrase from a file or the terminal.
//!
//! Which key a command uses, and storing a new one in the archive, is
//! `crate::remote::archive_key` (it talks to the receiver).

pub mod keyfile;
pub mod passphrase;
mod primitives;
mod xchacha;

pub(crate) use primitives::{open_with, seal_with};
pub use primitives::{random, Aad, ArchiveKey, ChunkHash, DataKey, Keys, OpenError, SealBuf, SEAL_OVERHEAD};
