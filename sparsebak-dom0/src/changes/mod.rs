//! Step 2 of the data path: which chunks a send looks at.
//!
//! - [`DeltaMap`] (`deltamap.rs`): one bit per archive chunk, crash-safe on
//!   disk;
//! - [`TrackedVolume`] (`tracking.rs`): short-lived tick/tock copies of a
//!   volume, compared and folded into the delta map by `monitor`/`send`; the
//!   copies are LVM thin snapshots compared by `thin_delta`
//!   (`lvm_tracking.rs`), or reflink copies of image files compared by
//!   their extent maps (`reflink_tracking.rs`);
//! - [`ScanJobs`] (`scan.rs`): the chunks to read, in address order, each
//!   paired with what the archive already holds there, for the chunk
//!   pipeline in [`crate::chunk`].

mod deltamap;
mod lvm_tracking;
mod reflink_tracking;
mod scan;
mod tracking;

pub use deltamap::{DeltaMap, LoadError};
pub use reflink_tracking::{is_unsupported, ReflinkCopies};
pub use scan::{Candidates, ScanJobs};
pub use tracking::{forget_history, ArchiveState, MonitorOutcome, Snapshots, TrackedVolume};
