//! Buffers that chunks from dom0 are read into, handed back by the session
//! writer once the chunk is in its file. A fresh buffer per chunk cost page
//! faults and zero-filling (glibc gives memory of this size back to the
//! kernel when it is freed, and the next chunk faults it in again).
//!
//! One pool for the process: the conversation thread takes, the writer
//! thread gives back. It keeps at most [`KEEP_BYTES`].

use std::sync::Mutex;

/// Bytes of free buffers kept at most (8 of the largest chunks, or many of
/// the usual 128 KiB).
const KEEP_BYTES: usize = 32 << 20;
/// Free buffers kept at most.
const KEEP: usize = 16;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer, with the room of an earlier chunk if one is free.
pub fn take() -> Vec<u8> {
    FREE.lock().ok().and_then(|mut free| free.pop()).unwrap_or_default()
}

/// Keeps a buffer for a later chunk, within the pool's bounds.
pub fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    if let Ok(mut free) = FREE.lock() {
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < KEEP && kept + buf.capacity() <= KEEP_BYTES {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers come back empty with their room, and the pool stays within
    /// its bounds in count and bytes.
    #[test]
    fn buffers_are_reused_within_bounds() {
        give_back(vec![7; 1000]);
        let b = take();
        assert!(b.is_empty() && b.capacity() >= 1000, "an emptied buffer with its room");
        for _ in 0..(KEEP + 5) {
            give_back(Vec::with_capacity(1024));
        }
        let count = FREE.lock().expect("lock").len();
        assert_eq!(count, KEEP, "at most KEEP buffers");
        FREE.lock().expect("lock").clear();
        for _ in 0..KEEP {
            give_back(Vec::with_capacity(8 << 20));
        }
        let kept: usize = FREE.lock().expect("lock").iter().map(Vec::capacity).sum();
        assert!(kept <= KEEP_BYTES, "{kept} bytes kept");
        assert_eq!(kept, KEEP_BYTES, "as many 8 MiB buffers as fit");
        give_back(Vec::new()); // no room: not kept
        FREE.lock().expect("lock").clear();
    }
}
