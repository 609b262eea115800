//! The archive in an S3 bucket, under `PREFIX/`, with the same layout as on
//! disk (`POOL/VOLUME/S_.../<chunk path>`, `info`, `manifest`, the key file
//! and the format marker) and the same guarantees, without rename or links:
//!
//! - **Commit object.** A session's chunks and metadata are uploaded first;
//!   the session exists only once `POOL/VOLUME/S_....committed` is written
//!   with a create-only put (`If-None-Match: *`). Listing ignores folders
//!   without one; the next send (or prune) of the volume removes them.
//! - **Probe.** On every connection a probe object is created twice with a
//!   create-only put; a server that lets the second one through would let a
//!   commit overwrite a commit, so it is refused.
//! - **Prune without downloading.** Surviving chunks of the pruned session
//!   P are copied into N on the server (`CopyObject`), then P's commit
//!   object goes and P is removed. The journal (`prune.journal`, the same
//!   text as on disk) and the surviving addresses (`prune.addrs`) are
//!   objects, written before any copy, so a kill anywhere is settled by
//!   dom0's next `finish` or `abort` exactly as on disk.
//! - **Tar sessions are refused** (`send --tarfile`): an S3 archive already
//!   stores chunks as objects, and a tar would need a multipart upload and
//!   ranged reads for nothing.
//! - **Deleting a volume** removes its commit objects first, so a kill
//!   leaves only uncommitted leftovers.
//!
//! Metadata files are uploaded as they arrive (multipart once they pass
//! 8 MiB), chunk uploads in flight are bounded in number and bytes, and
//! chunk reads come in batches of 16, so memory does not grow with the
//! volume. Only a prune's surviving addresses are spooled to an unnamed
//! temporary file in `$TMPDIR` (17 bytes per surviving chunk).
//!
//! Not covered: a receiver left running by a killed dom0 (qrexec does not
//! stop it) that is still uploading when the next run starts could commit
//! or journal after that run cleaned up; the disk store has the same race
//! with a far shorter window. A killed receiver can leave incomplete
//! multipart uploads of metadata; a bucket lifecycle rule
//! (AbortIncompleteMultipartUpload) frees them (see docs/INSTALL.md).

use super::client::{Bucket, StreamingUpload};
use super::profile;
use crate::archive::{check_marker, marker_text, MAX_CHUNK_FILE};
use crate::prune::{finishable, Journal, State, ADDRS, NEW_SUFFIX};
use crate::store::{ChunkRef, Store, StoredChunk};
use anyhow::{anyhow, bail, Context, Result};
use object_store::path::Path;
use sparsebak_proto::layout::{self, ARCHIVE_FORMAT_VERSION, PRUNE_JOURNAL};
use sparsebak_proto::{names, testhook, MetaFile, StoreFormat, VolumeRef};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};

use testhook::receiver_step as step;

/// Suffix of a session's commit object, beside its folder. Only S3
/// archives have these, so the name lives here rather than in
/// `sparsebak_proto::layout`.
const COMMITTED_SUFFIX: &str = ".committed";
/// Largest journal or marker object read.
const MAX_SMALL_OBJECT: u64 = 4096;
/// Server-side copies issued together during prune (a step each).
const COPY_BATCH: usize = 16;

pub struct S3Store {
    bucket: Bucket,
    /// `PREFIX`, without a trailing `/`.
    root: String,
    writer: Option<SessionUpload>,
    prune: Option<PruneUpload>,
}

/// A session being written.
struct SessionUpload {
    /// `PREFIX/POOL/VOLUME/S_...`
    dir: String,
    info: Option<StreamingUpload>,
    manifest: Option<StreamingUpload>,
}

/// A prune in phase 1.
struct PruneUpload {
    vol: String,
    pruned_dir: String,
    into_dir: String,
    journal: Journal,
    addrs: BufWriter<File>,
    last: Option<u64>,
    manifest: Option<StreamingUpload>,
}

