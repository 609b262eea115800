//! Writing one session: chunks and metadata go into `S_...-tmp`; `commit`
//! makes everything durable (one `syncfs` instead of thousands of fsyncs),
//! then renames the folder to its final name and syncs the parent, so a
//! session is either complete and visible or absent. A writer dropped without
//! commit removes its folder; a folder left by a killed receiver is removed by
//! the next `begin` of the same volume. A tar session's chunks go into one
//! `chunks.tar` instead of chunk files (see `tar.rs`).

use crate::archive::{chunk_path, remove_session_leftovers, Archive};
use crate::tar::TarWriter;
use anyhow::{bail, Context, Result};
use sparsebak_fsutil::{fsync_dir, with_suffix};
use sparsebak_proto::layout::{TAR_FILE, TMP_SUFFIX};
use sparsebak_proto::{MetaFile, StoreFormat, VolumeRef};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

pub struct SessionWriter {
    tmp_dir: PathBuf,
    final_dir: PathBuf,
    /// Chunk sub-folders already created (by their 9-digit prefix path).
    made_dirs: HashSet<PathBuf>,
    /// Where chunks go in a tar session.
    tar: Option<TarWriter>,
    info: Option<File>,
    manifest: Option<File>,
    committed: bool,
}

impl SessionWriter {
    pub fn begin(archive: &Archive, volume: &VolumeRef, session: &str, format: StoreFormat) -> Result<SessionWriter> {
        let final_dir = archive.session_dir(volume, session)?;
        let vol_dir = archive.volume_dir(volume)?;
        fs::create_dir_all(&vol_dir).with_context(|| format!("creating {}", vol_dir.display()))?;
        if final_dir.exists() {
            bail!("session {session} of {volume} already exists in the archive");
        }
        // A `-tmp` folder left by a receiver killed mid-send.
        remove_session_leftovers(&vol_dir, TMP_SUFFIX)?;
        let tmp_dir = with_suffix(&final_dir, TMP_SUFFIX);
        fs::create_dir(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
        let tar = match format {
            StoreFormat::Folders => None,
            StoreFormat::Tar => Some(TarWriter::create(&tmp_dir.join(TAR_FILE))?),
        };
        Ok(SessionWriter {
            tmp_dir,
            final_dir,
            made_dirs: HashSet::new(),
            tar,
            info: None,
            manifest: None,
            committed: false,
        })
    }

    pub fn put_chunk(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        if let Some(tar) = &mut self.tar {
            return tar.append(addr, data);
        }
        let path = chunk_path(&self.tmp_dir, addr);
        if let Some(parent) = path.parent() {
            if !self.made_dirs.contains(parent) {
                fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                self.made_dirs.insert(parent.to_path_buf());
            }
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating chunk {addr:#018x} at {}", path.display()))?;
        f.write_all(data).with_context(|| format!("writing chunk {addr:#018x} at {}", path.display()))
    }

    pub fn put_meta(&mut self, file: MetaFile, data: &[u8]) -> Result<()> {
        let slot = match file {
            MetaFile::Info => &mut self.info,
            MetaFile::Manifest => &mut self.manifest,
        };
        if slot.is_none() {
            let path = self.tmp_dir.join(file.file_name());
            *slot = Some(File::create(&path).with_context(|| format!("creating {}", path.display()))?);
        }
        let f = slot.as_mut().context("metadata file not open")?;
        f.write_all(data).with_context(|| format!("writing {} of {}", file.file_name(), self.tmp_dir.display()))
    }

    /// Durable, then visible. Refuses a session without info and manifest.
    pub fn commit(mut self) -> Result<()> {
        if self.info.is_none() || self.manifest.is_none() {
            bail!("refusing to commit {}: info or manifest missing", self.tmp_dir.display());
        }
        self.info = None;
        self.manifest = None;
        if let Some(tar) = self.tar.take() {
            tar.finish()?;
        }
        let dir = File::open(&self.tmp_dir).with_context(|| format!("opening {}", self.tmp_dir.display()))?;
        nix::unistd::syncfs(dir.as_raw_fd())
            .with_context(|| format!("syncing the filesystem of {}", self.tmp_dir.display()))?;
        fs::rename(&self.tmp_dir, &self.final_dir)
            .with_context(|| format!("renaming {} to {}", self.tmp_dir.display(), self.final_dir.display()))?;
        self.committed = true;
        let parent = self.final_dir.parent().context("session folder has no parent")?;
        fsync_dir(parent)
    }
}

impl Drop for SessionWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}
