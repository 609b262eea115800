//! Making changes durable: a file replaced or created atomically, and folder
//! entries synced, so a kill or a power cut leaves old or new state, never a
//! mix. Shared by dom0 (its metadata) and the receiver (the archive).
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing folder {}", dir.display()))
}

/// Writes `data` to `path` durably: temp file (`PATH.new`), fsync, rename,
/// folder fsync. The temp name appends to the whole name, so `vm.img` and
/// `vm.deltamap` never share one.
pub fn write_file_durably(path: &Path, data: &[u8]) -> Result<()> {
    write_synced_tmp(path, data)
        .and_then(|tmp| std::fs::rename(tmp, path))
        .with_context(|| format!("writing {}", path.display()))?;
    match path.parent() {
        Some(p) => fsync_dir(p),
        None => Ok(()),
    }
}

/// The temp name a durable write goes through: `PATH.new`, appended to the
/// whole name so that `vm.img` and `vm.deltamap` never share one.
fn tmp_path(path: &Path) -> std::path::PathBuf {
    with_suffix(path, ".new")
}

/// Writes `data` to `path`'s temp name and fsyncs it, so that only a rename
/// or link is left to make it appear.
fn write_synced_tmp(path: &Path, data: &[u8]) -> std::io::Result<std::path::PathBuf> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Removes a file durably; an absent file is fine.
pub fn remove_file_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    match path.parent() {
        Some(p) => fsync_dir(p),
        None => Ok(()),
    }
}

/// Creates `path` with `data`, durably, never replacing an existing file:
/// temp file, fsync, hard link to the final name (fails if it exists),
/// folder fsync.
pub fn create_file_durably(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("file has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if path.exists() {
        bail!("{} already exists; refusing to replace it", path.display());
    }
    let tmp = tmp_path(path);
    let written = write_synced_tmp(path, data).and_then(|tmp| std::fs::hard_link(tmp, path));
    // The temp name is gone either way: on success the final name holds
    // the data, on failure there is nothing to keep.
    let _ = std::fs::remove_file(&tmp);
    written.with_context(|| format!("writing {}", path.display()))?;
    fsync_dir(dir)
}

/// Makes way for a file that a killed run of ours may have left at `path`:
/// removes it when `ours` says its type is the kind we leave (never
/// following a link), refuses anything else with an error naming it, and
/// does nothing when the path is free. `what` names our kind in the error
/// ("a regular file", "a socket").
pub fn remove_stale(path: &Path, ours: impl Fn(&std::fs::FileType) -> bool, what: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if ours(&m.file_type()) => {
            std::fs::remove_file(path).with_context(|| format!("removing the leftover {}", path.display()))
        }
        Ok(_) => bail!("{} exists and is not {what} (a link?); remove it or choose another path", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// `path` with `suffix` appended to its last component (`S_x` -> `S_x-tmp`).
pub fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_and_create_refuses_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("journal");
        write_file_durably(&p, b"one").expect("write");
        write_file_durably(&p, b"two").expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert!(!tmp_path(&p).exists(), "no temp file left");

        let key = dir.path().join("sub/key");
        create_file_durably(&key, b"k1").expect("create");
        let err = create_file_durably(&key, b"k2").expect_err("must not replace");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&key).expect("read"), b"k1");

        remove_file_durably(&key).expect("remove");
        assert!(!key.exists());
        remove_file_durably(&key).expect("absent is fine");
    }

    #[test]
    fn suffix_goes_on_the_last_component() {
        assert_eq!(with_suffix(Path::new("/a/S_1"), "-tmp"), Path::new("/a/S_1-tmp"));
        assert_eq!(with_suffix(Path::new("rel/manifest"), ".new"), Path::new("rel/manifest.new"));
    }
}
