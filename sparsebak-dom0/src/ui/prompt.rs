//! Yes/no questions on the terminal.

use anyhow::{Context, Result};
use std::io::{IsTerminal, Write};

/// Asks a yes/no question on the terminal; anything but yes (or no
/// terminal to ask on) is no.
pub fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    ask(question);
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Shows a question on stderr. A broken stderr is no reason to panic; the
/// answer is still read from the terminal.
pub fn ask(question: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(question.as_bytes()).and_then(|_| err.flush());
}
