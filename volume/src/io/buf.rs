//! `IoBuf`: an owned, 4 KiB-aligned, zero-initialised byte buffer for O_DIRECT I/O.
//!
//! Ownership is the safety argument of the whole data path: submitting an operation moves the
//! `IoBuf` into the engine, which keeps it alive (and unaliased) until the kernel completes the
//! operation, and then hands it back in the completion. No code ever holds a reference into a
//! buffer the kernel is writing.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every `IoBuf`, enough for O_DIRECT on 512-byte and 4 KiB sector devices.
pub const IO_ALIGN: usize = 4096;

/// An owned, aligned, heap-allocated byte buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: `IoBuf` owns its allocation exclusively (like `Vec<u8>`); moving it between threads
// moves that ownership.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only permit reads of initialised bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes (capacity rounded up to the alignment).
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Layout::from_size_align(cap, IO_ALIGN).expect("IoBuf layout");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Change the length within the allocated capacity; new bytes are zero or stale contents.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    /// The allocated capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// A raw pointer to the start, for handing to the kernel. The caller must keep `self`
    /// alive and unaliased until the kernel is done with it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A raw const pointer to the start.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("IoBuf layout");
        // SAFETY: allocated in `zeroed` with exactly this layout, and freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = IoBuf::zeroed(10_000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.capacity(), 12_288);
        assert!(b.iter().all(|&x| x == 0));
        b[9_999] = 7;
        let c = b.clone();
        assert_eq!(c[9_999], 7);
        b.set_len(4096);
        assert_eq!(b.len(), 4096);
    }
}
