//! `sparsebak`: the admin-side agent (dom0 on Qubes, root on plain Linux).
#![forbid(unsafe_code)]

mod chunk;
mod cli;
mod commands;
mod config;
mod image;
mod logging;
mod lvm;
mod manifest;
mod metadir;
mod pipeline;
mod scan;
mod session;
mod transport;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    logging::init(cli.quiet, cli.verbose);
    if let Err(e) = commands::run(&cli) {
        eprintln!("sparsebak: {e:#}");
        std::process::exit(1);
    }
}
