//! `send [VOL...]`: store every chunk that changed since the volume's last
//! session (all of them for a volume new to the archive) as a new session.
//!
//! Order of events, so that a send killed at any point leaves the archive
//! and dom0 as they were, or with a complete session that the next run
//! adopts:
//! 1. dom0 writes its manifest and info under `S_...-tmp` in its metadata;
//! 2. the receiver writes the chunks and its copies under `S_...-tmp` and
//!    commits (fsync, rename) when told to;
//! 3. dom0 renames its own `-tmp` folder. A run that finds a `-tmp` folder
//!    of its own promotes it if the archive has that session, else drops it.
//!
//! A send that finds nothing changed (same size, no changed chunk) creates no
//! session.

use super::Tracking;
use super::{prune, Ctx};
use crate::changes::{forget_history, is_unsupported, ArchiveState, Candidates, ScanJobs, TrackedVolume};
use crate::chunk::{self, pipeline, ChunkCodec, Packed};
use crate::config::SourceKind;
use crate::crypto::Keys;
use crate::meta::{
    ChunkState, ManifestEntry, ManifestWriter, MetaDir, SessionFormat, SessionId, SessionInfo, VolumeMeta,
};
use crate::remote::{
    archive_key,
    metafile::{self, MetaRef},
    rollback, Receiver,
};
use crate::source::{lvm::ThinPool, ImageVolume};
use crate::ui::{human_bytes, Progress};
use anyhow::{bail, Context, Result};
use sparsebak_fsutil::write_file_durably;
use sparsebak_proto::testhook::dom0_step as step;
use sparsebak_proto::{MetaFile, VolumeRef};
use std::time::Instant;

pub fn run(ctx: &Ctx) -> Result<()> {
    let names = ctx.config.select_volumes(&ctx.cli.volumes, true)?;
    for tag in &ctx.cli.tag {
        crate::meta::validate_tag(tag)?;
    }
    if ctx.cli.tag.len() > crate::meta::MAX_TAGS {
        bail!("at most {} tags per session", crate::meta::MAX_TAGS);
    }
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let pool = ctx.thin_pool()?;
    check_sources(ctx, pool.as_ref(), &names)?;
    let tracking = ctx.tracking_with(pool)?;
    let keys = archive_key::for_send(ctx.key_scope(), &meta, ctx.cli.passphrase_file.as_deref(), ctx.cli.unattended)?;
    let mut rx = Receiver::connect(&ctx.config)?;
    let keys = keys.establish(ctx.key_scope(), &mut rx)?;
    let autoprune = ctx.cli.autoprune || ctx.config.autoprune;
    if autoprune && ctx.config.retention.is_empty() {
        bail!("--autoprune needs keep rules in a [retention] section of {}", ctx.config.path.display());
    }
    let mut rx = Some(rx);
    for name in &names {
        let r = match &mut rx {
            Some(r) => r,
            None => rx.insert(Receiver::connect(&ctx.config)?),
        };
        send_volume(ctx, &meta, &tracking, r, keys.as_ref(), name).with_context(|| format!("sending {name}"))?;
        if autoprune {
            let (vm, volume) = (meta.volume(&ctx.pool_dir, name), ctx.volume_ref(name));
            // The session is committed and stands whatever happens here.
            match prune::prune_by_rules(&vm, r, keys.as_ref(), &volume, &ctx.config.retention) {
                Ok(0) => log::info!("{name}: autoprune: every session is kept"),
                Ok(n) => log::info!("{name}: autoprune: {n} session(s) pruned"),
                Err(e) => {
                    log::error!("{name}: autoprune failed (the new session stands): {e:#}");
                    // The receiver may have ended the conversation (an
                    // `Error` does): the next volume gets a fresh one.
                    if let Some(r) = rx.take() {
                        r.abandon();
                    }
                }
            }
        }
    }
    match rx {
        Some(r) => r.finish(),
        None => Ok(()),
    }
}

