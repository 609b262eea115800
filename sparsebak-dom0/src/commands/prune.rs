//! `prune --session=DT[,DT] [VOL...]`: removes sessions without rewriting
//! chunk data. Pruning session P merges it into the next newer session N:
//! dom0 merges the two manifests itself (the receiver's copies are never
//! trusted), each chunk of P that N does not override moves into N on the
//! receiver (hard link, or extraction out of a tar), and the rest of P goes.
//!
//! What must hold afterwards: every remaining session restores exactly as
//! before. The merged manifest N' keeps all of N's entries, plus P's entries
//! at addresses N lacks, except:
//! - entries at or beyond the largest volume size of N and every newer
//!   session are trimmed: no remaining session can see them, and a later
//!   send that grows the volume compares against the merged view, which
//!   then says "zero" there. (Trimming at N's own size would be wrong: a
//!   newer, larger session may rely on P's chunk where N was smaller.)
//! - P's zero entries are dropped when P is the oldest session: with no
//!   older session, "absent" already means zero. Otherwise they stay, as
//!   they hide older data.
//!
//! A range is pruned newest first, so each chunk moves at most once. Each
//! single prune is journaled on both sides (see `prune_journal.rs` and the
//! receiver's `prune.rs`); an interrupted one is settled (finished or
//! rolled back) first by the next command that talks to the receiver about
//! the volume (send, receive, verify, prune), so a timer's next send brings
//! both sides back in line.
//! Cost: one pass over the manifests of P and N, one link per moved chunk;
//! nothing proportional to the volume size.

use super::Ctx;
use crate::config::KeepRules;
use crate::crypto::Keys;
use crate::meta::retention::{self, Candidate, Decision};
use crate::meta::{
    prune_journal::{self, merged_path, JournalState, PruneJournal},
    ChunkState, ManifestWriter, MetaDir, Origin, SessionId, SessionInfo, VolumeMeta,
};
use crate::remote::{
    metafile::{self, MetaRef},
    Receiver,
};
use anyhow::{bail, Context, Result};
use sparsebak_fsutil::write_file_durably;
use sparsebak_proto::testhook::dom0_step as step;
use sparsebak_proto::{MetaFile, VolumeRef};
use std::time::Instant;

/// Addresses per `PruneLink` message (8 bytes each, far below the frame cap).
const LINK_BATCH: usize = 16 * 1024;

/// What a `prune` removes.
enum Selection {
    /// `--session=DT[,DT]`: the named sessions (inclusive range).
    Range { spec: String, from: SessionId, to: SessionId },
    /// `--keep-*` rules, or the config's `[retention]`.
    Rules(KeepRules),
}

fn selection(ctx: &Ctx) -> Result<Selection> {
    let cli = ctx.cli;
    let given = cli.keep_options();
    let [last, hourly, daily, weekly, monthly, yearly] = given.map(|n| n.unwrap_or(0));
    let from_cli = KeepRules { last, hourly, daily, weekly, monthly, yearly };
    match (cli.session.as_deref(), given.iter().any(Option::is_some)) {
        (Some(_), true) => bail!("--session and --keep-* rules do not mix: prune named sessions or prune by rules"),
        (Some(_), false) if cli.dry_run => {
            bail!("--dry-run shows what keep rules would do; --session names the sessions itself")
        }
        (Some(spec), false) => {
            let (from, to) = parse_range(spec)?;
            Ok(Selection::Range { spec: spec.to_string(), from, to })
        }
        (None, true) => Ok(Selection::Rules(from_cli)),
        (None, false) if !ctx.config.retention.is_empty() => Ok(Selection::Rules(ctx.config.retention)),
        (None, false) => bail!(
            "prune needs --session=DT[,DT] or --keep-last/-hourly/-daily/-weekly/-monthly/-yearly rules \
             (or a [retention] section in the config)"
        ),
    }
}

pub fn run(ctx: &Ctx) -> Result<()> {
    let selection = selection(ctx)?;
    let names = match ctx.cli.volumes.is_empty() {
        true => ctx.config.select_volumes(&[], true)?,
        false => ctx.cli.volumes.clone(),
    };
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let mut volumes = Vec::new();
    for name in &names {
        ctx.config.validate_volume(name)?;
        let vm = meta.volume(&ctx.pool_dir, name);
        if !vm.exists() {
            bail!("volume {name:?} has no sessions in {}", ctx.config.meta_dir.display());
        }
        volumes.push((name, vm));
    }
    if ctx.cli.dry_run {
        let Selection::Rules(rules) = &selection else { bail!("internal error: dry run of a range") };
        for (name, vm) in &volumes {
            for d in decide_for(vm, rules)? {
                let what = match &d.keep {
                    None => "prune".to_string(),
                    Some(reason) => format!("keep ({reason})"),
                };
                outln!("{name} {} {what}", d.session.date_time());
            }
        }
        return Ok(());
    }
    let keys = ctx.keys(&meta)?;
    let mut rx = Receiver::connect(&ctx.config)?;
    let mut pruned = 0;
    for (name, vm) in &volumes {
        let volume = ctx.volume_ref(name);
        pruned += match &selection {
            Selection::Range { from, to, .. } => prune_range(vm, &mut rx, keys.as_ref(), &volume, from, to),
            Selection::Rules(rules) => prune_by_rules(vm, &mut rx, keys.as_ref(), &volume, rules),
        }
        .with_context(|| format!("pruning {name}"))?;
    }
    rx.finish()?;
    match selection {
        Selection::Range { spec, .. } if pruned == 0 => {
            bail!("no session was pruned: none matched --session={spec} (see `sparsebak list VOLUME`)")
        }
        Selection::Rules(_) if pruned == 0 => log::info!("every session is kept by the rules; nothing pruned"),
        _ => {}
    }
    Ok(())
}

