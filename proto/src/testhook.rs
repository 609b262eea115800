//! A test hook for crash-safety tests, shared by both binaries so that they
//! count steps the same way.
//!
//! When the environment variable named by the caller (`SPARSEBAK_TEST_STOP_AFTER`
//! in `sparsebak`, `SPARSEBAK_VM_TEST_STOP_AFTER` in `sparsebak-vm`) holds a
//! number N, the process exits with status [`STOP_STATUS`] when it reaches
//! its N-th step, without running destructors or flushing buffered output,
//! which is what a kill does to it (and, unlike `abort`, leaves no core
//! file). Steps are the points of a journaled
//! operation (prune) where a crash must be recoverable. Without the variable
//! the hook costs one relaxed atomic increment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable read by `sparsebak` (dom0).
pub const DOM0_VAR: &str = "SPARSEBAK_TEST_STOP_AFTER";
/// Environment variable read by `sparsebak-vm` (the receiver).
pub const RECEIVER_VAR: &str = "SPARSEBAK_VM_TEST_STOP_AFTER";

/// Exit status of a process stopped by the hook (not 125-127, which
/// qrexec reserves).
pub const STOP_STATUS: i32 = 86;

static STEPS: AtomicU64 = AtomicU64::new(0);
static LIMIT: OnceLock<Option<u64>> = OnceLock::new();

/// A step of `sparsebak` (dom0): see [`step`].
pub fn dom0_step(what: &str) {
    step(DOM0_VAR, what);
}

/// A step of `sparsebak-vm` (the receiver): see [`step`].
pub fn receiver_step(what: &str) {
    step(RECEIVER_VAR, what);
}

/// Counts one step; stops the process if `var` asks to stop here.
pub fn step(var: &str, what: &str) {
    let limit = *LIMIT.get_or_init(|| std::env::var(var).ok().and_then(|v| v.trim().parse().ok()));
    let n = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    if limit == Some(n) {
        eprintln!("test hook {var}={n}: stopping after {what}");
        std::process::exit(STOP_STATUS);
    }
}
