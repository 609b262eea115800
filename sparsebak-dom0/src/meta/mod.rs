//! dom0's own metadata, the only record dom0 trusts.
//!
//! - `metadir.rs`: the metadata folder, its lock, volumes and sessions;
//! - `session.rs`: session names ([`SessionId`]) and `info` ([`SessionInfo`]);
//! - `manifest.rs`: manifests, their reader/writer, and the streaming k-way
//!   merge ([`ManifestMerge`]) that every restore and send builds on;
//! - [`prune_journal`]: dom0's half of a crash-safe prune.

mod manifest;
mod metadir;
pub mod prune_journal;
pub mod retention;
mod session;

pub use manifest::{
    ChunkState, Hash, ManifestEntry, ManifestMerge, ManifestReader, ManifestWriter, MergedEntry, Origin,
};
pub use metadir::{recover_marker_path, MetaDir, VolumeMeta};
pub use session::{validate_tag, SessionFormat, SessionId, SessionInfo, MAX_TAGS};
