//! Step 2 of the data path: which chunks a send looks at.
//!
//! - [`DeltaMap`] (`deltamap.rs`): one bit per archive chunk, filled from
//!   LVM thin metadata by `monitor`/`send`, crash-safe on disk;
//! - [`ScanJobs`] (`scan.rs`): the chunks to read, in address order, each
//!   paired with what the archive already holds there, for the chunk
//!   pipeline in [`crate::chunk`].

mod deltamap;
mod scan;

pub use deltamap::{DeltaMap, LoadError};
pub use scan::{Candidates, ScanJobs};
