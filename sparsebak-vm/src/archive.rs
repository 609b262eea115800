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

use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::layout::{self, ARCHIVE_FORMAT_VERSION};
use sparsebak_proto::{names, VolumeRef};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What to do about a destination this process may not write: in a Qubes
/// backup VM the service runs as the VM's default user, not root, and a
/// freshly mounted disk belongs to root.
fn permission_hint(root: &Path) -> String {
    let uid = nix::unistd::Uid::effective();
    let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    format!(
        " (sparsebak-vm runs as user {user}: make the destination writable for it, e.g. \
         `sudo mkdir -p {0} && sudo chown {user}: {0}` after mounting; see docs/INSTALL.md)",
        root.display()
    )
}

/// Largest chunk file the receiver reads or sends back; matches the frame
/// cap with room for the message header.
pub const MAX_CHUNK_FILE: u64 = (sparsebak_proto::MAX_FRAME - 64) as u64;

/// What the format marker says before its version number.
const MARKER_PREFIX: &str = "sparsebak archive format ";
/// More than any marker we write: a longer file is not one of ours, and is
/// not read further.
const MAX_MARKER: u64 = 64;

/// The root of one archive: `MOUNT/DIR`.
pub struct Archive {
    root: PathBuf,
}

impl Archive {
    /// Opens (creating `DIR` if needed) the archive at `dest`, refusing a
    /// mount point that is not mounted.
    pub fn open(mountpoint: &str, dir: &str) -> Result<Archive> {
        names::validate_mountpoint(mountpoint)?;
        names::validate_dest_dir(dir)?;
        let mount = Path::new(mountpoint);
        if !crate::mounts::is_mount_point(mount)? {
            bail!(
                "destination {} is not a mount point; refusing to use it (is the backup disk mounted?)",
                mount.display()
            );
        }
        let root = mount.join(dir);
        std::fs::create_dir_all(&root).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => permission_hint(&root),
                _ => String::new(),
            };
            anyhow!("creating archive folder {}: {e}{hint}", root.display())
        })?;
        ensure_format_marker(&root)?;
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

/// The format marker's whole text for `version`.
pub fn marker_text(version: u32) -> String {
    format!("{MARKER_PREFIX}{version}\n")
}

/// Checks the archive root's format marker, or writes it when there is
/// none: a new archive, or one made before the marker existed, which is
/// version 1, the version written. An archive of a newer format is refused
/// before anything in it is touched, so an old receiver never writes into a
/// layout it does not know. Only called once the mount point check passed.
///
/// A marker that cannot be written (a backup disk mounted read-only for a
/// restore, a full disk) does not stop the session: the archive is version
/// 1 either way, reads work, and writes fail on their own with their own
/// error. The receiver says so on stderr, which reaches the user.
fn ensure_format_marker(root: &Path) -> Result<()> {
    let path = root.join(layout::FORMAT_MARKER);
    if let Some(text) = read_marker(&path)? {
        return check_marker(&path, &text);
    }
    let written = sparsebak_fsutil::write_file_durably(&path, marker_text(ARCHIVE_FORMAT_VERSION).as_bytes());
    match (written, read_marker(&path)) {
        (Ok(()), _) => Ok(()),
        // Another receiver wrote it first (two pools sent to one archive).
        (Err(_), Ok(Some(text))) => check_marker(&path, &text),
        (Err(e), _) => {
            let _ = writeln!(
                std::io::stderr(),
                "sparsebak-vm: warning: {e:#}; the archive is taken as format version {ARCHIVE_FORMAT_VERSION}"
            );
            Ok(())
        }
    }
}

/// The marker's bytes, `None` when there is none. Never follows a link and
/// never blocks (a FIFO planted there), and reads only a marker's worth.
fn read_marker(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK).open(path);
    let f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening archive format marker {}", path.display())),
    };
    let is_file = f.metadata().with_context(|| format!("stat {}", path.display()))?.is_file();
    if !is_file {
        bail!("archive format marker {} is not a regular file", path.display());
    }
    let mut text = Vec::new();
    f.take(MAX_MARKER + 1).read_to_end(&mut text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text))
}

/// Refuses a garbled marker or one of a newer format.
pub fn check_marker(path: &Path, text: &[u8]) -> Result<()> {
    let version = parse_marker(path, text)?;
    layout::check_format_version(path, version, ARCHIVE_FORMAT_VERSION)
}

