//! tick and tock of an image file on a filesystem that shares data between
//! files (Btrfs; XFS made with `reflink=1`): reflink copies (FICLONE) in
//! `LOCALDIR/.sparsebak/`, named after the volume's folder name
//! (`appvms+work+private.img.tick`). A copy costs no space until the volume
//! changes, and Qubes' file-reflink pool driver never looks there (its
//! volumes live in `appvms/`, `vm-templates/`, ...; hidden names are never
//! volumes).
//!
//! Comparing the two copies' extent maps (FIEMAP) tells which ranges may
//! differ: written ranges get new extents, shared ones keep theirs. What
//! keeps that from missing a change lives in `sparsebak_reflink`: the volume
//! is fsynced before it is copied (data still in the page cache has no
//! extent yet); extents with flags that do not pin their data to one place
//! (delalloc, encoded, inline, unknown, any flag it does not know) count as
//! changed; and a comparison during which the filesystem moved extents is
//! redone. A volume that is not on the same filesystem as the copies (a
//! mount point inside `localdir`, a Btrfs subvolume, a block device) is
//! compared in full, as without reflinks.

use super::tracking::{Mapping, MarkRange, Present, Snapshots};
use anyhow::{anyhow, Context, Result};
use sparsebak_fsutil::{fsync_dir, remove_file_durably};
use sparsebak_proto::names::volume_folder_name;
use sparsebak_reflink::CopyError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The folder of the copies inside `localdir`.
const COPIES_DIR: &str = ".sparsebak";

/// The reflink copies of the image volumes under one `localdir`.
pub struct ReflinkCopies {
    localdir: PathBuf,
    dir: PathBuf,
    /// `st_dev` of the copies' folder: volumes elsewhere cannot be cloned
    /// into it.
    dev: u64,
}

impl ReflinkCopies {
    /// The copies of `localdir`'s volumes, when its filesystem can make
    /// them; `None` (with the reason) when it cannot.
    pub fn open(localdir: &Path) -> Result<std::result::Result<ReflinkCopies, String>> {
        let dir = localdir.join(COPIES_DIR);
        if !dir.is_dir() {
            if !sparsebak_reflink::supports_reflink(localdir)? {
                return Ok(Err(format!("{} is not on a filesystem with reflinks", localdir.display())));
            }
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            fsync_dir(localdir)?;
        }
        let dev = std::fs::metadata(&dir).with_context(|| format!("stat {}", dir.display()))?.dev();
        Ok(Ok(ReflinkCopies { localdir: localdir.to_path_buf(), dir, dev }))
    }

    /// The copies of `localdir`'s volumes if any were ever made (`delete`
    /// removes them whatever the config says now).
    pub fn existing(localdir: &Path) -> Option<ReflinkCopies> {
        let dir = localdir.join(COPIES_DIR);
        let dev = std::fs::metadata(&dir).ok().filter(|m| m.is_dir())?.dev();
        Some(ReflinkCopies { localdir: localdir.to_path_buf(), dir, dev })
    }

    /// Whether `volume` can be tracked: a regular file on the copies'
    /// filesystem.
    pub fn tracks(&self, volume: &str) -> Result<bool> {
        let path = self.volume_path(volume);
        let meta = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        Ok(meta.is_file() && meta.dev() == self.dev)
    }

    fn volume_path(&self, volume: &str) -> PathBuf {
        self.localdir.join(volume)
    }

    fn copy_path(&self, volume: &str, which: &str) -> PathBuf {
        self.dir.join(format!("{}.{which}", volume_folder_name(volume)))
    }

    fn tick(&self, volume: &str) -> PathBuf {
        self.copy_path(volume, "tick")
    }

    fn tock(&self, volume: &str) -> PathBuf {
        self.copy_path(volume, "tock")
    }
}

/// Whether `e` says that the filesystem cannot make a copy of that volume
/// there (btrfs: a nodatacow image and a copies folder without, or the
/// other way round): the volume is then compared in full.
pub fn is_unsupported(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<CopyError>(), Some(CopyError::Unsupported { .. })))
}

fn exists(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
    }
}

impl Snapshots for ReflinkCopies {
    fn present(&self, volume: &str) -> Result<Present> {
        Ok(Present {
            volume: exists(&self.volume_path(volume))?,
            tick: exists(&self.tick(volume))?,
            tock: exists(&self.tock(volume))?,
        })
    }

    fn make_tock(&self, volume: &str) -> Result<()> {
        // Keeps its type: see `is_unsupported`.
        sparsebak_reflink::reflink_copy(&self.volume_path(volume), &self.tock(volume))?;
        Ok(())
    }

    fn remove_tock(&self, volume: &str) -> Result<()> {
        remove_file_durably(&self.tock(volume))
    }

    fn remove_tick(&self, volume: &str) -> Result<()> {
        remove_file_durably(&self.tick(volume))
    }

    fn rename_tock_to_tick(&self, volume: &str) -> Result<()> {
        let (tock, tick) = (self.tock(volume), self.tick(volume));
        std::fs::rename(&tock, &tick).with_context(|| format!("renaming {} to {}", tock.display(), tick.display()))?;
        fsync_dir(&self.dir)
    }

    fn scan_changes(&self, volume: &str, mark: &mut MarkRange) -> Result<u64> {
        let (tick, tock) = (self.tick(volume), self.tock(volume));
        for (start, len) in sparsebak_reflink::compare_stable(&tick, &tock)? {
            mark(start, len)?;
        }
        Ok(std::fs::metadata(&tock).with_context(|| format!("stat {}", tock.display()))?.len())
    }

    fn mapped_ranges(&self, volume: &str, mark: &mut MarkRange) -> Result<Mapping> {
        let tock = self.tock(volume);
        let file = std::fs::File::open(&tock).with_context(|| format!("opening {}", tock.display()))?;
        let size = file.metadata().with_context(|| format!("stat {}", tock.display()))?.len();
        let mut mapped = 0;
        for e in sparsebak_reflink::extent_map(&file)? {
            let end = e.logical.saturating_add(e.length).min(size);
            if e.logical < end {
                mark(e.logical, end - e.logical)?;
                mapped += end - e.logical;
            }
        }
        Ok(Mapping { volume_size: size, mapped_bytes: mapped })
    }

    fn tock_path(&self, volume: &str) -> Result<PathBuf> {
        Ok(self.tock(volume))
    }

    fn tick_path(&self, volume: &str) -> Result<PathBuf> {
        Ok(self.tick(volume))
    }

    fn tick_name(&self, volume: &str) -> String {
        self.tick(volume).display().to_string()
    }

    fn tock_name(&self, volume: &str) -> String {
        self.tock(volume).display().to_string()
    }

    fn no_such_volume(&self, volume: &str) -> anyhow::Error {
        anyhow!("volume {volume}: {} does not exist (check localdir and [volumes] in the config)", {
            self.volume_path(volume).display()
        })
    }
}
