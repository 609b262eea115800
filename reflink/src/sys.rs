//! The crate's only unsafe code: the two ioctls, FICLONE and FS_IOC_FIEMAP,
//! behind safe wrappers that take `&File`s and a buffer this module owns the
//! layout of. `lib.rs` allows `unsafe_code` for this module alone.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `FIEMAP_FLAG_SYNC`: write dirty pages back before mapping, so delayed
/// allocations get their real extents.
pub(crate) const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// Extents asked for per FIEMAP call (the buffer is 32 + 512 * 56 bytes).
pub(crate) const FIEMAP_BATCH: usize = 512;

/// `struct fiemap_extent` of `<linux/fiemap.h>`: 56 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FiemapExtent {
    pub fe_logical: u64,
    pub fe_physical: u64,
    pub fe_length: u64,
    pub fe_reserved64: [u64; 2],
    pub fe_flags: u32,
    pub fe_reserved: [u32; 3],
}

/// The fixed part of `struct fiemap` of `<linux/fiemap.h>` (32 bytes); the
/// kernel's struct ends in a flexible array of extents, which `FiemapBuf`
/// puts right after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FiemapHeader {
    pub fm_start: u64,
    pub fm_length: u64,
    pub fm_flags: u32,
    pub fm_mapped_extents: u32,
    pub fm_extent_count: u32,
    pub fm_reserved: u32,
}

/// A `struct fiemap` with room for `FIEMAP_BATCH` extents, laid out as the
/// kernel expects: the header, then the extents (no padding between: the
/// header is 32 bytes and both are 8-aligned; the tests check it).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct FiemapBuf {
    pub header: FiemapHeader,
    pub extents: [FiemapExtent; FIEMAP_BATCH],
}

impl FiemapBuf {
    pub(crate) fn new_boxed() -> Box<Self> {
        Box::new(FiemapBuf { header: FiemapHeader::default(), extents: [FiemapExtent::default(); FIEMAP_BATCH] })
    }
}

// FICLONE = _IOW(0x94, 9, int): `ioctl(dst_fd, FICLONE, src_fd)`.
nix::ioctl_write_int!(ioctl_ficlone, 0x94, 9);
// FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap), the size being that of the
// fixed part (32 bytes).
nix::ioctl_readwrite!(ioctl_fiemap, b'f', 11, FiemapHeader);

/// `ioctl(dst, FICLONE, src)`: make all of `dst` share `src`'s extents.
pub(crate) fn ficlone(dst: &File, src: &File) -> nix::Result<()> {
    let src_fd = nix::sys::ioctl::ioctl_param_type::try_from(src.as_raw_fd()).map_err(|_| nix::errno::Errno::EBADF)?;
    // SAFETY: FICLONE reads no memory of ours: its argument is the source
    // descriptor as an integer. Both descriptors belong to `File`s borrowed
    // for the whole call, so they are open and are the files meant.
    unsafe { ioctl_ficlone(dst.as_raw_fd(), src_fd) }.map(drop)
}

/// One `FS_IOC_FIEMAP` call on `file` with `buf`'s header as filled in by
/// the caller, except `fm_extent_count`, which is set here to the buffer's
/// real capacity.
pub(crate) fn fiemap(file: &File, buf: &mut FiemapBuf) -> nix::Result<()> {
    buf.header.fm_extent_count = FIEMAP_BATCH as u32;
    let ptr = std::ptr::from_mut::<FiemapBuf>(buf).cast::<FiemapHeader>();
    // SAFETY: `ptr` points at a live, exclusively borrowed `FiemapBuf`: a
    // `#[repr(C)]` header followed by `FIEMAP_BATCH` extents in the same
    // allocation, and `fm_extent_count` (set just above) tells the kernel
    // exactly that capacity, so it reads and writes only inside `*buf`. The
    // pointer is derived from the whole buffer, not from the header field,
    // so it is valid for all of it. All fields are plain integers: any bit
    // pattern the kernel writes is a valid value.
    unsafe { ioctl_fiemap(file.as_raw_fd(), ptr) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(size_of::<FiemapExtent>(), 56);
        assert_eq!(offset_of!(FiemapExtent, fe_logical), 0);
        assert_eq!(offset_of!(FiemapExtent, fe_physical), 8);
        assert_eq!(offset_of!(FiemapExtent, fe_length), 16);
        assert_eq!(offset_of!(FiemapExtent, fe_flags), 40);
        assert_eq!(size_of::<FiemapHeader>(), 32);
        assert_eq!(offset_of!(FiemapHeader, fm_flags), 16);
        assert_eq!(offset_of!(FiemapHeader, fm_mapped_extents), 20);
        assert_eq!(offset_of!(FiemapHeader, fm_extent_count), 24);
        assert_eq!(offset_of!(FiemapBuf, extents), 32);
        assert_eq!(size_of::<FiemapBuf>(), 32 + 56 * FIEMAP_BATCH);
    }

    #[test]
    fn request_codes_are_the_kernels() {
        // The values of FICLONE and FS_IOC_FIEMAP on x86_64/aarch64 Linux.
        assert_eq!(nix::request_code_write!(0x94, 9, size_of::<nix::libc::c_int>()) as u64, 0x4004_9409);
        assert_eq!(nix::request_code_readwrite!(b'f', 11, size_of::<FiemapHeader>()) as u64, 0xC020_660B);
    }
}
