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

use super::{human_bytes, Ctx};
use crate::chunk::{self, ChunkJob, Packed};
use crate::config::SourceKind;
use crate::image::ImageVolume;
use crate::manifest::{ChunkState, ManifestEntry, ManifestMerge, ManifestReader, ManifestWriter, MergedEntry};
use crate::metadir::{write_file_durably, MetaDir, VolumeMeta};
use crate::pipeline;
use crate::session::{SessionFormat, SessionId, SessionInfo};
use crate::transport::{kind, Receiver};
use anyhow::{bail, Context, Result};
use sparsebak_proto::msg::META_PIECE;
use sparsebak_proto::{MetaFile, Request, Response, VolumeRef};
use std::io::Read;
use std::iter::Peekable;
use std::time::Instant;

pub fn run(ctx: &Ctx) -> Result<()> {
    let names = ctx.config.select_volumes(&ctx.cli.volumes, true)?;
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let mut rx = Receiver::connect(&ctx.config)?;
    for name in &names {
        send_volume(ctx, &meta, &mut rx, name).with_context(|| format!("sending {name}"))?;
    }
    rx.finish()
}

/// Counts for the summary line and the info file.
#[derive(Default)]
struct Tally {
    chunks: u64,
    bytes: u64,
    zeros: u64,
}

fn send_volume(ctx: &Ctx, meta: &MetaDir, rx: &mut Receiver, name: &str) -> Result<()> {
    let started = Instant::now();
    let vm = meta.volume(&ctx.pool_dir, name);
    let volume = ctx.volume_ref(name);
    let archive_sessions = reconcile(&vm, rx, &volume)?;
    let sessions = vm.sessions()?;
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

    let SourceKind::Local { dir } = &ctx.config.source else {
        bail!("only image-file volumes are supported");
    };
    let mut source = ImageVolume::open(&dir.join(name))?;
    let size = source.size();

    let previous = PreviousLookup { merged: vm.merged(&sessions)?.peekable() };
    let newest_known = sessions.iter().chain(archive_sessions.iter()).max();
    let id = SessionId::next(chrono::Utc::now(), newest_known)?;
    let tmp = vm.tmp_session_dir(&id);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut manifest = ManifestWriter::create(&tmp.join("manifest"))?;
    let mut tally = Tally::default();
    let mut begun = false;

    let jobs = ScanJobs { source: &mut source, previous, chunk_size, size, next: 0, force_store: full };
    pipeline::ordered_map(jobs, pipeline::default_workers(), chunk::pack, |(addr, packed)| {
        let state = match packed {
            Packed::Unchanged => return Ok(()),
            Packed::Zero => {
                tally.zeros += 1;
                ChunkState::Zero
            }
            Packed::Stored { plain, stored, data } => {
                begin_once(rx, &mut begun, &volume, &id)?;
                tally.chunks += 1;
                tally.bytes += data.len() as u64;
                rx.send(&Request::PutChunk { addr, data })?;
                ChunkState::Stored { plain, stored }
            }
        };
        manifest.push(&ManifestEntry { addr, state })
    })?;
    manifest.finish()?;

    if tally.chunks == 0 && tally.zeros == 0 && prev_info.as_ref().is_some_and(|i| i.volume_size == size) {
        vm.discard_unfinished(&id)?;
        log::info!("{name}: no changes; no session created");
        return Ok(());
    }
    let info = SessionInfo {
        format: SessionFormat::Folders,
        chunk_size,
        volume_size: size,
        previous: latest.cloned(),
        chunks: tally.chunks,
        bytes: tally.bytes,
        zeros: tally.zeros,
    };
    write_file_durably(&tmp.join("info"), info.to_text().as_bytes())?;
    begin_once(rx, &mut begun, &volume, &id)?;
    send_meta_file(rx, MetaFile::Manifest, &tmp.join("manifest"))?;
    send_meta_file(rx, MetaFile::Info, &tmp.join("info"))?;
    expect_done(rx.call(&Request::Commit)?, "commit")?;
    vm.promote(&id)?;
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

fn begin_once(rx: &mut Receiver, begun: &mut bool, volume: &VolumeRef, id: &SessionId) -> Result<()> {
    if !*begun {
        let resp = rx.call(&Request::BeginSession { volume: volume.clone(), session: id.to_string() })?;
        expect_done(resp, "begin session")?;
        *begun = true;
    }
    Ok(())
}

fn expect_done(resp: Response, what: &str) -> Result<()> {
    match resp {
        Response::Done => Ok(()),
        other => bail!("unexpected answer to {what}: {}", kind(&other)),
    }
}

fn send_meta_file(rx: &mut Receiver, file: MetaFile, path: &std::path::Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; META_PIECE];
    // At least one piece, even for an empty manifest, so the file exists.
    let mut first = true;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 && !first {
            return Ok(());
        }
        first = false;
        rx.send(&Request::PutMeta { file, data: buf[..n].to_vec() })?;
    }
}

