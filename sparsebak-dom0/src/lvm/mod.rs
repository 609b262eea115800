//! LVM thin change tracking (see issue 3).
//!
//! * [`thin_delta`]: streaming parser of `thin_delta` XML into byte ranges.
//! * [`deltamap`]: the per-volume bitmap of changed archive chunks
//!   (`VOL.deltamap`), crash-safe on disk.
//! * [`commands`]: lvm / dmsetup / thin_delta invocations (argument vectors
//!   only) and [`commands::scan_changes`], which ties them together.
//! * [`tracking`]: tick/tock snapshots and the map, for monitor/send/resync.

pub mod commands;
pub mod deltamap;
pub mod thin_delta;
pub mod tracking;

#[cfg(test)]
mod vm_tests;
