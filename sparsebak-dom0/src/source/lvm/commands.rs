//! The LVM, device-mapper and thin_delta commands sparsebak runs, as thin
//! typed wrappers.
//!
//! Every command is run with an argument vector (never through a shell), with
//! `LC_ALL=C` so that output and messages are parseable, and with
//! `LVM_SUPPRESS_FD_WARNINGS=1` so that lvm does not complain about file
//! descriptors it inherits. Errors name the command and the object and carry
//! the command's stderr.
//!
//! The pool's kernel device is `VG-POOL-tpool` in device-mapper naming, where
//! every `-` inside the VG and LV names is doubled (`my-vg/pool-0` becomes
//! `my--vg-pool--0-tpool`); its metadata sub-volume is `VG-POOL_tmeta`.
//!
//! [`ThinPool::scan_changes`] is the operation that `monitor`, `send` and
//! `resync` build on: it reserves a pool metadata snapshot (so `thin_delta`
//! reads a consistent copy of the live metadata), streams `thin_delta
//! --metadata-snap` between the thin ids of two volumes into the parser, and
//! releases the metadata snapshot again on every path. A reservation that a
//! killed run left behind is found from `dmsetup status` and released first:
//! the kernel allows only one, and a held one pins metadata space.

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use super::thin_delta::{parse_thin_delta, ChangedRange, DeltaSummary};
use super::thin_dump::parse_thin_dump;

/// How much of a command's stderr is kept for error messages.
const STDERR_KEEP: usize = 16 * 1024;

/// Finds a system tool: on `PATH`, else in the sbin directories (a user's or
/// a timer's PATH may lack them), else the bare name (spawning then fails with
/// a clear error).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn command(name: &str) -> Command {
    let mut c = Command::new(tool(name));
    c.env("LC_ALL", "C").env("LVM_SUPPRESS_FD_WARNINGS", "1").stdin(Stdio::null());
    c
}

fn show(prog: &str, args: &[&str]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.len().saturating_sub(STDERR_KEEP);
    let start = (start..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
    s[start..].replace('\n', "; ")
}

/// Runs `prog args...` and returns its stdout; a failure to start or a
/// non-zero exit is an error that shows the command line and its stderr.
fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = command(prog).args(args).output().with_context(|| format!("cannot run {prog} (is it installed?)"))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", show(prog, args), out.status, tail(&out.stderr));
    }
    String::from_utf8(out.stdout).map_err(|_| anyhow!("`{}` printed non-UTF-8", show(prog, args)))
}

/// Checks a VG or LV name before it goes on a command line or into a device
/// name: LVM's own character set, and never something lvm could take for an
/// option.
pub fn validate_lvm_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b));
    if !ok {
        bail!("invalid {what} name {name:?}: LVM names use A-Z a-z 0-9 + _ . - and do not start with -");
    }
    Ok(())
}

/// Device-mapper spelling of one name component: `-` doubled.
pub fn dm_escape(name: &str) -> String {
    name.replace('-', "--")
}

/// One row of `lvs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvInfo {
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Thin device id inside the pool (thin volumes only).
    pub thin_id: Option<u64>,
    /// Pool the volume lives in (thin volumes only).
    pub pool: Option<String>,
    /// LVM segment type: `thin`, `thin-pool`, `linear`, ...
    pub segtype: String,
    /// The 10-character `lv_attr` string.
    pub attr: String,
}

impl LvInfo {
    /// Active in the kernel (`lv_attr` position 5 is `a`).
    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.attr.as_bytes().get(4) == Some(&b'a')
    }

    fn parse(line: &str) -> Result<LvInfo> {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        let [name, size, thin_id, pool, segtype, attr] = f[..] else {
            bail!("unexpected lvs output line {line:?}");
        };
        let num =
            |what: &str, s: &str| s.parse::<u64>().map_err(|_| anyhow!("lvs: {what} {s:?} of {name} is not a number"));
        Ok(LvInfo {
            name: name.to_string(),
            size: num("size", size)?,
            thin_id: if thin_id.is_empty() { None } else { Some(num("thin_id", thin_id)?) },
            pool: (!pool.is_empty()).then(|| pool.to_string()),
            segtype: segtype.to_string(),
            attr: attr.to_string(),
        })
    }
}

/// What thin_delta found between two volumes, plus their sizes (so the
/// caller can size the delta map and notice growth or shrinking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    pub summary: DeltaSummary,
    pub left: LvInfo,
    pub right: LvInfo,
}

