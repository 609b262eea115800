//! Tar sessions (`send --tarfile`): the chunks of a session as one ustar
//! stream, `chunks.tar`, in the session folder beside `info` and `manifest`.
//! Members are named like chunk files (`000123456/x0001234567890000`), in
//! increasing address order, so `tar -x` in the session folder yields the
//! folder layout.
//!
//! The writer is a minimal ustar writer (regular files only): a crate would
//! bring far more than the 512-byte header this needs. The reader never
//! trusts the file: every header's checksum, name, size and order is
//! checked.
//!
//! ## The index, `chunks.tar.idx`
//!
//! Beside the tar lies its index ([`TAR_INDEX_FILE`]): where each chunk's
//! data lies in the tar, sorted by address. A ReadChunk costs a binary
//! search by positioned reads in the index (one read when the chunks are
//! asked in order, as dom0 does) and two in the tar (the member's header,
//! checked, then its data), and the receiver holds no memory per chunk.
//! Before the index was a file, it was built in memory from the tar's
//! headers: 24 bytes per chunk, 192 MiB per cached session of a 1 TiB
//! volume at 128 KiB chunks.
//!
//! ```text
//! header   8 bytes  "SBTIDX" + two-digit version ("SBTIDX01")
//!          8 bytes  length of the tar file it indexes (u64 big-endian)
//!          8 bytes  number of records (u64 big-endian)
//! records 20 bytes each, strictly increasing address:
//!          address (u64 BE), offset of the data in the tar (u64 BE), length (u32 BE)
//! ```
//!
//! [`TarWriter`] streams the records out while it appends (the writer
//! refuses chunks out of address order, so they come sorted) and writes the
//! header last, in `finish`, before the session writer's `syncfs` and
//! rename: a committed tar session always has its index, and an index
//! without its header (all zeros) is never taken for one.
//!
//! [`TarIndex::open`] checks an index against its tar before using it, in
//! one sequential pass: the header, the tar's length, the file's length
//! against the record count, every record in the tar and no longer than any
//! chunk, addresses strictly increasing, members back to back from the
//! tar's start with its end block after the last (so the index lists every
//! member and only those). It checks again whatever it reads later, and the
//! tar header in front of each chunk it returns, so a damaged or swapped
//! index yields an error naming the file, never a panic, an unbounded
//! allocation or another chunk's bytes.
//!
//! A session without a valid index (written before indexes existed, or
//! damaged: a warning says so) gets one built on first use, by one
//! streaming pass over the tar's headers. The members must be in strictly
//! increasing address order (what every sparsebak writer did), so the
//! records are written as they are found, with no sort and no memory per
//! chunk; a tar out of order is refused, not sorted. The index goes beside
//! the tar (`chunks.tar.idx.new` under a lock, fsync, rename). When it
//! cannot (a backup disk mounted read-only, another receiver building the
//! same index) it goes to an unnamed file in the system's temp folder,
//! which lives as long as the open index and is built again next time.

use crate::archive::MAX_CHUNK_FILE;
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sparsebak_fsutil::{fsync_dir, with_suffix};
use sparsebak_proto::layout::{chunk_rel_path, TAR_INDEX_FILE};
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const BLOCK: usize = 512;
/// [`BLOCK`] for offset arithmetic.
const BLOCK_U64: u64 = BLOCK as u64;

/// What an index starts with, before its two-digit version.
const INDEX_MAGIC: &[u8; 6] = b"SBTIDX";
/// The index format this sparsebak writes and reads. An index of any other
/// version is rebuilt: it holds nothing the tar does not.
pub const INDEX_VERSION: u32 = 1;
/// Magic and version, tar length, record count.
const INDEX_HEADER: u64 = 24;
/// Address, offset, length.
const RECORD: u64 = 20;
/// Records read at once by the pass that checks a whole index.
const RECORDS_PER_READ: u64 = 4096;

/// The index's path for a tar's path: [`TAR_INDEX_FILE`] in its folder.
pub fn index_path(tar: &Path) -> PathBuf {
    tar.with_file_name(TAR_INDEX_FILE)
}

/// One record of the index: where chunk `addr`'s data lies in the tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    addr: u64,
    offset: u64,
    len: u32,
}

impl Record {
    fn encode(&self) -> [u8; RECORD as usize] {
        let mut r = [0u8; RECORD as usize];
        r[..8].copy_from_slice(&self.addr.to_be_bytes());
        r[8..16].copy_from_slice(&self.offset.to_be_bytes());
        r[16..].copy_from_slice(&self.len.to_be_bytes());
        r
    }

    fn decode(r: &[u8; RECORD as usize]) -> Record {
        let (mut addr, mut offset, mut len) = ([0u8; 8], [0u8; 8], [0u8; 4]);
        addr.copy_from_slice(&r[..8]);
        offset.copy_from_slice(&r[8..16]);
        len.copy_from_slice(&r[16..]);
        Record { addr: u64::from_be_bytes(addr), offset: u64::from_be_bytes(offset), len: u32::from_be_bytes(len) }
    }

