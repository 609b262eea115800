//! Where the data key is kept, and its passphrase-wrapped copy.
//!
//! - dom0: `META/VG%POOL/.sparsebak-key`, `version=`, `key=` the raw key in
//!   hex and (version 2 and later) `chunk_hash=`; version 1 files from
//!   before versions hold the bare hex key. Mode 0600, written durably.
//!   Routine commands read it and never need a passphrase.
//! - archive: `DEST/VG%POOL/.sparsebak-key`, the key sealed under a key
//!   derived from the passphrase with Argon2id, with the KDF parameters and
//!   salt beside it (text `key=value` lines), so that a new dom0 can rebuild
//!   everything from the archive and the passphrase (`recover`).
//!
//! The leading dot keeps both files clear of volume names, which may not
//! start with one.
//!
//! The version of a key file also says which chunk hashes its archive uses
//! ([`ChunkHash`]): version 1 HMAC-SHA256, versions 2 and 3 the ones their
//! `chunk_hash=` line names (keyed BLAKE3; version 3 records seal ids for
//! the stored bytes). An archive keeps the version its key was made with;
//! new keys are version 3.

use crate::crypto::xchacha::XChaCha20Poly1305;
use crate::crypto::{open_with, seal_with, Aad, ArchiveKey, ChunkHash, DataKey};
use crate::hex;
use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::layout;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Newest version of both key files' format. Version 1 files written
/// before versions existed have no `version=` line (dom0's was the bare hex
/// key).
pub const KEY_FILE_VERSION: u32 = 3;

/// The version a key file with these chunk hashes is written in. A new
/// kind of chunk hashes takes a new version, so that a sparsebak that does
/// not know it refuses the archive's key (naming both versions) before it
/// reads a manifest it would misread.
fn version_for(chunk_hash: ChunkHash) -> u32 {
    match chunk_hash {
        ChunkHash::HmacSha256 => 1,
        ChunkHash::Blake3 => 2,
        ChunkHash::Blake3SealId => 3,
    }
}

/// The `version=` and (version 2 and later) `chunk_hash=` lines of a key file.
fn header_lines(chunk_hash: ChunkHash) -> String {
    match version_for(chunk_hash) {
        1 => "version=1\n".to_string(),
        v => format!("version={v}\nchunk_hash={}\n", chunk_hash.name()),
    }
}

/// Reads the version and chunk hashes of a parsed key file.
fn read_header(kv: &HashMap<&str, &str>, origin: &Path) -> Result<ChunkHash> {
    let version = layout::declared_version(kv.get("version").copied())
        .with_context(|| format!("key file {}", origin.display()))?;
    layout::check_format_version(origin, version, KEY_FILE_VERSION)?;
    if version == 1 {
        return Ok(ChunkHash::HmacSha256);
    }
    let name = kv.get("chunk_hash").copied().unwrap_or_default();
    match ChunkHash::from_name(name) {
        Some(h) if version_for(h) == version => Ok(h),
        _ => bail!("key file {}: unknown chunk_hash {:?} for version {version}", origin.display(), name),
    }
}

/// Largest wrapped-key file either side accepts.
pub const MAX_WRAPPED_LEN: usize = 4096;

/// Argon2id cost for new keys: 64 MiB, 3 passes, 4 lanes (the RFC 9106
/// "second recommended" setting); only `send` of a new archive and `recover`
/// pay it. The lanes of each slice are computed on all cores (the argon2
/// crate's `parallel` feature): the same work and memory as one lane, in
/// less time (a first send of a 1 MiB image: 0.16 -> 0.11 s on two cores).
/// Keys made with 1 lane (before) keep their parameters, which the wrapped
/// key records.
const KDF_M_KIB: u32 = 64 * 1024;
const KDF_T: u32 = 3;
const KDF_P: u32 = 4;
/// Caps on parameters read from the archive: a hostile receiver must not
/// make dom0 allocate or compute without bound.
const KDF_M_KIB_MAX: u32 = 1 << 20;
const KDF_T_MAX: u32 = 64;
const KDF_P_MAX: u32 = 16;

/// dom0's copy of the data key of one pool folder.
pub fn dom0_key_path(meta_root: &Path, pool_dir: &str) -> PathBuf {
    meta_root.join(pool_dir).join(layout::KEY_FILE)
}

