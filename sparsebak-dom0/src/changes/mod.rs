//! Step 2 of the data path: which chunks a send looks at.
//!
//! - [`DeltaMap`] (`deltamap.rs`): one bit per archive chunk, crash-safe on
//!   disk;
//! - [`TrackedVolume`] (`lvm_tracking.rs`): short-lived tick/tock thin
//!   snapshots compared by `thin_delta`, folded into the delta map by
//!   `monitor`/`send`;
//! - [`ScanJobs`] (`scan.rs`): the chunks to read, in address order, each
//!   paired with what the archive already holds there, for the chunk
//!   pipeline in [`crate::chunk`].

mod deltamap;
mod lvm_tracking;
mod scan;

pub use deltamap::{DeltaMap, LoadError};
pub use lvm_tracking::{ArchiveState, MonitorOutcome, TrackedVolume};
pub use scan::{Candidates, ScanJobs};
