//! `list [VOL...] [--json]`: with volumes, one line per session: its
//! `YYYYMMDD-HHMMSS`, format (folders or tar), volume size, chunks stored,
//! bytes stored and tags. Without volumes, one line per volume that is
//! archived or configured, saying whether it is configured, enabled and
//! present on the source. Reads only dom0's metadata (dom0 never trusts the
//! archive's listing).
//!
//! `--json` prints the same as one JSON document ([`Listing`]; the README
//! documents the fields, which stay stable: new ones may be added, none
//! renamed or removed without a new `format`).

use super::Ctx;
use crate::config::SourceKind;
use crate::meta::{MetaDir, SessionId, VolumeMeta};
use crate::source::lvm::ThinPool;
use crate::ui::human_bytes;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sparsebak_proto::names::volume_folder_name;

/// Version of the JSON document's shape.
const JSON_FORMAT: u32 = 1;

/// The JSON document.
#[derive(Serialize)]
struct Listing {
    format: u32,
    /// The archive's pool folder (`VG%POOL`, `local%DIR`).
    pool: String,
    volumes: Vec<VolumeListing>,
}

#[derive(Serialize)]
struct VolumeListing {
    /// As configured (or, when not configured, its folder name).
    name: String,
    /// Its folder in the archive and in dom0's metadata.
    folder: String,
    configured: bool,
    enabled: bool,
    /// "yes", "no" or "unknown" (only listed without volume names).
    #[serde(skip_serializing_if = "Option::is_none")]
    present: Option<&'static str>,
    sessions: Vec<SessionListing>,
}

#[derive(Serialize)]
struct SessionListing {
    /// `YYYYMMDD-HHMMSS`, as commands take it.
    session: String,
    /// The same in RFC 3339 (UTC).
    time: String,
    /// "folders" or "tar".
    format: &'static str,
    volume_size: u64,
    chunk_size: u64,
    /// Chunks stored in this session, and their bytes (compressed, sealed).
    chunks: u64,
    bytes: u64,
    /// All-zero chunks recorded in this session.
    zeros: u64,
    tags: Vec<String>,
}

pub fn run(ctx: &Ctx) -> Result<()> {
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let all = ctx.cli.volumes.is_empty();
    let volumes = match all {
        true => every_volume(ctx, &meta)?,
        false => named_volumes(ctx, &meta)?,
    };
    if ctx.cli.json {
        let doc = Listing { format: JSON_FORMAT, pool: ctx.pool_dir.clone(), volumes };
        let text = serde_json::to_string_pretty(&doc).context("writing the listing as JSON")?;
        outln!("{text}");
        return Ok(());
    }
    for v in &volumes {
        if all {
            let latest = v.sessions.last().map_or("-", |s| s.session.as_str());
            outln!(
                "{}  sessions={}  latest={latest}  configured={}  enabled={}  present={}",
                v.name,
                v.sessions.len(),
                yes_no(v.configured),
                yes_no(v.enabled),
                v.present.unwrap_or("unknown")
            );
            continue;
        }
        if v.sessions.is_empty() {
            log::info!("{}: no sessions yet", v.name);
            continue;
        }
        if volumes.len() > 1 {
            outln!("{}:", v.name);
        }
        for s in &v.sessions {
            let tags = if s.tags.is_empty() { String::new() } else { format!("  tags={}", s.tags.join(",")) };
            outln!(
                "{}  format={}  size={}  chunks={}  bytes={}  ({}){tags}",
                s.session,
                s.format,
                s.volume_size,
                s.chunks,
                s.bytes,
                human_bytes(s.bytes)
            );
        }
    }
    Ok(())
}

/// Every volume archived (by its metadata) or configured.
fn every_volume(ctx: &Ctx, meta: &MetaDir) -> Result<Vec<VolumeListing>> {
    // Metadata folders under the configured name they belong to.
    let configured_as = |folder: String| {
        let found = ctx.config.volumes.iter().find(|(n, _)| volume_folder_name(n) == folder);
        found.map_or(folder, |(n, _)| n.clone())
    };
    let mut names: Vec<String> = meta.volumes_with_metadata(&ctx.pool_dir)?.into_iter().map(configured_as).collect();
    names.extend(ctx.config.volumes.iter().map(|(n, _)| n.clone()));
    names.sort();
    names.dedup();
    // Listing must work even when the pool cannot be checked.
    let pool = ctx.thin_pool().unwrap_or_else(|e| {
        log::warn!("cannot check which volumes are present: {e:#}");
        None
    });
    names
        .into_iter()
        .map(|name| {
            let present = present_on_source(ctx, pool.as_ref(), &name);
            volume_listing(ctx, &meta.volume(&ctx.pool_dir, &name), name, Some(present))
        })
        .collect()
}

/// The volumes named on the command line; a name neither configured nor
/// archived is an error (a typo).
fn named_volumes(ctx: &Ctx, meta: &MetaDir) -> Result<Vec<VolumeListing>> {
    let mut out = Vec::new();
    for name in &ctx.cli.volumes {
        ctx.config.validate_volume(name)?;
        let vm = meta.volume(&ctx.pool_dir, name);
        let listing = volume_listing(ctx, &vm, name.clone(), None)?;
        if listing.sessions.is_empty() && !listing.configured {
            bail!("volume {name:?} is neither configured nor archived");
        }
        out.push(listing);
    }
    Ok(out)
}

fn volume_listing(ctx: &Ctx, vm: &VolumeMeta, name: String, present: Option<&'static str>) -> Result<VolumeListing> {
    let sessions = if vm.exists() { vm.sessions()? } else { Vec::new() };
    let (configured, enabled) = match ctx.config.volumes.iter().find(|(n, _)| *n == name) {
        Some((_, e)) => (true, *e),
        None => (false, false),
    };
    Ok(VolumeListing {
        folder: volume_folder_name(&name),
        name,
        configured,
        enabled,
        present,
        sessions: sessions.iter().map(|s| session_listing(vm, s)).collect::<Result<_>>()?,
    })
}

fn session_listing(vm: &VolumeMeta, s: &SessionId) -> Result<SessionListing> {
    let info = vm.info(s)?;
    Ok(SessionListing {
        session: s.date_time().to_string(),
        time: s.rfc3339(),
        format: info.format_name(),
        volume_size: info.volume_size,
        chunk_size: info.chunk_size,
        chunks: info.chunks,
        bytes: info.bytes,
        zeros: info.zeros,
        tags: info.tags,
    })
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
