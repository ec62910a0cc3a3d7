//! The io_uring engine (being written): data-path threads each owning a ring.

use std::io;

use super::{Completion, IoEngine, IoRequest};

/// The io_uring engine.
#[derive(Debug)]
pub struct UringEngine {
    inner: super::sync_engine::SyncEngine,
}

impl UringEngine {
    /// Start `threads` ring-owning threads.
    ///
    /// # Errors
    /// If the kernel refuses io_uring.
    pub fn start(threads: usize) -> io::Result<Self> {
        Ok(Self { inner: super::sync_engine::SyncEngine::start(threads)? })
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn submit(&self, req: IoRequest) -> Completion {
        self.inner.submit(req)
    }
}
