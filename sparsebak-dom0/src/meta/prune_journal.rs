//! dom0's prune journal, `VOLUME/prune.journal` in the metadata folder.
//!
//! Pruning session P into the next newer session N changes dom0's metadata
//! in two places (N's manifest and info, and P's folder); the journal makes
//! that one atomic step:
//! - `prepared`: written before the receiver is told anything. N's merged
//!   manifest and info are built beside the real ones (`manifest.merged`,
//!   `info.merged`), which readers ignore. A run that finds this state
//!   rolls back (the receiver undoes its links, the `.merged` files go).
//! - `committed`: written (atomically) once the receiver holds every
//!   surviving chunk in N. From here the prune is finished, never undone:
//!   [`settle_local`] installs the merged files and removes P, and runs
//!   before any reader looks at the sessions, so every command sees either
//!   the old or the merged set of sessions.
//!
//! The journal is removed only after the receiver settled its side too.

use crate::meta::SessionId;
use crate::meta::VolumeMeta;
use anyhow::{anyhow, bail, Context, Result};
use sparsebak_fsutil::{fsync_dir, with_suffix, write_file_durably};
use sparsebak_proto::testhook::dom0_step;
use sparsebak_proto::{layout, MetaFile};
use std::fs;
use std::path::PathBuf;

const MERGED_SUFFIX: &str = "merged";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalState {
    Prepared,
    Committed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneJournal {
    pub pruned: SessionId,
    pub into: SessionId,
    pub state: JournalState,
}

impl PruneJournal {
    fn path(vm: &VolumeMeta) -> PathBuf {
        vm.dir().join(layout::PRUNE_JOURNAL)
    }

    pub fn read(vm: &VolumeMeta) -> Result<Option<PruneJournal>> {
        let path = Self::path(vm);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("prune journal {}", path.display())).map(Some)
    }

    fn parse(text: &str) -> Result<PruneJournal> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .ok_or_else(|| anyhow!("missing {key}"))
        };
        let state = match field("state")? {
            "prepared" => JournalState::Prepared,
            "committed" => JournalState::Committed,
            other => bail!("unknown state {other:?}"),
        };
        Ok(PruneJournal { pruned: SessionId::parse(field("pruned")?)?, into: SessionId::parse(field("into")?)?, state })
    }

    fn to_text(&self) -> String {
        let state = match self.state {
            JournalState::Prepared => "prepared",
            JournalState::Committed => "committed",
        };
        format!("pruned={}\ninto={}\nstate={state}\n", self.pruned, self.into)
    }

    /// Writes the journal atomically and durably.
    pub fn write(&self, vm: &VolumeMeta) -> Result<()> {
        write_file_durably(&Self::path(vm), self.to_text().as_bytes())
    }

    pub fn remove(vm: &VolumeMeta) -> Result<()> {
        let path = Self::path(vm);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        fsync_dir(vm.dir())
    }
}

/// Where N's merged manifest or info is built before the commit.
pub fn merged_path(vm: &VolumeMeta, into: &SessionId, file: MetaFile) -> PathBuf {
    vm.session_dir(into).join(format!("{}.{MERGED_SUFFIX}", file.file_name()))
}

/// Completes the local half of a committed prune (idempotent); nothing to
/// do for a prepared one, whose `.merged` files readers ignore.
pub fn settle_local(vm: &VolumeMeta) -> Result<()> {
    let Some(j) = PruneJournal::read(vm)? else {
        return Ok(());
    };
    if j.state != JournalState::Committed {
        return Ok(());
    }
    let into_dir = vm.session_dir(&j.into);
    for file in [MetaFile::Manifest, MetaFile::Info] {
        let merged = merged_path(vm, &j.into, file);
        if merged.exists() {
            fs::rename(&merged, into_dir.join(file.file_name()))
                .with_context(|| format!("installing {}", merged.display()))?;
        }
    }
    fsync_dir(&into_dir)?;
    dom0_step("merged metadata installed");
    let pruned_dir = vm.session_dir(&j.pruned);
    let gone = with_suffix(&pruned_dir, layout::PRUNED_SUFFIX);
    if pruned_dir.exists() {
        fs::rename(&pruned_dir, &gone).with_context(|| format!("renaming {}", pruned_dir.display()))?;
        fsync_dir(vm.dir())?;
    }
    if gone.exists() {
        fs::remove_dir_all(&gone).with_context(|| format!("removing {}", gone.display()))?;
    }
    Ok(())
}

/// Removes the `.merged` files of a prune that is rolled back.
pub fn discard_merged(vm: &VolumeMeta, into: &SessionId) -> Result<()> {
    for file in [MetaFile::Manifest, MetaFile::Info] {
        let path = merged_path(vm, into, file);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_text_round_trips_and_rejects_garbage() {
        let j = PruneJournal {
            pruned: SessionId::parse("S_20260101-000000").expect("id"),
            into: SessionId::parse("S_20260102-000000").expect("id"),
            state: JournalState::Committed,
        };
        assert_eq!(PruneJournal::parse(&j.to_text()).expect("parses"), j);
        assert!(PruneJournal::parse("pruned=S_20260101-000000\ninto=x\nstate=committed\n").is_err());
        assert!(PruneJournal::parse(&j.to_text().replace("committed", "maybe")).is_err());
    }
}
