//! Buffers that chunks from dom0 are read into, handed back by the session
//! writer once the chunk is in its file. A fresh buffer per chunk cost page
//! faults and zero-filling (glibc gives memory of this size back to the
//! kernel when it is freed, and the next chunk faults it in again).
//!
//! One pool for the process ([`take`], [`give_back`]): the conversation
//! thread takes, the writer thread gives back. It keeps at most
//! [`KEEP_BYTES`].

use std::sync::Mutex;

/// Bytes of free buffers kept at most (about 8 of the largest chunks, or
/// many of the usual 128 KiB).
const KEEP_BYTES: usize = 32 << 20;
/// Free buffers kept at most.
const KEEP: usize = 16;

/// Free buffers, within [`KEEP`] and [`KEEP_BYTES`].
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

static POOL: Pool = Pool::new();

/// An empty buffer, with the room of an earlier chunk if one is free.
pub fn take() -> Vec<u8> {
    POOL.take()
}

/// Keeps a buffer for a later chunk, within the pool's bounds.
pub fn give_back(buf: Vec<u8>) {
    POOL.give_back(buf)
}

impl Pool {
    const fn new() -> Pool {
        Pool { free: Mutex::new(Vec::new()) }
    }

    fn take(&self) -> Vec<u8> {
        self.free.lock().ok().and_then(|mut free| free.pop()).unwrap_or_default()
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        if let Ok(mut free) = self.free.lock() {
            let kept: usize = free.iter().map(Vec::capacity).sum();
            if free.len() < KEEP && kept + buf.capacity() <= KEEP_BYTES {
                free.push(buf);
            }
        }
    }

    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let free = self.free.lock().expect("lock");
        (free.len(), free.iter().map(Vec::capacity).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers come back empty with their room, and a pool stays within
    /// its bounds in count and bytes. (A pool of its own: the process's
    /// is used by other tests running beside this one.)
    #[test]
    fn buffers_are_reused_within_bounds() {
        let pool = Pool::new();
        pool.give_back(vec![7; 1000]);
        let b = pool.take();
        assert!(b.is_empty() && b.capacity() >= 1000, "an emptied buffer with its room");
        for _ in 0..(KEEP + 5) {
            pool.give_back(Vec::with_capacity(1024));
        }
        assert_eq!(pool.kept().0, KEEP, "at most KEEP buffers");

        let pool = Pool::new();
        for _ in 0..KEEP {
            pool.give_back(Vec::with_capacity(8 << 20));
        }
        assert_eq!(pool.kept().1, KEEP_BYTES, "as many 8 MiB buffers as fit in KEEP_BYTES");
        pool.give_back(Vec::new());
        assert_eq!(pool.kept().0, KEEP_BYTES / (8 << 20), "a buffer without room is not kept");
    }
}
