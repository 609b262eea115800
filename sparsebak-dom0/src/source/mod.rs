//! Step 1 of the data path: where a volume's bytes come from, and what the
//! source itself knows about what changed.
//!
//! - [`ImageVolume`] (`image.rs`): reads an image file or block device by
//!   chunk, skipping holes (also how LVM snapshots are read);
//! - [`lvm`]: thin pool commands (argument vectors only), the streaming
//!   `thin_delta` parser, and tick/tock snapshot tracking that feeds the
//!   delta map in [`crate::changes`].

mod image;
pub mod lvm;

pub use image::ImageVolume;
