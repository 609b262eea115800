//! Step 4 of the data path: the receiver, which owns the archive and is not
//! trusted.
//!
//! - `transport.rs`: starting the receiver (local child, ssh, qrexec) and
//!   capped frames over its stdin/stdout, with an idle limit on every wait;
//! - `client.rs`: one typed method per request, so commands never match on
//!   a `Response` themselves;
//! - [`archive_key`]: which key a command uses; a new archive's key is
//!   stored (wrapped) in the archive before dom0 keeps it;
//! - [`metafile`]: info and manifest files to and from the archive, piece by
//!   piece (sealed in encrypted archives);
//! - [`rollback`]: the check that the archive still holds dom0's newest
//!   session.

pub mod archive_key;
mod client;
pub mod metafile;
pub mod rollback;
mod transport;

pub use client::ChunkAnswer;
pub use transport::{Receiver, RequestSink, ResponseSource};
