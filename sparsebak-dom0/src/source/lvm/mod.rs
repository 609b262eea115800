//! LVM thin pools: the commands (argument vectors only) and what they tell.
//!
//! * [`thin_delta`]: streaming parser of `thin_delta` XML into byte ranges.
//! * [`thin_dump`]: streaming parser of `thin_dump --dev-id` XML: the mapped
//!   ranges of one thin device (what its first send must read).
//! * [`commands`]: lvm / dmsetup / thin_delta invocations and
//!   [`commands::ThinPool::scan_changes`], which ties them together.
//!
//! The tick/tock tracking built on them lives in
//! [`crate::changes`] (`lvm_tracking.rs`).

pub mod commands;
pub mod thin_delta;
pub mod thin_dump;

pub use commands::ThinPool;

#[cfg(test)]
mod test_tools;
#[cfg(test)]
mod vm_tests;