    /// Whether the record can describe a member of a tar of `tar_len`
    /// bytes: data after a header block, block-aligned, no longer than any
    /// chunk, inside the file.
    fn check(&self, tar_len: u64) -> Result<()> {
        if u64::from(self.len) > MAX_CHUNK_FILE {
            bail!("chunk {:#018x} is {} bytes, larger than any chunk", self.addr, self.len);
        }
        let inside = self.offset.checked_add(u64::from(self.len)).is_some_and(|end| end <= tar_len);
        if self.offset < BLOCK_U64 || self.offset & (BLOCK_U64 - 1) != 0 || !inside {
            bail!("chunk {:#018x} at byte {} is outside the tar ({tar_len} bytes)", self.addr, self.offset);
        }
        Ok(())
    }
}

/// The index header for `count` records of a tar of `tar_len` bytes.
fn index_header(tar_len: u64, count: u64) -> [u8; INDEX_HEADER as usize] {
    let mut h = [0u8; INDEX_HEADER as usize];
    h[..6].copy_from_slice(INDEX_MAGIC);
    h[6..8].copy_from_slice(format!("{INDEX_VERSION:02}").as_bytes());
    h[8..16].copy_from_slice(&tar_len.to_be_bytes());
    h[16..24].copy_from_slice(&count.to_be_bytes());
    h
}

/// Streams records to an index file: a zero header first, the real one
/// once the records are all out (so an unfinished index is never valid).
struct IndexWriter {
    out: BufWriter<File>,
    count: u64,
}

impl IndexWriter {
    fn start(file: File) -> std::io::Result<IndexWriter> {
        let mut out = BufWriter::with_capacity(1 << 16, file);
        out.write_all(&[0u8; INDEX_HEADER as usize])?;
        Ok(IndexWriter { out, count: 0 })
    }

    fn push(&mut self, record: Record) -> std::io::Result<()> {
        self.out.write_all(&record.encode())?;
        self.count += 1;
        Ok(())
    }

    /// Writes the header; the file, for reading or syncing.
    fn finish(self, tar_len: u64) -> std::io::Result<(File, u64)> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.write_all_at(&index_header(tar_len, self.count), 0)?;
        Ok((file, self.count))
    }
}

/// Appends chunks to a new tar file, and their records to its index.
pub struct TarWriter {
    out: BufWriter<File>,
    path: PathBuf,
    index: IndexWriter,
    index_path: PathBuf,
    /// Bytes of the tar written so far.
    at: u64,
    last: Option<u64>,
}

impl TarWriter {
    /// Creates `path` and its index beside it (neither may exist).
    pub fn create(path: &Path) -> Result<TarWriter> {
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let index_path = index_path(path);
        let index = File::options()
            .write(true)
            .create_new(true)
            .open(&index_path)
            .and_then(IndexWriter::start)
            .with_context(|| format!("creating {}", index_path.display()))?;
        Ok(TarWriter {
            out: BufWriter::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            index,
            index_path,
            at: 0,
            last: None,
        })
    }

    pub fn append(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        if self.last.is_some_and(|l| l >= addr) {
            bail!("chunk {addr:#018x} out of order for {}", self.path.display());
        }
        let len = u32::try_from(data.len()).ok().filter(|&l| u64::from(l) <= MAX_CHUNK_FILE).with_context(|| {
            format!("chunk {addr:#018x} of {} bytes is larger than any chunk ({})", data.len(), self.path.display())
        })?;
        self.last = Some(addr);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(&header(&chunk_rel_path(addr), data.len() as u64))?;
            out.write_all(data)?;
            out.write_all(&[0u8; BLOCK][..pad])
        };
        write(&mut self.out).with_context(|| format!("writing chunk {addr:#018x} to {}", self.path.display()))?;
        let record = Record { addr, offset: self.at + BLOCK_U64, len };
        self.at += BLOCK_U64 + u64::from(len) + pad as u64;
        self.index.push(record).with_context(|| format!("writing {}", self.index_path.display()))
    }

    /// Writes the end-of-archive blocks and the index's header, and flushes
    /// both. The caller syncs: the session writer's `syncfs` before its
    /// rename covers the tar and its index.
    pub fn finish(mut self) -> Result<()> {
        self.out
            .write_all(&[0u8; 2 * BLOCK])
            .and_then(|_| self.out.flush())
            .with_context(|| format!("finishing {}", self.path.display()))?;
        let tar_len = self.at + 2 * BLOCK_U64;
        self.index.finish(tar_len).with_context(|| format!("finishing {}", self.index_path.display()))?;
        Ok(())
    }
}

/// A ustar header for a regular file.
fn header(name: &str, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum = checksum(&h);
    put_octal(&mut h[148..155], sum);
    h[155] = b' ';
    h
}

