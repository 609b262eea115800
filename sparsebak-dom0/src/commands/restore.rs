//! `receive VOL --save-to PATH` and `verify [VOL...]`: rebuild a session from
//! dom0's own manifests (newest session wins per chunk, up to the chosen
//! session), fetch exactly those chunks from the receiver, and check each
//! against dom0's hashes before decompressing it. `receive` writes the
//! result; `verify` only checks.
//!
//! Requests are pipelined: a sender thread streams `ReadChunk` requests while
//! this thread reads the answers and the workers check them, so the pipe
//! never idles. A regular output file is written beside its destination and
//! renamed over it only when every chunk checked out, so a failed receive
//! never leaves a half-restored file behind.

use super::{Ctx, ReadChain};
use crate::chunk::{self, pipeline, ChunkCodec};
use crate::crypto::Keys;
use crate::interrupt::{self, TempFileGuard};
use crate::meta::{ChunkState, MergedEntry, MetaDir, SessionId, VolumeMeta};
use crate::remote::{
    metafile::{self, MetaRef},
    rollback, ChunkAnswer, Receiver, RequestSink, ResponseSource,
};
use crate::ui::{confirm, human_bytes, Progress};
use anyhow::{anyhow, bail, Context, Result};
use sparsebak_proto::{MetaFile, VolumeRef};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Receive,
    Verify,
}

/// Entries in flight between the request sender and the answer reader.
const IN_FLIGHT: usize = 256;
/// Entries handed from the sender to the reader at once. One at a time, a
/// full channel woke the sender for every chunk the reader took, and it
/// then flushed a single request: a thread wake-up and a tiny pipe write
/// per chunk on both sides.
const ORDER_BATCH: usize = 32;
/// How many bad chunks are reported one by one before only counting.
const REPORT_LIMIT: u64 = 20;

pub fn run(ctx: &Ctx, mode: Mode) -> Result<()> {
    let names = match mode {
        Mode::Receive => match ctx.cli.volumes.as_slice() {
            [one] => vec![one.clone()],
            _ => bail!("receive takes exactly one volume"),
        },
        Mode::Verify => ctx.config.select_volumes(&ctx.cli.volumes, false)?,
    };
    run_on(ctx, mode, &names)
}

/// `verify` of the given volumes (for `recover`).
pub fn verify_volumes(ctx: &Ctx, names: &[String]) -> Result<()> {
    run_on(ctx, Mode::Verify, names)
}

