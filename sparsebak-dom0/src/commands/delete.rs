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
use crate::changes::TrackedVolume;
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
    let pool = ctx.thin_pool()?;
    let mut rx = Receiver::connect(&ctx.config)?;
    for name in &ctx.cli.volumes {
        rx.delete_volume(&ctx.volume_ref(name)).with_context(|| format!("deleting {name}"))?;
        let deltamap = meta.volume(&ctx.pool_dir, name).deltamap_path().to_path_buf();
        meta.delete_volume(&ctx.pool_dir, name)?;
        if let Some(pool) = &pool {
            TrackedVolume::new(pool, name, &deltamap).remove_snapshots()?;
        }
        if ctx.config.volumes.iter().any(|(n, enabled)| n == name && *enabled) {
            log::warn!("{name} is still enabled in {}: its next send will be a full one", ctx.config.path.display());
        }
        log::info!("{name}: deleted from the archive and from dom0's metadata");
    }
    rx.finish()
}