/// Zero-padded octal digits followed by a NUL, filling `field`.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// Sum of the header's bytes with the checksum field counted as spaces.
fn checksum(h: &[u8; BLOCK]) -> u64 {
    h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum()
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == '\0' || c == ' ');
    if text.is_empty() {
        return None;
    }
    u64::from_str_radix(text, 8).ok()
}

/// Where each chunk of a tar session lies: the tar and its index, both
/// open, and a few numbers. Nothing here grows with the number of chunks.
pub struct TarIndex {
    tar: File,
    path: PathBuf,
    tar_len: u64,
    index: File,
    /// The index's path, or where an unnamed one stands in for it.
    index_name: PathBuf,
    count: u64,
    /// The record after the last one found: dom0 reads a session's chunks
    /// in increasing address order, so that is usually the next one asked.
    next: Cell<u64>,
}

impl TarIndex {
    /// Opens the tar at `path` with its index, building the index when
    /// there is no valid one (see the module's doc).
    pub fn open(path: &Path) -> Result<TarIndex> {
        let tar = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let tar_len = tar.metadata().with_context(|| format!("stat {}", path.display()))?.len();
        let beside = index_path(path);
        let (index, count, index_name) = match open_index(&beside, &tar, tar_len) {
            Ok(Some((index, count))) => (index, count, beside),
            Ok(None) => build_index(&tar, path, tar_len, &beside)?,
            Err(e) => {
                eprintln!("sparsebak-vm: warning: {e:#}; rebuilding it from {}", path.display());
                build_index(&tar, path, tar_len, &beside)?
            }
        };
        Ok(TarIndex { tar, path: path.to_path_buf(), tar_len, index, index_name, count, next: Cell::new(0) })
    }

    /// The stored bytes of chunk `addr`, or `None` when the tar lacks it.
    pub fn read(&self, addr: u64) -> Option<Result<Vec<u8>>> {
        match self.find(addr) {
            Ok(None) => None,
            Ok(Some(record)) => Some(self.read_member(record)),
            Err(e) => Some(Err(e)),
        }
    }

    /// Number of chunks in the tar.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Where the index is read from: beside the tar, or a stand-in.
    #[cfg(test)]
    pub fn index_name(&self) -> &Path {
        &self.index_name
    }

    /// Record `i`, checked again (the file may have changed since open).
    fn record(&self, i: u64) -> Result<Record> {
        let mut r = [0u8; RECORD as usize];
        self.index
            .read_exact_at(&mut r, INDEX_HEADER + i * RECORD)
            .with_context(|| format!("reading {}", self.index_name.display()))?;
        let record = Record::decode(&r);
        record.check(self.tar_len).with_context(|| format!("{}: damaged record {i}", self.index_name.display()))?;
        Ok(record)
    }

    /// The record of `addr`: the one after the last hit if it is that,
    /// else a binary search that also checks the order of what it sees.
    fn find(&self, addr: u64) -> Result<Option<Record>> {
        let hint = self.next.get();
        if hint < self.count {
            let r = self.record(hint)?;
            if r.addr == addr {
                self.next.set(hint + 1);
                return Ok(Some(r));
            }
        }
        // Records [lo, hi) may hold `addr`; `below`/`above` are the
        // addresses just outside, which every record inside must lie between.
        let (mut lo, mut hi) = (0u64, self.count);
        let (mut below, mut above) = (None::<u64>, None::<u64>);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let r = self.record(mid)?;
            if below.is_some_and(|b| r.addr <= b) || above.is_some_and(|a| r.addr >= a) {
                bail!("{}: addresses out of order at record {mid}", self.index_name.display());
            }
            match r.addr.cmp(&addr) {
                std::cmp::Ordering::Less => (lo, below) = (mid + 1, Some(r.addr)),
                std::cmp::Ordering::Greater => (hi, above) = (mid, Some(r.addr)),
                std::cmp::Ordering::Equal => {
                    self.next.set(mid + 1);
                    return Ok(Some(r));
                }
            }
        }
        Ok(None)
    }

    /// The chunk a record points at, after checking that the tar's own
    /// header in front of it names that chunk and that size.
    fn read_member(&self, r: Record) -> Result<Vec<u8>> {
        let what = || format!("reading chunk {:#018x} from {}", r.addr, self.path.display());
        let mut h = [0u8; BLOCK];
        self.tar.read_exact_at(&mut h, r.offset - BLOCK_U64).with_context(what)?;
        let found = parse_header(&h).with_context(|| {
            format!(
                "{}: bad tar header at byte {} (index {})",
                self.path.display(),
                r.offset - BLOCK_U64,
                self.index_name.display()
            )
        })?;
        if found != (r.addr, u64::from(r.len)) {
            bail!(
                "{}: the index {} does not match the tar at byte {} (chunk {:#018x})",
                self.path.display(),
                self.index_name.display(),
                r.offset - BLOCK_U64,
                r.addr
            );
        }
        let mut data = vec![0u8; r.len as usize];
        self.tar.read_exact_at(&mut data, r.offset).with_context(what)?;
        Ok(data)
    }
}