/// The version a marker holds. Strict: exactly what [`marker_text`] writes
/// for some version (`layout::parse_version`: no sign, no leading zero, from
/// 1 on), so a damaged marker is never taken for an old one.
fn parse_marker(path: &Path, text: &[u8]) -> Result<u32> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.strip_prefix(MARKER_PREFIX)?.strip_suffix('\n'))
        .and_then(layout::parse_version)
        .ok_or_else(|| {
            anyhow!(
                "{}: garbled archive format marker {:?}; expected {:?}",
                path.display(),
                String::from_utf8_lossy(text),
                marker_text(ARCHIVE_FORMAT_VERSION)
            )
        })
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

    /// An archive folder under a fresh temp dir, with `/` as the mount point
    /// (it is one, and the temp dir is not).
    fn open((mountpoint, dir): (String, String)) -> Result<Archive> {
        Archive::open(&mountpoint, &dir)
    }

    fn dest_in(tmp: &tempfile::TempDir) -> (String, String) {
        let rel = tmp.path().join("archive").strip_prefix("/").expect("absolute").to_string_lossy().into_owned();
        ("/".into(), rel)
    }

    fn marker_of(tmp: &tempfile::TempDir) -> PathBuf {
        tmp.path().join("archive").join(layout::FORMAT_MARKER)
    }

    #[test]
    fn a_new_archive_gets_the_marker_and_reopens() {
        let tmp = tempfile::tempdir().expect("tempdir");
        open(dest_in(&tmp)).expect("open new");
        let marker = marker_of(&tmp);
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "sparsebak archive format 1\n");
        open(dest_in(&tmp)).expect("reopen");
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "sparsebak archive format 1\n");
    }

    #[test]
    fn an_archive_from_before_the_marker_gets_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let session = tmp.path().join("archive/local%images/v/S_20260101-000000");
        std::fs::create_dir_all(&session).expect("mkdir");
        let archive = open(dest_in(&tmp)).expect("open old archive");
        assert_eq!(std::fs::read_to_string(marker_of(&tmp)).expect("marker"), marker_text(1));
        let volume = VolumeRef { pool: "local%images".into(), name: "v".into() };
        assert_eq!(archive.list_sessions(&volume).expect("list"), ["S_20260101-000000"]);
    }

    #[test]
    fn a_newer_format_is_refused_naming_the_marker_and_both_versions() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let marker = marker_of(&tmp);
        std::fs::create_dir_all(marker.parent().expect("parent")).expect("mkdir");
        std::fs::write(&marker, "sparsebak archive format 99\n").expect("write");
        let err = open(dest_in(&tmp)).err().expect("refused");
        let want = layout::check_format_version(&marker, 99, ARCHIVE_FORMAT_VERSION).expect_err("newer");
        assert_eq!(format!("{err:#}"), want.to_string());
        assert!(want.to_string().contains(&marker.display().to_string()), "{want}");
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "sparsebak archive format 99\n", "untouched");
    }

    #[test]
    fn a_garbled_marker_is_an_error_naming_it_and_is_left_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let marker = marker_of(&tmp);
        std::fs::create_dir_all(marker.parent().expect("parent")).expect("mkdir");
        let long = format!("sparsebak archive format 1\n{}", " ".repeat(100));
        for bad in [
            "",
            "sparsebak archive format 1",
            "sparsebak archive format 01\n",
            "sparsebak archive format +1\n",
            "sparsebak archive format 0\n",
            "sparsebak archive format 1\n\n",
            "sparsebak archive format 99999999999\n",
            "Sparsebak archive format 1\n",
            &long,
        ] {
            std::fs::write(&marker, bad).expect("write");
            let err = format!("{:#}", open(dest_in(&tmp)).err().expect("refused"));
            assert!(err.contains("garbled") && err.contains(&marker.display().to_string()), "{bad:?}: {err}");
            assert_eq!(std::fs::read_to_string(&marker).expect("marker"), bad, "left as it was");
        }
        std::fs::write(&marker, [0xff, 0xfe, b'\n']).expect("write");
        assert!(open(dest_in(&tmp)).is_err(), "not UTF-8");
    }

    #[test]
    fn a_fifo_or_link_as_marker_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let marker = marker_of(&tmp);
        std::fs::create_dir_all(marker.parent().expect("parent")).expect("mkdir");
        nix::unistd::mkfifo(&marker, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let err = format!("{:#}", open(dest_in(&tmp)).err().expect("a FIFO is no marker"));
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_file(&marker).expect("rm fifo");
        let real = tmp.path().join("elsewhere");
        std::fs::write(&real, marker_text(1)).expect("write");
        std::os::unix::fs::symlink(&real, &marker).expect("symlink");
        assert!(open(dest_in(&tmp)).is_err(), "a link is not followed");
    }

    #[test]
    fn nothing_is_written_on_an_unmounted_destination() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = Archive::open(&tmp.path().to_string_lossy(), "archive").err().expect("not a mount point");
        assert!(err.to_string().contains("not a mount point"), "{err}");
        assert!(!tmp.path().join("archive").exists(), "no archive folder, no marker");
    }

    #[test]
    fn chunk_paths_group_by_address_prefix() {
        let p = chunk_path(Path::new("/a/S_20260101-000000"), 0x1_2345_6789_0000);
        assert_eq!(p, Path::new("/a/S_20260101-000000/000123456/x0001234567890000"));
        let p = chunk_path(Path::new("/s"), 0);
        assert_eq!(p, Path::new("/s/000000000/x0000000000000000"));
    }
}
