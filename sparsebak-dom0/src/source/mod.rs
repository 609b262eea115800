//! Step 1 of the data path: where a volume's bytes come from, and what the
//! source itself knows about what changed.
//!
//! - [`ImageVolume`] (`image.rs`): reads an image file or block device by
//!   chunk, skipping holes (also how LVM snapshots are read);
//! - [`lvm`]: thin pool commands (argument vectors only) and the streaming
//!   `thin_delta` parser, which the tick/tock tracking in
//!   [`crate::changes`] builds on.

mod image;
pub mod lvm;

pub use image::ImageVolume;