pub fn load_dom0_key(path: &Path) -> Result<Option<ArchiveKey>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading key {}", path.display())),
    };
    let kv = key_values(&text);
    // Version 1 before versions existed: the bare hex key on one line.
    let (hex_key, chunk_hash) = match kv.get("key") {
        Some(k) => (*k, read_header(&kv, path)?),
        None => (text.trim(), ChunkHash::HmacSha256),
    };
    let data = unhex32(hex_key).with_context(|| format!("key file {} is damaged", path.display()))?;
    Ok(Some(ArchiveKey { data, chunk_hash }))
}

/// Writes dom0's key file: 0600, never over an existing one, fsynced with
/// its folder.
pub fn save_dom0_key(path: &Path, key: &ArchiveKey) -> Result<()> {
    let dir = path.parent().context("key path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = Zeroizing::new(format!("{}key={}\n", header_lines(key.chunk_hash), hex::encode(key.data.as_slice())));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing key {}", path.display()))?;
    sparsebak_fsutil::fsync_dir(dir)
}

/// The passphrase-wrapped data key as stored in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    m_kib: u32,
    t: u32,
    p: u32,
    salt: [u8; 16],
    sealed: Vec<u8>,
    chunk_hash: ChunkHash,
}

impl WrappedKey {
    pub fn wrap(key: &ArchiveKey, passphrase: &[u8], pool: &str) -> Result<WrappedKey> {
        let (m_kib, t, p, salt) = (KDF_M_KIB, KDF_T, KDF_P, crate::crypto::random()?);
        let kek = derive(passphrase, &salt, m_kib, t, p)?;
        let chunk_hash = key.chunk_hash;
        let sealed = seal_with(&kek, &Aad::WrappedKey { pool, chunk_hash }, key.data.as_slice())?;
        Ok(WrappedKey { m_kib, t, p, salt, sealed, chunk_hash })
    }

    /// The data key, or an error that says the passphrase is wrong (the two
    /// cannot be told apart from a tampered file, and the message says so).
    pub fn unwrap_key(&self, passphrase: &[u8], pool: &str) -> Result<ArchiveKey> {
        let kek = derive(passphrase, &self.salt, self.m_kib, self.t, self.p)?;
        let chunk_hash = self.chunk_hash;
        let plain = Zeroizing::new(
            open_with(&kek, &Aad::WrappedKey { pool, chunk_hash }, &self.sealed)
                .map_err(|_| anyhow!("wrong passphrase (or the archive's key file was altered)"))?,
        );
        let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| anyhow!("the archive's key has a wrong length"))?;
        Ok(ArchiveKey { data: Zeroizing::new(key), chunk_hash })
    }

    pub fn to_text(&self) -> String {
        format!(
            "{}kdf=argon2id\nm_kib={}\nt={}\np={}\nsalt={}\nsealed={}\n",
            header_lines(self.chunk_hash),
            self.m_kib,
            self.t,
            self.p,
            hex::encode(&self.salt),
            hex::encode(&self.sealed)
        )
    }

    /// Parses the archive's key file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<WrappedKey> {
        let kv = key_values(text);
        let chunk_hash = read_header(&kv, origin)?;
        let get = |k: &str| kv.get(k).copied().ok_or_else(|| anyhow!("key file lacks {k:?}"));
        let num = |k: &str, max: u32| -> Result<u32> {
            let v: u32 = get(k)?.parse().with_context(|| format!("key file {k:?}"))?;
            if v == 0 || v > max {
                bail!("key file {k:?} = {v} is out of range (1..={max})");
            }
            Ok(v)
        };
        if get("kdf")? != "argon2id" {
            bail!("key file: unknown kdf {:?}", get("kdf")?);
        }
        let salt = hex::decode(get("salt")?)?.try_into().map_err(|_| anyhow!("key file: salt must be 16 bytes"))?;
        Ok(WrappedKey {
            m_kib: num("m_kib", KDF_M_KIB_MAX)?,
            t: num("t", KDF_T_MAX)?,
            p: num("p", KDF_P_MAX)?,
            salt,
            sealed: hex::decode(get("sealed")?)?,
            chunk_hash,
        })
    }
}

