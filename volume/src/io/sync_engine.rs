//! The portable engine: worker threads that call `pread`, `pwrite` and `fdatasync`.
//!
//! Used when io_uring is unavailable. Requests are handed to the workers over a channel; each
//! worker owns the request (and so its buffer) until it sends the completion back.

use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use super::{Completion, IoCompletion, IoEngine, IoOp, IoRequest};

type Job = (IoRequest, oneshot::Sender<IoCompletion>);

/// The thread-pool engine.
#[derive(Debug)]
pub struct SyncEngine {
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl SyncEngine {
    /// Start `threads` worker threads.
    ///
    /// # Errors
    /// If a thread cannot be spawned.
    pub fn start(threads: usize) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx: Receiver<Job> = rx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("ballast-sync-io-{i}"))
                    .spawn(move || {
                        for (mut req, done) in rx {
                            let result = run(&mut req);
                            let _ = done.send(IoCompletion {
                                result,
                                buf: req.buf,
                            });
                        }
                    })?,
            );
        }
        Ok(Self {
            tx: Some(tx),
            workers,
        })
    }
}

/// Run `req` on the calling thread.
pub(crate) fn run(req: &mut IoRequest) -> io::Result<()> {
    req.validate()?;
    let fd = req.file.raw_fd();
    let fdatasync = || {
        // SAFETY: `fd` is open for as long as `req.file` lives, which outlives this call.
        let rc = unsafe { libc::fdatasync(fd) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    if req.op == IoOp::Fsync {
        return fdatasync();
    }
    let buf = req
        .buf
        .as_mut()
        .expect("validated: reads and writes carry a buffer");
    for seg in &req.segments {
        let mut done = 0usize;
        while done < seg.len {
            let ptr = buf[seg.buf_offset + done..].as_mut_ptr();
            let len = seg.len - done;
            let off = libc::off_t::try_from(seg.file_offset + done as u64).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "file offset does not fit off_t",
                )
            })?;
            let n = match req.op {
                // SAFETY: `ptr..ptr+len` lies inside `buf` (validated), which we own exclusively.
                IoOp::Read => unsafe { libc::pread(fd, ptr.cast(), len, off) },
                IoOp::Write { .. } | IoOp::WriteThenSync => {
                    let dsync = req.op == IoOp::Write { dsync: true };
                    let iov = libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: len,
                    };
                    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                    // SAFETY: `iov` points inside `buf`, which we own; the call only reads it.
                    unsafe { libc::pwritev2(fd, &raw const iov, 1, off, flags) }
                }
                IoOp::Fsync => unreachable!(),
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "transfer past the end of the file",
                ));
            }
            done += n as usize;
        }
    }
    if req.op == IoOp::WriteThenSync {
        return fdatasync();
    }
    Ok(())
}

impl IoEngine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn submit(&self, req: IoRequest) -> Completion {
        let req = match super::run_inline(req) {
            Ok(done) => return done,
            Err(req) => req,
        };
        let (done, completion) = Completion::channel();
        if let Some(tx) = &self.tx {
            if let Err(crossbeam_channel::SendError((req, done))) = tx.send((req, done)) {
                let _ = done.send(IoCompletion {
                    result: Err(io::Error::other("the sync I/O engine has stopped")),
                    buf: req.buf,
                });
            }
        }
        completion
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
