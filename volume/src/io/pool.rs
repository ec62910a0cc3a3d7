//! A process-wide pool of large [`IoBuf`]s for frontends (FUSE, NBD) that move big requests.
//!
//! Allocating a zeroed 1 MiB buffer per request costs as much as copying the data once, so
//! request buffers of [`POOL_BUF`] bytes are recycled. Small buffers are allocated afresh:
//! for them the allocator is cheaper than a shared pool. The pool keeps at most
//! [`POOL_KEEP`] buffers; the lock is held only to push or pop, never across I/O.

use std::sync::Mutex;

use super::IoBuf;

/// The size of a pooled buffer: the largest request the frontends split I/O into.
pub const POOL_BUF: usize = 1 << 20;
/// Requests at least this large use pooled buffers.
pub const POOL_MIN: usize = 64 * 1024;
/// Buffers kept for reuse (32 MiB at most).
const POOL_KEEP: usize = 32;

static POOL: Mutex<Vec<IoBuf>> = Mutex::new(Vec::new());

/// A buffer of `len` bytes whose contents are unspecified (zeros or stale data).
pub fn take(len: usize) -> IoBuf {
    if !(POOL_MIN..=POOL_BUF).contains(&len) {
        return IoBuf::zeroed(len);
    }
    let pooled = POOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop();
    let mut b = pooled.unwrap_or_else(|| IoBuf::zeroed(POOL_BUF));
    b.set_len(len);
    b
}

/// Hand a buffer back for reuse; only pool-sized ones are kept.
pub fn give(buf: IoBuf) {
    if buf.capacity() == POOL_BUF {
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_and_small_ones_are_not() {
        let b = take(POOL_BUF);
        let p = b.as_ptr();
        give(b);
        // Another test may race us for the pooled buffer; only check what is certain.
        let again = take(128 * 1024);
        assert_eq!(again.len(), 128 * 1024);
        assert_eq!(again.capacity(), POOL_BUF);
        let small = take(4096);
        assert_eq!(small.capacity(), 4096);
        give(small); // dropped, not kept
        let _ = p;
    }
}