/// Different for every call in any receiver: process id and clock.
fn nonce() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// N's new manifest during a prune, installed by `finish`.
fn new_manifest_key(into_dir: &str) -> Result<Path> {
    key(&format!("{into_dir}/{}{NEW_SUFFIX}", layout::MANIFEST_FILE))
}

fn key(s: &str) -> Result<Path> {
    Path::parse(s).map_err(|e| anyhow!("bad object key {s:?}: {e}"))
}

fn spool() -> Result<File> {
    tempfile::tempfile().context("creating a temporary file for prune addresses")
}

/// A spooled file rewound, with its length.
fn rewound(mut f: File) -> Result<(File, u64)> {
    let len = f.stream_position().context("spooled metadata")?;
    f.rewind().context("spooled metadata")?;
    Ok((f, len))
}

impl S3Store {
    /// Connects to `bucket` with the receiver's settings for it, probes that
    /// create-only puts work, and checks (or writes) the format marker.
    pub fn open(bucket: &str, prefix: &str) -> Result<S3Store> {
        let profile = profile::load(bucket)?;
        let store = S3Store {
            bucket: Bucket::open(&profile)?,
            root: prefix.trim_end_matches('/').to_string(),
            writer: None,
            prune: None,
        };
        store.probe_create_only()?;
        store.ensure_format_marker()?;
        Ok(store)
    }

    fn probe_create_only(&self) -> Result<()> {
        let probe = key(&format!("{}/.sparsebak-probe-{}", self.root, nonce()))?;
        let first = self.bucket.put_create(&probe, b"probe\n".to_vec())?;
        // (A kill right here leaves the probe object: harmless, ignored by
        // every listing, as it is no session.)
        let second = self.bucket.put_create(&probe, b"probe again\n".to_vec())?;
        let removed = self.bucket.delete(&probe);
        match (first, second) {
            (true, false) => removed,
            (false, _) => bail!("{probe}: a fresh probe object already existed; another receiver may be probing"),
            (true, true) => bail!(
                "refusing this object store: it let a create-only put (If-None-Match: *) overwrite {probe}; \
                 sparsebak needs create-only puts to commit sessions safely"
            ),
        }
    }

    fn ensure_format_marker(&self) -> Result<()> {
        let name = format!("{}/{}", self.root, layout::FORMAT_MARKER);
        let marker = key(&name)?;
        let shown = std::path::Path::new(&name);
        if let Some(text) = self.bucket.get(&marker, MAX_SMALL_OBJECT)? {
            return check_marker(shown, &text);
        }
        if !self.bucket.put_create(&marker, marker_text(ARCHIVE_FORMAT_VERSION).into_bytes())? {
            let text = self.bucket.get(&marker, MAX_SMALL_OBJECT)?.unwrap_or_default();
            return check_marker(shown, &text);
        }
        Ok(())
    }

    /// `PREFIX/POOL/VOLUME`, after validating both names.
    fn vol(&self, volume: &VolumeRef) -> Result<String> {
        volume.validate()?;
        Ok(format!("{}/{}/{}", self.root, volume.pool, volume.name))
    }

    fn session_dir(&self, volume: &VolumeRef, session: &str) -> Result<String> {
        names::validate_session_name(session)?;
        Ok(format!("{}/{session}", self.vol(volume)?))
    }

    fn commit_key(dir: &str) -> Result<Path> {
        key(&format!("{dir}{COMMITTED_SUFFIX}"))
    }

    fn chunk_key(dir: &str, addr: u64) -> Result<Path> {
        key(&format!("{dir}/{}", layout::chunk_rel_path(addr)))
    }

    fn meta_key(dir: &str, file: MetaFile) -> Result<Path> {
        key(&format!("{dir}/{}", file.file_name()))
    }

    fn is_committed(&self, dir: &str) -> Result<bool> {
        self.bucket.exists(&Self::commit_key(dir)?)
    }

