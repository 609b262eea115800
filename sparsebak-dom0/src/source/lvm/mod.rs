//! LVM thin change tracking (see the README, "LVM thin change tracking").
//!
//! * [`thin_delta`]: streaming parser of `thin_delta` XML into byte ranges.
//! * [`commands`]: lvm / dmsetup / thin_delta invocations (argument vectors
//!   only) and [`commands::ThinPool::scan_changes`], which ties them together.
//! * [`tracking`]: tick/tock snapshots and the delta map
//!   ([`crate::changes::DeltaMap`]), for monitor/send/resync.

pub mod commands;
pub mod thin_delta;
pub mod tracking;

pub use commands::ThinPool;
pub use tracking::{MonitorOutcome, TrackedVolume};

#[cfg(test)]
mod vm_tests;
