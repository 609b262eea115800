//! `tag VOL DT NAME` / `untag VOL DT NAME`: change a session's labels. A
//! tagged session is kept by every rule-based prune, and `prune --session`
//! refuses it until its tags are removed.
//!
//! Tags live in the session's `info`, in dom0 and (sealed like the rest) in
//! the archive, so `recover` brings them back. Both copies must stay equal
//! (`verify` compares them), so the change is journaled by its own file:
//! dom0 writes the new info as `info.new` first, then the archive's copy is
//! replaced, then `info.new` takes the place of `info`. A kill in between
//! leaves `info.new`, which the next command that talks to the receiver
//! about the volume finishes first ([`settle`]).

use super::Ctx;
use crate::crypto::Keys;
use crate::meta::{validate_tag, SessionId, SessionInfo, VolumeMeta, MAX_TAGS};
use crate::remote::{
    metafile::{self, MetaRef},
    Receiver,
};
use anyhow::{bail, Context, Result};
use sparsebak_fsutil::{fsync_dir, with_suffix, write_file_durably};
use sparsebak_proto::testhook::dom0_step as step;
use sparsebak_proto::{MetaFile, VolumeRef};
use std::path::PathBuf;

/// Adds (`add`) or removes a tag.
pub fn run(ctx: &Ctx, add: bool) -> Result<()> {
    let command = if add { "tag" } else { "untag" };
    let [name, dt, tag] = ctx.cli.volumes.as_slice() else {
        bail!("{command} takes a volume, a session and a tag: `sparsebak {command} VOLUME YYYYMMDD-HHMMSS NAME`");
    };
    ctx.config.validate_volume(name)?;
    validate_tag(tag)?;
    let session = SessionId::from_user(dt)?;
    let meta = crate::meta::MetaDir::lock(&ctx.config.meta_dir)?;
    let vm = meta.volume(&ctx.pool_dir, name);
    if !vm.sessions()?.contains(&session) {
        bail!("volume {name:?} has no session {} (see `sparsebak list {name}`)", session.date_time());
    }
    let keys = ctx.keys(&meta)?;
    let volume = ctx.volume_ref(name);
    let mut rx = Receiver::connect(&ctx.config)?;
    super::settle_interrupted(&vm, &mut rx, keys.as_ref(), &volume)?;
    let mut info = vm.info(&session)?;
    let present = info.tags.iter().any(|t| t == tag);
    match (add, present) {
        (true, true) | (false, false) => {
            let state = if present { "already has" } else { "has no" };
            log::info!("{name}: session {} {state} tag {tag}", session.date_time());
            return rx.finish();
        }
        (true, false) if info.tags.len() >= MAX_TAGS => {
            bail!("session {} already has {MAX_TAGS} tags", session.date_time())
        }
        (true, false) => info.tags.push(tag.clone()),
        (false, true) => info.tags.retain(|t| t != tag),
    }
    let pending = pending_info_path(&vm, &session);
    write_file_durably(&pending, info.to_text().as_bytes())?;
    step("new info written");
    install(&vm, &mut rx, keys.as_ref(), &volume, &session)?;
    rx.finish()?;
    let verb = if add { "tagged" } else { "untagged" };
    log::info!("{name}: session {} {verb} {tag}", session.date_time());
    Ok(())
}

/// `S_.../info.new`: a tag change not yet in place on both sides.
fn pending_info_path(vm: &VolumeMeta, session: &SessionId) -> PathBuf {
    with_suffix(&vm.session_dir(session).join(MetaFile::Info.file_name()), ".new")
}

/// Sends the pending info to the archive, then puts it in place in dom0.
fn install(
    vm: &VolumeMeta,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    session: &SessionId,
) -> Result<()> {
    let pending = pending_info_path(vm, session);
    let text = std::fs::read(&pending).with_context(|| format!("reading {}", pending.display()))?;
    // Refuse to spread a file that is not an info (damaged by hand).
    SessionInfo::parse(&String::from_utf8_lossy(&text)).with_context(|| format!("{}", pending.display()))?;
    let sealed =
        metafile::seal_single(MetaRef { keys, volume, session: session.as_str(), file: MetaFile::Info }, text)?;
    rx.replace_info(volume, session.as_str(), sealed)?;
    step("archive's info replaced");
    let dir = vm.session_dir(session);
    std::fs::rename(&pending, dir.join(MetaFile::Info.file_name()))
        .with_context(|| format!("installing {}", pending.display()))?;
    fsync_dir(&dir)
}

/// Finishes tag changes that a kill interrupted (see the module comment).
pub fn settle(vm: &VolumeMeta, rx: &mut Receiver, keys: Option<&Keys>, volume: &VolumeRef) -> Result<()> {
    for session in vm.sessions()? {
        if pending_info_path(vm, &session).exists() {
            log::warn!("{}: finishing the interrupted tag change of session {}", volume.name, session.date_time());
            install(vm, rx, keys, volume, &session)?;
        }
    }
    Ok(())
}