    /// Committed sessions and every session folder of a volume.
    fn scan(&self, vol: &str) -> Result<(Vec<String>, Vec<String>)> {
        let listing = self.bucket.list_dir(&key(vol)?)?;
        let dirs = listing.dirs;
        let mut committed: Vec<String> = listing
            .objects
            .into_iter()
            .filter_map(|name| name.strip_suffix(COMMITTED_SUFFIX).map(str::to_string))
            .filter(|s| names::validate_session_name(s).is_ok())
            .collect();
        committed.sort();
        Ok((committed, dirs))
    }

    /// Removes session folders without a commit object: what a killed send,
    /// prune or delete left.
    fn remove_leftovers(&self, vol: &str) -> Result<()> {
        let (committed, dirs) = self.scan(vol)?;
        for dir in dirs.iter().filter(|d| !committed.contains(d)) {
            self.bucket.delete_under(&key(&format!("{vol}/{dir}"))?)?;
        }
        Ok(())
    }

    fn read_journal(&self, vol: &str) -> Result<Option<Journal>> {
        let name = format!("{vol}/{PRUNE_JOURNAL}");
        match self.bucket.get(&key(&name)?, MAX_SMALL_OBJECT)? {
            None => Ok(None),
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| anyhow!("{name} is not text"))?;
                Journal::parse(&text, std::path::Path::new(&name)).map(Some)
            }
        }
    }

    fn write_journal(&self, vol: &str, journal: &Journal) -> Result<()> {
        self.bucket.put(&key(&format!("{vol}/{PRUNE_JOURNAL}"))?, journal.to_text().into_bytes())
    }

    /// Removes the prune's own objects once it is settled.
    fn remove_prune_objects(&self, vol: &str, into_dir: &str) -> Result<()> {
        self.bucket.delete(&new_manifest_key(into_dir)?)?;
        self.bucket.delete(&key(&format!("{vol}/{ADDRS}"))?)?;
        self.bucket.delete(&key(&format!("{vol}/{PRUNE_JOURNAL}"))?)
    }

    /// Calls `f` with every address in the uploaded `prune.addrs` (a line
    /// per surviving chunk). It is downloaded to a temporary file first, so
    /// that no request stays open while `f` works.
    fn for_each_recorded_addr(&self, vol: &str, mut f: impl FnMut(u64) -> Result<()>) -> Result<()> {
        let name = format!("{vol}/{ADDRS}");
        let mut copy = BufWriter::new(spool()?);
        self.bucket.for_each_line(&key(&name)?, 16, |line| {
            copy.write_all(line).and_then(|_| copy.write_all(b"\n")).context("spooling prune addresses")
        })?;
        let (copy, _) = rewound(copy.into_inner().map_err(|e| anyhow!("spooling prune addresses: {}", e.error()))?)?;
        for line in BufReader::new(copy).lines() {
            let hex = line.context("reading spooled prune addresses")?;
            f(u64::from_str_radix(&hex, 16).with_context(|| format!("{name}: bad address {hex:?}"))?)?;
        }
        Ok(())
    }
}

impl Store for S3Store {
    fn list_sessions(&mut self, volume: &VolumeRef) -> Result<Vec<String>> {
        Ok(self.scan(&self.vol(volume)?)?.0)
    }

    fn begin_session(&mut self, volume: &VolumeRef, session: &str, format: StoreFormat) -> Result<()> {
        if format == StoreFormat::Tar {
            bail!("tar sessions are not supported in S3 archives: send without --tarfile");
        }
        let vol = self.vol(volume)?;
        let dir = self.session_dir(volume, session)?;
        if self.is_committed(&dir)? {
            bail!("session {session} of {volume} already exists in the archive");
        }
        self.remove_leftovers(&vol)?;
        self.writer = Some(SessionUpload { dir, info: None, manifest: None });
        Ok(())
    }