/// Checks that every volume to send exists before anything is written
/// anywhere: a mistyped `localdir` or volume name must not first create an
/// archive key, a session folder or a snapshot.
fn check_sources(ctx: &Ctx, pool: Option<&ThinPool>, names: &[String]) -> Result<()> {
    match (&ctx.config.source, pool) {
        (SourceKind::Local { dir }, _) => {
            if !dir.is_dir() {
                bail!("localdir {} is not a folder (see {})", dir.display(), ctx.config.path.display());
            }
            for name in names {
                ImageVolume::open(&dir.join(name)).with_context(|| format!("volume {name}"))?;
            }
        }
        (SourceKind::Lvm { .. }, Some(pool)) => {
            let lvs = pool.list_lvs()?;
            if let Some(name) = names.iter().find(|name| !lvs.iter().any(|lv| lv.name == **name)) {
                return Err(pool.no_such_volume(name));
            }
        }
        (SourceKind::Lvm { .. }, None) => bail!("internal error: no thin pool for LVM volumes"),
    }
    Ok(())
}

/// Counts for the summary line and the info file.
#[derive(Default)]
struct Tally {
    chunks: u64,
    bytes: u64,
    zeros: u64,
}

fn send_volume(
    ctx: &Ctx,
    meta: &MetaDir,
    tracking: &Tracking,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    name: &str,
) -> Result<()> {
    let started = Instant::now();
    let vm = meta.volume(&ctx.pool_dir, name);
    let volume = ctx.volume_ref(name);
    super::settle_interrupted(&vm, rx, keys, &volume)?;
    let archive_sessions = reconcile(&vm, rx, &volume)?;
    let sessions = vm.sessions()?;
    rollback::check(&volume, &sessions, &archive_sessions)?;
    let missing: Vec<&SessionId> = sessions.iter().filter(|s| !archive_sessions.contains(s)).collect();
    let full = !missing.is_empty();
    if full {
        log::warn!(
            "{name}: the archive lacks {} session(s) that dom0 recorded (first: {}); sending the whole volume",
            missing.len(),
            missing[0]
        );
    }
    let latest = sessions.last();
    let prev_info = latest.map(|s| vm.info(s)).transpose()?;
    let chunk_size = prev_info.as_ref().map_or(ctx.config.chunk_size, |i| i.chunk_size);

    // Where to read and which chunks to look at. A tracked volume is read
    // from its tock copy, which `tracked` owns until the session is
    // committed.
    let archive = match &prev_info {
        None if sessions.is_empty() => ArchiveState::New,
        Some(i) if !full => ArchiveState::Archived { tail_start: i.volume_size },
        _ => ArchiveState::Unusable,
    };
    let tracked_volume = tracking.copies_for(name)?.map(|c| TrackedVolume::new(c, name, vm.deltamap_path()));
    let begun_send = match &tracked_volume {
        Some(t) => match t.begin_send(chunk_size, archive) {
            Ok(send) => Some(send),
            Err(e) if is_unsupported(&e) => {
                log::warn!("{name}: {e:#}; comparing the whole volume");
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let (mut source, candidates, tracked) = match begun_send {
        Some(mut t) => (ImageVolume::open(&t.path()?)?, t.take_candidates()?, Some(t)),
        None => match &ctx.config.source {
            SourceKind::Local { dir } => {
                // Any tick of it stops matching the archive with this
                // session: its history must not be trusted later.
                forget_history(vm.deltamap_path())?;
                (ImageVolume::open(&dir.join(name))?, Candidates::AllData, None)
            }
            SourceKind::Lvm { .. } => bail!("internal error: an LVM volume without its snapshots"),
        },
    };
    if matches!(archive, ArchiveState::Archived { .. }) && matches!(candidates, Candidates::Marked { .. }) {
        source.advise_random();
    }
    let size = source.size();

    let newest_known = sessions.iter().chain(archive_sessions.iter()).max();
    let id = SessionId::next(session_clock()?, newest_known)?;
    let tmp = vm.tmp_session_dir(&id);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut manifest = ManifestWriter::create(&tmp.join(MetaFile::Manifest.file_name()))?;
    let mut tally = Tally::default();
    let mut begun = false;
    let format = if ctx.cli.tarfile { SessionFormat::Tar } else { SessionFormat::Folders };

    let jobs = ScanJobs::new(&mut source, vm.merged(&sessions)?, candidates, chunk_size, full);
    let progress = Progress::bytes(&format!("send {name}"), size);
    let codec = ChunkCodec { keys, volume: &volume };
    let pack = |job| chunk::pack(job, &codec, id.as_str());
    pipeline::ordered_map(jobs, pipeline::Lanes::for_chunks(chunk_size), pack, |(addr, packed)| {
        progress.set_position(addr);
        let state = match packed {
            Packed::Unchanged => return Ok(()),
            Packed::Zero => {
                tally.zeros += 1;
                ChunkState::Zero
            }
            Packed::Stored { plain, stored, data } => {
                begin_once(rx, &mut begun, &volume, &id, format)?;
                tally.chunks += 1;
                tally.bytes += data.len() as u64;
                rx.put_chunk(addr, data)?;
                ChunkState::Stored { plain, stored, origin: None }
            }
        };
        manifest.push(&ManifestEntry { addr, state })
    })?;
    drop(progress);
    manifest.finish()?;

    if tally.chunks == 0 && tally.zeros == 0 && prev_info.as_ref().is_some_and(|i| i.volume_size == size) {
        vm.discard_unfinished(&id)?;
        if let Some(t) = tracked {
            t.finish(chunk_size, size)?;
        }
        log::info!("{name}: no changes; no session created");
        return Ok(());
    }
    let info = SessionInfo {
        format,
        chunk_size,
        volume_size: size,
        previous: latest.cloned(),
        chunks: tally.chunks,
        bytes: tally.bytes,
        zeros: tally.zeros,
        tags: ctx.cli.tag.clone(),
    };
    write_file_durably(&tmp.join(MetaFile::Info.file_name()), info.to_text().as_bytes())?;
    begin_once(rx, &mut begun, &volume, &id, format)?;
    for file in [MetaFile::Manifest, MetaFile::Info] {
        let m = MetaRef { keys, volume: &volume, session: id.as_str(), file };
        metafile::send(rx, m, &tmp.join(file.file_name()))?;
    }
    rx.commit()?;
    step("session committed");
    vm.promote(&id)?;
    step("session recorded");
    if let Some(t) = tracked {
        t.finish(chunk_size, size)?;
    }
    let secs = started.elapsed().as_secs_f64();
    log::info!(
        "{name}: session {} sent: {} chunks changed, {} stored, {} zero chunks, {:.1} s ({:.0} MB/s scanned)",
        id.date_time(),
        tally.chunks,
        human_bytes(tally.bytes),
        tally.zeros,
        secs,
        size as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}

/// The time a new session is named after: now. A test hook like the stop
/// hook (`sparsebak_proto::testhook`), `SPARSEBAK_TEST_NOW=RFC3339`, sets
/// the clock, so that retention tests can make sessions hours and months
/// apart; names still only ever increase.
fn session_clock() -> Result<chrono::DateTime<chrono::Utc>> {
    match std::env::var("SPARSEBAK_TEST_NOW") {
        Ok(t) => Ok(chrono::DateTime::parse_from_rfc3339(&t)
            .with_context(|| format!("SPARSEBAK_TEST_NOW={t:?} is not an RFC 3339 time"))?
            .with_timezone(&chrono::Utc)),
        Err(_) => Ok(chrono::Utc::now()),
    }
}

fn begin_once(
    rx: &mut Receiver,
    begun: &mut bool,
    volume: &VolumeRef,
    id: &SessionId,
    format: SessionFormat,
) -> Result<()> {
    if !*begun {
        rx.begin_session(volume, id.as_str(), format)?;
        *begun = true;
    }
    Ok(())
}

/// Brings dom0's metadata in line with the archive after an interrupted
/// send, and returns the archive's committed sessions of the volume.
fn reconcile(vm: &VolumeMeta, rx: &mut Receiver, volume: &VolumeRef) -> Result<Vec<SessionId>> {
    let archive = rollback::archive_sessions(rx, volume)?;
    for id in vm.unfinished_sessions()? {
        if archive.contains(&id) && vm.tmp_session_dir(&id).join(MetaFile::Info.file_name()).is_file() {
            log::warn!(
                "{}: adopting session {id}, committed by the receiver before the last run was interrupted",
                volume.name
            );
            vm.promote(&id)?;
        } else {
            vm.discard_unfinished(&id)?;
        }
    }
    let known = vm.sessions()?;
    for s in rollback::unrecorded(&known, &archive) {
        log::warn!("{}: the archive holds session {s} that dom0 has no record of; it is ignored", volume.name);
    }
    Ok(archive)
}
