//! Change tracking of one volume with two short-lived copies, whatever
//! makes the copies ([`Snapshots`]: LVM thin snapshots in `lvm_tracking.rs`,
//! reflink copies of image files in `reflink_tracking.rs`):
//!
//! - `tick`: read-only copy holding the state of the last send (or of the
//!   last `monitor`, whose changes since that send are in the map);
//! - `tock`: made by `monitor`/`send`, compared with tick, then it replaces
//!   tick;
//! - the delta map (dom0 metadata, `VOL.deltamap`): chunks changed since the
//!   last send.
//!
//! Ordering makes every interruption recoverable without losing a change:
//! the map is saved before tock replaces tick, and cleared only after the
//! receiver committed a session and tock has replaced tick. A run that
//! finds tick and tock removes the stale tock and compares again (marking
//! twice is harmless); one that finds only tock finishes the interrupted
//! rotation, which is right only because of the next rule. When the history
//! cannot be trusted (no tick, a missing or damaged map, a different chunk
//! size, a comparison that failed), the send falls back to reading the whole
//! volume and comparing chunk hashes with the archive's manifests; and such
//! a send (like a first one) removes the map before it makes tock, so that a
//! kill before its commit leaves no map for a promoted tock to be trusted
//! with. A send that does not track at all (`reflink = off`, a volume the
//! copies cannot follow) removes the map too: tick no longer matches the
//! archive's latest session after it.

use super::{Candidates, DeltaMap, LoadError};
use anyhow::{Context, Result};
use sparsebak_proto::testhook::dom0_step as step;
use std::path::{Path, PathBuf};

/// Which of a volume and its two copies exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    pub volume: bool,
    pub tick: bool,
    pub tock: bool,
}

/// What a first send has to read: the ranges a copy holds data in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The copy's size in bytes (ranges are clipped to it).
    pub volume_size: u64,
    /// Sum of the ranges reported.
    pub mapped_bytes: u64,
}

/// Receives byte ranges `(start, len)`.
pub type MarkRange<'m> = dyn FnMut(u64, u64) -> Result<()> + 'm;

/// Where a volume's tick and tock live, and how they are compared.
pub trait Snapshots {
    /// What exists now; an error when the volume itself cannot be looked at.
    fn present(&self, volume: &str) -> Result<Present>;
    /// Makes tock: a read-only copy of the volume as it is now.
    fn make_tock(&self, volume: &str) -> Result<()>;
    fn remove_tock(&self, volume: &str) -> Result<()>;
    fn remove_tick(&self, volume: &str) -> Result<()>;
    /// Renames tock to tick; tick does not exist.
    fn rename_tock_to_tick(&self, volume: &str) -> Result<()>;
    /// Marks every byte range where tock may differ from tick; returns
    /// tock's size. Ranges may overlap and repeat; missing one is the one
    /// thing it must never do.
    fn scan_changes(&self, volume: &str, mark: &mut MarkRange) -> Result<u64>;
    /// Marks the ranges tock holds data in (the rest reads as zeros).
    fn mapped_ranges(&self, volume: &str, mark: &mut MarkRange) -> Result<Mapping>;
    /// tock, to read from.
    fn tock_path(&self, volume: &str) -> Result<PathBuf>;
    /// tick, to read from (`resync`).
    fn tick_path(&self, volume: &str) -> Result<PathBuf>;
    /// How tick and tock are named to the user.
    fn tick_name(&self, volume: &str) -> String;
    fn tock_name(&self, volume: &str) -> String;
    /// The error for a volume that does not exist.
    fn no_such_volume(&self, volume: &str) -> anyhow::Error;
}

pub struct TrackedVolume<'a> {
    copies: &'a dyn Snapshots,
    name: String,
    map_path: PathBuf,
}