/// `DT` or `DT1,DT2` (inclusive, in either order).
fn parse_range(spec: &str) -> Result<(SessionId, SessionId)> {
    let (a, b) = match spec.split_once(',') {
        Some((a, b)) => (SessionId::from_user(a.trim())?, SessionId::from_user(b.trim())?),
        None => (SessionId::from_user(spec.trim())?, SessionId::from_user(spec.trim())?),
    };
    Ok(if a <= b { (a, b) } else { (b, a) })
}

/// Prunes the volume's sessions in `[from, to]`; returns how many. A
/// tagged session in the range stops it before anything is pruned.
fn prune_range(
    vm: &VolumeMeta,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    from: &SessionId,
    to: &SessionId,
) -> Result<usize> {
    super::settle_interrupted(vm, rx, keys, volume)?;
    let sessions = vm.sessions()?;
    let mut targets: Vec<SessionId> = sessions.iter().filter(|s| *s >= from && *s <= to).cloned().collect();
    if targets.last().is_some() && targets.last() == sessions.last() {
        let newest = targets.pop().context("no target")?;
        log::warn!("{}: {} is the newest session; the newest session is never pruned", volume.name, newest.date_time());
    }
    for s in &targets {
        let tags = vm.info(s)?.tags;
        if !tags.is_empty() {
            bail!(
                "session {} is tagged {}; remove its tags first (`sparsebak untag {} {} TAG`)",
                s.date_time(),
                tags.join(","),
                volume.name,
                s.date_time()
            );
        }
    }
    prune_sessions(vm, rx, keys, volume, &targets)
}

/// Prunes what `rules` do not keep (tagged and newest sessions are always
/// kept); returns how many. Also `send --autoprune`.
pub fn prune_by_rules(
    vm: &VolumeMeta,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    rules: &KeepRules,
) -> Result<usize> {
    super::settle_interrupted(vm, rx, keys, volume)?;
    let targets: Vec<SessionId> =
        decide_for(vm, rules)?.into_iter().filter(|d| !d.is_kept()).map(|d| d.session).collect();
    prune_sessions(vm, rx, keys, volume, &targets)
}

/// The rules' decision for each of the volume's sessions, oldest first.
fn decide_for(vm: &VolumeMeta, rules: &KeepRules) -> Result<Vec<Decision>> {
    let sessions = vm.sessions()?;
    let tags: Vec<Vec<String>> = sessions.iter().map(|s| vm.info(s).map(|i| i.tags)).collect::<Result<_>>()?;
    let candidates: Vec<Candidate> =
        sessions.iter().zip(&tags).map(|(session, tags)| Candidate { session, tags }).collect();
    retention::decide(&candidates, rules)
}

/// Prunes `targets` newest first, so that each chunk moves at most once.
fn prune_sessions(
    vm: &VolumeMeta,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    targets: &[SessionId],
) -> Result<usize> {
    for p in targets.iter().rev() {
        let sessions = vm.sessions()?;
        let i = sessions.iter().position(|s| s == p).context("pruned session vanished")?;
        if i + 1 == sessions.len() {
            bail!("internal error: the newest session {} is never pruned", p.date_time());
        }
        prune_one(vm, rx, keys, volume, &sessions, i)?;
    }
    Ok(targets.len())
}

/// What one prune did, for the summary line.
#[derive(Default)]
struct Tally {
    moved: u64,
    zeros_kept: u64,
    trimmed: u64,
    /// Zero entries of the oldest session: "absent" already means zero.
    zeros_dropped: u64,
    /// Entries of P that N does not override.
    p_entries: u64,
}

