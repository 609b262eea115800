//! Change tracking of disk-image files on Btrfs and XFS (`reflink=1`) by
//! reflink copies.
//!
//! At each backup the tool makes a read-only reflink copy of the image
//! (`reflink_copy`, FICLONE): `tick` is the copy of the last backup, `tock`
//! the new one. Both share the image's extents as of their making, and the
//! filesystem never writes a shared extent in place, so comparing the two
//! copies' extent maps (`extent_map`, FIEMAP) tells which byte ranges may
//! differ (`changed_ranges`, `compare_stable`) without reading the data.
//! Every byte that may differ is reported (a miss would be a silently
//! wrong backup); some that do not differ are too, and cost a read and a
//! hash compare. After the backup, `tock` becomes the next `tick`.
//!
//! What it relies on: tick and tock are never written (they are made mode
//! 0400) and live on the image's filesystem, in one btrfs subvolume; their
//! maps, not the image's, are compared (the image's own extents change
//! under writes, an XFS copy-on-write fork among them). Compressed btrfs
//! extents, inline data, preallocated ranges and any unfamiliar flag are
//! always reported as changed. Tests run against real btrfs and XFS
//! filesystems on loop devices (`tests/real_fs.rs`: root, btrfs-progs,
//! xfsprogs).
//!
//! All unsafe code (the two ioctls) is in `sys.rs`.

mod clone;
mod compare;
mod fiemap;
mod fskind;
#[allow(unsafe_code)]
mod sys;

pub use clone::{reflink_copy, supports_reflink, CopyError};
pub use compare::{changed_ranges, compare_stable, UnstableMaps, STABLE_ATTEMPTS};
pub use fiemap::{
    extent_map, Extent, FIEMAP_EXTENT_DATA_ENCRYPTED, FIEMAP_EXTENT_DATA_INLINE, FIEMAP_EXTENT_DATA_TAIL,
    FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_MERGED, FIEMAP_EXTENT_NOT_ALIGNED,
    FIEMAP_EXTENT_SHARED, FIEMAP_EXTENT_UNKNOWN, FIEMAP_EXTENT_UNWRITTEN, FIEMAP_IGNORED_FLAGS, FIEMAP_KNOWN_FLAGS,
    MAX_EXTENTS,
};
pub use fskind::{filesystem_kind, FsKind};
