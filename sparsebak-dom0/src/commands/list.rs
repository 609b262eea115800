//! `list [VOL...]`: with volumes, one line per session starting with its
//! `YYYYMMDD-HHMMSS`; without, one line per volume that has sessions.
//! Reads only dom0's metadata (dom0 never trusts the archive's listing).

use super::{human_bytes, Ctx};
use crate::metadir::MetaDir;
use anyhow::Result;

pub fn run(ctx: &Ctx) -> Result<()> {
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    if ctx.cli.volumes.is_empty() {
        for name in meta.volumes_with_metadata(&ctx.pool_dir)? {
            let vm = meta.volume(&ctx.pool_dir, &name);
            let sessions = vm.sessions()?;
            let configured = match ctx.config.volumes.iter().find(|(n, _)| *n == name) {
                Some((_, true)) => "enabled",
                Some((_, false)) => "disabled",
                None => "not configured",
            };
            let latest = sessions.last().map_or("-", |s| s.date_time());
            println!("{name}  sessions={}  latest={latest}  ({configured})", sessions.len());
        }
        return Ok(());
    }
    for name in &ctx.cli.volumes {
        sparsebak_proto::names::validate_volume_name(name)?;
        let vm = meta.volume(&ctx.pool_dir, name);
        let sessions = vm.sessions()?;
        if sessions.is_empty() {
            // An empty list for a known volume; an error for a typo.
            if !ctx.config.volumes.iter().any(|(n, _)| n == name) {
                anyhow::bail!("volume {name:?} is neither configured nor archived");
            }
            log::info!("{name}: no sessions yet");
            continue;
        }
        if ctx.cli.volumes.len() > 1 {
            println!("{name}:");
        }
        for s in sessions {
            let info = vm.info(&s)?;
            println!(
                "{}  size={}  chunks={}  stored={}",
                s.date_time(),
                info.volume_size,
                info.chunks,
                human_bytes(info.bytes)
            );
        }
    }
    Ok(())
}
