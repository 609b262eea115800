//! A file's extent map, read with FIEMAP (`ioctl(FS_IOC_FIEMAP)`).

use std::fs::File;
use std::io;

use anyhow::{bail, Context, Result};

use crate::sys::{self, FiemapBuf, FiemapHeader, FIEMAP_BATCH, FIEMAP_FLAG_SYNC};

/// The last extent of the file.
pub const FIEMAP_EXTENT_LAST: u32 = 0x0000_0001;
/// Where the data is, is not known yet (`fe_physical` means nothing).
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x0000_0002;
/// Delayed allocation: no place on disk yet (implies UNKNOWN).
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x0000_0004;
/// Data is encoded (compressed) on disk: `fe_physical` is not a byte of it.
pub const FIEMAP_EXTENT_ENCODED: u32 = 0x0000_0008;
/// Data is encrypted by the filesystem.
pub const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x0000_0080;
/// The extent's offsets may not be block aligned.
pub const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x0000_0100;
/// Data is stored inline in metadata (btrfs: small files; physical is 0).
pub const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x0000_0200;
/// Data is packed into a block with other files' tails.
pub const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x0000_0400;
/// Allocated but not written (preallocated): reads as zeros.
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0000_0800;
/// The filesystem merged several of its extents into this one.
pub const FIEMAP_EXTENT_MERGED: u32 = 0x0000_1000;
/// The extent's space is shared with another file (a reflink) or snapshot.
pub const FIEMAP_EXTENT_SHARED: u32 = 0x0000_2000;

/// Every flag this crate knows of. A bit outside it is a flag of a newer
/// kernel, and `changed_ranges` treats its extent as changed.
pub const FIEMAP_KNOWN_FLAGS: u32 = FIEMAP_EXTENT_LAST
    | FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
    | FIEMAP_EXTENT_UNWRITTEN
    | FIEMAP_EXTENT_MERGED
    | FIEMAP_EXTENT_SHARED;

/// The flags that say nothing about where a byte's data is or how it is
/// stored, and that `changed_ranges` ignores. Any other flag (known or not)
/// makes the extent's whole range count as changed.
pub const FIEMAP_IGNORED_FLAGS: u32 = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_MERGED;

/// At most this many extents are read for one file; a file with more is an
/// error (the caller compares in full). 16 Mi extents take 512 MiB here.
pub const MAX_EXTENTS: usize = 16 * 1024 * 1024;

/// One extent as FIEMAP reports it: `length` bytes of the file from byte
/// `logical` are stored from byte `physical` of the filesystem's device(s).
/// `flags` are `FIEMAP_EXTENT_*` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// Reads the whole extent map of `file` with FIEMAP, with
/// `FIEMAP_FLAG_SYNC` so that dirty data is written back (and gets its real
/// extent) first. Extents come in the kernel's order, in calls of at most
/// 512, until one has `FIEMAP_EXTENT_LAST` or a call returns none. An
/// extent repeated verbatim at the start of the next call is kept once; any
/// other overlap is kept as reported (and `changed_ranges` marks it).
///
/// Errors: the filesystem has no FIEMAP (e.g. tmpfs: `EOPNOTSUPP`), more
/// than `MAX_EXTENTS` extents, or a reply that makes no progress.
pub fn extent_map(file: &File) -> Result<Vec<Extent>> {
    let mut buf = FiemapBuf::new_boxed();
    let mut out: Vec<Extent> = Vec::new();
    let mut start = 0u64;
    loop {
        buf.header = FiemapHeader {
            fm_start: start,
            // The kernel clamps the length to the filesystem's maximum.
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: FIEMAP_BATCH as u32,
            fm_reserved: 0,
        };
        sys::fiemap(file, &mut buf)
            .map_err(io::Error::from)
            .with_context(|| format!("reading the extent map (FIEMAP) from byte {start}"))?;
        let mapped = buf.header.fm_mapped_extents as usize;
        if mapped > FIEMAP_BATCH {
            bail!("FIEMAP reported {mapped} extents into a buffer of {FIEMAP_BATCH}");
        }
        if mapped == 0 {
            break;
        }
        let mut end = start;
        let mut last = false;
        for fe in &buf.extents[..mapped] {
            let extent =
                Extent { logical: fe.fe_logical, physical: fe.fe_physical, length: fe.fe_length, flags: fe.fe_flags };
            if out.last() != Some(&extent) {
                out.push(extent);
            }
            end = end.max(extent.logical.saturating_add(extent.length));
            last |= extent.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if out.len() > MAX_EXTENTS {
            bail!("the file has more than {MAX_EXTENTS} extents");
        }
        if last || end == u64::MAX {
            break;
        }
        if end <= start {
            bail!("FIEMAP from byte {start} returned no extent ending after it");
        }
        start = end;
    }
    Ok(out)
}
