//! What both sides of sparsebak must agree on: the frame format, the typed
//! messages, the protocol version and the validation of every name that
//! crosses the wire. Nothing here knows about LVM or directories.
#![forbid(unsafe_code)]

pub mod frame;
pub mod layout;
pub mod msg;
pub mod names;
pub mod testhook;

pub use frame::{read_msg, write_msg, FrameError, MAX_FRAME};
pub use msg::{Destination, MetaFile, Request, Response, StoreFormat, VolumeRef, PROTOCOL_VERSION};