/// What the archive holds of a volume as a send starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveState {
    /// No session of the volume anywhere: its first send, which reads only
    /// what the volume holds data in.
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
    pub fn new(copies: &'a dyn Snapshots, name: &str, map_path: &Path) -> TrackedVolume<'a> {
        TrackedVolume { copies, name: name.to_string(), map_path: map_path.to_path_buf() }
    }

    /// `delete`: removes whichever of the two copies exist (the map goes
    /// with dom0's metadata).
    pub fn remove_snapshots(&self) -> Result<()> {
        let p = self.copies.present(&self.name)?;
        if p.tock {
            self.copies.remove_tock(&self.name)?;
        }
        if p.tick {
            self.copies.remove_tick(&self.name)?;
        }
        Ok(())
    }

    /// Puts the copies back into a known state after an interrupted run.
    /// Returns whether a tick exists afterwards.
    fn recover(&self) -> Result<bool> {
        let p = self.copies.present(&self.name)?;
        if !p.volume {
            return Err(self.copies.no_such_volume(&self.name));
        }
        match (p.tick, p.tock) {
            (true, true) => {
                log::warn!("{}: removing {} left by an interrupted run", self.name, self.copies.tock_name(&self.name));
                self.copies.remove_tock(&self.name)?;
                Ok(true)
            }
            (false, true) => {
                log::warn!(
                    "{}: finishing the interrupted rotation of {}",
                    self.name,
                    self.copies.tock_name(&self.name)
                );
                self.copies.rename_tock_to_tick(&self.name)?;
                Ok(true)
            }
            (has_tick, false) => Ok(has_tick),
        }
    }

    /// tock takes tick's place. Between the two steps only tock exists:
    /// `recover` finishes the job, the map having been saved before.
    fn rotate(&self) -> Result<()> {
        if self.copies.present(&self.name)?.tick {
            self.copies.remove_tick(&self.name)?;
            step("tick removed");
        }
        self.copies.rename_tock_to_tick(&self.name)?;
        step("tock became tick");
        Ok(())
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

    /// Makes tock, folds the tick->tock changes into `map` and saves it. A
    /// failed comparison removes tock again and is an error.
    fn fold_changes(&self, map: &mut DeltaMap) -> Result<u64> {
        self.copies.make_tock(&self.name)?;
        step("tock made");
        let scanned =
            self.copies.scan_changes(&self.name, &mut |start, len| map.mark_bytes(start, len)).and_then(|size| {
                map.resize(size.div_ceil(map.chunk_size()))?;
                map.save(&self.map_path)
            });
        if let Err(e) = scanned {
            self.remove_tock_quietly();
            return Err(e);
        }
        step("changes saved in the delta map");
        Ok(map.count_marked())
    }

    fn remove_tock_quietly(&self) {
        if let Err(e) = self.copies.remove_tock(&self.name) {
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
        self.rotate()?;
        Ok(MonitorOutcome::Tracked(marked))
    }

    /// Makes tock for a send that does not fold changes into the map (a
    /// first send, or one that compares the whole volume): the map goes
    /// first, see the module comment.
    fn make_untracked_tock(&self) -> Result<()> {
        forget_history(&self.map_path)?;
        self.copies.make_tock(&self.name)?;
        step("tock made");
        Ok(())
    }

    /// Starts a send: makes tock and decides which chunks to look at.
    pub fn begin_send(&self, chunk_size: u64, archive: ArchiveState) -> Result<TrackedSend<'_>> {
        let has_tick = self.recover()?;
        let candidates = match archive {
            ArchiveState::New => {
                self.make_untracked_tock()?;
                match self.mapped_chunks(chunk_size) {
                    Ok(map) => Candidates::Marked { map, tail_start: u64::MAX },
                    Err(e) => {
                        log::warn!(
                            "{}: mapping of {} unknown ({e:#}); reading the whole volume",
                            self.name,
                            self.copies.tock_name(&self.name)
                        );
                        Candidates::AllData
                    }
                }
            }
            ArchiveState::Unusable => {
                self.make_untracked_tock()?;
                Candidates::AllData
            }
            ArchiveState::Archived { tail_start } => {
                let map = match has_tick {
                    true => self.load_map(chunk_size)?,
                    false => Err(format!("{} is missing", self.copies.tick_name(&self.name))),
                };
                let folded = map.and_then(|mut map| match self.fold_changes(&mut map) {
                    Ok(_) => Ok(map),
                    Err(e) => Err(format!("comparing {}: {e:#}", self.copies.tock_name(&self.name))),
                });
                match folded {
                    Ok(map) => Candidates::Marked { map, tail_start },
                    Err(why) => {
                        log::warn!("{}: change history unusable ({why}); comparing the whole volume", self.name);
                        self.make_untracked_tock()?;
                        Candidates::AllData
                    }
                }
            }
        };
        Ok(TrackedSend { volume: self, candidates: Some(candidates), done: false })
    }

    /// The chunks of tock that hold data: all that a first send has to read
    /// (the rest reads as zeros). A first send has no older session whose
    /// data could hide under a hole.
    fn mapped_chunks(&self, chunk_size: u64) -> Result<DeltaMap> {
        // Marking grows the map; it gets the volume's length once that is known.
        let mut map = DeltaMap::new(chunk_size, 0)?;
        let mapping = self.copies.mapped_ranges(&self.name, &mut |start, len| map.mark_bytes(start, len))?;
        map.resize(mapping.volume_size.div_ceil(chunk_size))?;
        log::info!(
            "{}: first send: {} of {} bytes are mapped; reading {} chunks",
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

    /// tick, to read from, after recovering an interrupted run.
    pub fn tick_path(&self) -> Result<PathBuf> {
        if !self.recover()? {
            anyhow::bail!("{} does not exist: send the volume first", self.copies.tick_name(&self.name));
        }
        self.copies.tick_path(&self.name)
    }
}

/// Removes a volume's delta map durably: its history no longer describes
/// the way from tick to the archive's latest session, so the next tracked
/// send compares the whole volume once. Also for sends that do not track.
pub fn forget_history(map_path: &Path) -> Result<()> {
    sparsebak_fsutil::remove_file_durably(map_path)
}

/// A send in progress: owns tock. Dropped without `finish`, it removes tock
/// (the map keeps what was folded in, so nothing is lost).
pub struct TrackedSend<'a> {
    volume: &'a TrackedVolume<'a>,
    candidates: Option<Candidates>,
    done: bool,
}

impl TrackedSend<'_> {
    /// tock, to read from.
    pub fn path(&self) -> Result<PathBuf> {
        self.volume.copies.tock_path(&self.volume.name)
    }

    pub fn take_candidates(&mut self) -> Result<Candidates> {
        self.candidates.take().context("candidates already taken")
    }

    /// After the receiver committed (or nothing changed): tock replaces
    /// tick, then the map is cleared. In that order: a kill in between
    /// leaves the old marks beside the new tick (read again for nothing),
    /// never a cleared map beside the old tick.
    pub fn finish(mut self, chunk_size: u64, size: u64) -> Result<()> {
        self.done = true;
        self.volume.rotate()?;
        DeltaMap::for_volume(chunk_size, size)?.save(&self.volume.map_path)?;
        step("delta map cleared");
        Ok(())
    }
}

impl Drop for TrackedSend<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.volume.remove_tock_quietly();
        }
    }
}
