//! The ini configuration (`--config`, default `/sparsebak/sparsebak.ini`).
//! dom0's metadata lives in the config file's directory.
//!
//! Every key is checked: an unknown or missing key is an error naming it, so
//! a typo never silently turns into a default that backs up the wrong thing.

use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::{names, Destination};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/sparsebak/sparsebak.ini";

/// Default archive chunk size for volumes new to the archive.
pub const DEFAULT_CHUNK_SIZE: u64 = 128 * 1024;

/// Keys allowed in `[var]`.
const VAR_KEYS: &[&str] = &[
    "vgname",
    "poolname",
    "localdir",
    "destvm",
    "destmountpoint",
    "destdir",
    "desturl",
    "chunksize",
    "idletimeout",
    "encryption",
    "reflink",
    "autoprune",
];

/// Keys allowed in `[retention]`, in the order of [`KeepRules`]' fields.
const RETENTION_KEYS: [&str; 6] = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];

/// The largest count a keep rule takes (a century of hours).
pub const MAX_KEEP: u32 = 1_000_000;

/// How many sessions of each kind of period to keep (see
/// `meta/retention.rs`); 0 = that rule is off. From `prune --keep-*` or the
/// config's `[retention]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepRules {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepRules {
    /// No rule at all: nothing may be pruned by rules.
    pub fn is_empty(&self) -> bool {
        *self == KeepRules::default()
    }
}

/// Default for `[var] idletimeout`: how long dom0 waits for the receiver to
/// make any progress before giving up (a commit on a slow disk can take a
/// while, so this is generous).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(900);
/// The range of `[var] idletimeout`, in seconds: at least 1, at most a day
/// (every wait adds it to the clock, so it must stay a sane number).
pub const IDLE_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;

/// Where the volumes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// LVM thin volumes in `vg/pool`.
    Lvm { vg: String, pool: String },
    /// Image files or block devices under a directory.
    Local { dir: PathBuf },
}

