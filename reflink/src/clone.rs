//! Reflink copies (FICLONE) and probing whether a folder's filesystem can
//! make them.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use nix::errno::Errno;

use crate::sys;

/// Why `reflink_copy` failed.
#[derive(Debug)]
pub enum CopyError {
    /// The filesystem cannot make this reflink copy: FICLONE failed with
    /// `EOPNOTSUPP` (no reflink support, e.g. tmpfs, ext4, XFS made with
    /// `reflink=0`), `EINVAL` (e.g. btrfs: one file nodatacow and the other
    /// not), `EXDEV` (not on the same filesystem), `ENOTTY` or `EPERM`.
    /// Nothing is left at `dst`.
    Unsupported { src: PathBuf, dst: PathBuf, source: io::Error },
    /// Any other failure; `context` names both paths and the step that
    /// failed. Nothing that this call created is left at `dst`.
    Io { context: String, source: io::Error },
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyError::Unsupported { src, dst, source } => write!(
                f,
                "cannot make a reflink copy of {} at {}: the filesystem does not support it here ({source})",
                src.display(),
                dst.display()
            ),
            CopyError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for CopyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CopyError::Unsupported { source, .. } | CopyError::Io { source, .. } => Some(source),
        }
    }
}

/// Makes `dst` a read-only (mode 0400) reflink copy of `src`: it shares all
/// of `src`'s extents, so it costs no data and keeps `src`'s content of now.
///
/// Steps: fsync `src` (data still only in the page cache has no extent to
/// share yet); create `dst` with `O_CREAT|O_EXCL|O_NOFOLLOW` (an existing
/// `dst`, symlink or not, is never followed nor overwritten); FICLONE; fsync
/// `dst` and its folder. On any failure after creating `dst`, it is removed.
pub fn reflink_copy(src: &Path, dst: &Path) -> Result<(), CopyError> {
    let io_err = |step: &str, source: io::Error| CopyError::Io {
        context: format!("reflink copy of {} to {}: {step}", src.display(), dst.display()),
        source,
    };
    let src_file = File::open(src).map_err(|e| io_err(&format!("opening {}", src.display()), e))?;
    let meta = src_file.metadata().map_err(|e| io_err(&format!("reading {}'s metadata", src.display()), e))?;
    if !meta.is_file() {
        return Err(io_err(
            &format!("{} is not a regular file", src.display()),
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    src_file.sync_all().map_err(|e| io_err(&format!("fsync of {}", src.display()), e))?;

    let dst_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(dst)
        .map_err(|e| io_err(&format!("creating {}", dst.display()), e))?;
    // From here on `dst` is ours: remove it on every failure.
    let finish = || -> Result<(), CopyError> {
        if let Err(errno) = sys::ficlone(&dst_file, &src_file) {
            let source = io::Error::from(errno);
            return Err(match errno {
                Errno::EOPNOTSUPP | Errno::EINVAL | Errno::EXDEV | Errno::ENOTTY | Errno::EPERM => {
                    CopyError::Unsupported { src: src.to_path_buf(), dst: dst.to_path_buf(), source }
                }
                _ => io_err("FICLONE", source),
            });
        }
        dst_file.sync_all().map_err(|e| io_err(&format!("fsync of {}", dst.display()), e))?;
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&format!("fsync of folder {}", parent.display()), e))
    };
    let result = finish();
    if result.is_err() {
        drop(dst_file);
        // A file this call just created with O_EXCL: removing it fails only
        // if someone else removed or replaced it meanwhile; the copy's own
        // error is the one to report either way.
        let _ = fs::remove_file(dst);
    }
    result
}

/// Whether the filesystem of folder `dir` can make reflink copies: makes a
/// hidden 4 KiB probe file in `dir` and reflink-copies it (`reflink_copy`),
/// then removes both, whatever happened. `Ok(false)` when the copy fails as
/// `CopyError::Unsupported`; an error when the probe cannot be made at all
/// (e.g. `dir` is not writable).
pub fn supports_reflink(dir: &Path) -> Result<bool> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tag =
        format!(".sparsebak-reflink-probe-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let src = dir.join(format!("{tag}.src"));
    let dst = dir.join(format!("{tag}.dst"));

    let mut src_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&src)
        .with_context(|| format!("creating the reflink probe file {}", src.display()))?;
    let _src_guard = RemoveOnDrop(&src);
    src_file.write_all(&[0x5a; 4096]).with_context(|| format!("writing the reflink probe file {}", src.display()))?;
    drop(src_file);

    match reflink_copy(&src, &dst) {
        Ok(()) => {
            let _dst_guard = RemoveOnDrop(&dst);
            Ok(true)
        }
        Err(CopyError::Unsupported { .. }) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("probing reflink support in {}", dir.display())),
    }
}

/// Removes a file this module created, when dropped.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}
