//! `monitor [VOL...]` (LVM, and image files tracked by reflink copies): fold the changes since the last run into each
//! volume's delta map, in seconds, without reading the volumes. Run from a
//! timer; safe to run at any time (it takes the metadata lock). A failure on
//! one volume does not stop the others; the exit status reports it.

use super::Ctx;
use crate::changes::{MonitorOutcome, TrackedVolume};
use crate::meta::MetaDir;
use anyhow::{bail, Result};

pub fn run(ctx: &Ctx) -> Result<()> {
    let names = ctx.config.select_volumes(&ctx.cli.volumes, true)?;
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let tracking = ctx.tracking()?;
    let mut failed = Vec::new();
    for name in &names {
        let vm = meta.volume(&ctx.pool_dir, name);
        let outcome = tracking.require("monitor", name).and_then(|copies| {
            let cs = ctx.chunk_size_of(&vm)?;
            TrackedVolume::new(copies, name, vm.deltamap_path()).monitor(cs)
        });
        match outcome {
            Ok(MonitorOutcome::Tracked(n)) => log::info!("{name}: {n} chunks marked for the next send"),
            Ok(MonitorOutcome::NotSentYet) => log::info!("{name}: not sent yet; nothing to track"),
            Ok(MonitorOutcome::Untrusted(why)) => {
                log::warn!("{name}: {why}; the next send compares the whole volume (or run `sparsebak resync {name}`)")
            }
            Err(e) => {
                log::error!("{name}: {e:#}");
                failed.push(name.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!("monitor failed for {}", failed.join(", "));
    }
    Ok(())
}