/// Brings dom0's metadata in line with the archive after an interrupted
/// send, and returns the archive's committed sessions of the volume.
fn reconcile(vm: &VolumeMeta, rx: &mut Receiver, volume: &VolumeRef) -> Result<Vec<SessionId>> {
    let listed = match rx.call(&Request::ListSessions { volume: volume.clone() })? {
        Response::Sessions(s) => s,
        other => bail!("unexpected answer to list sessions: {}", kind(&other)),
    };
    let archive: Vec<SessionId> = listed.iter().filter_map(|s| SessionId::parse(s).ok()).collect();
    for id in vm.unfinished_sessions()? {
        if archive.contains(&id) && vm.tmp_session_dir(&id).join("info").is_file() {
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
    for s in archive.iter().filter(|s| !known.contains(s)) {
        log::warn!("{}: the archive holds session {s} that dom0 has no record of; it is ignored", volume.name);
    }
    Ok(archive)
}

/// The chunks worth looking at, in address order: those that may hold data
/// (SEEK_DATA) and those where an older session stored data (they may have
/// become zero). Everything else is a hole that was already a hole, so a
/// sparse volume costs what its data costs.
struct ScanJobs<'a> {
    source: &'a mut ImageVolume,
    previous: PreviousLookup,
    chunk_size: u64,
    size: u64,
    next: u64,
    force_store: bool,
}

impl ScanJobs<'_> {
    fn next_job(&mut self) -> Result<Option<ChunkJob>> {
        let cs = self.chunk_size;
        if self.next >= self.size {
            return Ok(None);
        }
        let data_at = self.source.next_data(self.next)? / cs * cs;
        let stored_at = self.previous.next_stored_from(self.next)?;
        let addr = data_at.min(stored_at).max(self.next);
        if addr >= self.size {
            self.next = self.size;
            return Ok(None);
        }
        self.next = addr + cs;
        let len = cs.min(self.size - addr) as usize;
        Ok(Some(ChunkJob {
            addr,
            data: self.source.read_chunk(addr, len)?,
            previous: self.previous.at(addr)?,
            force_store: self.force_store,
        }))
    }
}

impl Iterator for ScanJobs<'_> {
    type Item = Result<ChunkJob>;

    fn next(&mut self) -> Option<Self::Item> {
        let r = self.next_job().transpose();
        if matches!(r, Some(Err(_))) {
            self.next = self.size;
        }
        r
    }
}

/// Walks the merged manifest of the sessions so far alongside the scan.
struct PreviousLookup {
    merged: Peekable<ManifestMerge<ManifestReader>>,
}

impl PreviousLookup {
    /// Drops entries before `addr`; the next entry is then at or after it.
    fn skip_before(&mut self, addr: u64) -> Result<()> {
        while let Some(peeked) = self.merged.peek() {
            match peeked {
                Ok(m) if m.entry.addr >= addr => break,
                Ok(_) => {
                    self.merged.next();
                }
                Err(_) => {
                    if let Some(Err(e)) = self.merged.next() {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// The newest entry at exactly `addr` (`None`: zero so far).
    fn at(&mut self, addr: u64) -> Result<Option<ChunkState>> {
        self.skip_before(addr)?;
        Ok(match self.merged.peek() {
            Some(Ok(m)) if m.entry.addr == addr => Some(m.entry.state),
            _ => None,
        })
    }

    /// The address of the first stored (non-zero) entry at or after `addr`.
    fn next_stored_from(&mut self, addr: u64) -> Result<u64> {
        self.skip_before(addr)?;
        loop {
            match self.merged.peek() {
                None => return Ok(u64::MAX),
                Some(Ok(MergedEntry { entry, .. })) if matches!(entry.state, ChunkState::Stored { .. }) => {
                    return Ok(entry.addr)
                }
                Some(Ok(_)) => {
                    self.merged.next();
                }
                Some(Err(_)) => {
                    if let Some(Err(e)) = self.merged.next() {
                        return Err(e);
                    }
                }
            }
        }
    }
}
