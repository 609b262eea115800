//! One file per command; this file dispatches and holds what they share.

/// Prints one line on stdout. A closed pipe (`sparsebak list | head -1`)
/// ends the command quietly instead of panicking like `println!`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        match writeln!(std::io::stdout().lock(), $($arg)*) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(anyhow::Error::from(e).context("writing to stdout")),
        }
    }};
}

mod delete;
mod list;
mod monitor;
mod prune;
mod recover;
mod restore;
mod resync;
mod send;

use crate::cli::{Cli, CommandName};
use crate::config::{Config, SourceKind};
use crate::lvm::commands::ThinPool;
use crate::session::SessionId;
use anyhow::{bail, Context, Result};
use sparsebak_proto::VolumeRef;
use std::io::IsTerminal;

/// What every command gets.
pub struct Ctx<'a> {
    pub cli: &'a Cli,
    pub config: Config,
    pub pool_dir: String,
}

impl Ctx<'_> {
    pub fn volume_ref(&self, name: &str) -> VolumeRef {
        VolumeRef { pool: self.pool_dir.clone(), name: name.to_string() }
    }

    /// The thin pool of an LVM config, checked to exist; `None` for image
    /// volumes.
    pub fn thin_pool(&self) -> Result<Option<ThinPool>> {
        match &self.config.source {
            SourceKind::Lvm { vg, pool } => {
                let p = ThinPool::new(vg, pool)?;
                p.check()?;
                Ok(Some(p))
            }
            SourceKind::Local { .. } => Ok(None),
        }
    }

    /// The thin pool, for commands that only make sense on LVM volumes.
    pub fn require_thin_pool(&self, command: &str) -> Result<ThinPool> {
        match self.thin_pool()? {
            Some(p) => Ok(p),
            None => bail!("{command} works on LVM thin volumes; image volumes are compared in full by every send"),
        }
    }

    /// The chunk size of a volume: its latest session's, else the config's.
    pub fn chunk_size_of(&self, vm: &crate::metadir::VolumeMeta) -> Result<u64> {
        Ok(match vm.sessions()?.last() {
            Some(s) => vm.info(s)?.chunk_size,
            None => self.config.chunk_size,
        })
    }

    /// The `--session` option, parsed.
    pub fn session_option(&self) -> Result<Option<SessionId>> {
        self.cli.session.as_deref().map(SessionId::from_user).transpose()
    }
}

pub fn run(cli: &Cli) -> Result<()> {
    if cli.command == CommandName::Version {
        outln!("sparsebak {} (protocol {})", env!("CARGO_PKG_VERSION"), sparsebak_proto::PROTOCOL_VERSION);
        return Ok(());
    }
    let config = Config::load(&cli.config)?;
    let pool_dir = config.pool_dir()?;
    let ctx = Ctx { cli, config, pool_dir };
    match cli.command {
        CommandName::Send => send::run(&ctx),
        CommandName::Receive => restore::run(&ctx, restore::Mode::Receive),
        CommandName::Verify => restore::run(&ctx, restore::Mode::Verify),
        CommandName::List => list::run(&ctx),
        CommandName::Monitor => monitor::run(&ctx),
        CommandName::Resync => resync::run(&ctx),
        CommandName::Prune => prune::run(&ctx),
        CommandName::Delete => delete::run(&ctx),
        CommandName::Recover => recover::run(&ctx),
        CommandName::Version => Ok(()),
    }
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

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
