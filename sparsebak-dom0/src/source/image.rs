//! Plain image files and block devices as volumes (`[var] localdir`).
//! Change detection reads the volume and compares chunk hashes with the last
//! session; holes of sparse files are skipped with SEEK_DATA, so a mostly
//! empty 1 TiB image costs what its data costs.

use anyhow::{bail, Context, Result};
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

pub struct ImageVolume {
    file: File,
    path: PathBuf,
    size: u64,
    /// The last SEEK_DATA answer: (queried offset, start of the next data
    /// region at or after it, `u64::MAX` when the rest is a hole).
    data_cache: Option<(u64, u64)>,
    holes_supported: bool,
}

impl ImageVolume {
    pub fn open(path: &Path) -> Result<ImageVolume> {
        let mut file = File::open(path).with_context(|| format!("opening volume {}", path.display()))?;
        let meta = file.metadata().with_context(|| format!("stat {}", path.display()))?;
        let ft = meta.file_type();
        let size = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() {
            file.seek(SeekFrom::End(0)).with_context(|| format!("size of {}", path.display()))?
        } else {
            bail!("volume {} is neither a regular file nor a block device", path.display());
        };
        Ok(ImageVolume { file, path: path.to_path_buf(), size, data_cache: None, holes_supported: ft.is_file() })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tells the kernel that reads will jump around (only the chunks an
    /// incremental send marked): no readahead into the chunks in between,
    /// which would otherwise be read from disk for nothing when marked
    /// chunks sit close together. Advice only; a failure changes nothing.
    pub fn advise_random(&self) {
        let _ =
            nix::fcntl::posix_fadvise(self.file.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
    }

    /// Reads `[addr, addr+buf.len())` into `buf`; false (and `buf` not
    /// written) when the whole range is a hole.
    pub fn read_chunk_into(&mut self, addr: u64, buf: &mut [u8]) -> Result<bool> {
        if self.is_hole(addr, buf.len() as u64)? {
            return Ok(false);
        }
        self.file.read_exact_at(buf, addr).with_context(|| format!("reading {} at {addr:#x}", self.path.display()))?;
        Ok(true)
    }

    fn is_hole(&mut self, addr: u64, len: u64) -> Result<bool> {
        Ok(self.next_data(addr)? >= addr.saturating_add(len))
    }

    /// The first offset at or after `from` that may hold data (`size` or
    /// beyond when only holes follow). Queries must move forward; the last
    /// answer is reused while it still covers `from`.
    pub fn next_data(&mut self, from: u64) -> Result<u64> {
        if !self.holes_supported {
            return Ok(from);
        }
        if let Some((queried, next)) = self.data_cache {
            if queried <= from && from < next {
                return Ok(next);
            }
            if next == from {
                return Ok(from);
            }
        }
        let next = match lseek(self.file.as_raw_fd(), from as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(nix::errno::Errno::ENXIO) => u64::MAX,
            Err(nix::errno::Errno::EINVAL) => {
                self.holes_supported = false;
                return Ok(from);
            }
            Err(e) => bail!("SEEK_DATA in {} at {from:#x}: {e}", self.path.display()),
        };
        self.data_cache = Some((from, next));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_are_reported_without_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse.img");
        let mut f = File::create(&path).expect("create");
        f.set_len(64 << 20).expect("set_len");
        f.seek(SeekFrom::Start(32 << 20)).expect("seek");
        f.write_all(&[7u8; 4096]).expect("write");
        drop(f);
        let mut v = ImageVolume::open(&path).expect("open");
        assert_eq!(v.size(), 64 << 20);
        let cs = 1 << 20;
        // tmpfs and ext4 report holes at page/block granularity; the first
        // chunk is a hole, the one holding data is not.
        let mut data = vec![0xeeu8; cs];
        assert!(!v.read_chunk_into(0, &mut data).expect("read"));
        assert!(data.iter().all(|&b| b == 0xee), "a hole leaves the buffer alone");
        assert!(v.read_chunk_into(32 << 20, &mut data).expect("read"));
        assert_eq!(&data[..4096], &[7u8; 4096][..]);
        assert!(data[4096..].iter().all(|&b| b == 0), "old buffer content overwritten");
        assert!(!v.read_chunk_into(63 << 20, &mut data).expect("read"));
        let mut v = ImageVolume::open(&path).expect("open");
        let first = v.next_data(0).expect("seek");
        assert!(first <= 32 << 20 && first > 16 << 20, "data found at {first:#x}");
        assert!(v.next_data((32 << 20) + 8192).expect("seek") >= 64 << 20);
    }
}
