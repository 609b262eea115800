//! Yes/no questions on the terminal.

use anyhow::{Context, Result};
use std::io::IsTerminal;

/// Asks a yes/no question on the terminal; anything but yes (or no
/// terminal to ask on) is no.
pub fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question}");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
