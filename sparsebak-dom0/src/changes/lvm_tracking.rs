//! Change tracking of one thin volume with short-lived snapshots:
//!
//! - `VOL.tick`: read-only snapshot holding the state of the last send (or
//!   of the last `monitor`, whose changes since that send are in the map);
//! - `VOL.tock`: made by `monitor`/`send`, compared with tick by
//!   `thin_delta`, then it replaces tick;
//! - `VOL.deltamap` (dom0 metadata): chunks changed since the last send.
//!
//! Ordering makes every interruption recoverable without losing a change:
//! the map is saved before tock replaces tick, and cleared only after the
//! receiver committed a session. A run that finds tick and tock removes the
//! stale tock and compares again (marking twice is harmless); one that finds
//! only tock finishes the interrupted rotation. When the history cannot be
//! trusted (no tick, a missing or damaged map, a different chunk size), the
//! send falls back to reading the whole volume and comparing chunk hashes
//! with the archive's manifests.

use super::{Candidates, DeltaMap, LoadError};
use crate::source::lvm::ThinPool;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub struct TrackedVolume<'a> {
    pool: &'a ThinPool,
    name: String,
    map_path: PathBuf,
}

/// What the archive holds of a volume as a send starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveState {
    /// No session of the volume anywhere: its first send, which reads only
    /// the blocks the thin pool has mapped.
    New,
    /// Sessions that the new one cannot build on (the archive lacks some):
    /// the whole volume is compared.
    Unusable,
    /// Sessions to build on; the last one covered `tail_start` bytes.
    Archived { tail_start: u64 },
}

/// What `monitor` did for a volume.
pub enum MonitorOutcome {
    /// Changes folded into the map: (chunks marked now in total).
    Tracked(u64),
    /// Never sent: there is no tick to compare with yet.
    NotSentYet,
    /// The map is missing or damaged: left for `send` to fall back.
    Untrusted(String),
}

