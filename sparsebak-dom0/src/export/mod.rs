//! Instant access: a session served as a read-only NBD export
//! (`sparsebak export`), so that one file of last week's backup can be read
//! without restoring the whole volume.
//!
//! - [`nbd`]: the NBD protocol, over any stream;
//! - [`SessionImage`] (`session_image.rs`): a session's content read on
//!   demand from the receiver, checked like `receive` checks it.

pub mod nbd;
mod session_image;

pub use session_image::SessionImage;
