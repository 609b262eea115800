//! Which filesystem a path is on (statfs `f_type`).

use std::io;
use std::path::Path;

use anyhow::{Context, Result};
use nix::sys::statfs::{statfs, BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC};

/// The filesystems this crate knows to make reflink copies (XFS only when
/// made with `reflink=1`, the default of mkfs.xfs since xfsprogs 5.1:
/// `supports_reflink` tells for sure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Btrfs,
    Xfs,
    /// Any other filesystem, by its statfs magic number (e.g. 0x01021994
    /// for tmpfs, 0xEF53 for ext4).
    Other(u64),
}

/// The kind of filesystem that `path` is on.
pub fn filesystem_kind(path: &Path) -> Result<FsKind> {
    let st = statfs(path).map_err(io::Error::from).with_context(|| format!("statfs of {}", path.display()))?;
    let magic = st.filesystem_type();
    Ok(if magic == BTRFS_SUPER_MAGIC {
        FsKind::Btrfs
    } else if magic == XFS_SUPER_MAGIC {
        FsKind::Xfs
    } else {
        // f_type is a C long; magic numbers are 32-bit values, kept as
        // unsigned whatever the width of long.
        FsKind::Other(magic.0 as u64 & 0xffff_ffff)
    })
}
