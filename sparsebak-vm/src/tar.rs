//! Tar sessions (`send --tarfile`): the chunks of a session as one ustar
//! stream, `chunks.tar`, in the session folder beside `info` and `manifest`.
//! Members are named like chunk files (`000123456/x0001234567890000`), in
//! increasing address order, so `tar -x` in the session folder yields the
//! folder layout.
//!
//! The writer is a minimal ustar writer (regular files only): a crate would
//! bring far more than the 512-byte header this needs. The reader never
//! trusts the file: every header's checksum, name, size and order is
//! checked, and reading it builds an index (address -> offset, length) held
//! in memory, 24 bytes per chunk, so ReadChunk costs one positioned read.

use crate::archive::MAX_CHUNK_FILE;
use anyhow::{bail, Context, Result};
use sparsebak_proto::layout::chunk_rel_path;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const BLOCK: usize = 512;

/// Appends chunks to a new tar file.
pub struct TarWriter {
    out: BufWriter<File>,
    path: PathBuf,
    last: Option<u64>,
}

impl TarWriter {
    pub fn create(path: &Path) -> Result<TarWriter> {
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(TarWriter { out: BufWriter::with_capacity(1 << 20, f), path: path.to_path_buf(), last: None })
    }

    pub fn append(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        if self.last.is_some_and(|l| l >= addr) {
            bail!("chunk {addr:#018x} out of order for {}", self.path.display());
        }
        self.last = Some(addr);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(&header(&chunk_rel_path(addr), data.len() as u64))?;
            out.write_all(data)?;
            out.write_all(&[0u8; BLOCK][..pad])
        };
        write(&mut self.out).with_context(|| format!("writing chunk {addr:#018x} to {}", self.path.display()))
    }

    /// Writes the end-of-archive blocks and flushes (the caller syncs).
    pub fn finish(mut self) -> Result<()> {
        self.out
            .write_all(&[0u8; 2 * BLOCK])
            .and_then(|_| self.out.flush())
            .with_context(|| format!("finishing {}", self.path.display()))
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

/// Where each chunk of a tar session lies.
pub struct TarIndex {
    file: File,
    path: PathBuf,
    /// (address, data offset, length), by increasing address.
    entries: Vec<(u64, u64, u32)>,
}

impl TarIndex {
    /// Reads every header of `path` (skipping the data) and checks it.
    pub fn open(path: &Path) -> Result<TarIndex> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("stat {}", path.display()))?.len();
        let mut entries: Vec<(u64, u64, u32)> = Vec::new();
        let mut at = 0u64;
        let mut h = [0u8; BLOCK];
        loop {
            if at + BLOCK as u64 > len {
                bail!("{} is truncated at byte {at}", path.display());
            }
            file.read_exact_at(&mut h, at).with_context(|| format!("reading {}", path.display()))?;
            if h.iter().all(|&b| b == 0) {
                break;
            }
            let (addr, size) =
                parse_header(&h).with_context(|| format!("{}: bad tar header at byte {at}", path.display()))?;
            if entries.last().is_some_and(|&(last, _, _)| last >= addr) {
                bail!("{}: chunk {addr:#018x} out of order at byte {at}", path.display());
            }
            let data = at + BLOCK as u64;
            if data + size > len {
                bail!("{}: chunk {addr:#018x} runs past the end of the file", path.display());
            }
            entries.push((addr, data, size as u32));
            at = data + size.div_ceil(BLOCK as u64) * BLOCK as u64;
        }
        Ok(TarIndex { file, path: path.to_path_buf(), entries })
    }

    /// The stored bytes of chunk `addr`, or `None` when the tar lacks it.
    pub fn read(&self, addr: u64) -> Option<Result<Vec<u8>>> {
        let i = self.entries.binary_search_by_key(&addr, |e| e.0).ok()?;
        let (_, offset, len) = self.entries[i];
        let mut data = vec![0u8; len as usize];
        Some(
            self.file
                .read_exact_at(&mut data, offset)
                .map(|_| data)
                .with_context(|| format!("reading chunk {addr:#018x} from {}", self.path.display())),
        )
    }

    /// Number of chunks in the tar.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
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

    #[test]
    fn round_trip_and_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        let chunks = vec![(0u64, vec![1u8; 700]), (0x20000, vec![]), (0x1_2345_6000_0000, vec![9u8; 512])];
        write_tar(&path, &chunks);
        let idx = TarIndex::open(&path).expect("index");
        assert_eq!(idx.len(), 3);
        for (a, d) in &chunks {
            assert_eq!(&idx.read(*a).expect("present").expect("reads"), d);
        }
        assert!(idx.read(0x40000).is_none());
    }

    #[test]
    fn system_tar_reads_our_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TAR_FILE);
        write_tar(&path, &[(0x20000, b"hello".to_vec()), (0x40000, vec![7u8; 1000])]);
        let Ok(out) = std::process::Command::new("tar").arg("-tvf").arg(&path).output() else {
            return; // no tar(1) here
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("000000000/x0000000000020000") && text.contains("000000000/x0000000000040000"), "{text}");
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
        for (what, bytes) in cases {
            std::fs::write(&path, &bytes).expect("write");
            assert!(TarIndex::open(&path).is_err(), "{what}");
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
        // Out of order.
        let mut bytes = header(&chunk_rel_path(0x40000), 0).to_vec();
        bytes.extend_from_slice(&header(&chunk_rel_path(0x20000), 0));
        bytes.extend_from_slice(&[0u8; 2 * BLOCK]);
        std::fs::write(&path, &bytes).expect("write");
        assert!(format!("{:#}", TarIndex::open(&path).err().expect("refused")).contains("out of order"));
    }
}