impl<'a> TrackedVolume<'a> {
    pub fn new(pool: &'a ThinPool, name: &str, map_path: &Path) -> TrackedVolume<'a> {
        TrackedVolume { pool, name: name.to_string(), map_path: map_path.to_path_buf() }
    }

    fn tick(&self) -> String {
        format!("{}.tick", self.name)
    }

    fn tock(&self) -> String {
        format!("{}.tock", self.name)
    }

    /// `delete`: removes whichever of the two snapshots exist (the map
    /// goes with dom0's metadata).
    pub fn remove_snapshots(&self) -> Result<()> {
        let lvs = self.pool.list_lvs()?;
        for lv in [self.tick(), self.tock()] {
            if lvs.iter().any(|l| l.name == lv) {
                self.pool.remove_lv(&lv)?;
            }
        }
        Ok(())
    }

    /// Puts the snapshots back into a known state after an interrupted run.
    /// Returns whether a tick exists afterwards.
    fn recover(&self) -> Result<bool> {
        let lvs = self.pool.list_lvs()?;
        let has = |n: &str| lvs.iter().any(|l| l.name == n);
        if !has(&self.name) {
            return Err(self.pool.no_such_volume(&self.name));
        }
        match (has(&self.tick()), has(&self.tock())) {
            (true, true) => {
                log::warn!("{}: removing {} left by an interrupted run", self.name, self.tock());
                self.pool.remove_lv(&self.tock())?;
                Ok(true)
            }
            (false, true) => {
                log::warn!("{}: finishing the interrupted rotation of {}", self.name, self.tock());
                self.pool.rename_lv(&self.tock(), &self.tick())?;
                Ok(true)
            }
            (has_tick, false) => Ok(has_tick),
        }
    }

    /// The map, or why the change history is unusable (then the whole
    /// volume is compared). A map from a newer sparsebak is an error: a
    /// downgrade must not silently discard what the newer one recorded.
    fn load_map(&self, chunk_size: u64) -> Result<Result<DeltaMap, String>> {
        Ok(match DeltaMap::load(&self.map_path) {
            Ok(m) if m.chunk_size() == chunk_size => Ok(m),
            Ok(m) => Err(format!("delta map chunk size {} differs from the archive's {chunk_size}", m.chunk_size())),
            Err(e @ LoadError::Newer(..)) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Snapshot tock, fold tick->tock changes into `map`, save it.
    fn fold_changes(&self, map: &mut DeltaMap) -> Result<u64> {
        self.pool.create_snapshot(&self.name, &self.tock())?;
        let scanned =
            self.pool.scan_changes(&self.tick(), &self.tock(), |c| map.mark_bytes(c.start, c.len)).and_then(|r| {
                map.resize(r.right.size.div_ceil(map.chunk_size()))?;
                map.save(&self.map_path)?;
                Ok(r)
            });
        if let Err(e) = scanned {
            self.remove_tock_quietly();
            return Err(e);
        }
        Ok(map.count_marked())
    }

    fn remove_tock_quietly(&self) {
        if let Err(e) = self.pool.remove_lv(&self.tock()) {
            log::error!("{}: {e:#}", self.name);
        }
    }

    /// `monitor`: fold the changes since the last run into the map.
    pub fn monitor(&self, chunk_size: u64) -> Result<MonitorOutcome> {
        if !self.recover()? {
            return Ok(MonitorOutcome::NotSentYet);
        }
        let mut map = match self.load_map(chunk_size)? {
            Ok(m) => m,
            Err(why) => return Ok(MonitorOutcome::Untrusted(why)),
        };
        let marked = self.fold_changes(&mut map)?;
        self.pool.replace_lv(&self.tock(), &self.tick())?;
        Ok(MonitorOutcome::Tracked(marked))
    }

    /// Starts a send: makes tock and decides which chunks to look at.
    pub fn begin_send(&self, chunk_size: u64, archive: ArchiveState) -> Result<TrackedSend<'_>> {
        let has_tick = self.recover()?;
        let candidates = match archive {
            ArchiveState::New => {
                self.pool.create_snapshot(&self.name, &self.tock())?;
                match self.mapped_chunks(chunk_size) {
                    Ok(map) => Candidates::Marked { map, tail_start: u64::MAX },
                    Err(e) => {
                        log::warn!(
                            "{}: mapping of {} unknown ({e:#}); reading the whole volume",
                            self.name,
                            self.tock()
                        );
                        Candidates::AllData
                    }
                }
            }
            ArchiveState::Unusable => {
                self.pool.create_snapshot(&self.name, &self.tock())?;
                Candidates::AllData
            }
            ArchiveState::Archived { tail_start } => {
                let map =
                    if has_tick { self.load_map(chunk_size)? } else { Err(format!("{} is missing", self.tick())) };
                match map {
                    Ok(mut map) => {
                        self.fold_changes(&mut map)?;
                        Candidates::Marked { map, tail_start }
                    }
                    Err(why) => {
                        log::warn!("{}: change history unusable ({why}); comparing the whole volume", self.name);
                        self.pool.create_snapshot(&self.name, &self.tock())?;
                        Candidates::AllData
                    }
                }
            }
        };
        Ok(TrackedSend { volume: self, candidates: Some(candidates), done: false })
    }

    /// The chunks of tock that hold mapped blocks: all that a first send has
    /// to read (the rest of a thin volume reads as zeros). A first send has
    /// no older session whose data could hide under an unmapped block.
    fn mapped_chunks(&self, chunk_size: u64) -> Result<DeltaMap> {
        // Marking grows the map; it gets the volume's length once that is known.
        let mut map = DeltaMap::new(chunk_size, 0)?;
        let mapping = self.pool.mapped_ranges(&self.tock(), |start, len| map.mark_bytes(start, len))?;
        map.resize(mapping.volume_size.div_ceil(chunk_size))?;
        log::info!(
            "{}: first send: {} of {} bytes are mapped in the thin pool; reading {} chunks",
            self.name,
            mapping.mapped_bytes,
            mapping.volume_size,
            map.count_marked()
        );
        Ok(map)
    }

    /// The map `resync` marks into: the current one, or a fresh one when it
    /// is missing or damaged (resync is how a lost map is rebuilt).
    pub fn map_for_resync(&self, chunk_size: u64, tick_size: u64) -> Result<DeltaMap> {
        match self.load_map(chunk_size)? {
            Ok(m) => Ok(m),
            Err(_) => DeltaMap::for_volume(chunk_size, tick_size),
        }
    }

    pub fn save_map(&self, map: &DeltaMap) -> Result<()> {
        map.save(&self.map_path)
    }

    /// The device of tick, after recovering an interrupted run.
    pub fn tick_device(&self) -> Result<PathBuf> {
        if !self.recover()? {
            anyhow::bail!("{}/{} does not exist: send the volume first", self.pool.vg(), self.tick());
        }
        self.pool.set_active(&self.tick(), true)?;
        self.pool.dev_path(&self.tick())
    }
}

/// A send in progress: owns tock. Dropped without `finish`, it removes tock
/// (the map keeps what was folded in, so nothing is lost).
pub struct TrackedSend<'a> {
    volume: &'a TrackedVolume<'a>,
    candidates: Option<Candidates>,
    done: bool,
}

impl TrackedSend<'_> {
    pub fn device(&self) -> Result<PathBuf> {
        self.volume.pool.dev_path(&self.volume.tock())
    }

    pub fn take_candidates(&mut self) -> Result<Candidates> {
        self.candidates.take().context("candidates already taken")
    }

    /// After the receiver committed (or nothing changed): clear the map and
    /// let tock replace tick.
    pub fn finish(mut self, chunk_size: u64, size: u64) -> Result<()> {
        self.done = true;
        DeltaMap::for_volume(chunk_size, size)?.save(&self.volume.map_path)?;
        self.volume.pool.replace_lv(&self.volume.tock(), &self.volume.tick())
    }
}

impl Drop for TrackedSend<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.volume.remove_tock_quietly();
        }
    }
}