    fn put_chunk(&mut self, addr: u64, data: Vec<u8>) -> Result<()> {
        let dir = &self.writer.as_ref().context("protocol error: no open session")?.dir;
        let chunk = Self::chunk_key(dir, addr)?;
        self.bucket.spawn_put(chunk, data)
    }

    fn put_meta(&mut self, file: MetaFile, data: Vec<u8>) -> Result<()> {
        let (slot, key) = if let Some(p) = &mut self.prune {
            if file != MetaFile::Manifest {
                bail!("protocol error: during a prune only the manifest is sent as metadata");
            }
            (&mut p.manifest, new_manifest_key(&p.into_dir)?)
        } else {
            let w = self.writer.as_mut().context("protocol error: no open session")?;
            let key = Self::meta_key(&w.dir, file)?;
            let slot = match file {
                MetaFile::Info => &mut w.info,
                MetaFile::Manifest => &mut w.manifest,
            };
            (slot, key)
        };
        let upload = slot.get_or_insert_with(|| StreamingUpload::new(key));
        self.bucket.stream_write(upload, &data)
    }

    fn commit(&mut self) -> Result<()> {
        let w = self.writer.take().context("protocol error: commit without a session")?;
        let (Some(info), Some(manifest)) = (w.info, w.manifest) else {
            self.bucket.cancel_uploads();
            bail!("refusing to commit {}: info or manifest missing", w.dir);
        };
        self.bucket.wait_uploads()?;
        step("s3 chunks uploaded");
        self.bucket.stream_finish(info)?;
        self.bucket.stream_finish(manifest)?;
        step("s3 metadata uploaded");
        // A nonce tells our own commit object from another's if a retried
        // create-only put finds the first attempt already stored.
        let mark = format!("committed {}\n", nonce()).into_bytes();
        let commit = Self::commit_key(&w.dir)?;
        if !self.bucket.put_create(&commit, mark.clone())?
            && self.bucket.get(&commit, MAX_SMALL_OBJECT)?.as_deref() != Some(mark.as_slice())
        {
            bail!("{} was committed by someone else meanwhile", w.dir);
        }
        step("s3 session committed");
        Ok(())
    }

    fn session_open(&self) -> bool {
        self.writer.is_some()
    }

    fn read_chunks(&mut self, chunks: &[ChunkRef]) -> Vec<Result<StoredChunk>> {
        let keys: Result<Vec<Path>> =
            chunks.iter().map(|c| Self::chunk_key(&self.session_dir(&c.volume, &c.session)?, c.addr)).collect();
        match keys {
            Ok(keys) => {
                self.bucket.get_many(keys, MAX_CHUNK_FILE).into_iter().map(|r| r.map(StoredChunk::Bytes)).collect()
            }
            // A bad name is dom0's error for every chunk of the batch.
            Err(e) => chunks.iter().map(|_| Err(anyhow!("{e:#}"))).collect(),
        }
    }

