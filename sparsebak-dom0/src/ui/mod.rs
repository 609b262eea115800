//! What the user sees: log lines (stderr and syslog), progress bars,
//! yes/no prompts, byte counts, and untrusted text made printable.

pub mod logging;
pub mod printable;
mod progress;
mod prompt;
mod size;

pub use progress::{suspend, Progress};
pub use prompt::{ask, confirm};
pub use size::human_bytes;