fn key_values(text: &str) -> HashMap<&str, &str> {
    text.lines().filter_map(|l| l.split_once('=')).collect()
}

fn derive(passphrase: &[u8], salt: &[u8], m_kib: u32, t: u32, p: u32) -> Result<XChaCha20Poly1305> {
    let params = argon2::Params::new(m_kib, t, p, Some(32)).map_err(|e| anyhow!("argon2 parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(passphrase, salt, kek.as_mut_slice()).map_err(|e| anyhow!("argon2: {e}"))?;
    Ok(XChaCha20Poly1305::new(&kek))
}

fn unhex32(s: &str) -> Result<DataKey> {
    let v = Zeroizing::new(hex::decode(s)?);
    let key: [u8; 32] = v.as_slice().try_into().map_err(|_| anyhow!("a key must be 32 bytes"))?;
    Ok(Zeroizing::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key(chunk_hash: ChunkHash) -> ArchiveKey {
        ArchiveKey { chunk_hash, ..ArchiveKey::generate().expect("key") }
    }

    #[test]
    fn wrap_round_trip_and_wrong_passphrase() {
        for chunk_hash in [ChunkHash::HmacSha256, ChunkHash::Blake3, ChunkHash::Blake3SealId] {
            let key = new_key(chunk_hash);
            let w = WrappedKey::wrap(&key, b"correct horse", "vg%pool").expect("wraps");
            // New keys get RFC 9106's second recommended cost (keys made
            // with one lane before still unwrap: the golden archives).
            assert!(w.to_text().contains("\nm_kib=65536\nt=3\np=4\n"), "{}", w.to_text());
            let parsed = WrappedKey::parse(&w.to_text(), Path::new("k")).expect("parses");
            assert_eq!(parsed, w);
            let back = parsed.unwrap_key(b"correct horse", "vg%pool").expect("unwraps");
            assert_eq!((*back.data, back.chunk_hash), (*key.data, chunk_hash));
            let err = parsed.unwrap_key(b"wrong", "vg%pool").expect_err("refused");
            assert!(err.to_string().contains("wrong passphrase"), "{err}");
            assert!(parsed.unwrap_key(b"correct horse", "vg%other").is_err());
        }
    }

    #[test]
    fn the_archive_cannot_change_the_chunk_hashes_of_its_key() {
        let text = WrappedKey::wrap(&new_key(ChunkHash::Blake3), b"pw", "p%q").expect("wraps").to_text();
        assert!(text.starts_with("version=2\nchunk_hash=blake3\n"), "{text}");
        // Claimed as a version 1 key (HMAC-SHA256): the seal fails.
        let downgraded =
            WrappedKey::parse(&text.replace("version=2\nchunk_hash=blake3\n", "version=1\n"), Path::new("k"))
                .expect("parses");
        assert!(downgraded.unwrap_key(b"pw", "p%q").is_err());
        // An unknown hash, or one that does not belong to the version: refused.
        let err = WrappedKey::parse(&text.replace("blake3", "md5"), Path::new("arch/k")).expect_err("unknown");
        assert!(err.to_string().contains("arch/k") && err.to_string().contains("md5"), "{err}");
        assert!(WrappedKey::parse(&text.replace("blake3", "hmac-sha256"), Path::new("k")).is_err());
        assert!(WrappedKey::parse(&text.replace("chunk_hash=blake3\n", ""), Path::new("k")).is_err());
        // A version 3 key (seal ids) claimed as version 2: the seal fails.
        let v3 = WrappedKey::wrap(&new_key(ChunkHash::Blake3SealId), b"pw", "p%q").expect("wraps").to_text();
        assert!(v3.starts_with("version=3\nchunk_hash=blake3-seal-id\n"), "{v3}");
        let as_v2 = v3.replace("version=3\nchunk_hash=blake3-seal-id\n", "version=2\nchunk_hash=blake3\n");
        let as_v2 = WrappedKey::parse(&as_v2, Path::new("k")).expect("parses");
        assert!(as_v2.unwrap_key(b"pw", "p%q").is_err());
        assert!(WrappedKey::parse(&v3.replace("version=3", "version=2"), Path::new("k")).is_err());
        // And the other way: a version 2 key claimed as version 3 fails too.
        let as_v3 = text.replace("version=2\nchunk_hash=blake3\n", "version=3\nchunk_hash=blake3-seal-id\n");
        let as_v3 = WrappedKey::parse(&as_v3, Path::new("k")).expect("parses");
        assert!(as_v3.unwrap_key(b"pw", "p%q").is_err());
    }

    #[test]
    fn hostile_kdf_parameters_are_refused() {
        let text = WrappedKey::wrap(&new_key(ChunkHash::NEW), b"pw", "p%q").expect("wraps").to_text();
        let huge = text.replace(&format!("m_kib={KDF_M_KIB}"), "m_kib=4000000000");
        assert!(WrappedKey::parse(&huge, Path::new("k")).is_err());
        assert!(WrappedKey::parse(&text.replace("kdf=argon2id", "kdf=none"), Path::new("k")).is_err());
    }

    #[test]
    fn dom0_key_file_is_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dom0_key_path(dir.path(), "vg%pool");
        assert!(load_dom0_key(&path).expect("reads").is_none());
        let key = new_key(ChunkHash::NEW);
        save_dom0_key(&path, &key).expect("saves");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = load_dom0_key(&path).expect("reads").expect("present");
        assert_eq!((*back.data, back.chunk_hash), (*key.data, ChunkHash::NEW));
        assert!(save_dom0_key(&path, &key).is_err());
    }

    #[test]
    fn key_files_carry_a_version_and_older_ones_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = new_key(ChunkHash::HmacSha256);
        // dom0's key file as written before versions: the bare hex key.
        let old = dir.path().join("old");
        std::fs::write(&old, format!("{}\n", hex::encode(key.data.as_slice()))).expect("write");
        let back = load_dom0_key(&old).expect("reads").expect("present");
        assert_eq!((*back.data, back.chunk_hash), (*key.data, ChunkHash::HmacSha256));
        // A version 1 key is written as version 1 (exactly as before), and
        // reads back with its hashes.
        let v1 = dir.path().join("v1");
        save_dom0_key(&v1, &key).expect("saves");
        let text = std::fs::read_to_string(&v1).expect("read");
        assert_eq!(text, format!("version=1\nkey={}\n", hex::encode(key.data.as_slice())));
        assert_eq!(load_dom0_key(&v1).expect("reads").expect("present").chunk_hash, ChunkHash::HmacSha256);
        // Versions 2 and 3 name their chunk hashes; each reads back as it was.
        for (chunk_hash, version) in [(ChunkHash::Blake3, 2), (ChunkHash::Blake3SealId, 3)] {
            let path = dir.path().join(format!("v{version}"));
            save_dom0_key(&path, &new_key(chunk_hash)).expect("saves");
            let text = std::fs::read_to_string(&path).expect("read");
            assert!(text.starts_with(&format!("version={version}\nchunk_hash={}\n", chunk_hash.name())), "{text}");
            assert_eq!(load_dom0_key(&path).expect("reads").expect("present").chunk_hash, chunk_hash);
        }
        assert_eq!(version_for(ChunkHash::NEW), KEY_FILE_VERSION, "new keys are of the newest version");
        let new = dir.path().join("v3");
        let text = std::fs::read_to_string(&new).expect("read");
        std::fs::write(&new, text.replace("version=3", "version=9")).expect("write");
        let err = format!("{:#}", load_dom0_key(&new).expect_err("newer refused"));
        assert!(err.contains(&new.display().to_string()) && err.contains("format version 9"), "{err}");
        assert!(err.contains(&format!("(version {KEY_FILE_VERSION})")), "{err}");

        // The archive's wrapped key: versionless (old) parses; newer is refused.
        let wrapped = WrappedKey::wrap(&key, b"pw", "p%q").expect("wraps").to_text();
        assert!(wrapped.starts_with("version=1\n"), "{wrapped}");
        let versionless = wrapped.replace("version=1\n", "");
        assert!(WrappedKey::parse(&versionless, Path::new("k")).is_ok());
        let err =
            WrappedKey::parse(&wrapped.replace("version=1", "version=4"), Path::new("archive/p%q/.sparsebak-key"))
                .expect_err("newer refused")
                .to_string();
        assert!(err.contains("archive/p%q/.sparsebak-key") && err.contains("format version 4"), "{err}");
    }
}
