//! Chunk buffers that go back to where they came from: the scan reads each
//! chunk into one, a worker packs it into another of the same pool
//! ([`ChunkBuf::sibling`]), and each returns to the pool for a later chunk
//! when dropped (the first by the worker, the second once sent). A fresh
//! buffer per chunk cost page faults and zero-filling (glibc hands buffers
//! this large back to the kernel when they are freed): about a twentieth of
//! a full send's CPU for the read buffers, as much again for packed ones.
//!
//! The pool holds only buffers that were in flight before, so the
//! pipeline's bound on jobs in flight bounds it too; and never more than
//! [`KEEP_BYTES`]. The chunk answers of a connection are read into buffers
//! of its own pool the same way.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Buffers kept for reuse at most (insurance: the pipeline's bound on jobs
/// in flight keeps the count below this).
const KEEP: usize = 64;
/// Bytes of free buffers kept at most: an NBD export reads up to a whole
/// request's chunks at once, which with 4 MiB chunks would otherwise stay
/// pooled for the export's life.
const KEEP_BYTES: usize = 32 << 20;

/// Free buffers, shared by the scan and the buffers it hands out.
#[derive(Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub fn new() -> Arc<BufferPool> {
        Arc::new(BufferPool::default())
    }

    /// A buffer of `len` bytes. Its content is unspecified (a reused
    /// buffer holds an older chunk): the caller overwrites all of it.
    pub fn take(self: &Arc<Self>, len: usize) -> ChunkBuf {
        // One that holds `len` bytes already, if there is one: a packed
        // chunk's buffer comes back holding only the packed bytes, and
        // lengthening it would zero-fill the rest.
        let mut buf = self.pop(|free| free.iter().rposition(|b| b.len() >= len).or(free.len().checked_sub(1)));
        buf.resize(len, 0);
        ChunkBuf { buf, pool: Some(Arc::clone(self)) }
    }

    /// An empty buffer for a reader or a packer to fill (a reused one keeps
    /// its capacity: see [`ChunkBuf::vec_mut`]).
    pub fn take_empty(self: &Arc<Self>) -> ChunkBuf {
        // The shortest: what it holds is dropped, and the longer ones suit
        // `take`.
        let mut buf = self.pop(|free| free.iter().enumerate().min_by_key(|(_, b)| b.len()).map(|(i, _)| i));
        buf.clear();
        ChunkBuf { buf, pool: Some(Arc::clone(self)) }
    }

    /// The free buffer that `choose` picks, or a new one.
    fn pop(&self, choose: impl Fn(&[Vec<u8>]) -> Option<usize>) -> Vec<u8> {
        let Ok(mut free) = self.free.lock() else { return Vec::new() };
        choose(&free).map(|i| free.swap_remove(i)).unwrap_or_default()
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return; // nothing to reuse (a buffer taken out and not put back)
        }
        if let Ok(mut free) = self.free.lock() {
            let kept: usize = free.iter().map(Vec::capacity).sum();
            if free.len() < KEEP && kept + buf.capacity() <= KEEP_BYTES {
                free.push(buf);
            }
        }
    }
}

/// A chunk's bytes; back to its pool, if it has one, when dropped.
#[derive(Default)]
pub struct ChunkBuf {
    buf: Vec<u8>,
    pool: Option<Arc<BufferPool>>,
}

/// A buffer of no pool (tests, one-off reads).
impl From<Vec<u8>> for ChunkBuf {
    fn from(buf: Vec<u8>) -> ChunkBuf {
        ChunkBuf { buf, pool: None }
    }
}

impl ChunkBuf {
    /// An empty buffer from the same pool (none if this one has none): a
    /// worker packs a chunk into one, and it comes back once sent.
    pub fn sibling(&self) -> ChunkBuf {
        match &self.pool {
            Some(pool) => pool.take_empty(),
            None => ChunkBuf::default(),
        }
    }

    /// The buffer itself, for readers that append (`read_to_end` into a
    /// reused buffer needs no new memory).
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_their_pool_and_are_reused() {
        let pool = BufferPool::new();
        let free = |pool: &Arc<BufferPool>| pool.free.lock().expect("lock").len();
        let mut a = pool.take(4096);
        a[0] = 7;
        assert_eq!(free(&pool), 0);
        drop(a);
        assert_eq!(free(&pool), 1, "a dropped buffer goes back to its pool");
        // A fresh buffer of 100 bytes would not have the old one's room.
        let b = pool.take(100);
        assert_eq!(free(&pool), 0, "the free buffer is handed out again");
        assert_eq!(b.len(), 100, "a reused buffer takes the length asked for");
        assert!(b.buf.capacity() >= 4096, "it is the old buffer");
        let c = pool.take(50);
        assert_eq!(c.len(), 50, "a new buffer when none is free");
        drop((b, c));
        assert_eq!(free(&pool), 2);
        let mut many: Vec<ChunkBuf> = (0..KEEP + 10).map(|_| pool.take(1)).collect();
        many.clear();
        assert_eq!(free(&pool), KEEP, "the pool keeps at most KEEP buffers");
        drop(ChunkBuf::from(vec![1, 2, 3])); // no pool: simply freed
        assert_eq!(free(&pool), KEEP);
        let big: Vec<ChunkBuf> = (0..8).map(|_| pool.take(8 << 20)).collect();
        drop(big);
        let kept: usize = pool.free.lock().expect("lock").iter().map(Vec::capacity).sum();
        assert!(kept <= KEEP_BYTES, "{kept} bytes kept");
        let mut e = pool.take_empty();
        assert!(e.is_empty() && e.vec_mut().capacity() >= 1, "an empty buffer with its old room");
        e.vec_mut().extend_from_slice(b"read");
        assert_eq!(&e[..], b"read");
    }

    /// A packed chunk's buffer comes back short: `take` prefers one that
    /// already holds the length asked for (no zero-filling), `take_empty`
    /// the shortest; an emptied buffer with no memory is not kept.
    #[test]
    fn full_buffers_go_to_take_and_short_ones_to_take_empty() {
        let pool = BufferPool::new();
        let free = |pool: &Arc<BufferPool>| pool.free.lock().expect("lock").len();
        let mut full = pool.take(1000);
        full.fill(0xAA);
        let mut short = pool.take_empty();
        short.vec_mut().extend_from_slice(&[0xBB; 10]);
        short.vec_mut().reserve_exact(2000);
        drop((full, short));
        assert_eq!(free(&pool), 2);
        let read = pool.take(1000);
        assert!(read.iter().all(|&b| b == 0xAA), "the buffer that held 1000 bytes");
        let packed = pool.take_empty();
        assert!(packed.is_empty() && packed.buf.capacity() >= 2010, "the short one");
        drop((read, packed));
        let mut emptied = pool.take(500);
        std::mem::take(emptied.vec_mut());
        drop(emptied);
        assert_eq!(free(&pool), 1, "an emptied buffer is not pooled");
    }
}
