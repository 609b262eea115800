//! Getting the passphrase: from `--passphrase-file PATH` (first line, without
//! its line end), else by asking on the terminal with echo off. Only the
//! creation of an encrypted archive and `recover` need one.

use anyhow::{bail, Context, Result};
use nix::sys::termios::{self, LocalFlags, SetArg};
use std::io::{BufRead, IsTerminal};
use std::path::Path;
use zeroize::Zeroizing;

pub type Passphrase = Zeroizing<Vec<u8>>;

/// Shortest passphrase accepted when creating a key.
const MIN_LEN: usize = 8;

pub fn from_file(path: &Path) -> Result<Passphrase> {
    let text =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("reading passphrase file {}", path.display()))?);
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("passphrase file {} is empty", path.display());
    }
    Ok(Zeroizing::new(line.to_vec()))
}

/// The passphrase for an existing key (recover).
pub fn existing(file: Option<&Path>) -> Result<Passphrase> {
    match file {
        Some(p) => from_file(p),
        None => prompt("Passphrase of the archive's key: "),
    }
}

/// A passphrase for a new key: typed twice when asked for.
pub fn new(file: Option<&Path>) -> Result<Passphrase> {
    let pass = match file {
        Some(p) => from_file(p)?,
        None => {
            let first = prompt("New passphrase for the archive's key: ")?;
            if *prompt("Repeat it: ")? != *first {
                bail!("the two passphrases differ");
            }
            first
        }
    };
    if pass.len() < MIN_LEN {
        bail!("the passphrase must have at least {MIN_LEN} characters");
    }
    Ok(pass)
}

fn prompt(question: &str) -> Result<Passphrase> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("a passphrase is needed and there is no terminal to ask for it: use --passphrase-file PATH");
    }
    crate::ui::ask(question);
    let saved = termios::tcgetattr(&stdin).context("reading terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning terminal echo off")?;
    let mut line = Zeroizing::new(String::new());
    let read = stdin.lock().read_line(&mut line);
    let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    crate::ui::ask("\n");
    read.context("reading the passphrase")?;
    let pass = line.trim_end_matches(['\n', '\r']);
    if pass.is_empty() {
        bail!("empty passphrase");
    }
    Ok(Zeroizing::new(pass.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_gives_its_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("pw");
        std::fs::write(&p, "long enough pass\nignored\n").expect("write");
        assert_eq!(new(Some(&p)).expect("reads").as_slice(), b"long enough pass");
        std::fs::write(&p, "short\n").expect("write");
        assert!(new(Some(&p)).is_err());
        assert_eq!(existing(Some(&p)).expect("reads").as_slice(), b"short");
        std::fs::write(&p, "\n").expect("write");
        assert!(existing(Some(&p)).is_err());
    }
}
