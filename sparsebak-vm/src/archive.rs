//! The archive layout on the receiver, defined once:
//!
//! ```text
//! MOUNT/DIR/VG%POOL/VOLUME/S_YYYYMMDD-HHMMSS/info
//!                                           /manifest
//!                                           /<first 9 hex digits>/x<16 hex digits of the byte address>
//! ```
//!
//! Sessions are written as `S_...-tmp` and renamed on commit. Every path is
//! built from validated names and integers only, so nothing leaves the root.

use anyhow::{bail, Context, Result};
use sparsebak_proto::{names, Destination, VolumeRef};
use std::path::{Path, PathBuf};

/// Suffix of a session folder that is still being written.
pub const TMP_SUFFIX: &str = "-tmp";

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

    /// The committed folder of a session, after validating its name.
    pub fn session_dir(&self, volume: &VolumeRef, session: &str) -> Result<PathBuf> {
        names::validate_session_name(session)?;
        Ok(self.volume_dir(volume)?.join(session))
    }

    /// Committed session names of a volume, sorted (oldest first).
    pub fn list_sessions(&self, volume: &VolumeRef) -> Result<Vec<String>> {
        let dir = self.volume_dir(volume)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        let mut sessions = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            if let Some(name) = entry.file_name().to_str() {
                if names::validate_session_name(name).is_ok() {
                    sessions.push(name.to_string());
                }
            }
        }
        sessions.sort();
        Ok(sessions)
    }
}

/// Path of a chunk file inside a session folder.
pub fn chunk_path(session_dir: &Path, addr: u64) -> PathBuf {
    let hex = format!("{addr:016x}");
    session_dir.join(&hex[..9]).join(format!("x{hex}"))
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
