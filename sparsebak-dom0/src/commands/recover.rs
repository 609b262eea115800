//! `recover [VOL...]`: after dom0's metadata was lost, rebuild it from the
//! archive alone: the data key (unwrapped with the passphrase), then every
//! session's info and manifest of each configured volume (default: all of
//! them, enabled or not), then `verify` the latest session of each.
//!
//! Everything read is untrusted until opened: in an encrypted archive each
//! metadata piece must open under the key with its volume, session, file
//! and position bound in, so the receiver can withhold sessions but not
//! forge, alter or move one. Manifests are also checked for order and size
//! before they are kept. Rollback to an older archive copy cannot be
//! detected here (dom0's record of the newest session is what was lost);
//! the recovered sessions are listed so the user can judge.

use super::{restore, Ctx};
use crate::crypto::{keyfile, passphrase, ArchiveKey, Keys};
use crate::meta::{recover_marker_path, ManifestReader, MetaDir, SessionId, SessionInfo, VolumeMeta};
use crate::remote::{
    archive_key,
    metafile::{self, MetaRef},
    rollback, Receiver,
};
use anyhow::{bail, Context, Result};
use sparsebak_fsutil::{remove_file_durably, write_file_durably};
use sparsebak_proto::{MetaFile, VolumeRef};
use std::io::Write;
use std::path::Path;

/// Largest info file accepted from the archive.
const MAX_INFO: u64 = 64 * 1024;
/// Longest manifest line: two hashes, the address and an origin.
const MAX_LINE: u64 = 64 + 1 + 64 + 1 + 17 + 1 + 17 + 1;

pub fn run(ctx: &Ctx) -> Result<()> {
    let names = ctx.config.select_volumes(&ctx.cli.volumes, false)?;
    let (recovered, key_recovered) = {
        let meta = MetaDir::lock(&ctx.config.meta_dir)?;
        let marker = recover_marker_path(&ctx.config.meta_dir, &ctx.pool_dir);
        let key_path = keyfile::dom0_key_path(&ctx.config.meta_dir, &ctx.pool_dir);
        discard_partial_recover(&meta, ctx, &marker, &key_path)?;
        if key_path.exists() {
            bail!("dom0 already holds the key {}; recover only rebuilds lost metadata", key_path.display());
        }
        for name in &names {
            if !meta.volume(&ctx.pool_dir, name).sessions()?.is_empty() {
                bail!("dom0 already has sessions of {name}; recover only rebuilds lost metadata");
            }
        }
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_file_durably(&marker, names.iter().map(|n| format!("{n}\n")).collect::<String>().as_bytes())?;
        let mut rx = Receiver::connect(&ctx.config)?;
        let (keys, data_key) = recover_key(ctx, &mut rx)?;
        let mut recovered = Vec::new();
        for name in &names {
            let volume = ctx.volume_ref(name);
            let vm = meta.volume(&ctx.pool_dir, name);
            let count =
                recover_volume(&mut rx, keys.as_ref(), &volume, &vm).with_context(|| format!("recovering {name}"))?;
            if count > 0 {
                let latest = vm.sessions()?.last().map(|s| s.date_time().to_string()).unwrap_or_default();
                log::info!("{name}: recovered {count} session(s), the newest {latest}");
                recovered.push(name.clone());
            } else {
                log::warn!("{name}: the archive holds no session of it");
            }
        }
        rx.finish()?;
        if let Some(key) = &data_key {
            keyfile::save_dom0_key(&key_path, key)?;
        }
        remove_file_durably(&marker)?;
        (recovered, data_key.is_some())
    };
    if recovered.is_empty() {
        // An encrypted archive without a session of any configured volume
        // (every volume deleted, or a first send stopped between storing its
        // new key in the archive and in dom0): the key is all there is.
        if key_recovered && ctx.cli.volumes.is_empty() {
            log::info!("{}: recovered the archive's key; it holds no session of any configured volume", ctx.pool_dir);
            return Ok(());
        }
        if key_recovered {
            bail!("the archive holds no session of the volumes named; only its key was recovered");
        }
        bail!("the archive holds no session of the volumes named; nothing recovered");
    }
    restore::verify_volumes(ctx, &recovered)
}

