//! The archive on the receiver: paths under its root `MOUNT/DIR`. The names
//! themselves (key file, session folders, chunk paths, suffixes) come from
//! `sparsebak_proto::layout`, which draws the whole tree; this file only
//! joins them.
//!
//! Sessions are written with a `-tmp` suffix and renamed on commit. Every path is
//! built from validated names and integers only, so nothing leaves the root.
//! A tar session may also hold chunk files: chunks merged into it by prune
//! are always stored in the folder layout.
//! The receiver never interprets what dom0 stores: chunks, metadata and the
//! key file are opaque bytes to it (sealed ones, for encrypted archives).

use anyhow::{bail, Context, Result};
use sparsebak_proto::layout;
use sparsebak_proto::{names, Destination, VolumeRef};
use std::path::{Path, PathBuf};

/// Largest chunk file the receiver reads or sends back; matches the frame
/// cap with room for the message header.
pub const MAX_CHUNK_FILE: u64 = (sparsebak_proto::MAX_FRAME - 64) as u64;

/// The root of one archive: `MOUNT/DIR`.
pub struct Archive {
    root: PathBuf,
}

impl Archive {
    /// Opens (creating `DIR` if needed) the archive at `dest`, refusing a
    /// mount point that is not mounted.
    pub fn open(dest: &Destination) -> Result<Archive> {
        names::validate_mountpoint(&dest.mountpoint)?;
        names::validate_dest_dir(&dest.dir)?;
        let mount = Path::new(&dest.mountpoint);
        if !crate::mounts::is_mount_point(mount)? {
            bail!(
                "destination {} is not a mount point; refusing to use it (is the backup disk mounted?)",
                mount.display()
            );
        }
        let root = mount.join(&dest.dir);
        std::fs::create_dir_all(&root).with_context(|| format!("creating archive folder {}", root.display()))?;
        Ok(Archive { root })
    }

    /// `ROOT/VG%POOL/VOLUME`, after validating both names.
    pub fn volume_dir(&self, volume: &VolumeRef) -> Result<PathBuf> {
        volume.validate()?;
        Ok(self.root.join(&volume.pool).join(&volume.name))
    }

    /// The pool folder's wrapped key file, after validating the pool name.
    pub fn key_path(&self, pool: &str) -> Result<PathBuf> {
        names::validate_pool_dir(pool)?;
        Ok(self.root.join(pool).join(layout::KEY_FILE))
    }

    /// The committed folder of a session, after validating its name.
    pub fn session_dir(&self, volume: &VolumeRef, session: &str) -> Result<PathBuf> {
        names::validate_session_name(session)?;
        Ok(self.volume_dir(volume)?.join(session))
    }

    /// Committed session names of a volume, sorted (oldest first).
    pub fn list_sessions(&self, volume: &VolumeRef) -> Result<Vec<String>> {
        let mut sessions = entry_names(&self.volume_dir(volume)?)?;
        sessions.retain(|name| names::validate_session_name(name).is_ok());
        sessions.sort();
        Ok(sessions)
    }

    /// Removes a volume and all its sessions. The folder is first renamed
    /// to `layout::deleted_name` (never a valid volume name), so a receiver killed
    /// midway leaves nothing that looks like sessions; a later delete of the
    /// same volume finishes the removal. Deleting an absent volume is fine.
    pub fn delete_volume(&self, volume: &VolumeRef) -> Result<()> {
        let dir = self.volume_dir(volume)?;
        let pool_dir = self.root.join(&volume.pool);
        let doomed = pool_dir.join(layout::deleted_name(&volume.name));
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
        }
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("renaming {}", dir.display())),
        }
        sparsebak_fsutil::fsync_dir(&pool_dir)?;
        std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
    }
}

/// Path of a chunk file inside a session folder.
pub fn chunk_path(session_dir: &Path, addr: u64) -> PathBuf {
    session_dir.join(layout::chunk_rel_path(addr))
}

/// Removes the session folders of a volume that carry `suffix` (`-tmp`
/// left by a killed send, `-pruned` left by a killed prune): they are no
/// sessions, only leftovers. A missing volume folder has none.
pub fn remove_session_leftovers(vol_dir: &Path, suffix: &str) -> Result<()> {
    for name in entry_names(vol_dir)? {
        if name.starts_with(layout::SESSION_PREFIX) && name.ends_with(suffix) {
            let path = vol_dir.join(&name);
            std::fs::remove_dir_all(&path).with_context(|| format!("removing leftover {}", path.display()))?;
        }
    }
    Ok(())
}

/// Names of the entries of `dir` (none if it does not exist). Names that
/// are not UTF-8 are skipped: nothing sparsebak writes has one.
fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_paths_group_by_address_prefix() {
        let p = chunk_path(Path::new("/a/S_20260101-000000"), 0x1_2345_6789_0000);
        assert_eq!(p, Path::new("/a/S_20260101-000000/000123456/x0001234567890000"));
        let p = chunk_path(Path::new("/s"), 0);
        assert_eq!(p, Path::new("/s/000000000/x0000000000000000"));
    }
}