    fn read_meta(
        &mut self,
        volume: &VolumeRef,
        session: &str,
        file: MetaFile,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>> {
        let dir = self.session_dir(volume, session)?;
        self.bucket.get_range(&Self::meta_key(&dir, file)?, offset, max)
    }

    fn prune_begin(&mut self, volume: &VolumeRef, pruned: &str, into: &str) -> Result<()> {
        let vol = self.vol(volume)?;
        let pruned_dir = self.session_dir(volume, pruned)?;
        let into_dir = self.session_dir(volume, into)?;
        if pruned >= into {
            bail!("cannot prune {pruned} of {volume} into the older session {into}");
        }
        for (name, dir) in [(pruned, &pruned_dir), (into, &into_dir)] {
            if !self.is_committed(dir)? {
                bail!("{volume} has no session {name} in the archive");
            }
        }
        if let Some(j) = self.read_journal(&vol)? {
            bail!(
                "{volume} has an unsettled prune of {} into {}; dom0 must finish or abort it first",
                j.pruned,
                j.into
            );
        }
        self.remove_leftovers(&vol)?;
        // A stale address list (of a prune whose journal a kill removed)
        // must never be taken for this prune's.
        self.bucket.delete(&key(&format!("{vol}/{ADDRS}"))?)?;
        let journal = Journal { pruned: pruned.to_string(), into: into.to_string(), state: State::Collecting };
        self.write_journal(&vol, &journal)?;
        step("prune journal written");
        self.prune = Some(PruneUpload {
            vol,
            pruned_dir,
            into_dir,
            journal,
            addrs: BufWriter::with_capacity(1 << 16, spool()?),
            last: None,
            manifest: None,
        });
        Ok(())
    }

    fn prune_add(&mut self, addrs: &[u64]) -> Result<()> {
        let p = self.prune.as_mut().context("protocol error: no prune open")?;
        for &a in addrs {
            if p.last.is_some_and(|l| l >= a) {
                bail!("prune: address {a:#018x} out of order");
            }
            p.last = Some(a);
            writeln!(p.addrs, "{a:016x}").context("spooling prune addresses")?;
        }
        Ok(())
    }

    /// Uploads the addresses and N's new manifest, then copies P's
    /// surviving chunks into N on the server, walking P's listing and the
    /// sorted addresses side by side (both in address order: chunk keys are
    /// fixed-width hex).
    fn prune_link(&mut self) -> Result<u64> {
        let mut p = self.prune.take().context("protocol error: no prune open")?;
        let Some(manifest) = p.manifest.take() else {
            bail!("prune of {}: the new manifest of {} is missing", p.journal.pruned, p.journal.into);
        };
        let addrs = p.addrs.into_inner().map_err(|e| anyhow!("spooling prune addresses: {}", e.error()))?;
        let (mut addrs, addrs_len) = rewound(addrs)?;
        // The clone shares the file position: rewind again after the upload.
        self.bucket.put_file(&key(&format!("{}/{ADDRS}", p.vol))?, addrs.try_clone().context("spool")?, addrs_len)?;
        addrs.rewind().context("spooled prune addresses")?;
        self.bucket.stream_finish(manifest)?;

        let mut wanted = BufReader::new(addrs).lines().map(|l| {
            let l = l.context("reading spooled prune addresses")?;
            u64::from_str_radix(&l, 16).with_context(|| format!("spooled prune address {l:?}"))
        });
        let mut next = wanted.next().transpose()?;
        let mut bytes = 0u64;
        let mut copies = Vec::new();
        let missing = |addr: u64| anyhow!("chunk {addr:#018x} of {} is missing", p.journal.pruned);
        let chunk_prefix = format!("{}/", p.pruned_dir);
        self.bucket.for_each_object(&key(&p.pruned_dir)?, |object, size| {
            let Some(addr) = object
                .as_ref()
                .strip_prefix(&chunk_prefix)
                .and_then(|rel| rel.rsplit('/').next())
                .and_then(layout::parse_addr_token)
            else {
                return Ok(()); // info, manifest
            };
            while let Some(want) = next.filter(|&w| w <= addr) {
                if want < addr {
                    return Err(missing(want));
                }
                copies.push((object.clone(), Self::chunk_key(&p.into_dir, addr)?));
                bytes += size;
                next = wanted.next().transpose()?;
            }
            if copies.len() >= COPY_BATCH {
                self.bucket.copy_many(std::mem::take(&mut copies))?;
                step("chunk linked");
            }
            Ok(())
        })?;
        if let Some(want) = next {
            return Err(missing(want));
        }
        self.bucket.copy_many(copies)?;
        step("chunks synced");
        p.journal.state = State::Linked;
        self.write_journal(&p.vol, &p.journal)?;
        step("prune journal linked");
        Ok(bytes)
    }

    fn prune_open(&self) -> bool {
        self.prune.is_some()
    }

    fn prune_finish(&mut self, volume: &VolumeRef, pruned: &str, into: &str, info: &[u8]) -> Result<()> {
        let vol = self.vol(volume)?;
        let pruned_dir = self.session_dir(volume, pruned)?;
        let into_dir = self.session_dir(volume, into)?;
        if !finishable(self.read_journal(&vol)?, volume, pruned, into)? {
            return self.remove_leftovers(&vol); // finished before; dom0 did not hear it
        }
        let new_manifest = new_manifest_key(&into_dir)?;
        if self.bucket.exists(&new_manifest)? {
            self.bucket.copy_many(vec![(new_manifest, Self::meta_key(&into_dir, MetaFile::Manifest)?)])?;
        }
        self.bucket.put(&Self::meta_key(&into_dir, MetaFile::Info)?, info.to_vec())?;
        step("merged metadata installed");
        self.bucket.delete(&Self::commit_key(&pruned_dir)?)?;
        step("pruned session renamed");
        self.remove_prune_objects(&vol, &into_dir)?;
        step("prune journal removed");
        self.remove_leftovers(&vol)
    }

    fn prune_abort(&mut self, volume: &VolumeRef) -> Result<()> {
        let vol = self.vol(volume)?;
        let Some(j) = self.read_journal(&vol)? else {
            return self.remove_leftovers(&vol);
        };
        let into_dir = self.session_dir(volume, &j.into)?;
        let mut added = Vec::new();
        self.for_each_recorded_addr(&vol, |addr| {
            added.push(Self::chunk_key(&into_dir, addr)?);
            if added.len() >= 1000 {
                self.bucket.delete_many(std::mem::take(&mut added))?;
                step("added chunk removed");
            }
            Ok(())
        })?;
        self.bucket.delete_many(added)?;
        self.remove_prune_objects(&vol, &into_dir)?;
        step("prune aborted");
        self.remove_leftovers(&vol)
    }

    /// Commit objects first, then a prune's journal, then the rest: a kill
    /// leaves only what listing ignores and the next run removes.
    fn delete_volume(&mut self, volume: &VolumeRef) -> Result<()> {
        let vol = self.vol(volume)?;
        let (committed, _) = self.scan(&vol)?;
        let markers: Result<Vec<Path>> = committed.iter().map(|s| Self::commit_key(&format!("{vol}/{s}"))).collect();
        self.bucket.delete_many(markers?)?;
        self.bucket.delete(&key(&format!("{vol}/{PRUNE_JOURNAL}"))?)?;
        self.bucket.delete(&key(&format!("{vol}/{ADDRS}"))?)?;
        self.bucket.delete_under(&key(&vol)?)
    }

    fn get_key(&mut self, pool: &str, max: usize) -> Result<Option<Vec<u8>>> {
        names::validate_pool_dir(pool)?;
        self.bucket.get(&key(&format!("{}/{pool}/{}", self.root, layout::KEY_FILE))?, max as u64)
    }

    fn put_key(&mut self, pool: &str, data: &[u8]) -> Result<()> {
        names::validate_pool_dir(pool)?;
        let name = format!("{}/{pool}/{}", self.root, layout::KEY_FILE);
        if !self.bucket.put_create(&key(&name)?, data.to_vec())? {
            bail!("{name} already exists; refusing to replace an archive's key");
        }
        Ok(())
    }

    fn replace_info(&mut self, volume: &VolumeRef, session: &str, info: &[u8]) -> Result<()> {
        let dir = self.session_dir(volume, session)?;
        if !self.is_committed(&dir)? {
            bail!("{volume}: no committed session {session}");
        }
        self.bucket.put(&Self::meta_key(&dir, MetaFile::Info)?, info.to_vec())
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // An uncommitted session's objects are left to the next send; its
        // unfinished multipart uploads are abandoned here.
        self.bucket.cancel_uploads();
        let w = self.writer.take();
        let p = self.prune.take();
        let open = w.into_iter().flat_map(|w| [w.info, w.manifest]).chain(p.map(|p| p.manifest));
        for mut upload in open.flatten() {
            self.bucket.stream_abort(&mut upload);
        }
    }
}