/// What [`ThinPool::mapped_ranges`] found besides the ranges themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The volume's size in bytes (ranges are clipped to it).
    pub volume_size: u64,
    /// Sum of the ranges reported.
    pub mapped_bytes: u64,
}

/// A thin pool `VG/POOL`, the unit every operation here works in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPool {
    vg: String,
    pool: String,
}

impl ThinPool {
    /// Checks the names (not the existence: see [`ThinPool::check`]).
    pub fn new(vg: &str, pool: &str) -> Result<ThinPool> {
        validate_lvm_name("volume group", vg)?;
        validate_lvm_name("thin pool", pool)?;
        Ok(ThinPool { vg: vg.to_string(), pool: pool.to_string() })
    }

    pub fn vg(&self) -> &str {
        &self.vg
    }

    /// `VG/LV`, checking the LV name.
    fn path(&self, lv: &str) -> Result<String> {
        validate_lvm_name("logical volume", lv)?;
        Ok(format!("{}/{}", self.vg, lv))
    }

    /// Device-mapper name of the pool's kernel target.
    pub fn tpool_dm_name(&self) -> String {
        format!("{}-{}-tpool", dm_escape(&self.vg), dm_escape(&self.pool))
    }

    /// The pool's metadata device, which thin_delta reads.
    pub fn tmeta_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/mapper/{}-{}_tmeta", dm_escape(&self.vg), dm_escape(&self.pool)))
    }

    /// Block device path of an LV (`/dev/VG/LV`; it exists while active).
    pub fn dev_path(&self, lv: &str) -> Result<PathBuf> {
        Ok(PathBuf::from("/dev").join(self.path(lv)?))
    }

    /// All (visible) logical volumes of the volume group, from one `lvs` call.
    pub fn list_lvs(&self) -> Result<Vec<LvInfo>> {
        let out = run(
            "lvm",
            &[
                "lvs",
                "--noheadings",
                "--nosuffix",
                "--units",
                "b",
                "--separator",
                "|",
                "-o",
                "lv_name,lv_size,thin_id,pool_lv,segtype,lv_attr",
                &self.vg,
            ],
        )
        .with_context(|| format!("listing logical volumes of {}", self.vg))?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(LvInfo::parse)
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("listing logical volumes of {}", self.vg))
    }

    /// The error for a configured volume that is not there.
    pub fn no_such_volume(&self, name: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "volume {}/{name} does not exist (check [volumes] in the config; `lvs {}` lists them)",
            self.vg,
            self.vg
        )
    }

    /// The named LV, or None when it does not exist.
    pub fn lv(&self, name: &str) -> Result<Option<LvInfo>> {
        validate_lvm_name("logical volume", name)?;
        Ok(self.list_lvs()?.into_iter().find(|l| l.name == name))
    }

    /// Checks that the pool exists and is a thin pool; the error says how to
    /// find the right names.
    pub fn check(&self) -> Result<()> {
        let lvs = self.list_lvs().with_context(|| {
            format!(
                "thin pool {}/{}: volume group not usable (check vgname in the config; `vgs` lists them)",
                self.vg, self.pool
            )
        })?;
        self.check_in(&lvs)
    }

    fn check_in(&self, lvs: &[LvInfo]) -> Result<()> {
        match lvs.iter().find(|l| l.name == self.pool) {
            None => bail!(
                "thin pool {}/{} not found (check poolname in the config; `lvs {}` lists the volumes)",
                self.vg,
                self.pool,
                self.vg
            ),
            Some(l) if l.segtype != "thin-pool" => bail!(
                "{}/{} is a {} volume, not a thin pool (check poolname in the config)",
                self.vg,
                self.pool,
                l.segtype
            ),
            Some(_) => Ok(()),
        }
    }

    /// Finds `name` among `lvs` and checks that it is a thin volume of this
    /// pool with a thin id.
    fn thin_in<'a>(&self, lvs: &'a [LvInfo], name: &str) -> Result<&'a LvInfo> {
        let lv = lvs
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| anyhow!("logical volume {}/{} does not exist", self.vg, name))?;
        if lv.segtype != "thin" || lv.pool.as_deref() != Some(self.pool.as_str()) {
            bail!(
                "{}/{} is not a thin volume of pool {} (type {}, pool {})",
                self.vg,
                name,
                self.pool,
                lv.segtype,
                lv.pool.as_deref().unwrap_or("none")
            );
        }
        if lv.thin_id.is_none() {
            bail!("lvs shows no thin_id for {}/{}", self.vg, name);
        }
        Ok(lv)
    }

    /// Makes `name` a read-only, active thin snapshot of `origin` (which may
    /// itself be a snapshot, e.g. `VOL.tick`): `lvcreate -s -pr -kn -ay`.
    /// `-kn` clears the activation-skip flag that thin snapshots get by
    /// default, so that `-ay` activates it.
    pub fn create_snapshot(&self, origin: &str, name: &str) -> Result<()> {
        let o = self.path(origin)?;
        validate_lvm_name("logical volume", name)?;
        run("lvm", &["lvcreate", "-s", "-pr", "-kn", "-ay", "-n", name, &o])
            .with_context(|| format!("creating snapshot {}/{} of {}", self.vg, name, o))?;
        Ok(())
    }

    /// Removes an LV (active or not), without prompting.
    pub fn remove_lv(&self, name: &str) -> Result<()> {
        let p = self.path(name)?;
        run("lvm", &["lvremove", "-f", &p]).with_context(|| format!("removing {p}"))?;
        Ok(())
    }

    /// Renames an LV within the volume group.
    pub fn rename_lv(&self, from: &str, to: &str) -> Result<()> {
        validate_lvm_name("logical volume", from)?;
        validate_lvm_name("logical volume", to)?;
        run("lvm", &["lvrename", &self.vg, from, to])
            .with_context(|| format!("renaming {}/{} to {}", self.vg, from, to))?;
        Ok(())
    }

    /// Activates (`lvchange -ay -K`, also for skip-flagged snapshots) or
    /// deactivates an LV.
    pub fn set_active(&self, name: &str, active: bool) -> Result<()> {
        let p = self.path(name)?;
        let args: &[&str] = if active { &["lvchange", "-ay", "-K", &p] } else { &["lvchange", "-an", &p] };
        run("lvm", args).with_context(|| format!("{} {p}", if active { "activating" } else { "deactivating" }))?;
        Ok(())
    }

    /// The dm name of the pool target and its `dmsetup status` line. Usually
    /// `VG-POOL-tpool`; a pool that LVM activated without the `-tpool` layer
    /// is `VG-POOL` itself, so that is tried too (accepted only when its
    /// target really is `thin-pool`).
    fn pool_status(&self) -> Result<(String, String)> {
        let tpool = self.tpool_dm_name();
        let first = run("dmsetup", &["status", &tpool]);
        let (name, out) = match first {
            Ok(out) => (tpool, out),
            Err(e) => {
                let plain = format!("{}-{}", dm_escape(&self.vg), dm_escape(&self.pool));
                match run("dmsetup", &["status", &plain]) {
                    Ok(out) if out.split_whitespace().nth(2) == Some("thin-pool") => (plain, out),
                    _ => {
                        return Err(e.context(format!(
                            "thin pool {}/{} is not active (no device-mapper device {}; \
                             activate a volume of the pool or run `lvchange -ay {}/{}`)",
                            self.vg,
                            self.pool,
                            self.tpool_dm_name(),
                            self.vg,
                            self.pool
                        )))
                    }
                }
            }
        };
        Ok((name, out))
    }

    /// The metadata root that is held by a reserved metadata snapshot, or
    /// None. Parsed from `dmsetup status` of the pool: `START LEN thin-pool
    /// TRANSACTION_ID USED/TOTAL_META USED/TOTAL_DATA HELD_ROOT|- ...`.
    #[cfg(test)]
    pub fn held_metadata_root(&self) -> Result<Option<u64>> {
        let (name, out) = self.pool_status()?;
        parse_held_root(&out)
            .with_context(|| format!("status of thin pool {}/{} (dm device {name})", self.vg, self.pool))
    }

    fn message(&self, dm_name: &str, msg: &str) -> Result<()> {
        run("dmsetup", &["message", dm_name, "0", msg])?;
        Ok(())
    }

    /// Releases a metadata snapshot left reserved (by a killed sparsebak, or
    /// anything else: sparsebak's lock means none of its own is in use).
    /// Returns whether one was released.
    fn release_stale_on(&self, name: &str, status: &str) -> Result<bool> {
        let held = parse_held_root(status).with_context(|| format!("status of thin pool {}/{}", self.vg, self.pool))?;
        let Some(root) = held else {
            return Ok(false);
        };
        log::warn!(
            "thin pool {}/{}: releasing a metadata snapshot (root {root}) left reserved by an earlier run",
            self.vg,
            self.pool
        );
        self.message(name, "release_metadata_snap").with_context(|| {
            format!(
                "releasing stale metadata snapshot of {}/{} (try `dmsetup message {name} 0 release_metadata_snap`)",
                self.vg, self.pool
            )
        })?;
        Ok(true)
    }

    /// Reserves a pool metadata snapshot, first releasing a stale one. The
    /// returned guard releases it when dropped; call
    /// [`MetadataSnap::release`] to see release errors.
    pub fn reserve_metadata_snap(&self) -> Result<MetadataSnap<'_>> {
        let (name, status) = self.pool_status()?;
        self.release_stale_on(&name, &status)?;
        self.message(&name, "reserve_metadata_snap")
            .with_context(|| format!("reserving metadata snapshot of {}/{}", self.vg, self.pool))?;
        Ok(MetadataSnap { pool: self, dm_name: name, released: false })
    }

    /// Runs a thin-provisioning tool (`thin_delta`, `thin_dump`) with
    /// `--metadata-snap` on the reserved metadata snapshot and streams its
    /// stdout into `parse`. The `--metadata-snap` flag without a value works
    /// with 0.9 (optional block number, taken from the superblock when
    /// absent) and 1.x (a plain flag). Its stderr is kept (bounded) for the
    /// error message; a parse error kills it.
    fn run_on_metadata_snap<T>(
        &self,
        snap: &MetadataSnap<'_>,
        tool: &str,
        args: &[&str],
        what: &str,
        parse: impl FnOnce(BufReader<std::process::ChildStdout>) -> Result<T>,
    ) -> Result<T> {
        if snap.pool != self {
            bail!("metadata snapshot of {}/{} used for {}/{}", snap.pool.vg, snap.pool.pool, self.vg, self.pool);
        }
        let meta = self.tmeta_path();
        let what = format!("{what} in {}/{} ({})", self.vg, self.pool, meta.display());
        let mut child = command(tool)
            .arg("--metadata-snap")
            .args(args)
            .arg(&meta)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {tool} (is thin-provisioning-tools installed?) for {what}"))?;
        let stderr = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut e) = stderr {
                let _ = (&mut e).take(STDERR_KEEP as u64).read_to_end(&mut buf);
                // Drain the rest so the tool never blocks on a full pipe.
                let _ = std::io::copy(&mut e, &mut std::io::sink());
            }
            buf
        });
        let parsed = match child.stdout.take() {
            Some(out) => parse(BufReader::with_capacity(64 * 1024, out)),
            None => Err(anyhow!("no stdout pipe")),
        };
        if parsed.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().with_context(|| what.clone())?;
        let err = err_reader.join().unwrap_or_default();
        match parsed {
            Ok(v) if status.success() => Ok(v),
            Ok(_) => bail!("{what}: exited with {status}: {}", tail(&err)),
            Err(e) if !status.success() && !err.is_empty() => {
                Err(e.context(format!("{what}: exited with {status}: {}", tail(&err))))
            }
            Err(e) => Err(e.context(what)),
        }
    }

    /// Runs `thin_delta` between two thin device ids on the reserved
    /// metadata snapshot, streaming its output into the parser.
    pub fn thin_delta(
        &self,
        snap: &MetadataSnap<'_>,
        left_id: u64,
        right_id: u64,
        on_change: impl FnMut(ChangedRange) -> Result<()>,
    ) -> Result<DeltaSummary> {
        let (l, r) = (left_id.to_string(), right_id.to_string());
        let what = format!("thin_delta of thin ids {l} and {r}");
        let args = ["--snap1", l.as_str(), "--snap2", r.as_str()];
        let sum =
            self.run_on_metadata_snap(snap, "thin_delta", &args, &what, |out| parse_thin_delta(out, on_change))?;
        for (want, got, side) in [(left_id, sum.left, "left"), (right_id, sum.right, "right")] {
            if got.is_some_and(|g| g != want) {
                bail!("{what}: output is for {side} device {got:?}, not {want}");
            }
        }
        Ok(sum)
    }

    /// Reports every mapped range of thin volume `lv` (e.g. `VOL.tock`) in
    /// bytes, clipped to its size, from `thin_dump` of a reserved metadata
    /// snapshot (released afterwards, also on errors). Unmapped ranges read
    /// as zeros.
    pub fn mapped_ranges(&self, lv: &str, mut on_mapped: impl FnMut(u64, u64) -> Result<()>) -> Result<Mapping> {
        let lvs = self.list_lvs()?;
        self.check_in(&lvs)?;
        let info = self.thin_in(&lvs, lv)?.clone();
        let Some(id) = info.thin_id else {
            bail!("no thin id for {lv}"); // checked by thin_in
        };
        let snap = self.reserve_metadata_snap()?;
        let mut total = 0u64;
        let clipped = |start: u64, len: u64| {
            if start >= info.size {
                return Ok(());
            }
            let len = len.min(info.size - start);
            total += len;
            on_mapped(start, len)
        };
        let id_arg = id.to_string();
        let what = format!("thin_dump of {}/{lv} (thin id {id})", self.vg);
        let parsed = self.run_on_metadata_snap(&snap, "thin_dump", &["--dev-id", &id_arg], &what, |out| {
            parse_thin_dump(out, id, clipped)
        });
        let released = snap.release();
        parsed?;
        released?;
        Ok(Mapping { volume_size: info.size, mapped_bytes: total })
    }

    /// Reports every change between thin volumes `left` (e.g. `VOL.tick`)
    /// and `right` (e.g. `VOL.tock`) in bytes, with the pool block size and
    /// the two volumes' sizes. Checks that the pool and both volumes exist
    /// and are thin volumes of this pool, reserves a metadata snapshot
    /// (releasing a stale one), runs thin_delta and releases the snapshot,
    /// also when thin_delta or `on_change` fails.
    ///
    /// Ranges are clipped to the size of `right`: when the volume shrank,
    /// thin_delta reports the cut tail of `left` as `left_only`, but those
    /// bytes no longer exist, and a delta map sized for `right` must not grow
    /// from them. Growth needs nothing special: the new tail is reported as
    /// `right_only` where it was written (unwritten parts read as zeros).
    pub fn scan_changes(
        &self,
        left: &str,
        right: &str,
        on_change: impl FnMut(ChangedRange) -> Result<()>,
    ) -> Result<ScanResult> {
        let lvs = self.list_lvs()?;
        self.check_in(&lvs)?;
        let l = self.thin_in(&lvs, left)?.clone();
        let r = self.thin_in(&lvs, right)?.clone();
        let (Some(lid), Some(rid)) = (l.thin_id, r.thin_id) else {
            bail!("no thin ids for {left}/{right}"); // checked by thin_in
        };
        let snap = self.reserve_metadata_snap()?;
        let limit = r.size;
        let mut on_change = on_change;
        let clipped = |c: ChangedRange| {
            if c.start >= limit {
                return Ok(());
            }
            on_change(ChangedRange { len: c.len.min(limit - c.start), ..c })
        };
        let summary = self
            .thin_delta(&snap, lid, rid, clipped)
            .with_context(|| format!("comparing {}/{left} with {}/{right}", self.vg, self.vg));
        let released = snap.release();
        let summary = summary?;
        released?;
        Ok(ScanResult { summary, left: l, right: r })
    }
}

