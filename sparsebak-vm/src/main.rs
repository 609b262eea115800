//! `sparsebak-vm`: the archive owner. It runs in the backup VM (or as a local
//! child, or over ssh) and speaks the sparsebak protocol on stdin/stdout.
#![forbid(unsafe_code)]

mod answers;
mod archive;
mod chunk_buffers;
mod chunk_source;
mod cli;
mod local_store;
mod mounts;
mod prune;
mod s3;
mod serve;
mod session_writer;
mod store;
mod tar;
mod writer_thread;

use clap::Parser;
use cli::{Cli, Command};
use std::io::Write;

/// Exit status for failures. qrexec reserves 125-127, so never use those.
const EXIT_FAILURE: i32 = 1;

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve => {
            if let Err(e) = serve::serve_stdio() {
                if !e.reported {
                    // Both pipes may be gone (qrexec-client killed during a
                    // send): say it if stderr still listens, never panic.
                    let _ = writeln!(std::io::stderr(), "sparsebak-vm: {:#}", e.error);
                }
                std::process::exit(EXIT_FAILURE);
            }
        }
        Command::Version => {
            let version =
                format!("sparsebak-vm {} (protocol {})", env!("CARGO_PKG_VERSION"), sparsebak_proto::PROTOCOL_VERSION);
            if writeln!(std::io::stdout(), "{version}").is_err() {
                std::process::exit(EXIT_FAILURE);
            }
        }
    }
}
