//! `sparsebak`: the admin-side agent (dom0 on Qubes, root on plain Linux).
#![forbid(unsafe_code)]

mod changes;
mod chunk;
mod cli;
mod commands;
mod config;
mod crypto;
mod export;
mod hex;
mod interrupt;
mod meta;
mod remote;
mod source;
mod ui;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    ui::logging::init(cli.quiet, cli.verbose);
    raise_open_file_limit();
    if let Err(e) = commands::run(&cli) {
        // Through the logger, so that a failed unattended run reaches syslog.
        log::error!("{e:#}");
        std::process::exit(1);
    }
}

/// Merging manifests opens one file per session; a volume backed up several
/// times an hour has thousands. Raise the soft limit to the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
