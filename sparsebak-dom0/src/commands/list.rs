//! `list [VOL...]`: with volumes, one line per session: its
//! `YYYYMMDD-HHMMSS`, format (folders or tar), volume size, chunks stored
//! and bytes stored. Without volumes, one line per volume that is archived
//! or configured, saying whether it is configured, enabled and present on
//! the source. Reads only dom0's metadata (dom0 never trusts the archive's
//! listing).

use super::Ctx;
use crate::config::SourceKind;
use crate::meta::MetaDir;
use crate::source::lvm::ThinPool;
use crate::ui::human_bytes;
use anyhow::Result;
use sparsebak_proto::names::volume_folder_name;

pub fn run(ctx: &Ctx) -> Result<()> {
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    if ctx.cli.volumes.is_empty() {
        // Metadata folders under the configured name they belong to.
        let configured_as = |folder: String| {
            let found = ctx.config.volumes.iter().find(|(n, _)| volume_folder_name(n) == folder);
            found.map_or(folder, |(n, _)| n.clone())
        };
        let mut names: Vec<String> =
            meta.volumes_with_metadata(&ctx.pool_dir)?.into_iter().map(configured_as).collect();
        names.extend(ctx.config.volumes.iter().map(|(n, _)| n.clone()));
        names.sort();
        names.dedup();
        // Listing must work even when the pool cannot be checked.
        let pool = ctx.thin_pool().unwrap_or_else(|e| {
            log::warn!("cannot check which volumes are present: {e:#}");
            None
        });
        for name in names {
            let vm = meta.volume(&ctx.pool_dir, &name);
            let sessions = if vm.exists() { vm.sessions()? } else { Vec::new() };
            let (configured, enabled) = match ctx.config.volumes.iter().find(|(n, _)| *n == name) {
                Some((_, e)) => (true, *e),
                None => (false, false),
            };
            let latest = sessions.last().map_or("-", |s| s.date_time());
            outln!(
                "{name}  sessions={}  latest={latest}  configured={}  enabled={}  present={}",
                sessions.len(),
                yes_no(configured),
                yes_no(enabled),
                present_on_source(ctx, pool.as_ref(), &name)
            );
        }
        return Ok(());
    }
    for name in &ctx.cli.volumes {
        ctx.config.validate_volume(name)?;
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
            outln!("{name}:");
        }
        for s in sessions {
            let info = vm.info(&s)?;
            outln!(
                "{}  format={}  size={}  chunks={}  bytes={}  ({})",
                s.date_time(),
                info.format_name(),
                info.volume_size,
                info.chunks,
                info.bytes,
                human_bytes(info.bytes)
            );
        }
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Whether the volume exists on the source (an image file, or an LV of
/// the pool), so users see which archived volumes are gone: "yes", "no",
/// or "unknown" when LVM could not be asked.
fn present_on_source(ctx: &Ctx, pool: Option<&ThinPool>, name: &str) -> &'static str {
    match (&ctx.config.source, pool) {
        (_, Some(pool)) => match pool.lv(name) {
            Ok(lv) => yes_no(lv.is_some()),
            Err(e) => {
                log::warn!("{name}: {e:#}");
                "unknown"
            }
        },
        (SourceKind::Local { dir }, None) => yes_no(dir.join(name).exists()),
        (SourceKind::Lvm { .. }, None) => "unknown",
    }
}