/// Where the receiver runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestVm {
    /// `sparsebak-vm serve` as a local child process.
    Local,
    /// `ssh [-p PORT] TARGET sparsebak-vm serve`.
    Ssh { target: String, port: Option<u16> },
    /// A Qubes VM, through qrexec.
    Qubes(String),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// dom0 metadata directory: the config file's directory.
    pub meta_dir: PathBuf,
    pub source: SourceKind,
    pub dest_vm: DestVm,
    /// `destmountpoint`/`destdir`, or `desturl = s3://BUCKET/PREFIX`.
    pub dest: Destination,
    /// Chunk size for volumes that are new to the archive.
    pub chunk_size: u64,
    /// `[var] idletimeout` (seconds): see [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// `[var] encryption = on|off` (default on): whether a new archive is
    /// encrypted. An existing archive keeps the mode it was created with;
    /// the config must agree with it.
    pub encryption: bool,
    /// `[var] reflink = on|off` (default on): with `localdir` on a
    /// filesystem with reflinks, track image volumes by reflink copies
    /// (see `changes/reflink_tracking.rs`); off compares them in full.
    pub reflink: bool,
    /// `[retention]`: the rules of `prune` without `--session`, and of
    /// autoprune (none by default).
    pub retention: KeepRules,
    /// `[var] autoprune = on|off` (default off): `send` prunes each volume by
    /// the `[retention]` rules right after its session is committed.
    pub autoprune: bool,
    /// `[volumes]` in file order: (name, enabled).
    pub volumes: Vec<(String, bool)>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(path, &text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        let ini = ini::Ini::load_from_str(text).map_err(|e| anyhow!("{e}"))?;
        for (section, props) in ini.iter() {
            match section {
                None | Some("var") | Some("volumes") | Some("retention") => {}
                Some(other) => bail!("unknown section [{other}]"),
            }
            // The parser keeps every copy; which one wins is not obvious to
            // whoever edits the file, so a second copy is an error.
            if let Some(name) = section.filter(|s| ini.section_all(Some(*s)).count() > 1) {
                bail!("section [{name}] appears more than once");
            }
            if let Some((key, _)) = props.iter().find(|(k, _)| props.get_all(k).count() > 1) {
                bail!("key {key:?} appears more than once in [{}]", section.unwrap_or("general"));
            }
        }
        if let Some((key, _)) = ini.general_section().iter().next() {
            bail!("key {key:?} must be inside a section ([var] or [volumes])");
        }
        let var = ini.section(Some("var")).context("missing section [var]")?;
        if let Some((key, _)) = var.iter().find(|(k, _)| !VAR_KEYS.contains(k)) {
            bail!("unknown key {key:?} in [var]");
        }
        let get = |key: &str| -> Result<String> {
            var.get(key).map(str::to_string).ok_or_else(|| anyhow!("missing key {key:?} in [var]"))
        };

        let source = match (var.get("localdir"), var.get("vgname"), var.get("poolname")) {
            (Some(dir), None, None) => SourceKind::Local { dir: PathBuf::from(dir) },
            (Some(_), _, _) => bail!("[var] localdir cannot be combined with vgname/poolname"),
            (None, _, _) => {
                let vg = get("vgname")?;
                let pool = get("poolname")?;
                names::validate_volume_name(&vg).context("key \"vgname\"")?;
                names::validate_volume_name(&pool).context("key \"poolname\"")?;
                SourceKind::Lvm { vg, pool }
            }
        };
        let dest_vm = parse_dest_vm(&get("destvm")?).context("key \"destvm\"")?;
        let dest = match (var.get("desturl"), var.get("destmountpoint"), var.get("destdir")) {
            (Some(url), None, None) => parse_dest_url(url).context("key \"desturl\"")?,
            (Some(_), _, _) => {
                bail!("[var] desturl cannot be combined with destmountpoint/destdir: use one or the other")
            }
            (None, _, _) => {
                let mountpoint = get("destmountpoint")?;
                names::validate_mountpoint(&mountpoint).context("key \"destmountpoint\"")?;
                let dir = get("destdir")?;
                names::validate_dest_dir(&dir).context("key \"destdir\"")?;
                Destination::Mounted { mountpoint, dir }
            }
        };
        let chunk_size = match var.get("chunksize") {
            None => DEFAULT_CHUNK_SIZE,
            Some(v) => parse_chunk_size(v).context("key \"chunksize\"")?,
        };

        let idle_timeout = match var.get("idletimeout") {
            None => DEFAULT_IDLE_TIMEOUT,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(secs) if IDLE_TIMEOUT_RANGE.contains(&secs) => Duration::from_secs(secs),
                _ => bail!(
                    "key \"idletimeout\": {v:?} is not a number of seconds from {} to {}",
                    IDLE_TIMEOUT_RANGE.start(),
                    IDLE_TIMEOUT_RANGE.end()
                ),
            },
        };
        let encryption = on_off(var.get("encryption"), "encryption", true)?;
        let reflink = on_off(var.get("reflink"), "reflink", true)?;
        let autoprune = on_off(var.get("autoprune"), "autoprune", false)?;
        let retention = match ini.section(Some("retention")) {
            Some(section) => parse_retention(section)?,
            None => KeepRules::default(),
        };
        if autoprune && retention.is_empty() {
            bail!("autoprune = on needs keep rules in a [retention] section");
        }
        let mut volumes = Vec::new();
        if let Some(vols) = ini.section(Some("volumes")) {
            let mut folders = std::collections::HashMap::new();
            for (name, value) in vols.iter() {
                validate_volume_for(&source, name).with_context(|| format!("[volumes] {name}"))?;
                if let Some(other) = folders.insert(names::volume_folder_name(name), name) {
                    bail!("[volumes] {other} and {name} would share one folder in the archive");
                }
                let enabled = match value {
                    "enable" | "enabled" => true,
                    "disable" | "disabled" => false,
                    other => bail!("[volumes] {name} = {other:?}: expected enable or disable"),
                };
                volumes.push((name.to_string(), enabled));
            }
        }
        let meta_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Config {
            path: path.to_path_buf(),
            meta_dir,
            source,
            dest_vm,
            dest,
            chunk_size,
            idle_timeout,
            encryption,
            reflink,
            retention,
            autoprune,
            volumes,
        })
    }

    /// The archive's pool folder name: `VG%POOL`, or `local%DIRNAME` for
    /// image-file volumes (so the same layout serves both).
    pub fn pool_dir(&self) -> Result<String> {
        let name = match &self.source {
            SourceKind::Lvm { vg, pool } => format!("{vg}%{pool}"),
            SourceKind::Local { dir } => {
                let base = dir
                    .file_name()
                    .and_then(|b| b.to_str())
                    .ok_or_else(|| anyhow!("localdir {} has no usable final component", dir.display()))?;
                format!("local%{base}")
            }
        };
        names::validate_pool_dir(&name)?;
        Ok(name)
    }

    /// Checks a volume name given on the command line as this config's
    /// source allows it.
    pub fn validate_volume(&self, name: &str) -> Result<()> {
        validate_volume_for(&self.source, name)?;
        let folder = names::volume_folder_name(name);
        match self.volumes.iter().find(|(n, _)| n != name && names::volume_folder_name(n) == folder) {
            Some((configured, _)) => bail!("volume {name:?} is configured as {configured:?}: use that name"),
            None => Ok(()),
        }
    }

    /// The volumes a command works on: the named ones (each must be listed,
    /// and enabled when `need_enabled`), or every enabled one.
    pub fn select_volumes(&self, named: &[String], need_enabled: bool) -> Result<Vec<String>> {
        if named.is_empty() {
            let all: Vec<String> = self.volumes.iter().filter(|(_, e)| *e).map(|(n, _)| n.clone()).collect();
            if all.is_empty() {
                bail!("no volume is enabled in [volumes] of {}", self.path.display());
            }
            return Ok(all);
        }
        for name in named {
            match self.volumes.iter().find(|(n, _)| n == name) {
                None => bail!("volume {name:?} is not configured in [volumes] of {}", self.path.display()),
                Some((_, false)) if need_enabled => {
                    bail!("volume {name:?} is disabled in [volumes] of {}", self.path.display())
                }
                Some(_) => {}
            }
        }
        Ok(named.to_vec())
    }
}

