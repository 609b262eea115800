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
mod export;
mod list;
mod monitor;
mod prune;
mod recover;
mod restore;
mod resync;
mod send;
mod tag;

use crate::changes::{ReflinkCopies, Snapshots};
use crate::cli::{Cli, CommandName};
use crate::config::{Config, SourceKind};
use crate::crypto::Keys;
use crate::meta::{MetaDir, SessionId};
use crate::remote::archive_key::{self, KeyScope};
use crate::source::lvm::ThinPool;
use anyhow::{bail, Result};
use sparsebak_proto::VolumeRef;

/// What every command gets.
pub struct Ctx<'a> {
    pub cli: &'a Cli,
    pub config: Config,
    pub pool_dir: String,
}

impl Ctx<'_> {
    /// The volume as the archive names it (its folder name).
    pub fn volume_ref(&self, name: &str) -> VolumeRef {
        VolumeRef { pool: self.pool_dir.clone(), name: sparsebak_proto::names::volume_folder_name(name) }
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

    /// How this config's volumes are tracked between sends.
    pub fn tracking(&self) -> Result<Tracking> {
        self.tracking_with(self.thin_pool()?)
    }

    /// [`Ctx::tracking`] with the checked thin pool at hand (`thin_pool`).
    pub fn tracking_with(&self, pool: Option<ThinPool>) -> Result<Tracking> {
        Ok(match (&self.config.source, pool) {
            (SourceKind::Lvm { .. }, Some(pool)) => Tracking::Lvm(pool),
            (SourceKind::Lvm { .. }, None) => bail!("internal error: no thin pool for LVM volumes"),
            (SourceKind::Local { dir }, _) if self.config.reflink => match ReflinkCopies::open(dir)? {
                Ok(copies) => Tracking::Reflink(copies),
                Err(why) => {
                    log::debug!("{why}: image volumes are compared in full by every send");
                    Tracking::Untracked
                }
            },
            (SourceKind::Local { .. }, _) => Tracking::Untracked,
        })
    }

    /// The chunk size of a volume: its latest session's, else the config's.
    pub fn chunk_size_of(&self, vm: &crate::meta::VolumeMeta) -> Result<u64> {
        Ok(match vm.sessions()?.last() {
            Some(s) => vm.info(s)?.chunk_size,
            None => self.config.chunk_size,
        })
    }

    /// The pool whose key this command works with.
    pub fn key_scope(&self) -> KeyScope<'_> {
        KeyScope {
            meta_dir: &self.config.meta_dir,
            pool_dir: &self.pool_dir,
            encryption: self.config.encryption,
            archive: &self.config.dest,
        }
    }

    /// The keys of an existing archive (none for an unencrypted one).
    pub fn keys(&self, meta: &MetaDir) -> Result<Option<Keys>> {
        archive_key::load(self.key_scope(), meta)
    }

    /// The `--session` option, parsed.
    pub fn session_option(&self) -> Result<Option<SessionId>> {
        self.cli.session.as_deref().map(SessionId::from_user).transpose()
    }
}

/// The sessions a read of a volume (`receive`, `verify`, `export`) works
/// with, once an interrupted prune or tag change is settled and the archive
/// is checked for a rollback.
pub struct ReadChain {
    /// dom0's sessions of the volume, oldest first.
    pub sessions: Vec<SessionId>,
    /// Those up to and including the one to read (`--session`, else the
    /// latest).
    pub upto: Vec<SessionId>,
    /// The archive's sessions of the volume.
    pub archive: Vec<SessionId>,
}

impl Ctx<'_> {
    pub fn read_chain(
        &self,
        name: &str,
        vm: &crate::meta::VolumeMeta,
        rx: &mut crate::remote::Receiver,
        keys: Option<&Keys>,
        volume: &VolumeRef,
    ) -> Result<ReadChain> {
        settle_interrupted(vm, rx, keys, volume)?;
        let sessions = vm.sessions()?;
        if sessions.is_empty() {
            bail!("volume {name:?} has no sessions in {}", self.config.meta_dir.display());
        }
        let target = match self.session_option()? {
            Some(w) => sessions.iter().position(|s| *s == w).ok_or_else(|| {
                anyhow::anyhow!("volume {name:?} has no session {} (see `sparsebak list {name}`)", w.date_time())
            })?,
            None => sessions.len() - 1,
        };
        let archive = crate::remote::rollback::archive_sessions(rx, volume)?;
        crate::remote::rollback::check(volume, &sessions, &archive)?;
        Ok(ReadChain { upto: sessions[..=target].to_vec(), sessions, archive })
    }
}

