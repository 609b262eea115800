//! S3 storage for the receiver: settings (`profile.rs`), a blocking client
//! over `object_store` (`client.rs`), and the archive on it (`store.rs`).

mod client;
mod profile;
mod store;

pub use store::S3Store;
