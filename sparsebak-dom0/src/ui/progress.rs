//! Progress bars for long `send` / `receive` / `verify` runs: bytes done,
//! rate and ETA, on stderr, only when stderr is a terminal and info messages
//! are shown (so never under `-q`, cron or systemd, where a bar would only
//! fill the logs with control codes).
//!
//! Log lines printed while a bar is drawn go through [`suspend`], which
//! clears the bar, prints, and redraws it, so the two never tear each other.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};

/// The bar on screen, if any (one at a time: volumes are done one by one).
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A bar over a byte range; a no-op when not shown.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts a bar labelled `label` over `total` bytes.
    pub fn bytes(label: &str, total: u64) -> Progress {
        if !std::io::stderr().is_terminal() || !log::log_enabled!(log::Level::Info) {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(label.to_string());
        *ACTIVE.lock().unwrap_or_else(PoisonError::into_inner) = Some(bar.clone());
        Progress { bar: Some(bar) }
    }

    /// Bytes of the volume done so far.
    pub fn set_position(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }
}

impl Drop for Progress {
    /// Clears the bar: the summary line that follows says what was done.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            *ACTIVE.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

/// Runs `f` (which prints to stderr) with the active bar hidden.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let active = ACTIVE.lock().unwrap_or_else(PoisonError::into_inner).clone();
    match active {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}