/// Merges `sessions[i]` into `sessions[i + 1]`.
///
/// A chunk moved from P keeps its seal, which names the session it was first
/// stored in: the merged manifest records that origin (P, or the origin P's
/// entry already had) so that receive can still open it.
fn prune_one(
    vm: &VolumeMeta,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    sessions: &[SessionId],
    i: usize,
) -> Result<()> {
    let started = Instant::now();
    let (p, n) = (&sessions[i], &sessions[i + 1]);
    let (p_info, n_info) = (vm.info(p)?, vm.info(n)?);
    if p_info.chunk_size != n_info.chunk_size {
        bail!("sessions {p} and {n} have different chunk sizes");
    }
    let mut keep_below = 0;
    for s in &sessions[i + 1..] {
        keep_below = keep_below.max(vm.info(s)?.volume_size);
    }
    let keep_zeros = i > 0;

    let mut journal = PruneJournal { pruned: p.clone(), into: n.clone(), state: JournalState::Prepared };
    journal.write(vm)?;
    step("prune journal prepared");
    rx.prune_begin(volume, p.as_str(), n.as_str())?;
    step("receiver began the prune");

    let manifest_path = merged_path(vm, n, MetaFile::Manifest);
    let mut manifest = ManifestWriter::create(&manifest_path)?;
    let mut tally = Tally::default();
    let mut batch = Vec::with_capacity(LINK_BATCH);
    let p_origin = Origin::new(p.as_str())?;
    for m in vm.merged(&[p.clone(), n.clone()])? {
        let mut m = m?;
        if m.session == 1 {
            manifest.push(&m.entry)?; // N's own entry wins
            continue;
        }
        tally.p_entries += 1;
        if m.entry.addr >= keep_below {
            tally.trimmed += 1;
            continue;
        }
        match m.entry.state {
            ChunkState::Zero if !keep_zeros => {
                tally.zeros_dropped += 1;
                continue;
            }
            ChunkState::Zero => tally.zeros_kept += 1,
            ChunkState::Stored { ref mut origin, .. } => {
                origin.get_or_insert(p_origin);
                tally.moved += 1;
                batch.push(m.entry.addr);
                if batch.len() == LINK_BATCH {
                    rx.prune_link(std::mem::take(&mut batch))?;
                }
            }
        }
        manifest.push(&m.entry)?;
    }
    if !batch.is_empty() {
        rx.prune_link(batch)?;
    }
    manifest.finish()?;
    metafile::send(rx, MetaRef { keys, volume, session: n.as_str(), file: MetaFile::Manifest }, &manifest_path)?;
    step("prune addresses sent");
    // The receiver's figure only feeds `list`; it cannot exceed P's own.
    let linked_bytes = rx.prune_linked()?.min(p_info.bytes);
    step("receiver linked");

    let merged_info = SessionInfo {
        previous: p_info.previous.clone(),
        chunks: n_info.chunks + tally.moved,
        bytes: n_info.bytes + linked_bytes,
        zeros: n_info.zeros + tally.zeros_kept,
        ..n_info
    };
    write_file_durably(&merged_path(vm, n, MetaFile::Info), merged_info.to_text().as_bytes())?;
    step("merged info written");
    journal.state = JournalState::Committed;
    journal.write(vm)?;
    step("prune journal committed");
    prune_journal::settle_local(vm)?;
    step("local metadata settled");
    finish_on_receiver(vm, rx, keys, volume, &journal)?;
    log::info!(
        "{}: pruned session {} into {}: {} chunks moved, {} superseded, {} trimmed, {} zero entries kept, {} dropped ({:.2} s)",
        volume.name,
        p.date_time(),
        n.date_time(),
        tally.moved,
        (p_info.chunks + p_info.zeros).saturating_sub(tally.p_entries),
        tally.trimmed,
        tally.zeros_kept,
        tally.zeros_dropped,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Tells the receiver to finish a committed prune, then drops the journal.
fn finish_on_receiver(
    vm: &VolumeMeta,
    rx: &mut Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    j: &PruneJournal,
) -> Result<()> {
    let info_path = vm.session_dir(&j.into).join(MetaFile::Info.file_name());
    let info = std::fs::read(&info_path).with_context(|| format!("reading {}", info_path.display()))?;
    let info = metafile::seal_single(MetaRef { keys, volume, session: j.into.as_str(), file: MetaFile::Info }, info)?;
    rx.prune_finish(volume, j.pruned.as_str(), j.into.as_str(), info)?;
    step("receiver finished the prune");
    PruneJournal::remove(vm)?;
    step("prune journal removed");
    Ok(())
}

/// Settles a prune that a kill interrupted: a committed one is finished,
/// a prepared one rolled back, on both sides.
pub fn settle(vm: &VolumeMeta, rx: &mut Receiver, keys: Option<&Keys>, volume: &VolumeRef) -> Result<()> {
    let Some(j) = PruneJournal::read(vm)? else {
        return Ok(());
    };
    match j.state {
        JournalState::Committed => {
            log::warn!("{}: finishing the interrupted prune of session {}", volume.name, j.pruned.date_time());
            prune_journal::settle_local(vm)?;
            finish_on_receiver(vm, rx, keys, volume, &j)
        }
        JournalState::Prepared => {
            log::warn!("{}: rolling back the interrupted prune of session {}", volume.name, j.pruned.date_time());
            rx.prune_abort(volume)?;
            prune_journal::discard_merged(vm, &j.into)?;
            PruneJournal::remove(vm)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let (a, b) = parse_range("20260102-000000,20260101-000000").expect("range");
        assert_eq!((a.date_time(), b.date_time()), ("20260101-000000", "20260102-000000"));
        let (a, b) = parse_range("S_20260101-000000").expect("single");
        assert_eq!(a, b);
        assert!(parse_range("yesterday").is_err());
        assert!(parse_range("20260101-000000,").is_err());
    }
}