/// Discards what an interrupted recover left (see the module comment): the
/// metadata of the volumes its marker names, and a key it may have written.
fn discard_partial_recover(meta: &MetaDir, ctx: &Ctx, marker: &Path, key_path: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(marker) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", marker.display())),
    };
    log::warn!("an earlier recover did not finish; discarding its partial metadata and starting over");
    for name in text.lines() {
        sparsebak_proto::names::validate_volume_path(name)
            .with_context(|| format!("{} names a bad volume", marker.display()))?;
        meta.delete_volume(&ctx.pool_dir, name)?;
    }
    remove_file_durably(key_path)?;
    remove_file_durably(marker)
}

/// Unwraps the archive's key with the passphrase (dom0 keeps it once every
/// volume is recovered); an archive without a key must be an unencrypted one.
fn recover_key(ctx: &Ctx, rx: &mut Receiver) -> Result<(Option<Keys>, Option<ArchiveKey>)> {
    match (archive_key::archive_wrapped_key(ctx.key_scope(), rx)?, ctx.config.encryption) {
        (Some(wrapped), true) => {
            let pass = passphrase::existing(ctx.cli.passphrase_file.as_deref())?;
            let key = wrapped.unwrap_key(&pass, &ctx.pool_dir)?;
            Ok((Some(Keys::new(&key)), Some(key)))
        }
        (Some(_), false) => bail!("the archive of {} is encrypted, but the config says encryption = off", ctx.pool_dir),
        (None, true) => bail!(
            "the archive holds no key for {}: it was made without encryption (set `encryption = off` to recover it) \
             or this is not the right destination",
            ctx.pool_dir
        ),
        (None, false) => Ok((None, None)),
    }
}

/// Rebuilds every session of one volume; returns how many.
fn recover_volume(rx: &mut Receiver, keys: Option<&Keys>, volume: &VolumeRef, vm: &VolumeMeta) -> Result<usize> {
    let mut sessions = rollback::archive_sessions(rx, volume)?;
    sessions.sort();
    for id in &sessions {
        let tmp = vm.tmp_session_dir(id);
        if tmp.exists() {
            vm.discard_unfinished(id)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let (info, text) = fetch_info(rx, MetaRef { keys, volume, session: id.as_str(), file: MetaFile::Info })?;
        // Kept as the archive has it, not re-serialized: `verify` compares the
        // two copies byte for byte, and an older info (no version line) must
        // stay the same file it was.
        write_file_durably(&tmp.join(MetaFile::Info.file_name()), text.as_bytes())?;
        let lines = info.volume_size.div_ceil(info.chunk_size);
        let m = MetaRef { keys, volume, session: id.as_str(), file: MetaFile::Manifest };
        fetch_manifest(rx, m, lines.saturating_mul(MAX_LINE), &tmp.join(MetaFile::Manifest.file_name()))?;
        vm.promote(id)?;
    }
    Ok(sessions.len())
}

/// The session's info from the archive, parsed, and its text as stored.
fn fetch_info(rx: &mut Receiver, m: MetaRef) -> Result<(SessionInfo, String)> {
    let mut text = Vec::new();
    metafile::fetch(rx, m, MAX_INFO, |piece| {
        text.extend_from_slice(piece);
        Ok(())
    })?;
    let text = String::from_utf8(text).with_context(|| format!("info of session {} is not text", m.session))?;
    let info = SessionInfo::parse(&text).with_context(|| format!("info of session {}", m.session))?;
    // dom0 keeps these bytes as they are: only the exact form sparsebak
    // writes, so nothing extra rides along into dom0's metadata.
    if !info.is_written_form(&text) {
        bail!("info of session {} in the archive is not in the form sparsebak writes", m.session);
    }
    Ok((info, text))
}

fn fetch_manifest(rx: &mut Receiver, m: MetaRef, max_len: u64, path: &std::path::Path) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    metafile::fetch(rx, m, max_len, |piece| f.write_all(piece).with_context(|| format!("writing {}", path.display())))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    for entry in ManifestReader::open(path)? {
        entry.with_context(|| format!("manifest of session {} from the archive", m.session))?;
    }
    let _ = SessionId::parse(m.session)?;
    Ok(())
}