/// Opens a file for reading without following a link or blocking on a FIFO.
fn open_plain(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK).open(path)
}

/// The index at `path` and its record count when it is a valid index of
/// `tar` (`tar_len` bytes); `None` when there is none; an error saying what
/// is wrong with it otherwise. Reads it once from end to end, and one block
/// of the tar.
fn open_index(path: &Path, tar: &File, tar_len: u64) -> Result<Option<(File, u64)>> {
    let file = match open_plain(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening tar index {}", path.display())),
    };
    let count = check_index(&file, tar, tar_len).with_context(|| format!("tar index {}", path.display()))?;
    Ok(Some((file, count)))
}

/// Checks a whole index against its tar; its record count.
fn check_index(file: &File, tar: &File, tar_len: u64) -> Result<u64> {
    let meta = file.metadata().context("stat")?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    let len = meta.len();
    let mut h = [0u8; INDEX_HEADER as usize];
    if len < INDEX_HEADER {
        bail!("truncated: {len} bytes");
    }
    file.read_exact_at(&mut h, 0).context("reading the header")?;
    if &h[..6] != INDEX_MAGIC {
        bail!("not a tar index (no SBTIDX header)");
    }
    let version = std::str::from_utf8(&h[6..8]).ok().and_then(|v| v.parse::<u32>().ok());
    if version != Some(INDEX_VERSION) {
        bail!("format version {:?}, not {INDEX_VERSION}", String::from_utf8_lossy(&h[6..8]));
    }
    let field = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let (indexed_len, count) = (field(8), field(16));
    if indexed_len != tar_len {
        bail!("made for a tar of {indexed_len} bytes, the tar has {tar_len}");
    }
    let expected = count.checked_mul(RECORD).and_then(|r| r.checked_add(INDEX_HEADER));
    if expected != Some(len) {
        bail!("{len} bytes for {count} records");
    }
    // The members lie back to back from the start of the tar, each a
    // header block and its padded data, and the block after the last is the
    // end of the archive: so the index lists every member, and only those.
    let mut buf = vec![0u8; (RECORDS_PER_READ * RECORD) as usize];
    let mut prev: Option<u64> = None;
    let mut next_header = 0u64;
    let mut i = 0u64;
    while i < count {
        let n = RECORDS_PER_READ.min(count - i);
        let bytes = &mut buf[..(n * RECORD) as usize];
        file.read_exact_at(bytes, INDEX_HEADER + i * RECORD).context("reading records")?;
        for (j, raw) in bytes.chunks_exact(RECORD as usize).enumerate() {
            let mut r = [0u8; RECORD as usize];
            r.copy_from_slice(raw);
            let r = Record::decode(&r);
            let at = i + j as u64;
            r.check(tar_len).with_context(|| format!("record {at}"))?;
            if prev.is_some_and(|p| r.addr <= p) {
                bail!("record {at}: addresses out of order");
            }
            if r.offset != next_header + BLOCK_U64 {
                bail!("record {at}: chunk at byte {}, the member there starts at byte {next_header}", r.offset);
            }
            prev = Some(r.addr);
            // In range: check() bounds offset + len by the tar's length.
            next_header = r.offset + u64::from(r.len).div_ceil(BLOCK_U64) * BLOCK_U64;
        }
        i += n;
    }
    let mut end = [0u8; BLOCK];
    if next_header + BLOCK_U64 > tar_len {
        bail!("the tar has no end block after its last chunk");
    }
    tar.read_exact_at(&mut end, next_header).context("reading the tar")?;
    if end.iter().any(|&b| b != 0) {
        bail!("the tar has members past its last record (at byte {next_header})");
    }
    Ok(count)
}

/// Why building an index failed: the tar (no index can be made from it),
/// or the file the index was going to.
enum BuildError {
    Tar(anyhow::Error),
    Index(anyhow::Error),
}