/// `[retention]`: each key a count from 0 to [`MAX_KEEP`].
fn parse_retention(section: &ini::Properties) -> Result<KeepRules> {
    if let Some((key, _)) = section.iter().find(|(k, _)| !RETENTION_KEYS.contains(k)) {
        bail!("unknown key {key:?} in [retention] (known: {})", RETENTION_KEYS.join(", "));
    }
    let get = |key: &str| -> Result<u32> {
        match section.get(key).map(str::trim) {
            None => Ok(0),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n <= MAX_KEEP => Ok(n),
                _ => bail!("[retention] {key} = {v:?}: expected a count from 0 to {MAX_KEEP}"),
            },
        }
    };
    Ok(KeepRules {
        last: get("last")?,
        hourly: get("hourly")?,
        daily: get("daily")?,
        weekly: get("weekly")?,
        monthly: get("monthly")?,
        yearly: get("yearly")?,
    })
}

/// An `on`/`off` key, `absent` when not given.
fn on_off(value: Option<&str>, key: &str, absent: bool) -> Result<bool> {
    match value.map(str::trim) {
        None => Ok(absent),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => bail!("key {key:?}: {other:?} must be on or off"),
    }
}

/// LVM volumes are LV names; image files may sit in sub-folders of
/// `localdir` (see [`names::validate_volume_path`]).
fn validate_volume_for(source: &SourceKind, name: &str) -> Result<()> {
    match source {
        SourceKind::Lvm { .. } => names::validate_volume_name(name),
        SourceKind::Local { .. } => names::validate_volume_path(name),
    }
}

/// `s3://BUCKET/PREFIX`: the bucket and a non-empty relative prefix. The
/// endpoint and credentials are the receiver's (its `s3.ini`), never dom0's.
fn parse_dest_url(value: &str) -> Result<Destination> {
    let Some(rest) = value.strip_prefix("s3://") else {
        bail!("{:?} is not an s3://BUCKET/PREFIX address", value.escape_debug().to_string());
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let dest = Destination::S3 { bucket: bucket.to_string(), prefix: prefix.trim_end_matches('/').to_string() };
    dest.validate()?;
    Ok(dest)
}

fn parse_dest_vm(value: &str) -> Result<DestVm> {
    if value == "none" {
        return Ok(DestVm::Local);
    }
    if let Some(rest) = value.strip_prefix("ssh://") {
        let (target, port) = match rest.rsplit_once(':') {
            Some((t, p)) => (t, Some(p.parse::<u16>().map_err(|_| anyhow!("bad ssh port {p:?}"))?)),
            None => (rest, None),
        };
        let ok = !target.is_empty()
            && !target.starts_with('-')
            && target.chars().all(|c| c.is_ascii_alphanumeric() || "@._-".contains(c));
        if !ok {
            bail!("bad ssh destination {target:?}: expected user@host");
        }
        return Ok(DestVm::Ssh { target: target.to_string(), port });
    }
    // Qubes VM names: a letter, then letters, digits, '_', '.', '-'; at most 31.
    let ok = value.len() <= 31
        && value.starts_with(|c: char| c.is_ascii_alphabetic())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        bail!("{value:?} is not none, ssh://user@host[:port] or a valid Qubes VM name");
    }
    Ok(DestVm::Qubes(value.to_string()))
}

