//! What the user sees: log lines (stderr and syslog), progress bars,
//! yes/no prompts and byte counts.

pub mod logging;
mod progress;
mod prompt;
mod size;

pub use progress::{suspend, Progress};
pub use prompt::confirm;
pub use size::human_bytes;
