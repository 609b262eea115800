//! The command line of `sparsebak-vm`. In its own file, free of the rest of
//! the crate, so that `xtask docs` can build the man page from it.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sparsebak-vm", version, about = "sparsebak archive receiver")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve one sparsebak agent on stdin/stdout until it closes stdin.
    Serve,
    /// Print the version and protocol version.
    Version,
}
