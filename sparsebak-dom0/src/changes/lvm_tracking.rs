//! tick and tock of an LVM thin volume: read-only thin snapshots `VOL.tick`
//! and `VOL.tock` in the volume's pool, compared by `thin_delta` on a
//! metadata snapshot (see `source/lvm`). The first send reads only the
//! blocks the pool has mapped for tock.

use super::tracking::{Mapping, MarkRange, Present, Snapshots};
use crate::source::lvm::ThinPool;
use anyhow::Result;
use std::path::PathBuf;

fn tick(volume: &str) -> String {
    format!("{volume}.tick")
}

fn tock(volume: &str) -> String {
    format!("{volume}.tock")
}

impl Snapshots for ThinPool {
    fn present(&self, volume: &str) -> Result<Present> {
        let lvs = self.list_lvs()?;
        let has = |n: &str| lvs.iter().any(|l| l.name == n);
        Ok(Present { volume: has(volume), tick: has(&tick(volume)), tock: has(&tock(volume)) })
    }

    fn make_tock(&self, volume: &str) -> Result<()> {
        self.create_snapshot(volume, &tock(volume))
    }

    fn remove_tock(&self, volume: &str) -> Result<()> {
        self.remove_lv(&tock(volume))
    }

    fn remove_tick(&self, volume: &str) -> Result<()> {
        self.remove_lv(&tick(volume))
    }

    fn rename_tock_to_tick(&self, volume: &str) -> Result<()> {
        self.rename_lv(&tock(volume), &tick(volume))
    }

    fn scan_changes(&self, volume: &str, mark: &mut MarkRange) -> Result<u64> {
        let r = ThinPool::scan_changes(self, &tick(volume), &tock(volume), |c| mark(c.start, c.len))?;
        Ok(r.right.size)
    }

    fn mapped_ranges(&self, volume: &str, mark: &mut MarkRange) -> Result<Mapping> {
        let m = ThinPool::mapped_ranges(self, &tock(volume), mark)?;
        Ok(Mapping { volume_size: m.volume_size, mapped_bytes: m.mapped_bytes })
    }

    fn tock_path(&self, volume: &str) -> Result<PathBuf> {
        self.dev_path(&tock(volume))
    }

    fn tick_path(&self, volume: &str) -> Result<PathBuf> {
        self.set_active(&tick(volume), true)?;
        self.dev_path(&tick(volume))
    }

    fn tick_name(&self, volume: &str) -> String {
        format!("{}/{}", self.vg(), tick(volume))
    }

    fn tock_name(&self, volume: &str) -> String {
        format!("{}/{}", self.vg(), tock(volume))
    }

    fn no_such_volume(&self, volume: &str) -> anyhow::Error {
        ThinPool::no_such_volume(self, volume)
    }
}