/// Chunk size in bytes, given in bytes or with a K/M/G suffix; a power of
/// two from 64 KiB to the protocol's maximum (4 MiB).
fn parse_chunk_size(v: &str) -> Result<u64> {
    const RANGE: &str = "a power of two from 64K to 4M";
    let v = v.trim();
    let (num, mult) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    let size = num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult));
    match size {
        Some(size) if size.is_power_of_two() && (64 * 1024..=sparsebak_proto::msg::MAX_CHUNK_SIZE).contains(&size) => {
            Ok(size)
        }
        _ => bail!("{v:?} is not a valid chunk size: {RANGE} (bytes, or with a K or M suffix)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/sparsebak/sparsebak.ini"), text)
    }

    const LVM: &str = "[var]\nvgname = qubes_dom0\npoolname = pool00\ndestvm = backup\ndestmountpoint = /mnt/volume\ndestdir = backups\n\n[volumes]\nvm-a-private = enable\nvm-b-private = disable\n";

    #[test]
    fn parses_readme_example() {
        let c = parse(LVM).expect("valid");
        assert_eq!(c.source, SourceKind::Lvm { vg: "qubes_dom0".into(), pool: "pool00".into() });
        assert_eq!(c.dest_vm, DestVm::Qubes("backup".into()));
        assert_eq!(c.meta_dir, Path::new("/sparsebak"));
        assert_eq!(c.pool_dir().expect("pool dir"), "qubes_dom0%pool00");
        assert_eq!(c.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(c.select_volumes(&[], true).expect("enabled"), vec!["vm-a-private"]);
    }

    fn err_of(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("must fail"))
    }

    #[test]
    fn errors_name_the_key_or_volume() {
        assert!(err_of(&LVM.replace("destdir", "destdri")).contains("destdri"));
        assert!(err_of(&LVM.replace("destdir = backups\n", "")).contains("destdir"));
        assert!(err_of(&LVM.replace("poolname = pool00\n", "")).contains("poolname"));
        assert!(err_of(&LVM.replace("= disable", "= maybe")).contains("vm-b-private"));
        assert!(err_of(&LVM.replace("destvm = backup", "destvm = -oProxy")).contains("destvm"));
        let c = parse(LVM).expect("valid");
        let e = c.select_volumes(&["vm-b-private".into()], true).expect_err("disabled");
        assert!(e.to_string().contains("vm-b-private") && e.to_string().contains("disabled"));
        let e = c.select_volumes(&["nope".into()], false).expect_err("unknown");
        assert!(e.to_string().contains("nope") && e.to_string().contains("not configured"));
        assert!(c.select_volumes(&["vm-b-private".into()], false).is_ok());
    }

    #[test]
    fn dest_vm_forms() {
        assert_eq!(parse_dest_vm("none").expect("none"), DestVm::Local);
        assert_eq!(
            parse_dest_vm("ssh://bak@host.example:2222").expect("ssh"),
            DestVm::Ssh { target: "bak@host.example".into(), port: Some(2222) }
        );
        assert!(parse_dest_vm("ssh://-oProxyCommand=x").is_err());
        assert!(parse_dest_vm("my vm").is_err());
    }

    #[test]
    fn local_dir_and_chunk_size() {
        let text = "[var]\nlocaldir = /srv/images\ndestvm = none\ndestmountpoint = /mnt\ndestdir = b\nchunksize = 256K\n[volumes]\ndisk.img = enable\n";
        let c = parse(text).expect("valid");
        assert_eq!(c.source, SourceKind::Local { dir: "/srv/images".into() });
        assert_eq!(c.pool_dir().expect("pool"), "local%images");
        assert_eq!(c.chunk_size, 256 * 1024);
        assert!(err_of(&text.replace("256K", "100K")).contains("chunksize"));
        for bad in ["1G", "3M", "18446744073709551615K", "big"] {
            let e = err_of(&text.replace("256K", bad));
            assert!(e.contains("chunksize") && e.contains("a power of two from 64K to 4M"), "{bad}: {e}");
        }
        assert_eq!(parse(&text.replace("256K", "4M")).expect("4M").chunk_size, 4 << 20);
    }

    #[test]
    fn image_volumes_may_sit_in_sub_folders() {
        let text = "[var]\nlocaldir = /var/lib/qubes\ndestvm = none\ndestmountpoint = /mnt\ndestdir = b\n[volumes]\nappvms/work/private.img = enable\n";
        let c = parse(text).expect("valid");
        assert_eq!(c.volumes, [("appvms/work/private.img".to_string(), true)]);
        assert!(c.validate_volume("vm-templates/fedora/root.img").is_ok());
        assert!(c.validate_volume("appvms/../x").is_err());
        let e = c.validate_volume("appvms+work+private.img").expect_err("an alias of a path");
        assert!(e.to_string().contains("configured as \"appvms/work/private.img\""), "{e}");
        let e = err_of(&format!("{text}appvms+work+private.img = enable\n"));
        assert!(e.contains("would share one folder"), "{e}");
        let e = err_of(&text.replace("appvms/work/private.img", "appvms/.work/private.img"));
        assert!(e.contains("[volumes] appvms/.work/private.img"), "{e}");
        // LVM volumes are LV names: no paths.
        assert!(err_of(&format!("{LVM}appvms/work = enable\n")).contains("appvms/work"));
    }

    #[test]
    fn retention_section() {
        let text = format!("{LVM}\n[retention]\nhourly = 24\ndaily = 30\nweekly = 8\n");
        let c = parse(&text).expect("valid");
        assert_eq!(c.retention, KeepRules { hourly: 24, daily: 30, weekly: 8, ..KeepRules::default() });
        assert!(!c.autoprune);
        let c = parse(&text.replace("destdir = backups\n", "destdir = backups\nautoprune = on\n")).expect("valid");
        assert!(c.autoprune);
        assert!(err_of(&format!("{text}fortnightly = 2\n")).contains("unknown key \"fortnightly\" in [retention]"));
        assert!(err_of(&text.replace("= 24", "= -1")).contains("[retention] hourly"));
        assert!(err_of(&text.replace("= 24", "= 1000001")).contains("from 0 to 1000000"));
        assert!(err_of(&format!("{text}daily = 3\n")).contains("\"daily\" appears more than once"));
        let e = err_of(&LVM.replace("destdir = backups\n", "destdir = backups\nautoprune = on\n"));
        assert!(e.contains("autoprune = on needs keep rules"), "{e}");
        assert!(
            err_of(&LVM.replace("destdir = backups\n", "destdir = backups\nautoprune = yes\n")).contains("autoprune")
        );
    }

    #[test]
    fn s3_destinations() {
        let with = |dest: &str| LVM.replace("destmountpoint = /mnt/volume\ndestdir = backups\n", dest);
        let c = parse(&with("desturl = s3://offsite-backups/sparsebak/laptop/\n")).expect("valid");
        let want = Destination::S3 { bucket: "offsite-backups".into(), prefix: "sparsebak/laptop".into() };
        assert_eq!(c.dest, want);
        assert_eq!(c.dest.to_string(), "s3://offsite-backups/sparsebak/laptop");
        let e = err_of(&with("desturl = s3://b1/p\ndestdir = x\n"));
        assert!(e.contains("desturl cannot be combined"), "{e}");
        for bad in ["http://b1/p", "s3://b1", "s3://b1/", "s3://B1/p", "s3://b1/../p", "s3://b1//p"] {
            let e = err_of(&with(&format!("desturl = {bad}\n")));
            assert!(e.contains("desturl"), "{bad}: {e}");
        }
        let e = err_of(&with(""));
        assert!(e.contains("destmountpoint"), "{e}");
    }

    #[test]
    fn idle_timeout_has_a_range() {
        let with = |v: &str| LVM.replace("destdir = backups\n", &format!("destdir = backups\nidletimeout = {v}\n"));
        assert_eq!(parse(&with("86400")).expect("a day").idle_timeout, Duration::from_secs(86_400));
        for bad in ["0", "86401", "18446744073709551615", "-1", "1.5"] {
            let e = err_of(&with(bad));
            assert!(e.contains("idletimeout") && e.contains("from 1 to 86400"), "{bad}: {e}");
        }
    }

    #[test]
    fn duplicate_keys_and_sections_are_errors() {
        let e = err_of(&LVM.replace("destdir = backups\n", "destdir = backups\ndestdir = other\n"));
        assert!(e.contains("\"destdir\" appears more than once in [var]"), "{e}");
        let e = err_of(&format!("{LVM}\n[volumes]\nvm-c-private = enable\n"));
        assert!(e.contains("section [volumes] appears more than once"), "{e}");
        let e = err_of(&LVM.replace("vm-b-private = disable", "vm-b-private = disable\nvm-a-private = disable"));
        assert!(e.contains("\"vm-a-private\" appears more than once in [volumes]"), "{e}");
    }
}
