//! Cleaning up a temporary file when the user interrupts: `receive` writes
//! beside `--save-to` under a temporary name, and Ctrl-C or a `kill` must not
//! leave a half-restored image there.
//!
//! No signal handler (and no `unsafe`): SIGINT, SIGTERM and SIGHUP are
//! blocked in the calling thread before any other thread is started, so
//! every thread inherits the block, and one watcher thread takes them with
//! `sigwait`. Child processes start with an empty mask (std resets it), so
//! the receiver still gets Ctrl-C as before.

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

/// The file to remove if a signal comes; see [`watch`].
#[derive(Clone, Default)]
pub struct TempFileGuard {
    path: Arc<Mutex<Option<PathBuf>>>,
}

impl TempFileGuard {
    /// From now on a signal removes `path`.
    pub fn set(&self, path: PathBuf) {
        *self.path.lock().unwrap_or_else(PoisonError::into_inner) = Some(path);
    }

    /// The file is ours no more (renamed into place, or removed).
    pub fn clear(&self) {
        *self.path.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Blocks the signals in this thread (call it before starting any thread)
/// and starts the watcher: on SIGINT, SIGTERM or SIGHUP it removes the
/// guarded file, if any, and ends the process with 128 + the signal number.
pub fn watch() -> Result<TempFileGuard> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("blocking SIGINT/SIGTERM/SIGHUP")?;
    let guard = TempFileGuard::default();
    let watched = guard.clone();
    std::thread::Builder::new()
        .name("signal watcher".into())
        .spawn(move || {
            let Ok(signal) = set.wait() else { return };
            let path = watched.path.lock().unwrap_or_else(PoisonError::into_inner).take();
            match path {
                Some(p) => match std::fs::remove_file(&p) {
                    Ok(()) => log::error!("interrupted by {signal}; removed {}", p.display()),
                    // Renamed into place a moment ago.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => log::error!("interrupted by {signal}"),
                    Err(e) => log::error!("interrupted by {signal}; could not remove {}: {e}", p.display()),
                },
                None => log::error!("interrupted by {signal}"),
            }
            std::process::exit(128 + signal as i32);
        })
        .context("starting the signal watcher")?;
    Ok(guard)
}
