//! The command line (README, "Command reference"). Options may stand before or after the
//! command and the volume names (`sparsebak --save-to=x.img receive VOL` and
//! `sparsebak receive VOL --save-to=x.img` mean the same).

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "sparsebak", version, about = "Fast incremental backups of disk images and LVM thin volumes")]
pub struct Cli {
    /// Configuration file; dom0's metadata lives in its directory.
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// Never prompt: overwrite without asking.
    #[arg(short = 'u', long)]
    pub unattended: bool,

    /// receive: where to write the restored volume (file or block device).
    #[arg(long, value_name = "PATH")]
    pub save_to: Option<PathBuf>,

    /// send: store the session as one tar file in the archive.
    #[arg(long)]
    pub tarfile: bool,

    /// receive/verify: the session to use, as YYYYMMDD-HHMMSS (default:
    /// latest). prune: the session DT, or every session from DT1 to DT2.
    #[arg(long, value_name = "DT[,DT]")]
    pub session: Option<String>,

    /// send: label the new session (repeatable); a tagged session is kept by
    /// every rule-based prune.
    #[arg(long = "tag", value_name = "NAME")]
    pub tag: Vec<String>,

    /// send: after each volume's session is committed, prune it by the
    /// config's [retention] rules (also `[var] autoprune = on`).
    #[arg(long)]
    pub autoprune: bool,

    /// prune: keep the N newest sessions.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// prune: keep the newest session of each of the last N hours (UTC).
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// prune: keep the newest session of each of the last N days (UTC).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// prune: keep the newest session of each of the last N ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// prune: keep the newest session of each of the last N months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// prune: keep the newest session of each of the last N years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,

    /// prune by rules: print what would be kept or pruned, and why; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// export: the Unix socket to serve NBD on (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// export: stop after the first client disconnects.
    #[arg(long)]
    pub once: bool,

    /// list: print one JSON document (fields in the README).
    #[arg(long)]
    pub json: bool,

    /// File whose first line is the archive key's passphrase (needed only to
    /// create an encrypted archive and to recover; else asked for).
    #[arg(long, value_name = "PATH")]
    pub passphrase_file: Option<PathBuf>,

    /// Print only errors.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print more detail.
    #[arg(short, long)]
    pub verbose: bool,

    #[arg(value_enum)]
    pub command: CommandName,

    /// Volumes to work on (default: every enabled volume).
    #[arg(value_name = "VOLUME")]
    pub volumes: Vec<String>,
}

impl Cli {
    /// The `--keep-*` options, in the order last, hourly, daily, weekly,
    /// monthly, yearly.
    pub fn keep_options(&self) -> [Option<u32>; 6] {
        [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly]
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandName {
    /// Back up changed chunks of the volumes.
    Send,
    /// Restore a volume from the archive (--save-to PATH).
    Receive,
    /// Check a session of each volume without writing anything.
    Verify,
    /// List the sessions of a volume, or all archived volumes.
    List,
    /// LVM: fold changes since the last run into the delta maps (from a timer).
    Monitor,
    /// LVM: mark chunks where VOL.tick differs from the archive's latest session.
    Resync,
    /// Remove sessions (--session DT or DT1,DT2, or by --keep-* rules),
    /// merging their chunks into the next newer session.
    Prune,
    /// Serve a session read-only over NBD (--socket PATH [--session DT] [--once]).
    Export,
    /// Label a session: `tag VOLUME DT NAME`.
    Tag,
    /// Remove a label: `untag VOLUME DT NAME`.
    Untag,
    /// Remove volumes from the archive and from dom0's metadata.
    Delete,
    /// Rebuild dom0's metadata (key, sessions, manifests) from the archive,
    /// then verify it: after dom0's metadata was lost.
    Recover,
    /// Print the version.
    Version,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_before_or_after_command() {
        let a = Cli::try_parse_from(["sparsebak", "--save-to=x.img", "receive", "vol"]).expect("parses");
        let b = Cli::try_parse_from(["sparsebak", "receive", "vol", "--save-to=x.img"]).expect("parses");
        for c in [a, b] {
            assert_eq!(c.command, CommandName::Receive);
            assert_eq!(c.volumes, ["vol"]);
            assert_eq!(c.save_to.as_deref(), Some(std::path::Path::new("x.img")));
        }
        let c = Cli::try_parse_from(["sparsebak", "send", "-u", "a", "--config", "/c.ini", "b"]).expect("parses");
        assert!(c.unattended);
        assert_eq!(c.volumes, ["a", "b"]);
        assert!(Cli::try_parse_from(["sparsebak", "explode"]).is_err());
        let p = Cli::try_parse_from(["sparsebak", "prune", "v", "--session=20260101-000000,20260102-000000"])
            .expect("parses");
        assert_eq!(p.command, CommandName::Prune);
        assert_eq!(p.session.as_deref(), Some("20260101-000000,20260102-000000"));
        let t = Cli::try_parse_from(["sparsebak", "send", "--tarfile"]).expect("parses");
        assert!(t.tarfile);
        assert_eq!(
            Cli::try_parse_from(["sparsebak", "delete", "-u", "v"]).expect("parses").command,
            CommandName::Delete
        );
    }
}
