//! Which key (if any) a command works with, decided once for all commands.
//!
//! The mode of a pool's archive is fixed when its first session is sent:
//! encrypted when dom0 then holds a key file, else not. The config's
//! `encryption` must agree with that afterwards, so a typo can never send
//! plaintext into an encrypted archive or the other way round.

use super::Receiver;
use crate::crypto::keyfile::{self, WrappedKey};
use crate::crypto::passphrase::{self, Passphrase};
use crate::crypto::Keys;
use crate::meta::MetaDir;
use anyhow::{bail, Result};
use sparsebak_proto::testhook::dom0_step as step;
use std::path::{Path, PathBuf};

/// The pool whose key a command works with, and what the config says.
#[derive(Clone, Copy)]
pub struct KeyScope<'a> {
    /// dom0's metadata folder.
    pub meta_dir: &'a Path,
    /// The pool folder (`VG%POOL`) the key belongs to.
    pub pool_dir: &'a str,
    /// The config's `encryption` setting.
    pub encryption: bool,
    /// The archive on the receiver, to name its key file in messages.
    pub archive: &'a sparsebak_proto::Destination,
}

impl KeyScope<'_> {
    fn key_path(&self) -> PathBuf {
        keyfile::dom0_key_path(self.meta_dir, self.pool_dir)
    }

    /// The archive's key file as the receiver holds it (for messages only).
    fn archive_key_path(&self) -> PathBuf {
        Path::new(&self.archive.to_string()).join(self.pool_dir).join(sparsebak_proto::layout::KEY_FILE)
    }
}

/// The keys of an existing archive, from dom0's key file: what every
/// command but the first send (and `recover`) uses. No passphrase needed.
pub fn load(scope: KeyScope, meta: &MetaDir) -> Result<Option<Keys>> {
    let path = scope.key_path();
    match (keyfile::load_dom0_key(&path)?, scope.encryption) {
        (Some(key), true) => Ok(Some(Keys::new(&key))),
        (Some(_), false) => bail!(
            "the archive of {} is encrypted (dom0 holds its key {}), but the config says encryption = off",
            scope.pool_dir,
            path.display()
        ),
        (None, false) => Ok(None),
        (None, true) if meta.volumes_with_metadata(scope.pool_dir)?.is_empty() => Ok(None),
        (None, true) => bail!(
            "dom0 has sessions of {} but no key file {}: set `encryption = off` for an archive made without \
             encryption, or rebuild dom0's metadata with `sparsebak recover`",
            scope.pool_dir,
            path.display()
        ),
    }
}

/// What `send` starts from: the keys of an existing archive, or a
/// passphrase for the key of a new one (obtained before anything is
/// written, so that `-u` without `--passphrase-file` fails cleanly).
pub enum SendKeys {
    Ready(Option<Keys>),
    Create(Passphrase),
}

pub fn for_send(scope: KeyScope, meta: &MetaDir, file: Option<&Path>, unattended: bool) -> Result<SendKeys> {
    let existing = load(scope, meta)?;
    if existing.is_some() || !scope.encryption {
        return Ok(SendKeys::Ready(existing));
    }
    if file.is_none() && unattended {
        bail!(
            "creating an encrypted archive needs a passphrase for its key: give --passphrase-file PATH \
             (or run once without -u to be asked), or set `encryption = off`"
        );
    }
    Ok(SendKeys::Create(passphrase::new(file)?))
}

impl SendKeys {
    /// The keys to send with: a new key is stored wrapped in the archive
    /// first, then in dom0 (if dom0 fails in between, `recover` gets it back).
    pub fn establish(self, scope: KeyScope, rx: &mut Receiver) -> Result<Option<Keys>> {
        let pass = match self {
            SendKeys::Ready(keys) => return Ok(keys),
            SendKeys::Create(pass) => pass,
        };
        if archive_wrapped_key(scope, rx)?.is_some() {
            bail!(
                "the archive already holds a key for {} that dom0 lacks: run `sparsebak recover` to rebuild dom0's \
                 metadata from the archive",
                scope.pool_dir
            );
        }
        let key = crate::crypto::ArchiveKey::generate()?;
        let wrapped = WrappedKey::wrap(&key, &pass, scope.pool_dir)?;
        rx.put_key(scope.pool_dir, wrapped.to_text().into_bytes())?;
        step("new key in the archive");
        keyfile::save_dom0_key(&scope.key_path(), &key)?;
        log::info!("{}: new encrypted archive; keep the passphrase: it is needed to recover", scope.pool_dir);
        Ok(Some(Keys::new(&key)))
    }
}

/// The archive's wrapped key of this pool, if it has one.
pub fn archive_wrapped_key(scope: KeyScope, rx: &mut Receiver) -> Result<Option<WrappedKey>> {
    match rx.get_key(scope.pool_dir)? {
        None => Ok(None),
        Some(data) if data.len() <= keyfile::MAX_WRAPPED_LEN => {
            let text = String::from_utf8(data).map_err(|_| anyhow::anyhow!("the archive's key file is not text"))?;
            Ok(Some(WrappedKey::parse(&text, &scope.archive_key_path())?))
        }
        Some(_) => bail!("the archive's key file is too large"),
    }
}