/// Options that belong to one command are an error with any other (a
/// misplaced `--keep-last` must not be silently ignored).
fn check_options(cli: &Cli) -> Result<()> {
    use CommandName::*;
    let keep = cli.keep_options();
    let misplaced = [
        ("--tag", !cli.tag.is_empty(), cli.command == Send),
        ("--autoprune", cli.autoprune, cli.command == Send),
        ("--tarfile", cli.tarfile, cli.command == Send),
        ("--keep-*", keep.iter().any(Option::is_some), cli.command == Prune),
        ("--dry-run", cli.dry_run, cli.command == Prune),
        ("--json", cli.json, cli.command == List),
        ("--save-to", cli.save_to.is_some(), cli.command == Receive),
        ("--socket", cli.socket.is_some(), cli.command == Export),
        ("--once", cli.once, cli.command == Export),
    ];
    if let Some((option, _, _)) = misplaced.iter().find(|(_, given, fits)| *given && !*fits) {
        bail!("{option} does not apply to {}", format!("{:?}", cli.command).to_lowercase());
    }
    Ok(())
}

/// Finishes what a kill interrupted on both sides of a volume (a prune, a
/// tag change) before a command that talks to the receiver about it does
/// anything else, so that the next ordinary command (a timer's send)
/// brings dom0 and the archive back in line.
pub fn settle_interrupted(
    vm: &crate::meta::VolumeMeta,
    rx: &mut crate::remote::Receiver,
    keys: Option<&Keys>,
    volume: &VolumeRef,
) -> Result<()> {
    prune::settle(vm, rx, keys, volume)?;
    tag::settle(vm, rx, keys, volume)
}

/// How volumes are tracked between sends (see `changes/`).
pub enum Tracking {
    /// Thin snapshots in the LVM pool.
    Lvm(ThinPool),
    /// Reflink copies in `localdir/.sparsebak`.
    Reflink(ReflinkCopies),
    /// Image files compared in full by every send (`reflink = off`, or no
    /// reflinks on that filesystem).
    Untracked,
}

impl Tracking {
    /// The copies that track `volume`; `None` when it is compared in full
    /// (an image file on another filesystem than the copies, or untracked).
    pub fn copies_for(&self, volume: &str) -> Result<Option<&dyn Snapshots>> {
        Ok(match self {
            Tracking::Lvm(pool) => Some(pool),
            Tracking::Reflink(copies) if copies.tracks(volume)? => Some(copies),
            Tracking::Reflink(_) | Tracking::Untracked => None,
        })
    }

    /// The same, for commands that only make sense with tracking.
    pub fn require(&self, command: &str, volume: &str) -> Result<&dyn Snapshots> {
        match self.copies_for(volume)? {
            Some(c) => Ok(c),
            None => bail!(
                "{command} works on LVM thin volumes and on image files on a filesystem with reflinks \
                 (Btrfs, XFS with reflink=1; `reflink` not off); {volume} is compared in full by every send"
            ),
        }
    }
}

pub fn run(cli: &Cli) -> Result<()> {
    if cli.command == CommandName::Version {
        outln!("sparsebak {} (protocol {})", env!("CARGO_PKG_VERSION"), sparsebak_proto::PROTOCOL_VERSION);
        return Ok(());
    }
    check_options(cli)?;
    let config = Config::load(&cli.config)?;
    let pool_dir = config.pool_dir()?;
    let marker = crate::meta::recover_marker_path(&config.meta_dir, &pool_dir);
    if cli.command != CommandName::Recover && marker.exists() {
        bail!(
            "a `recover` did not finish ({} exists): run `sparsebak recover` again to rebuild the metadata",
            marker.display()
        );
    }
    let ctx = Ctx { cli, config, pool_dir };
    match cli.command {
        CommandName::Send => send::run(&ctx),
        CommandName::Receive => restore::run(&ctx, restore::Mode::Receive),
        CommandName::Verify => restore::run(&ctx, restore::Mode::Verify),
        CommandName::List => list::run(&ctx),
        CommandName::Monitor => monitor::run(&ctx),
        CommandName::Resync => resync::run(&ctx),
        CommandName::Prune => prune::run(&ctx),
        CommandName::Export => export::run(&ctx),
        CommandName::Tag => tag::run(&ctx, true),
        CommandName::Untag => tag::run(&ctx, false),
        CommandName::Delete => delete::run(&ctx),
        CommandName::Recover => recover::run(&ctx),
        CommandName::Version => Ok(()),
    }
}
