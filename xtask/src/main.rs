//! Developer tasks that need the programs' clap definitions but must not
//! become part of their command lines (the CLI is a contract; a hidden
//! `gen-man` command would be one more thing in it).
//!
//! `cargo xtask docs DIR` writes, from the very structs the binaries parse
//! with (their source files are compiled in here with `#[path]`):
//! - `DIR/man/sparsebak.1`, `DIR/man/sparsebak-vm.1` (clap_mangen);
//! - `DIR/completions/sparsebak.bash`, `_sparsebak` (zsh),
//!   `sparsebak.fish` (clap_complete).
//!
//! The included files must stay free of the rest of their crates: the dom0
//! cli.rs reaches only `crate::config::DEFAULT_CONFIG`, so config.rs is
//! included too (rather than a copy of the constant that could drift).
#![forbid(unsafe_code)]

#[allow(dead_code)]
#[path = "../../sparsebak-dom0/src/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "../../sparsebak-dom0/src/config.rs"]
mod config;
#[allow(dead_code)]
#[path = "../../sparsebak-vm/src/cli.rs"]
mod vm_cli;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::Path;

/// Sections clap does not know about, appended to the man pages (roff).
const DOM0_EXTRA: &str = r#".SH FILES
.TP
\fI/sparsebak/sparsebak.ini\fR
Default configuration; dom0's metadata (sessions, manifests, delta maps)
lives in its directory.
.TP
\fI/etc/qubes/policy.d/50-sparsebak.policy\fR
qrexec policy: no VM may call the backup store.
.TP
\fIsparsebak-monitor.timer\fR
systemd timer running \fBsparsebak monitor\fR every 20 minutes (disabled
until enabled with \fBsystemctl enable \-\-now sparsebak-monitor.timer\fR).
.SH EXIT STATUS
0 on success; non-zero with a one-line reason on stderr for any failure.
\fBreceive\fR and \fBverify\fR fail when any chunk fails its check.
.SH LOGGING
Messages go to stderr; when stdout is not a terminal (cron, systemd) they
also go to syslog. On a terminal, long runs show a progress bar.
\fB\-q\fR keeps errors only.
.SH SEE ALSO
\fBsparsebak-vm\fR(1)
"#;

const VM_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/qubes-rpc/qubes.SparsebakStore\fR
qrexec service in the backup VM; runs \fBsparsebak-vm serve\fR.
.SH EXIT STATUS
0 when the agent closed the session cleanly, 1 on any failure (never 125,
126 or 127, which qrexec reserves).
.SH SEE ALSO
\fBsparsebak\fR(1)
"#;

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Vec<String>) -> Result<()> {
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["docs", dir] => docs(Path::new(dir)),
        _ => bail!("usage: cargo xtask docs DIR   (man pages and shell completions into DIR)"),
    }
}

fn docs(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    write_man(&man, cli::Cli::command(), DOM0_EXTRA)?;
    write_man(&man, vm_cli::Cli::command(), VM_EXTRA)?;
    let mut cmd = cli::Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "sparsebak", &completions)
            .with_context(|| format!("writing {shell} completions into {}", completions.display()))?;
        if shell == Shell::Fish {
            append(&path, &fish_positional_values(&cmd))?;
        }
        println!("{}", path.display());
    }
    Ok(())
}

/// clap_complete's fish script completes options only, not the values of
/// positionals, and sparsebak's COMMAND is a positional with values: add a
/// `complete -a VALUE -d HELP` line for each.
fn fish_positional_values(cmd: &clap::Command) -> String {
    let name = cmd.get_name();
    let mut out = String::new();
    for arg in cmd.get_positionals() {
        for v in arg.get_possible_values().iter().filter(|v| !v.is_hide_set()) {
            let help = v.get_help().map(|h| h.to_string()).unwrap_or_default();
            out.push_str(&format!("complete -c {name} -f -a {} -d {}\n", fish_quote(v.get_name()), fish_quote(&help)));
        }
    }
    out
}

/// A single-quoted fish word (fish escapes only \\ and \' inside quotes).
fn fish_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// `DIR/NAME.1`: clap_mangen's page plus `extra` roff sections.
fn write_man(dir: &Path, cmd: clap::Command, extra: &str) -> Result<()> {
    let path = dir.join(format!("{}.1", cmd.get_name()));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page).context("rendering man page")?;
    page.extend_from_slice(extra.as_bytes());
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
