//! `delete VOL...`: removes volumes from the archive, then dom0's metadata
//! for them (sessions, an unsettled prune's journal, the delta map), then
//! their change-tracking snapshots. Archive first: a delete killed midway
//! leaves dom0 with sessions the archive lacks, which the next send notices
//! and answers with a full send; never the reverse (archive data nobody
//! knows about).
//!
//! Asks for confirmation unless `-u`. A volume that is still enabled in the
//! config is deleted too, with a warning that its next send is a full one.

use super::Ctx;
use crate::changes::{ReflinkCopies, Snapshots, TrackedVolume};
use crate::config::SourceKind;
use crate::meta::MetaDir;
use crate::remote::Receiver;
use crate::ui::confirm;
use anyhow::{bail, Context, Result};

pub fn run(ctx: &Ctx) -> Result<()> {
    if ctx.cli.volumes.is_empty() {
        bail!("delete needs the names of the volumes to delete");
    }
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    for name in &ctx.cli.volumes {
        ctx.config.validate_volume(name)?;
        let vm = meta.volume(&ctx.pool_dir, name);
        let configured = ctx.config.volumes.iter().any(|(n, _)| n == name);
        if !vm.exists() && !configured {
            bail!("volume {name:?} is neither archived nor configured");
        }
        let sessions = if vm.exists() { vm.sessions()?.len() } else { 0 };
        let question = format!("Delete volume {name} and its {sessions} session(s) from the archive? [y/N] ");
        if !ctx.cli.unattended && !confirm(&question)? {
            bail!("not deleting {name} (use -u to delete without asking)");
        }
    }
    // Copies are removed even when tracking is off now.
    let copies: Option<Box<dyn Snapshots>> = match &ctx.config.source {
        SourceKind::Lvm { .. } => ctx.thin_pool()?.map(|p| Box::new(p) as Box<dyn Snapshots>),
        SourceKind::Local { dir } => ReflinkCopies::existing(dir).map(|c| Box::new(c) as Box<dyn Snapshots>),
    };
    let mut rx = Receiver::connect(&ctx.config)?;
    for name in &ctx.cli.volumes {
        rx.delete_volume(&ctx.volume_ref(name)).with_context(|| format!("deleting {name}"))?;
        let deltamap = meta.volume(&ctx.pool_dir, name).deltamap_path().to_path_buf();
        meta.delete_volume(&ctx.pool_dir, name)?;
        if let Some(copies) = &copies {
            TrackedVolume::new(copies.as_ref(), name, &deltamap).remove_snapshots()?;
        }
        if ctx.config.volumes.iter().any(|(n, enabled)| n == name && *enabled) {
            log::warn!("{name} is still enabled in {}: its next send will be a full one", ctx.config.path.display());
        }
        log::info!("{name}: deleted from the archive and from dom0's metadata");
    }
    rx.finish()
}
