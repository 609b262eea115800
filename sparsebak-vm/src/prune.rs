//! The receiver's half of prune: merging session P into the next newer
//! session N without rewriting chunk data.
//!
//! dom0 decides everything (which chunks of P survive, N's new manifest);
//! the receiver carries it out in two phases, each journaled in the volume
//! folder, so that a kill at any point leaves every session restorable and
//! the next run settles the prune one way or the other:
//!
//! 1. `begin`/`add`/`link`: the journal (`prune.journal`: P, N, state) is
//!    written first, the surviving addresses go to `prune.addrs`, then each
//!    chunk appears in N by hard link (or is extracted from P's tar into
//!    N's folder layout). P is untouched, and N's manifest does not list the
//!    new files yet, so both the old and the merged view restore correctly.
//!    One `syncfs`, then the journal says `linked`.
//! 2. dom0 commits on its side, then `finish`: N's manifest and info copies
//!    are replaced, P is renamed to `P-pruned` (no longer a session) and
//!    removed, the journal goes. Or dom0 never committed, and `abort`
//!    removes the files that phase 1 added to N.
//!
//! Cost: one link (or copy) per surviving chunk of P, one unlink per chunk
//! of P: never anything proportional to the volume size.

use crate::archive::{chunk_path, remove_session_leftovers, Archive};
use crate::chunk_source::ChunkSource;
use anyhow::{bail, Context, Result};
use sparsebak_fsutil::{fsync_dir, remove_file_durably, with_suffix, write_file_durably};
use sparsebak_proto::layout::{MANIFEST_FILE, PRUNED_SUFFIX, PRUNE_JOURNAL};
use sparsebak_proto::{testhook, MetaFile, VolumeRef};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The surviving addresses of the unsettled prune, beside its journal. Only
/// the receiver has this file (dom0 keeps its own state in its journal), so
/// it is named here rather than in `sparsebak_proto::layout`.
pub(crate) const ADDRS: &str = "prune.addrs";
/// Suffix of N's new manifest copy until `finish` renames it (receiver only,
/// like `ADDRS`).
pub(crate) const NEW_SUFFIX: &str = ".prune-new";

use testhook::receiver_step as step;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Addresses are being collected or chunks linked: not yet durable.
    Collecting,
    /// Every surviving chunk is in N, durably.
    Linked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Journal {
    pub pruned: String,
    pub into: String,
    pub state: State,
}

