//! Step 3 of the data path: what happens to each chunk, on worker threads.
//!
//! - `codec.rs`: [`pack`] (zero detection, plaintext hash, zstd, sealing,
//!   stored-bytes hash) on the way into the archive, [`unpack`] (the same
//!   checks in reverse, before anything is written) on the way back;
//! - [`pipeline`]: bounded, ordered parallel map that runs them.

mod codec;
pub mod pipeline;

pub use codec::{differs, pack, unpack, ChunkCodec, ChunkJob, Packed};