fn run_on(ctx: &Ctx, mode: Mode, names: &[String]) -> Result<()> {
    let output = match mode {
        Mode::Receive => {
            let path = ctx.cli.save_to.as_deref().context("receive needs --save-to PATH")?;
            // Before any thread starts: see `interrupt`.
            let guard = interrupt::watch()?;
            Some(prepare_output(path, ctx.cli.unattended, guard)?)
        }
        Mode::Verify => None,
    };
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let keys = ctx.keys(&meta)?;
    // A bad --session fails before any receiver is started.
    ctx.session_option()?;
    let mut failures = Vec::new();
    for name in names {
        ctx.config.validate_volume(name)?;
        let vm = meta.volume(&ctx.pool_dir, name);
        if !vm.exists() {
            bail!("volume {name:?} has no sessions in {}", ctx.config.meta_dir.display());
        }
        let volume = ctx.volume_ref(name);
        let mut rx = Receiver::connect(&ctx.config)?;
        let ReadChain { sessions, upto, archive } = ctx.read_chain(name, &vm, &mut rx, keys.as_ref(), &volume)?;
        if mode == Mode::Verify {
            for s in rollback::unrecorded(&sessions, &archive) {
                let line = format!("{name}: the archive holds session {} that dom0 has no record of", s.date_time());
                log::error!("{line}");
                failures.push(line);
            }
            failures.extend(check_metadata(&mut rx, &vm, keys.as_ref(), &volume, &upto)?);
        }
        let job = RestoreJob {
            info: vm.info(upto.last().context("no session")?)?,
            merged: vm.merged(&upto)?,
            sessions: upto,
            volume,
        };
        let outcome = restore_volume(rx, job, output.as_ref(), keys.as_ref())?;
        if let Some(f) = outcome {
            failures.push(f);
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Compares the archive's sealed info and manifest of each session with
/// dom0's: catches a truncated, altered, swapped or replayed metadata file.
/// Returns one line per bad file.
fn check_metadata(
    rx: &mut Receiver,
    vm: &VolumeMeta,
    keys: Option<&Keys>,
    volume: &VolumeRef,
    sessions: &[SessionId],
) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for s in sessions {
        for file in [MetaFile::Info, MetaFile::Manifest] {
            let m = MetaRef { keys, volume, session: s.as_str(), file };
            match metafile::compare(rx, m, &vm.session_dir(s).join(file.file_name())) {
                Ok(()) => {}
                Err(e) if e.is::<metafile::BadMeta>() => {
                    log::error!("{e:#}");
                    bad.push(format!("{e:#}"));
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(bad)
}

struct RestoreJob {
    volume: VolumeRef,
    info: crate::meta::SessionInfo,
    merged: crate::meta::ManifestMerge<crate::meta::ManifestReader>,
    /// Sessions up to and including the target, oldest first.
    sessions: Vec<SessionId>,
}

/// Where `receive` writes.
struct Output {
    dest: PathBuf,
    is_block_device: bool,
    /// Removes the temporary file when the user interrupts.
    guard: TempFileGuard,
}

fn prepare_output(path: &Path, unattended: bool, guard: TempFileGuard) -> Result<Output> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("--save-to {}", path.display())),
    };
    let is_block_device = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
    if let Some(m) = &meta {
        if !m.file_type().is_file() && !is_block_device {
            bail!("--save-to {} is neither a regular file nor a block device", path.display());
        }
        if !unattended && !confirm(&format!("Overwrite {}? [y/N] ", path.display()))? {
            bail!("not overwriting {} (use -u to overwrite without asking)", path.display());
        }
    }
    Ok(Output { dest: path.to_path_buf(), is_block_device, guard })
}

/// A file being restored: temp file + rename for regular files, direct
/// writes for block devices (where zero chunks must be written too).
struct Sink {
    file: File,
    tmp: Option<PathBuf>,
    dest: PathBuf,
    zeros: Vec<u8>,
    guard: TempFileGuard,
}

impl Sink {
    fn open(out: &Output, size: u64, chunk_size: u64) -> Result<Sink> {
        if out.is_block_device {
            let file = OpenOptions::new()
                .write(true)
                .open(&out.dest)
                .with_context(|| format!("opening {}", out.dest.display()))?;
            let dev_size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
                .with_context(|| format!("size of {}", out.dest.display()))?;
            if dev_size < size {
                bail!("block device {} holds {dev_size} bytes, the volume needs {size}", out.dest.display());
            }
            let zeros = vec![0; chunk_size as usize];
            return Ok(Sink { file, tmp: None, dest: out.dest.clone(), zeros, guard: out.guard.clone() });
        }
        let name = out.dest.file_name().context("--save-to has no file name")?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".sparsebak-tmp");
        let tmp = out.dest.with_file_name(tmp_name);
        let file = create_temp_file(&tmp)?;
        out.guard.set(tmp.clone());
        file.set_len(size).with_context(|| format!("sizing {}", tmp.display()))?;
        Ok(Sink { file, tmp: Some(tmp), dest: out.dest.clone(), zeros: Vec::new(), guard: out.guard.clone() })
    }

    /// Zeros for `[from, to)`: nothing to do in a fresh sparse file; written
    /// out on a block device, which may hold old data.
    fn fill_zeros(&self, from: u64, to: u64) -> Result<()> {
        if self.tmp.is_some() {
            return Ok(());
        }
        let mut at = from;
        while at < to {
            let n = (to - at).min(self.zeros.len() as u64) as usize;
            self.write(at, None, n)?;
            at += n as u64;
        }
        Ok(())
    }

    fn write(&self, addr: u64, data: Option<&[u8]>, len: usize) -> Result<()> {
        let bytes = match data {
            Some(d) => d,
            None if self.tmp.is_some() => return Ok(()), // a hole in a fresh sparse file
            None => &self.zeros[..len],
        };
        let target = self.tmp.as_deref().unwrap_or(&self.dest);
        self.file.write_all_at(bytes, addr).with_context(|| format!("writing {} at {addr:#x}", target.display()))
    }

    fn finish(self) -> Result<()> {
        let target = self.tmp.as_deref().unwrap_or(&self.dest).to_path_buf();
        self.file.sync_all().with_context(|| format!("syncing {}", target.display()))?;
        if let Some(tmp) = &self.tmp {
            std::fs::rename(tmp, &self.dest)
                .with_context(|| format!("renaming {} to {}", tmp.display(), self.dest.display()))?;
            self.guard.clear();
        }
        Ok(())
    }

    fn discard(self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
            self.guard.clear();
        }
    }
}

/// Creates the temporary file beside `--save-to` without ever following a
/// link: root restoring into a folder that others can write must not be
/// tricked into truncating the target of a link planted under that name.
/// A regular file of that name is a killed receive's leftover and goes
/// first; anything else is refused. Mode 0600: a disk image holds secrets.
fn create_temp_file(tmp: &Path) -> Result<File> {
    sparsebak_fsutil::remove_stale(tmp, std::fs::FileType::is_file, "a regular file")?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(tmp)
        .with_context(|| format!("creating {}", tmp.display()))
}

/// One chunk on its way through the checking workers.
struct Fetched {
    entry: MergedEntry,
    answer: Option<ChunkAnswer>,
    len: usize,
}

struct Checked {
    entry: MergedEntry,
    len: usize,
    outcome: Result<Chunk, String>,
}

/// A chunk that passed its checks.
enum Chunk {
    /// All zeros, still to be written if restoring onto a block device.
    Zero,
    /// Stored data, already handed to the output (if any) by the worker.
    Stored,
}

/// Returns `Some(summary)` when chunks failed their checks.
fn restore_volume(
    rx: Receiver,
    job: RestoreJob,
    output: Option<&Output>,
    keys: Option<&Keys>,
) -> Result<Option<String>> {
    let started = Instant::now();
    let RestoreJob { volume, info, merged, sessions } = job;
    let target = sessions.last().cloned().context("no session")?;
    let (size, cs) = (info.volume_size, info.chunk_size);
    let (requests, mut responses, mut process) = rx.split();
    let (order_tx, order_rx) = sync_channel::<Vec<Result<MergedEntry>>>(IN_FLIGHT / ORDER_BATCH);
    let sender = {
        let volume = volume.clone();
        let sessions = sessions.clone();
        std::thread::spawn(move || send_requests(requests, merged, size, &volume, &sessions, order_tx))
    };
    let sink = match output {
        Some(out) => Some(Sink::open(out, size, cs)?),
        None => None,
    };

    let label = format!("{} session {}", volume.name, target.date_time());
    let mut next_addr = 0u64; // where the last entry ended: gaps between entries are zeros
    let mut bad = 0u64;
    let mut stored = 0u64;
    let jobs = order_rx.into_iter().flatten().map(|entry| fetch(entry?, &mut responses, size, cs));
    let progress = Progress::bytes(&label, size);
    let codec = ChunkCodec { keys, volume: &volume };
    // Workers write the chunks they checked themselves (positioned writes
    // need no order): the writing then runs on every core instead of
    // holding up delivery, and the plaintext never leaves the worker's
    // buffer.
    let check_and_write = |f: Fetched| {
        let (addr, len) = (f.entry.entry.addr, f.len);
        check(f, &codec, &sessions, |plain| match &sink {
            Some(s) => s.write(addr, Some(plain), len),
            None => Ok(()),
        })
    };
    let result = pipeline::ordered_map(jobs, pipeline::Lanes::for_chunks(cs), check_and_write, |c: Checked| {
        let addr = c.entry.entry.addr;
        progress.set_position(addr);
        if let Some(s) = &sink {
            s.fill_zeros(next_addr, addr)?;
        }
        next_addr = addr + c.len as u64;
        match c.outcome {
            Ok(Chunk::Stored) => {
                stored += 1;
                Ok(())
            }
            Ok(Chunk::Zero) => match &sink {
                Some(s) => s.write(addr, None, c.len),
                None => Ok(()),
            },
            Err(why) => {
                bad += 1;
                if bad <= REPORT_LIMIT {
                    let at = sparsebak_proto::layout::addr_token(addr);
                    log::error!("{label}: chunk {at} (stored in {}): {why}", sessions[c.entry.session]);
                }
                Ok(())
            }
        }
    })
    .and_then(|_| match &sink {
        Some(s) => s.fill_zeros(next_addr, size),
        None => Ok(()),
    });
    drop(progress);
    if let Err(e) = result {
        process.kill();
        if let Some(s) = sink {
            s.discard();
        }
        return Err(e);
    }
    let sent = sender.join().map_err(|_| anyhow!("request sender panicked"));
    let finished = sent.and_then(|r| r).and_then(|_| process.finish());
    if let Err(e) = finished {
        if let Some(s) = sink {
            s.discard();
        }
        return Err(e);
    }
    if bad > 0 {
        if let Some(s) = sink {
            s.discard();
        }
        return Ok(Some(format!("{label}: {bad} chunk(s) failed their checks")));
    }
    let verb = match sink {
        Some(s) => {
            s.finish()?;
            "received"
        }
        None => "verified",
    };
    let secs = started.elapsed().as_secs_f64();
    log::info!(
        "{label}: {verb} {} stored chunks, {} ({:.1} s, {:.0} MB/s)",
        stored,
        human_bytes(size),
        secs,
        size as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(None)
}

/// The sender thread: one `ReadChunk` per stored chunk, and every entry
/// (stored or zero) down the order channel, in batches, so the reader
/// knows what comes.
fn send_requests(
    mut requests: RequestSink,
    merged: impl Iterator<Item = Result<MergedEntry>>,
    size: u64,
    volume: &VolumeRef,
    sessions: &[SessionId],
    order: std::sync::mpsc::SyncSender<Vec<Result<MergedEntry>>>,
) -> Result<()> {
    let mut batch = Vec::with_capacity(ORDER_BATCH);
    for entry in merged {
        let entry = match entry {
            Ok(e) if e.entry.addr >= size => continue,
            Ok(e) => e,
            Err(e) => {
                // The reader stops at the error, after the entries before it.
                batch.push(Err(anyhow!("{e:#}")));
                let _ = requests.flush();
                let _ = order.send(batch);
                return Err(e);
            }
        };
        if matches!(entry.entry.state, ChunkState::Stored { .. }) {
            requests.read_chunk(volume, sessions[entry.session].as_str(), entry.entry.addr)?;
        }
        batch.push(Ok(entry));
        if batch.len() == ORDER_BATCH && !hand_over(&mut requests, &order, std::mem::take(&mut batch))? {
            return Ok(()); // the reader stopped
        }
    }
    if !batch.is_empty() {
        hand_over(&mut requests, &order, batch)?;
    }
    requests.flush()?;
    Ok(())
}

/// Sends a batch of entries to the reader, after their requests: the
/// receiver always has the requests for every entry the reader waits on.
/// False when the reader stopped.
fn hand_over(
    requests: &mut RequestSink,
    order: &std::sync::mpsc::SyncSender<Vec<Result<MergedEntry>>>,
    batch: Vec<Result<MergedEntry>>,
) -> Result<bool> {
    // Unsent requests would leave the reader waiting for their answers: a
    // failed flush ends the sender, and the reader finds the channel closed.
    requests.flush()?;
    Ok(order.send(batch).is_ok())
}

/// Reads the answer for one entry (stored chunks only).
fn fetch(entry: MergedEntry, responses: &mut ResponseSource, size: u64, cs: u64) -> Result<Fetched> {
    let len = cs.min(size - entry.entry.addr) as usize;
    let answer = match entry.entry.state {
        ChunkState::Zero => None,
        ChunkState::Stored { .. } => {
            let answer = responses.chunk(chunk::max_stored_len(len))?;
            Some(answer.map_err(|why| format!("missing or unreadable in the archive ({why})")))
        }
    };
    Ok(Fetched { entry, answer, len })
}

/// Checks one fetched chunk and hands its plaintext to `use_plain`; an
/// error from `use_plain` (writing the output) stops the restore, a chunk
/// that fails its checks is only counted and reported.
fn check(
    f: Fetched,
    codec: &ChunkCodec,
    sessions: &[SessionId],
    use_plain: impl FnOnce(&[u8]) -> Result<()>,
) -> Result<Checked> {
    let addr = f.entry.entry.addr;
    let outcome = match (f.answer, &f.entry.entry.state) {
        (None, _) => Ok(Chunk::Zero),
        (Some(Err(why)), _) => Err(why),
        (Some(Ok(data)), state) => {
            let origin = match state {
                ChunkState::Stored { origin: Some(o), .. } => o.as_str(),
                _ => sessions[f.entry.session].as_str(),
            };
            match chunk::unpack(data, state, f.len, codec, origin, addr, use_plain) {
                Ok(used) => {
                    used?;
                    Ok(Chunk::Stored)
                }
                Err(fault) => Err(fault.to_string()),
            }
        }
    };
    Ok(Checked { entry: f.entry, len: f.len, outcome })
}
