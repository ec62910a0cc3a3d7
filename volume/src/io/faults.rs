//! Disk faults on demand, for the fault tests only: compiled into debug builds (the ones the
//! tests run) and into any build with the `failpoints` feature, never into a default release
//! build.
//!
//! [`wrap`] puts a [`FaultyEngine`] in front of the real engine when `BALLAST_FAILPOINTS`
//! names a control file. A thread reads that file every 50 ms; its first word sets the mode:
//!
//! - `error`: every write (and flush) fails with `EIO`, reads still work;
//! - `error-all`: every request fails with `EIO`;
//! - `hang`: requests are held (not submitted) until the mode changes, then submitted;
//! - anything else, or no file: requests pass through.
//!
//! So a test makes one node's disk fail or hang by writing a word to a file, and heals it by
//! removing the file.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Completion, IoCompletion, IoEngine, IoOp, IoRequest};

/// The environment variable naming the control file.
pub const ENV: &str = "BALLAST_FAILPOINTS";

const PASS: u8 = 0;
const ERROR_WRITES: u8 = 1;
const ERROR_ALL: u8 = 2;
const HANG: u8 = 3;

/// An engine that fails or holds requests as its control file says.
#[derive(Debug)]
pub struct FaultyEngine {
    inner: Arc<dyn IoEngine>,
    mode: Arc<Mode>,
}

#[derive(Debug, Default)]
struct Mode {
    now: AtomicU8,
    /// Signalled when the mode changes (held requests wait on it).
    changed: Condvar,
    lock: Mutex<()>,
}

impl Mode {
    fn read(path: &std::path::Path) -> u8 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        match text.split_whitespace().next() {
            Some("error") => ERROR_WRITES,
            Some("error-all") => ERROR_ALL,
            Some("hang") => HANG,
            _ => PASS,
        }
    }
}

/// `engine`, behind a [`FaultyEngine`] when [`ENV`] is set.
pub fn wrap(engine: Arc<dyn IoEngine>) -> Arc<dyn IoEngine> {
    let Some(path) = std::env::var_os(ENV).map(PathBuf::from) else {
        return engine;
    };
    tracing::warn!(control = %path.display(), "disk fault injection is on (a test build)");
    let mode = Arc::new(Mode::default());
    let watch = Arc::clone(&mode);
    let started = std::thread::Builder::new()
        .name("ballast-faults".into())
        .spawn(move || loop {
            let m = Mode::read(&path);
            if watch.now.swap(m, Ordering::SeqCst) != m {
                tracing::warn!(mode = m, "disk fault mode changed");
                let _g = watch
                    .lock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                watch.changed.notify_all();
            }
            std::thread::sleep(Duration::from_millis(50));
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the fault thread; faults are off");
        return engine;
    }
    Arc::new(FaultyEngine {
        inner: engine,
        mode,
    })
}

fn failed(req: IoRequest) -> Completion {
    Completion::ready(IoCompletion {
        result: Err(io::Error::from_raw_os_error(libc::EIO)),
        buf: req.buf,
    })
}

impl IoEngine for FaultyEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn submit(&self, req: IoRequest) -> Completion {
        match self.mode.now.load(Ordering::SeqCst) {
            ERROR_ALL => failed(req),
            ERROR_WRITES if !matches!(req.op, IoOp::Read) => failed(req),
            HANG => {
                // Hold it on a thread of its own until the mode changes, then submit it.
                let (tx, out) = Completion::channel();
                let (inner, mode) = (Arc::clone(&self.inner), Arc::clone(&self.mode));
                std::thread::spawn(move || {
                    let mut g = mode
                        .lock
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    while mode.now.load(Ordering::SeqCst) == HANG {
                        g = mode
                            .changed
                            .wait_timeout(g, Duration::from_millis(100))
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0;
                    }
                    drop(g);
                    let _ = tx.send(inner.submit(req).wait());
                });
                out
            }
            _ => self.inner.submit(req),
        }
    }
}
