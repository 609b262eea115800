//! dom0's own metadata, in the config file's directory:
//!
//! ```text
//! META/.sparsebak.lock                  one sparsebak at a time
//! META/VG%POOL/VOLUME/S_*/{info,manifest}
//! META/VG%POOL/VOLUME/prune.journal     (an unsettled prune, see prune_journal.rs)
//! META/VG%POOL/VOLUME.deltamap          (LVM volumes)
//! META/VG%POOL/recover.partial          (a recover under way, see recover.rs)
//! ```
//!
//! A session appears here only after the receiver committed it: it is
//! written as `S_...-tmp` and renamed, like in the archive. dom0 trusts only
//! these files, never the receiver's copies.

use crate::meta::{ManifestMerge, ManifestReader};
use crate::meta::{SessionId, SessionInfo};
use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sparsebak_proto::layout;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = ".sparsebak.lock";
const RECOVER_MARKER: &str = "recover.partial";

/// `META/VG%POOL/recover.partial`: while it exists, the pool's metadata is
/// a recover's unfinished work (the volumes it names, and the key).
pub fn recover_marker_path(meta_root: &Path, pool_dir: &str) -> PathBuf {
    meta_root.join(pool_dir).join(RECOVER_MARKER)
}

/// The locked metadata directory.
pub struct MetaDir {
    root: PathBuf,
    _lock: Flock<File>,
}

impl MetaDir {
    /// Takes the lock, or fails at once naming the lock file.
    pub fn lock(root: &Path) -> Result<MetaDir> {
        fs::create_dir_all(root).with_context(|| format!("creating metadata folder {}", root.display()))?;
        let path = root.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                bail!("another sparsebak is running (lock {} is held); try again when it has finished", path.display())
            }
            Err((_, e)) => bail!("locking {}: {e}", path.display()),
        };
        Ok(MetaDir { root: root.to_path_buf(), _lock: lock })
    }

    /// A volume's metadata, under its folder name (see
    /// [`sparsebak_proto::names::volume_folder_name`]).
    pub fn volume(&self, pool_dir: &str, name: &str) -> VolumeMeta {
        let folder = sparsebak_proto::names::volume_folder_name(name);
        VolumeMeta {
            dir: self.root.join(pool_dir).join(&folder),
            deltamap: self.root.join(pool_dir).join(format!("{folder}.deltamap")),
        }
    }

    /// Removes a volume's metadata: its sessions, journal and delta map.
    /// The folder is renamed to `.NAME-deleted` first (not a volume name),
    /// so a kill midway never leaves a volume with half its sessions.
    pub fn delete_volume(&self, pool_dir: &str, name: &str) -> Result<()> {
        let pool = self.root.join(pool_dir);
        let folder = sparsebak_proto::names::volume_folder_name(name);
        let dir = pool.join(&folder);
        let doomed = pool.join(layout::deleted_name(&folder));
        if doomed.exists() {
            fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
        }
        if dir.exists() {
            fs::rename(&dir, &doomed).with_context(|| format!("renaming {}", dir.display()))?;
            fsync_dir(&pool)?;
            fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
        }
        let deltamap = self.volume(pool_dir, name).deltamap;
        match fs::remove_file(&deltamap) {
            Ok(()) => fsync_dir(&pool),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", deltamap.display())),
        }
    }

    /// Names of volumes that have a folder under `pool_dir`.
    pub fn volumes_with_metadata(&self, pool_dir: &str) -> Result<Vec<String>> {
        let dir = self.root.join(pool_dir);
        let mut names = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.with_context(|| format!("listing {}", dir.display()))?;
                    if e.path().is_dir() {
                        if let Some(n) = e.file_name().to_str() {
                            names.push(n.to_string());
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        }
        names.sort();
        Ok(names)
    }
}

/// One volume's metadata folder.
pub struct VolumeMeta {
    dir: PathBuf,
    deltamap: PathBuf,
}

impl VolumeMeta {
    /// `META/VG%POOL/VOLUME.deltamap` (LVM volumes).
    pub fn deltamap_path(&self) -> &Path {
        &self.deltamap
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when dom0 has any metadata for the volume.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Committed sessions, oldest first. The local half of a committed
    /// prune that a kill interrupted is completed first, so no reader ever
    /// sees a half-pruned volume.
    pub fn sessions(&self) -> Result<Vec<SessionId>> {
        crate::meta::prune_journal::settle_local(self)?;
        let mut out: Vec<SessionId> =
            self.session_dirs()?.into_iter().filter_map(|(id, tmp)| (!tmp).then_some(id)).collect();
        out.sort();
        Ok(out)
    }

    /// Sessions left as `-tmp` by a send that did not finish.
    pub fn unfinished_sessions(&self) -> Result<Vec<SessionId>> {
        Ok(self.session_dirs()?.into_iter().filter_map(|(id, tmp)| tmp.then_some(id)).collect())
    }

    fn session_dirs(&self) -> Result<Vec<(SessionId, bool)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.with_context(|| format!("listing {}", self.dir.display()))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let (base, tmp) = match name.strip_suffix(layout::TMP_SUFFIX) {
                Some(b) => (b.to_string(), true),
                None => (name, false),
            };
            if let Ok(id) = SessionId::parse(&base) {
                out.push((id, tmp));
            }
        }
        Ok(out)
    }

    pub fn session_dir(&self, id: &SessionId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    pub fn tmp_session_dir(&self, id: &SessionId) -> PathBuf {
        self.dir.join(format!("{id}{}", layout::TMP_SUFFIX))
    }

    pub fn info(&self, id: &SessionId) -> Result<SessionInfo> {
        let path = self.session_dir(id).join(layout::INFO_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        SessionInfo::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn manifest_path(&self, id: &SessionId) -> PathBuf {
        self.session_dir(id).join(layout::MANIFEST_FILE)
    }

    /// The merged view of `sessions` (oldest first): newest entry per address.
    pub fn merged(&self, sessions: &[SessionId]) -> Result<ManifestMerge<ManifestReader>> {
        let readers =
            sessions.iter().map(|s| ManifestReader::open(&self.manifest_path(s))).collect::<Result<Vec<_>>>()?;
        ManifestMerge::new(readers)
    }

    /// Makes a finished `-tmp` session visible (after the receiver committed it).
    pub fn promote(&self, id: &SessionId) -> Result<()> {
        let tmp = self.tmp_session_dir(id);
        fs::rename(&tmp, self.session_dir(id)).with_context(|| format!("renaming {}", tmp.display()))?;
        fsync_dir(&self.dir)
    }

    /// Discards an unfinished `-tmp` session.
    pub fn discard_unfinished(&self, id: &SessionId) -> Result<()> {
        let tmp = self.tmp_session_dir(id);
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))
    }
}

use sparsebak_fsutil::fsync_dir;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_lock_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = MetaDir::lock(dir.path()).expect("first lock");
        let err = MetaDir::lock(dir.path()).err().expect("second lock must fail");
        assert!(err.to_string().contains("another sparsebak is running"), "{err}");
        drop(first);
        assert!(MetaDir::lock(dir.path()).is_ok());
    }
}
