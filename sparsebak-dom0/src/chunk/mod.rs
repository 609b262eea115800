//! Step 3 of the data path: what happens to each chunk, on worker threads.
//!
//! - `codec.rs`: [`pack`] (zero detection, plaintext hash, zstd, sealing,
//!   stored-bytes hash or seal id) on the way into the archive, [`unpack`]
//!   (the same checks in reverse, before anything is written) on the way
//!   back;
//! - [`pipeline`]: bounded, ordered parallel map that runs them;
//! - `buffers.rs`: chunk buffers that return to a pool when dropped.

mod buffers;
mod codec;
pub mod pipeline;

pub use buffers::{BufferPool, ChunkBuf};
pub use codec::{differs, max_stored_len, pack, unpack, ChunkCodec, ChunkJob, Packed};