/// Field 7 of a thin-pool status line: the held metadata root or `-`.
fn parse_held_root(status: &str) -> Result<Option<u64>> {
    let f: Vec<&str> = status.split_whitespace().collect();
    match f.get(2) {
        Some(&"thin-pool") => {}
        _ => bail!("not a thin-pool target: {:?}", status.trim()),
    }
    match f.get(3) {
        Some(&"Fail") => bail!("the pool is in Fail state (see `dmesg`; repair with `lvconvert --repair`)"),
        Some(&"Error") => bail!("the pool reports an error state (see `dmesg`)"),
        _ => {}
    }
    match f.get(6) {
        Some(&"-") => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| anyhow!("unexpected held metadata root {s:?} in {:?}", status.trim())),
        None => bail!("short thin-pool status {:?}", status.trim()),
    }
}

/// A reserved pool metadata snapshot; released on drop (errors are logged)
/// or by [`MetadataSnap::release`] (errors are returned).
#[derive(Debug)]
pub struct MetadataSnap<'a> {
    pool: &'a ThinPool,
    dm_name: String,
    released: bool,
}

impl MetadataSnap<'_> {
    /// Releases the metadata snapshot now.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.do_release()
    }

    fn do_release(&self) -> Result<()> {
        self.pool.message(&self.dm_name, "release_metadata_snap").with_context(|| {
            format!(
                "releasing metadata snapshot of {}/{} (run `dmsetup message {} 0 release_metadata_snap`)",
                self.pool.vg, self.pool.pool, self.dm_name
            )
        })
    }
}

impl Drop for MetadataSnap<'_> {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.do_release() {
                log::error!("{e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