impl Journal {
    pub(crate) fn to_text(&self) -> String {
        let state = match self.state {
            State::Collecting => "collecting",
            State::Linked => "linked",
        };
        format!("pruned={}\ninto={}\nstate={state}\n", self.pruned, self.into)
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Journal> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .with_context(|| format!("prune journal {} lacks {key}", path.display()))
        };
        let pruned = field("pruned")?.to_string();
        let into = field("into")?.to_string();
        sparsebak_proto::names::validate_session_name(&pruned)?;
        sparsebak_proto::names::validate_session_name(&into)?;
        let state = match field("state")? {
            "collecting" => State::Collecting,
            "linked" => State::Linked,
            other => bail!("prune journal {}: unknown state {other:?}", path.display()),
        };
        Ok(Journal { pruned, into, state })
    }

    fn read(vol_dir: &Path) -> Result<Option<Journal>> {
        let path = vol_dir.join(PRUNE_JOURNAL);
        match fs::read_to_string(&path) {
            Ok(text) => Journal::parse(&text, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write(&self, vol_dir: &Path) -> Result<()> {
        write_file_durably(&vol_dir.join(PRUNE_JOURNAL), self.to_text().as_bytes())
    }
}

/// A prune in phase 1.
pub struct Prune {
    vol_dir: PathBuf,
    pruned_dir: PathBuf,
    into_dir: PathBuf,
    journal: Journal,
    addrs: BufWriter<File>,
    last: Option<u64>,
    manifest: Option<File>,
}

impl Prune {
    pub fn begin(archive: &Archive, volume: &VolumeRef, pruned: &str, into: &str) -> Result<Prune> {
        let vol_dir = archive.volume_dir(volume)?;
        let pruned_dir = archive.session_dir(volume, pruned)?;
        let into_dir = archive.session_dir(volume, into)?;
        if pruned >= into {
            bail!("cannot prune {pruned} of {volume} into the older session {into}");
        }
        for dir in [&pruned_dir, &into_dir] {
            if !dir.is_dir() {
                bail!("{volume} has no session {} in the archive", file_name(dir));
            }
        }
        if let Some(j) = Journal::read(&vol_dir)? {
            bail!(
                "{volume} has an unsettled prune of {} into {}; dom0 must finish or abort it first",
                j.pruned,
                j.into
            );
        }
        remove_leftovers(&vol_dir)?;
        let journal = Journal { pruned: pruned.to_string(), into: into.to_string(), state: State::Collecting };
        let addrs_path = vol_dir.join(ADDRS);
        let addrs = File::create(&addrs_path).with_context(|| format!("creating {}", addrs_path.display()))?;
        // The journal last: from here on, `abort` knows what to undo.
        journal.write(&vol_dir)?;
        step("prune journal written");
        Ok(Prune {
            vol_dir,
            pruned_dir,
            into_dir,
            journal,
            addrs: BufWriter::with_capacity(1 << 16, addrs),
            last: None,
            manifest: None,
        })
    }

    /// Records surviving addresses (strictly increasing across calls).
    pub fn add(&mut self, addrs: &[u64]) -> Result<()> {
        for &a in addrs {
            if self.last.is_some_and(|l| l >= a) {
                bail!("prune: address {a:#018x} out of order");
            }
            self.last = Some(a);
            writeln!(self.addrs, "{a:016x}")
                .with_context(|| format!("writing {}", self.vol_dir.join(ADDRS).display()))?;
        }
        Ok(())
    }

    /// Appends to N's new manifest copy (installed by `finish`; the info
    /// copy comes with `finish` itself).
    pub fn put_meta(&mut self, file: MetaFile, data: &[u8]) -> Result<()> {
        if file != MetaFile::Manifest {
            bail!("protocol error: during a prune only the manifest is sent as metadata");
        }
        if self.manifest.is_none() {
            let path = new_manifest_path(&self.into_dir);
            self.manifest = Some(File::create(&path).with_context(|| format!("creating {}", path.display()))?);
        }
        let f = self.manifest.as_mut().context("manifest not open")?;
        f.write_all(data).with_context(|| format!("writing the new manifest of {}", self.into_dir.display()))
    }

    /// Puts every recorded chunk into N and makes it durable. Returns the
    /// bytes added to N.
    pub fn link(mut self, chunks: &mut ChunkSource) -> Result<u64> {
        let addrs_path = self.vol_dir.join(ADDRS);
        self.addrs.flush().with_context(|| format!("writing {}", addrs_path.display()))?;
        self.addrs.get_ref().sync_all().with_context(|| format!("syncing {}", addrs_path.display()))?;
        if self.manifest.is_none() {
            bail!(
                "prune of {}: the new manifest of {} is missing",
                file_name(&self.pruned_dir),
                file_name(&self.into_dir)
            );
        }
        let mut bytes = 0u64;
        for addr in read_addrs(&addrs_path)? {
            bytes += link_chunk(chunks, &self.pruned_dir, &self.into_dir, addr?)?;
            step("chunk linked");
        }
        self.manifest = None;
        let dir = File::open(&self.into_dir).with_context(|| format!("opening {}", self.into_dir.display()))?;
        nix::unistd::syncfs(dir.as_raw_fd())
            .with_context(|| format!("syncing the filesystem of {}", self.into_dir.display()))?;
        step("chunks synced");
        self.journal.state = State::Linked;
        self.journal.write(&self.vol_dir)?;
        step("prune journal linked");
        Ok(bytes)
    }
}

/// Makes chunk `addr` of `pruned_dir` appear in `into_dir`: a hard link to
/// its file, or a copy out of its tar (which converts it to folder layout).
/// Idempotent, so a repeated phase 1 after a kill just goes on.
fn link_chunk(chunks: &mut ChunkSource, pruned_dir: &Path, into_dir: &Path, addr: u64) -> Result<u64> {
    let dst = chunk_path(into_dir, addr);
    let parent = dst.parent().context("chunk path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let from_tar = match chunks.tar_of(pruned_dir)? {
        Some(tar) => tar.read(addr).transpose()?,
        None => None,
    };
    if let Some(data) = from_tar {
        // A fresh file: writing through a stale hard link would change
        // another session's chunk.
        match fs::remove_file(&dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("replacing stale {}", dst.display())),
        }
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .open(&dst)
            .with_context(|| format!("creating {}", dst.display()))?;
        f.write_all(&data).with_context(|| format!("writing {}", dst.display()))?;
        return Ok(data.len() as u64);
    }
    let src = chunk_path(pruned_dir, addr);
    let src_meta = fs::metadata(&src)
        .with_context(|| format!("chunk {addr:#018x} of {} is missing ({})", file_name(pruned_dir), src.display()))?;
    match fs::symlink_metadata(&dst) {
        Ok(m) if m.ino() == src_meta.ino() && m.dev() == src_meta.dev() => return Ok(m.len()),
        Ok(_) => fs::remove_file(&dst).with_context(|| format!("replacing stale {}", dst.display()))?,
        Err(_) => {}
    }
    fs::hard_link(&src, &dst).with_context(|| format!("linking {} to {}", src.display(), dst.display()))?;
    Ok(src_meta.len())
}

/// Phase 2, after dom0 committed. Also fine when it already happened.
pub fn finish(archive: &Archive, volume: &VolumeRef, pruned: &str, into: &str, info: &[u8]) -> Result<()> {
    let vol_dir = archive.volume_dir(volume)?;
    let pruned_dir = archive.session_dir(volume, pruned)?;
    let into_dir = archive.session_dir(volume, into)?;
    if !finishable(Journal::read(&vol_dir)?, volume, pruned, into)? {
        return remove_leftovers(&vol_dir); // finished before; dom0 did not hear it
    }
    let new = new_manifest_path(&into_dir);
    if new.exists() {
        fs::rename(&new, into_dir.join(MetaFile::Manifest.file_name()))
            .with_context(|| format!("installing {}", new.display()))?;
    }
    write_file_durably(&into_dir.join(MetaFile::Info.file_name()), info)?;
    step("merged metadata installed");
    let gone = with_suffix(&pruned_dir, PRUNED_SUFFIX);
    if pruned_dir.exists() {
        fs::rename(&pruned_dir, &gone).with_context(|| format!("renaming {}", pruned_dir.display()))?;
        fsync_dir(&vol_dir)?;
    }
    step("pruned session renamed");
    remove_file_durably(&vol_dir.join(ADDRS))?;
    remove_file_durably(&vol_dir.join(PRUNE_JOURNAL))?;
    step("prune journal removed");
    remove_leftovers(&vol_dir)
}

/// Whether the journal read from the archive is the linked prune of
/// `pruned` into `into` that dom0 asks to finish (`false`: there is none, it
/// finished before); an error for any other prune or an unlinked one.
pub(crate) fn finishable(journal: Option<Journal>, volume: &VolumeRef, pruned: &str, into: &str) -> Result<bool> {
    match journal {
        None => Ok(false),
        Some(j) if j.pruned != pruned || j.into != into => bail!(
            "{volume}: asked to finish pruning {pruned} into {into}, but the journal is for {} into {}",
            j.pruned,
            j.into
        ),
        Some(j) if j.state != State::Linked => {
            bail!("{volume}: prune of {pruned} into {into} never completed its linking; it cannot be finished")
        }
        Some(_) => Ok(true),
    }
}

/// Undoes phase 1 (dom0 did not commit). Also fine with nothing to undo.
pub fn abort(archive: &Archive, volume: &VolumeRef) -> Result<()> {
    let vol_dir = archive.volume_dir(volume)?;
    let Some(j) = Journal::read(&vol_dir)? else {
        return remove_leftovers(&vol_dir);
    };
    let into_dir = archive.session_dir(volume, &j.into)?;
    let addrs_path = vol_dir.join(ADDRS);
    if addrs_path.exists() {
        for addr in read_addrs(&addrs_path)? {
            let path = chunk_path(&into_dir, addr?);
            match fs::remove_file(&path) {
                Ok(()) => step("added chunk removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
    }
    remove_file_durably(&new_manifest_path(&into_dir))?;
    fsync_dir(&into_dir)?;
    remove_file_durably(&addrs_path)?;
    remove_file_durably(&vol_dir.join(PRUNE_JOURNAL))?;
    step("prune aborted");
    remove_leftovers(&vol_dir)
}

/// Removes pruned session folders whose removal a kill interrupted.
fn remove_leftovers(vol_dir: &Path) -> Result<()> {
    remove_session_leftovers(vol_dir, PRUNED_SUFFIX)
}

/// Reads the recorded addresses back; a torn last line (kill while
/// writing) is ignored: its chunk was never linked.
fn read_addrs(path: &Path) -> Result<impl Iterator<Item = Result<u64>>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let path = path.to_path_buf();
    Ok(BufReader::with_capacity(1 << 16, f).lines().filter_map(move |line| match line {
        Ok(l) if l.len() == 16 => {
            Some(u64::from_str_radix(&l, 16).with_context(|| format!("{}: bad address {l:?}", path.display())))
        }
        Ok(_) => None,
        Err(e) => Some(Err(e).with_context(|| format!("reading {}", path.display()))),
    }))
}

fn new_manifest_path(into_dir: &Path) -> PathBuf {
    with_suffix(&into_dir.join(MANIFEST_FILE), NEW_SUFFIX)
}

fn file_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::TarWriter;
    use sparsebak_proto::layout::TAR_FILE;

    const P: &str = "S_20260101-000000";
    const N: &str = "S_20260102-000000";

    /// An archive under a temp dir (`/` is the mount point), a volume with
    /// sessions P and N.
    fn setup() -> (tempfile::TempDir, Archive, VolumeRef) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rel = tmp.path().strip_prefix("/").expect("absolute").to_string_lossy().into_owned();
        let archive = Archive::open("/", &rel).expect("archive");
        let volume = VolumeRef { pool: "local%images".into(), name: "v".into() };
        for s in [P, N] {
            let dir = archive.session_dir(&volume, s).expect("dir");
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("manifest"), format!("old manifest of {s}")).expect("manifest");
        }
        (tmp, archive, volume)
    }

    fn put(archive: &Archive, volume: &VolumeRef, s: &str, addr: u64, data: &[u8]) -> PathBuf {
        let path = chunk_path(&archive.session_dir(volume, s).expect("dir"), addr);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, data).expect("chunk");
        path
    }

    fn run_phase1(archive: &Archive, volume: &VolumeRef, addrs: &[u64]) -> u64 {
        let mut p = Prune::begin(archive, volume, P, N).expect("begin");
        p.add(addrs).expect("add");
        p.put_meta(MetaFile::Manifest, b"merged manifest").expect("meta");
        p.link(&mut ChunkSource::default()).expect("link")
    }

    #[test]
    fn link_then_abort_leaves_both_sessions_as_they_were() {
        let (_tmp, archive, volume) = setup();
        put(&archive, &volume, P, 0x20000, b"aa");
        put(&archive, &volume, P, 0x40000, b"bbb");
        let n_own = put(&archive, &volume, N, 0x60000, b"n");
        assert_eq!(run_phase1(&archive, &volume, &[0x20000, 0x40000]), 5);
        let n_dir = archive.session_dir(&volume, N).expect("dir");
        assert_eq!(fs::read(chunk_path(&n_dir, 0x40000)).expect("linked"), b"bbb");
        // A second prune must wait until this one is settled.
        assert!(Prune::begin(&archive, &volume, P, N).is_err());
        abort(&archive, &volume).expect("abort");
        assert!(!chunk_path(&n_dir, 0x20000).exists() && !chunk_path(&n_dir, 0x40000).exists());
        assert_eq!(fs::read(&n_own).expect("N's own chunk"), b"n");
        assert_eq!(fs::read_to_string(n_dir.join("manifest")).expect("manifest"), format!("old manifest of {N}"));
        assert!(archive.session_dir(&volume, P).expect("dir").join("000000000").is_dir(), "P untouched");
        assert!(Journal::read(&archive.volume_dir(&volume).expect("vol")).expect("read").is_none());
        abort(&archive, &volume).expect("a second abort is a no-op");
    }

    #[test]
    fn finish_installs_the_merge_and_removes_the_pruned_session() {
        let (_tmp, archive, volume) = setup();
        put(&archive, &volume, P, 0x20000, b"aa");
        put(&archive, &volume, P, 0x40000, b"superseded");
        run_phase1(&archive, &volume, &[0x20000]);
        let err = finish(&archive, &volume, N, P, b"info").expect_err("wrong sessions");
        assert!(format!("{err:#}").contains("journal is for"), "{err:#}");
        finish(&archive, &volume, P, N, b"new info").expect("finish");
        let n_dir = archive.session_dir(&volume, N).expect("dir");
        assert_eq!(fs::read(chunk_path(&n_dir, 0x20000)).expect("moved"), b"aa");
        assert!(!chunk_path(&n_dir, 0x40000).exists());
        assert_eq!(fs::read(n_dir.join("manifest")).expect("manifest"), b"merged manifest");
        assert_eq!(fs::read(n_dir.join("info")).expect("info"), b"new info");
        assert_eq!(archive.list_sessions(&volume).expect("list"), [N]);
        let names: Vec<_> = fs::read_dir(archive.volume_dir(&volume).expect("vol")).expect("ls").flatten().collect();
        assert_eq!(names.len(), 1, "only N is left: {names:?}");
        finish(&archive, &volume, P, N, b"new info").expect("a repeated finish is a no-op");
    }

    #[test]
    fn tar_chunks_are_extracted_into_fresh_files() {
        let (_tmp, archive, volume) = setup();
        let p_dir = archive.session_dir(&volume, P).expect("dir");
        let mut tar = TarWriter::create(&p_dir.join(TAR_FILE)).expect("tar");
        tar.append(0x20000, b"from tar").expect("append");
        tar.finish().expect("finish");
        // A stale file in N that is a hard link to another session's chunk
        // must be replaced, not written through.
        let other = put(&archive, &volume, P, 0x80000, b"keep me");
        let n_dir = archive.session_dir(&volume, N).expect("dir");
        let stale = chunk_path(&n_dir, 0x20000);
        fs::create_dir_all(stale.parent().expect("parent")).expect("mkdir");
        fs::hard_link(&other, &stale).expect("link");
        assert_eq!(run_phase1(&archive, &volume, &[0x20000]), 8);
        assert_eq!(fs::read(&stale).expect("extracted"), b"from tar");
        assert_eq!(fs::read(&other).expect("other"), b"keep me");
    }

    #[test]
    fn addresses_must_increase_and_sessions_exist() {
        let (_tmp, archive, volume) = setup();
        let mut p = Prune::begin(&archive, &volume, P, N).expect("begin");
        assert!(p.add(&[0x40000, 0x20000]).is_err());
        drop(p);
        abort(&archive, &volume).expect("abort");
        assert!(Prune::begin(&archive, &volume, N, P).is_err(), "into an older session");
        assert!(Prune::begin(&archive, &volume, P, "S_20260103-000000").is_err(), "missing session");
    }
}