/// Builds the index of the tar at `tar_path`: beside it when it can, else
/// in an unnamed temp file. The index, its record count, its name.
fn build_index(tar: &File, tar_path: &Path, tar_len: u64, beside: &Path) -> Result<(File, u64, PathBuf)> {
    if let Ok(locked) = create_beside(beside) {
        let tmp = with_suffix(beside, ".new");
        match write_index(tar, tar_path, tar_len, &locked) {
            Ok((index, count)) => {
                // What was written is a good index for this receiver even
                // when it cannot be put in place; then it just has no name.
                if index.sync_all().and_then(|_| std::fs::rename(&tmp, beside)).is_ok() {
                    // A lost rename only means building it again later.
                    let _ = beside.parent().map(fsync_dir);
                    return Ok((index, count, beside.to_path_buf()));
                }
                let _ = std::fs::remove_file(&tmp);
                return Ok((index, count, unnamed_index_name()));
            }
            Err(BuildError::Tar(e)) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            Err(BuildError::Index(_)) => {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    let (file, name) = unnamed_temp_file()?;
    match write_index(tar, tar_path, tar_len, &file) {
        Ok((index, count)) => Ok((index, count, name)),
        Err(BuildError::Tar(e)) => Err(e),
        Err(BuildError::Index(e)) => Err(e.context(format!("building the index of {}", tar_path.display()))),
    }
}

/// `INDEX.new`, empty, locked against another receiver building the same
/// index; fails when the folder cannot be written or it is in use.
fn create_beside(beside: &Path) -> Result<Flock<File>> {
    let tmp = with_suffix(beside, ".new");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow!("{} is in use: {e}", tmp.display()))?;
    // Another receiver may have renamed this file into place between our
    // open and our lock: then it is its index, not ours to truncate.
    let ours = locked.metadata().with_context(|| format!("stat {}", tmp.display()))?;
    let named = std::fs::symlink_metadata(&tmp).with_context(|| format!("stat {}", tmp.display()))?;
    if !ours.is_file() || (ours.dev(), ours.ino()) != (named.dev(), named.ino()) {
        bail!("{} changed while opening it", tmp.display());
    }
    locked.set_len(0).with_context(|| format!("truncating {}", tmp.display()))?;
    Ok(locked)
}

/// How messages name an index that has no name of its own.
fn unnamed_index_name() -> PathBuf {
    std::env::temp_dir().join("(unnamed tar index)")
}

/// A temp file with no name, for an index that cannot be written beside
/// its tar; and a name for it in messages.
fn unnamed_temp_file() -> Result<(File, PathBuf)> {
    let dir = std::env::temp_dir();
    let name = unnamed_index_name();
    let tmpfile = OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(nix::libc::O_TMPFILE).open(&dir);
    if let Ok(f) = tmpfile {
        return Ok((f, name));
    }
    // No O_TMPFILE on this filesystem: a fresh name, removed at once.
    for n in 0..1000 {
        let path = dir.join(format!(".sparsebak-vm-index-{}-{n}", std::process::id()));
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path);
        match created {
            Ok(f) => {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                return Ok((f, name));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating a temp file in {}", dir.display())),
        }
    }
    bail!("no free temp file name in {}", dir.display())
}

/// Scans the tar's headers into an index written to `out` (empty).
fn write_index(tar: &File, tar_path: &Path, tar_len: u64, out: &File) -> Result<(File, u64), BuildError> {
    let index_err = |e: std::io::Error| BuildError::Index(anyhow::Error::from(e).context("writing a tar index"));
    let mut index = out.try_clone().and_then(IndexWriter::start).map_err(index_err)?;
    let mut push_err = None;
    scan(tar, tar_path, tar_len, |record| {
        index.push(record).map_err(|e| {
            push_err = Some(e);
            anyhow!("stopped")
        })
    })
    .map_err(|e| match push_err.take() {
        Some(io) => index_err(io),
        None => BuildError::Tar(e),
    })?;
    index.finish(tar_len).map_err(index_err)
}

/// Reads every header of the tar (skipping the data), checks it, and hands
/// each member's record to `each`, in order. Refuses members out of
/// address order (see the module's doc).
fn scan(tar: &File, path: &Path, len: u64, mut each: impl FnMut(Record) -> Result<()>) -> Result<()> {
    let mut last: Option<u64> = None;
    let mut at = 0u64;
    let mut h = [0u8; BLOCK];
    loop {
        if at + BLOCK_U64 > len {
            bail!("{} is truncated at byte {at}", path.display());
        }
        tar.read_exact_at(&mut h, at).with_context(|| format!("reading {}", path.display()))?;
        if h.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let (addr, size) =
            parse_header(&h).with_context(|| format!("{}: bad tar header at byte {at}", path.display()))?;
        if last.is_some_and(|last| last >= addr) {
            bail!("{}: chunk {addr:#018x} out of order at byte {at}", path.display());
        }
        last = Some(addr);
        let data = at + BLOCK_U64;
        if data + size > len {
            bail!("{}: chunk {addr:#018x} runs past the end of the file", path.display());
        }
        // parse_header bounds the size by MAX_CHUNK_FILE, far below 4 GiB.
        let len32 = u32::try_from(size).with_context(|| format!("{}: chunk {addr:#018x} too large", path.display()))?;
        each(Record { addr, offset: data, len: len32 })?;
        at = data + size.div_ceil(BLOCK_U64) * BLOCK_U64;
    }
}

/// Checks a member header: checksum, a regular file named like a chunk,
/// a size no chunk exceeds. Returns (address, size).
fn parse_header(h: &[u8; BLOCK]) -> Result<(u64, u64)> {
    let stored = parse_octal(&h[148..156]).context("unreadable checksum")?;
    if stored != checksum(h) {
        bail!("checksum mismatch");
    }
    if !matches!(h[156], b'0' | 0) {
        bail!("member is not a regular file");
    }
    let name_len = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = std::str::from_utf8(&h[..name_len]).context("member name is not UTF-8")?;
    // A chunk's name ends in its 16-digit address; whatever else it holds
    // must be exactly what `chunk_rel_path` makes of that address.
    let addr = name
        .get(name.len().saturating_sub(16)..)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .filter(|&addr| chunk_rel_path(addr) == name)
        .with_context(|| format!("member {name:?} is not a chunk"))?;
    if h[345] != 0 {
        bail!("member {name:?} is not a chunk");
    }
    let size = parse_octal(&h[124..136]).context("unreadable size")?;
    if size > MAX_CHUNK_FILE {
        bail!("member {name:?} is {size} bytes, larger than any chunk");
    }
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparsebak_proto::layout::TAR_FILE;

    fn write_tar(path: &Path, chunks: &[(u64, Vec<u8>)]) {
        let mut w = TarWriter::create(path).expect("create");
        for (a, d) in chunks {
            w.append(*a, d).expect("append");
        }
        w.finish().expect("finish");
    }

    /// Chunks of varied sizes (empty, within a block, over several) at
    /// addresses with gaps.
    fn many_chunks(n: u64) -> Vec<(u64, Vec<u8>)> {
        (0..n).map(|i| ((i * 3) << 17, vec![i as u8; (i as usize * 37) % 1500])).collect()
    }

    fn read_all(idx: &TarIndex, chunks: &[(u64, Vec<u8>)]) {
        for (a, d) in chunks {
            assert_eq!(&idx.read(*a).expect("present").expect("reads"), d, "chunk {a:#x}");
        }
    }

    #[test]
    fn round_trip_and_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = vec![(0u64, vec![1u8; 700]), (0x20000, vec![]), (0x1_2345_6000_0000, vec![9u8; 512])];
        write_tar(&path, &chunks);
        let idx = TarIndex::open(&path).expect("index");
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.index_name(), index_path(&path));
        read_all(&idx, &chunks);
        assert!(idx.read(0x40000).is_none());
    }

    #[test]
    fn many_chunks_hit_and_miss_in_any_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = many_chunks(5000);
        write_tar(&path, &chunks);
        let idx = TarIndex::open(&path).expect("index");
        assert_eq!(idx.len(), 5000);
        let index_len = std::fs::metadata(index_path(&path)).expect("index written").len();
        assert_eq!(index_len, INDEX_HEADER + 5000 * RECORD);
        // In order (the hint), backwards and scattered (the search).
        read_all(&idx, &chunks);
        for (a, d) in chunks.iter().rev() {
            assert_eq!(&idx.read(*a).expect("present").expect("reads"), d);
        }
        for i in (0..5000u64).map(|i| (i * 7919) % 5000) {
            let (a, d) = &chunks[i as usize];
            assert_eq!(&idx.read(*a).expect("present").expect("reads"), d);
        }
        // Misses: between chunks, before the first is impossible (0 is
        // there), after the last, and the largest address.
        for miss in [1u64 << 17, 2 << 17, (3 * 4999 + 1) << 17, u64::MAX, 5] {
            assert!(idx.read(miss).is_none(), "{miss:#x}");
        }
    }

    #[test]
    fn an_empty_tar_has_an_empty_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        write_tar(&path, &[]);
        let idx = TarIndex::open(&path).expect("index");
        assert_eq!(idx.len(), 0);
        assert!(idx.read(0).is_none());
    }

    #[test]
    fn system_tar_reads_our_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        write_tar(&path, &[(0x20000, b"hello".to_vec()), (0x40000, vec![7u8; 1000])]);
        let out = std::process::Command::new("tar").arg("-tvf").arg(&path).output().unwrap_or_else(|e| {
            panic!("running tar(1) failed ({e}): tar is a test dependency (scripts/test-all.sh); install it")
        });
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("000000000/x0000000000020000") && text.contains("000000000/x0000000000040000"), "{text}");
        assert_eq!(text.lines().count(), 2, "only the chunks are members: {text}");
    }

    #[test]
    fn damaged_tars_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        write_tar(&path, &[(0x20000, vec![5u8; 600]), (0x40000, vec![6u8; 10])]);
        let good = std::fs::read(&path).expect("read");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("checksum", {
                let mut b = good.clone();
                b[10] ^= 1;
                b
            }),
            ("truncated", good[..good.len() - 1100].to_vec()),
            ("no end", good[..BLOCK].to_vec()),
        ];
        // Without an index, so each is found by the pass that builds one.
        for (what, bytes) in cases {
            let _ = std::fs::remove_file(index_path(&path));
            std::fs::write(&path, &bytes).expect("write");
            assert!(TarIndex::open(&path).is_err(), "{what}");
            assert!(!index_path(&path).exists(), "no index of a damaged tar: {what}");
            assert!(!with_suffix(&index_path(&path), ".new").exists(), "no temp index left: {what}");
        }
        // A member that is not a chunk (valid checksum).
        std::fs::remove_file(&path).expect("rm");
        let mut h = header("../../etc/passwd", 3);
        h[0] = b'.';
        let mut bytes = h.to_vec();
        bytes.extend_from_slice(&[0u8; 3 * BLOCK]);
        std::fs::write(&path, &bytes).expect("write");
        let err = TarIndex::open(&path).err().expect("refused");
        assert!(format!("{err:#}").contains("not a chunk"), "{err:#}");
        // Out of order: refused, not sorted.
        let mut bytes = header(&chunk_rel_path(0x40000), 0).to_vec();
        bytes.extend_from_slice(&header(&chunk_rel_path(0x20000), 0));
        bytes.extend_from_slice(&[0u8; 2 * BLOCK]);
        std::fs::write(&path, &bytes).expect("write");
        assert!(format!("{:#}", TarIndex::open(&path).err().expect("refused")).contains("out of order"));
    }

    #[test]
    fn a_tar_damaged_under_a_good_index_fails_the_read_not_the_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        write_tar(&path, &[(0x20000, vec![5u8; 600]), (0x40000, vec![6u8; 10])]);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[3 * BLOCK + 10] ^= 1; // the second member's header
        std::fs::write(&path, &bytes).expect("write");
        let idx = TarIndex::open(&path).expect("the index still fits the tar's length");
        assert_eq!(idx.read(0x20000).expect("present").expect("first is fine"), vec![5u8; 600]);
        let err = idx.read(0x40000).expect("in the index").expect_err("header checked");
        assert!(format!("{err:#}").contains("bad tar header"), "{err:#}");
    }

    /// A session from before indexes: its index is built on first use,
    /// byte for byte what the writer makes, and written beside the tar.
    #[test]
    fn an_old_session_gets_its_index_built_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = many_chunks(3000);
        write_tar(&path, &chunks);
        let written = std::fs::read(index_path(&path)).expect("index");
        std::fs::remove_file(index_path(&path)).expect("rm");
        let idx = TarIndex::open(&path).expect("built");
        assert_eq!(idx.index_name(), index_path(&path));
        assert_eq!(std::fs::read(index_path(&path)).expect("built beside"), written);
        assert!(!with_suffix(&index_path(&path), ".new").exists());
        read_all(&idx, &chunks);
        assert!(idx.read(1 << 17).is_none());
        // A leftover temp index of a killed build is simply replaced.
        std::fs::remove_file(index_path(&path)).expect("rm");
        std::fs::write(with_suffix(&index_path(&path), ".new"), vec![7u8; 100_000]).expect("leftover");
        read_all(&TarIndex::open(&path).expect("built"), &chunks);
        assert_eq!(std::fs::read(index_path(&path)).expect("built beside"), written);
    }

    /// Every kind of damage to the index: rebuilt from the tar, with the
    /// same bytes as the writer's, and every chunk reads.
    #[test]
    fn a_damaged_index_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = many_chunks(50);
        write_tar(&path, &chunks);
        let good = std::fs::read(index_path(&path)).expect("index");
        let rec = |i: usize| INDEX_HEADER as usize + i * RECORD as usize;
        let patched = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        // Consistent in itself (count and length agree) but one member short.
        let without = |i: usize| {
            let mut b = good[..rec(i)].to_vec();
            b.extend_from_slice(&good[rec(i + 1)..]);
            b[16..24].copy_from_slice(&49u64.to_be_bytes());
            b
        };
        let swapped = {
            let mut b = good.clone();
            let (r3, r4) = (good[rec(3)..rec(4)].to_vec(), good[rec(4)..rec(5)].to_vec());
            b[rec(3)..rec(4)].copy_from_slice(&r4);
            b[rec(4)..rec(5)].copy_from_slice(&r3);
            b
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("header only", good[..INDEX_HEADER as usize].to_vec()),
            ("truncated by a byte", good[..good.len() - 1].to_vec()),
            ("a record short", good[..good.len() - RECORD as usize].to_vec()),
            ("unfinished (zero header)", patched(0, &[0u8; 24])),
            ("bad magic", patched(0, b"XBTIDX")),
            ("newer version", patched(6, b"02")),
            ("garbled version", patched(6, b"x1")),
            ("other tar length", patched(8, &1u64.to_be_bytes())),
            ("huge count", patched(16, &u64::MAX.to_be_bytes())),
            ("unsorted", swapped),
            ("duplicate address", patched(rec(5), &good[rec(4)..rec(4) + 8])),
            ("offset past the end", patched(rec(7) + 8, &(1u64 << 40).to_be_bytes())),
            ("offset overflows", patched(rec(7) + 8, &(u64::MAX - 511).to_be_bytes())),
            ("offset unaligned", patched(rec(7) + 8, &513u64.to_be_bytes())),
            ("offset in the header", patched(rec(0) + 8, &0u64.to_be_bytes())),
            ("overlapping", patched(rec(8) + 8, &good[rec(7) + 8..rec(7) + 16])),
            ("a record dropped", without(20)),
            ("the last record dropped", without(49)),
            ("length over the cap", patched(rec(9) + 16, &u32::MAX.to_be_bytes())),
        ];
        for (what, bytes) in cases {
            std::fs::write(index_path(&path), &bytes).expect("write");
            let idx = TarIndex::open(&path).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert_eq!(std::fs::read(index_path(&path)).expect("rebuilt"), good, "{what}");
            read_all(&idx, &chunks);
        }
        // Not a file: a FIFO is neither followed nor waited on.
        std::fs::remove_file(index_path(&path)).expect("rm");
        nix::unistd::mkfifo(&index_path(&path), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        read_all(&TarIndex::open(&path).expect("rebuilt"), &chunks);
        assert_eq!(std::fs::read(index_path(&path)).expect("rebuilt"), good);
        // Both damaged: one error naming the tar.
        std::fs::write(index_path(&path), b"junk").expect("write");
        let mut tar = std::fs::read(&path).expect("read");
        tar[20] ^= 1;
        std::fs::write(&path, &tar).expect("write");
        let err = TarIndex::open(&path).err().expect("refused");
        assert!(format!("{err:#}").contains(&path.display().to_string()), "{err:#}");
    }

    /// An index damaged after it was opened (or a good one made to point
    /// at another chunk): the read fails with a message naming the files.
    #[test]
    fn an_index_damaged_while_open_fails_reads_without_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = many_chunks(100);
        write_tar(&path, &chunks);
        let idx = TarIndex::open(&path).expect("index");
        let good = std::fs::read(index_path(&path)).expect("index");
        let rec = |i: usize| INDEX_HEADER as usize + i * RECORD as usize;
        // Record 10 points at chunk 11's data: its tar header says so.
        let mut b = good.clone();
        b.copy_within(rec(11) + 8..rec(12), rec(10) + 8);
        std::fs::write(index_path(&path), &b).expect("write");
        let err = idx.read(chunks[10].0).expect("listed").expect_err("mismatch");
        assert!(format!("{err:#}").contains("does not match the tar"), "{err:#}");
        // Records out of order on the search's path: record 50 (the first
        // probe) sends it down, record 25 (the next) lies above record 50.
        let mut b = good.clone();
        b[rec(25)..rec(25) + 8].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
        std::fs::write(index_path(&path), &b).expect("write");
        let err = idx.read(chunks[30].0).expect("searched").expect_err("order");
        assert!(format!("{err:#}").contains("out of order"), "{err:#}");
        // A length over the cap is never allocated.
        let mut b = good.clone();
        b[rec(60) + 16..rec(61)].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(index_path(&path), &b).expect("write");
        let err = idx.read(chunks[60].0).expect("listed").expect_err("cap");
        assert!(format!("{err:#}").contains("larger than any chunk"), "{err:#}");
        // Truncated: reads past its end fail.
        std::fs::write(index_path(&path), &good[..rec(1)]).expect("write");
        assert!(idx.read(chunks[70].0).expect("searched").is_err());
    }

    /// Where the index cannot be written beside the tar (here: its names
    /// are taken by folders, as a read-only folder refuses them), it goes
    /// to an unnamed temp file, and reads work the same.
    #[test]
    fn an_index_that_cannot_be_written_beside_goes_to_a_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = many_chunks(500);
        write_tar(&path, &chunks);
        std::fs::remove_file(index_path(&path)).expect("rm");
        let tmp = with_suffix(&index_path(&path), ".new");
        std::fs::create_dir(&tmp).expect("mkdir");
        let idx = TarIndex::open(&path).expect("fallback");
        assert!(idx.index_name().starts_with(std::env::temp_dir()), "{}", idx.index_name().display());
        assert!(!index_path(&path).exists());
        read_all(&idx, &chunks);
        assert!(idx.read(1 << 17).is_none());
        // The temp name is free but the final one cannot be replaced.
        std::fs::remove_dir(&tmp).expect("rmdir");
        std::fs::create_dir(index_path(&path)).expect("mkdir");
        let idx = TarIndex::open(&path).expect("fallback");
        read_all(&idx, &chunks);
        assert!(!tmp.exists(), "no temp index left");
        // Another receiver building the same index holds the lock.
        std::fs::remove_dir(index_path(&path)).expect("rmdir");
        let busy = Flock::lock(File::create(&tmp).expect("create"), FlockArg::LockExclusive).expect("lock");
        let idx = TarIndex::open(&path).expect("fallback");
        read_all(&idx, &chunks);
        assert!(!index_path(&path).exists(), "left to the other builder");
        drop(busy);
    }

    /// The index object holds no memory per chunk: its size is fixed, and
    /// it reads everything from the two files (`sparsebak-vm/tests/tar_index.rs`
    /// measures the real receiver's peak memory).
    #[test]
    fn the_index_object_is_small_and_fixed() {
        assert!(std::mem::size_of::<TarIndex>() <= 128, "{}", std::mem::size_of::<TarIndex>());
    }
}
