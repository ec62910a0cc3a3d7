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
//!
//! **Power cuts.** If a file `<control>.undo` exists when the engine starts, every write is
//! also recorded there until it is durable, so a test can model a volatile write cache: kill
//! the daemon, then undo (all, some 4 KiB sectors, or none of) each write that no flush had
//! made durable. The file is an append-only journal of lines, each write's old bytes after its
//! line:
//!
//! - `W <id> <offset> <len> <path>\n` then `len` bytes: the bytes at `offset` of `path` before
//!   write `id` (one line per segment; a write's segments share its id);
//! - `D <id>\n`: write `id` is durable (it had completed when an `fdatasync` of its file was
//!   submitted, and that `fdatasync` succeeded; or it was an `RWF_DSYNC` write that succeeded).
//!
//! A `D` line is appended before the completion it records is passed on, so whatever the
//! daemon acknowledged as flushed is marked durable in the journal even if it is killed at
//! once; a `W` record is appended before its write is submitted, so a record cut short by the
//! kill (the last one) is of a write never submitted. The journal is emptied whenever no write is pending. Writes are undone newest first,
//! which restores overlapping ones correctly.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Completion, IoCompletion, IoEngine, IoFile, IoOp, IoRequest};

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
    /// The power-cut journal, when `<control>.undo` existed at start.
    journal: Option<Arc<Journal>>,
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
    let mut undo = path.clone().into_os_string();
    undo.push(".undo");
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
    let journal = match Journal::open(Path::new(&undo)) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the power-cut journal; faults are off");
            return engine;
        }
    };
    Arc::new(FaultyEngine {
        inner: engine,
        mode,
        journal,
    })
}

/// What a journalled request's completion records.
#[derive(Debug)]
enum Done {
    /// Write `id` completed (durable at once if `dsync`).
    Write { id: u64, dsync: bool },
    /// An `fdatasync`, which makes `covered` durable if it succeeds.
    Fsync { covered: Vec<u64> },
    /// Write `id`, then an `fdatasync` covering it and `covered` (the writes completed when
    /// it was submitted).
    WriteThenSync { id: u64, covered: Vec<u64> },
}

/// A pending completion and where to pass it on.
type Forward = (Completion, oneshot::Sender<IoCompletion>, Done);

/// The power-cut journal (see the module docs).
#[derive(Debug)]
struct Journal {
    state: Mutex<JournalState>,
    /// Completions to record, then pass on (by the journal's thread).
    forward: mpsc::UnboundedSender<Forward>,
}

#[derive(Debug)]
struct JournalState {
    out: std::fs::File,
    next: u64,
    /// Writes not yet durable: id -> (file, completed).
    pending: BTreeMap<u64, ((u64, u64), bool)>,
    /// A buffered handle and the path of each file written, by (device, inode).
    files: HashMap<(u64, u64), (Arc<std::fs::File>, String)>,
}

impl Journal {
    /// The journal at `path` if that file exists (emptied), else `None`.
    fn open(path: &Path) -> io::Result<Option<Arc<Self>>> {
        if !path.exists() {
            return Ok(None);
        }
        let out = std::fs::OpenOptions::new().append(true).open(path)?;
        out.set_len(0)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Forward>();
        let journal = Arc::new(Self {
            state: Mutex::new(JournalState {
                out,
                next: 1,
                pending: BTreeMap::new(),
                files: HashMap::new(),
            }),
            forward: tx,
        });
        let weak = Arc::downgrade(&journal);
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        std::thread::Builder::new()
            .name("ballast-journal".into())
            .spawn(move || {
                rt.block_on(async move {
                    while let Some((inner, tx, done)) = rx.recv().await {
                        let weak = weak.clone();
                        tokio::spawn(async move {
                            let c = inner.await;
                            if let Some(j) = weak.upgrade() {
                                j.completed(done, c.result.is_ok());
                            }
                            let _ = tx.send(c);
                        });
                    }
                });
            })?;
        tracing::warn!(journal = %path.display(), "power-cut journal is on (a test build)");
        Ok(Some(journal))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record the old bytes under each segment of a write; its id.
    fn before_write(&self, req: &IoRequest) -> io::Result<u64> {
        let mut s = self.lock();
        let key = file_key(&req.file)?;
        if let std::collections::hash_map::Entry::Vacant(e) = s.files.entry(key) {
            let proc_path = format!("/proc/self/fd/{}", req.file.raw_fd());
            let path = std::fs::read_link(&proc_path)?
                .to_string_lossy()
                .into_owned();
            let reader = std::fs::File::open(&proc_path)?;
            e.insert((Arc::new(reader), path));
        }
        let (reader, path) = s.files[&key].clone();
        let id = s.next;
        s.next += 1;
        for seg in &req.segments {
            let mut old = vec![0u8; seg.len];
            let mut got = 0;
            while got < old.len() {
                match reader.read_at(&mut old[got..], seg.file_offset + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            old.truncate(got);
            let mut record =
                format!("W {id} {} {} {path}\n", seg.file_offset, old.len()).into_bytes();
            record.extend_from_slice(&old);
            s.out.write_all(&record)?;
        }
        s.pending.insert(id, (key, false));
        Ok(id)
    }

    /// The writes of `file` completed so far (an `fdatasync` submitted now covers them).
    fn completed_writes(&self, file: &IoFile) -> Vec<u64> {
        let Ok(key) = file_key(file) else {
            return Vec::new();
        };
        self.lock()
            .pending
            .iter()
            .filter(|(_, (k, done))| *k == key && *done)
            .map(|(id, _)| *id)
            .collect()
    }

    fn completed(&self, done: Done, ok: bool) {
        let mut s = self.lock();
        let durable = match done {
            Done::Write { id, dsync } => {
                if let Some(p) = s.pending.get_mut(&id) {
                    p.1 = true;
                }
                if dsync && ok {
                    vec![id]
                } else {
                    Vec::new()
                }
            }
            Done::Fsync { covered } if ok => covered,
            Done::Fsync { .. } => Vec::new(),
            Done::WriteThenSync { id, mut covered } => {
                if let Some(p) = s.pending.get_mut(&id) {
                    p.1 = true;
                }
                if ok {
                    covered.push(id);
                    covered
                } else {
                    Vec::new()
                }
            }
        };
        let mut lines = String::new();
        for id in durable {
            if s.pending.remove(&id).is_some() {
                let _ = writeln!(lines, "D {id}");
            }
        }
        let r = if s.pending.is_empty() {
            s.out.set_len(0)
        } else {
            s.out.write_all(lines.as_bytes())
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot write the power-cut journal");
        }
    }

    /// Pass `inner` on through `self`, recording `done` when it completes.
    fn track(&self, inner: Completion, done: Done) -> Completion {
        let (tx, out) = Completion::channel();
        if let Err(mpsc::error::SendError((inner, tx, _))) = self.forward.send((inner, tx, done)) {
            // The journal's thread is gone: pass the completion on unrecorded.
            std::thread::spawn(move || {
                let _ = tx.send(inner.wait());
            });
        }
        out
    }
}

fn file_key(file: &IoFile) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/self/fd/{}", file.raw_fd()))?;
    Ok((m.dev(), m.ino()))
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
        let Some(journal) = &self.journal else {
            return self.submit_faulty(req);
        };
        let done = match req.op {
            IoOp::Read => return self.submit_faulty(req),
            IoOp::Write { dsync } => match journal.before_write(&req) {
                Ok(id) => Done::Write { id, dsync },
                Err(e) => {
                    tracing::error!(error = %e, "cannot journal a write; failing it");
                    return failed(req);
                }
            },
            IoOp::Fsync => Done::Fsync {
                covered: journal.completed_writes(&req.file),
            },
            IoOp::WriteThenSync => {
                let covered = journal.completed_writes(&req.file);
                match journal.before_write(&req) {
                    Ok(id) => Done::WriteThenSync { id, covered },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot journal a write; failing it");
                        return failed(req);
                    }
                }
            }
        };
        journal.track(self.submit_faulty(req), done)
    }
}

impl FaultyEngine {
    fn submit_faulty(&self, req: IoRequest) -> Completion {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sync_engine::SyncEngine;
    use crate::io::IoBuf;

    /// The journal's lines, each `W` line's bytes summarised as their first byte.
    fn lines(journal: &Path) -> Vec<String> {
        let text = std::fs::read(journal).unwrap();
        let (mut out, mut at) = (Vec::new(), 0);
        while at < text.len() {
            let end = at + text[at..].iter().position(|&b| b == b'\n').unwrap();
            let line = String::from_utf8(text[at..end].to_vec()).unwrap();
            at = end + 1;
            let w: Vec<&str> = line.split(' ').collect();
            if w[0] == "W" {
                let len: usize = w[3].parse().unwrap();
                out.push(format!("W {} {} old={}", w[1], w[2], text[at]));
                at += len;
            } else {
                out.push(line);
            }
        }
        out
    }

    #[tokio::test]
    async fn the_journal_keeps_old_bytes_until_a_flush_or_dsync_makes_a_write_durable() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("faults.undo");
        std::fs::write(&journal, b"stale").unwrap();
        let path = dir.path().join("pool");
        std::fs::write(&path, vec![9u8; 3 * 4096]).unwrap();
        let file = IoFile::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
                .into(),
        );
        let engine = FaultyEngine {
            inner: Arc::new(SyncEngine::start(1).unwrap()),
            mode: Arc::new(Mode::default()),
            journal: Journal::open(&journal).unwrap(),
        };
        assert!(lines(&journal).is_empty(), "the journal starts empty");
        let write = |at: u64, byte: u8, dsync: bool| {
            let buf = IoBuf::from_slice(&[byte; 4096]);
            engine.submit(IoRequest::write(&file, at, buf, dsync))
        };
        write(0, 1, false).await.result.unwrap();
        write(4096, 2, false).await.result.unwrap();
        assert_eq!(lines(&journal), ["W 1 0 old=9", "W 2 4096 old=9"]);
        // A flush makes both durable; nothing is pending, so the journal empties.
        engine.submit(IoRequest::fsync(&file)).await.result.unwrap();
        assert!(lines(&journal).is_empty());
        // A write over the first: its old bytes are the first write's.
        write(0, 3, false).await.result.unwrap();
        // A dsync write is durable when it completes.
        write(8192, 4, true).await.result.unwrap();
        assert_eq!(lines(&journal), ["W 3 0 old=1", "W 4 8192 old=9", "D 4"]);
        // A failed flush makes nothing durable.
        let bad = FaultyEngine {
            inner: Arc::clone(&engine.inner),
            mode: Arc::new(Mode::default()),
            journal: engine.journal.clone(),
        };
        bad.mode.now.store(ERROR_WRITES, Ordering::SeqCst);
        assert!(bad.submit(IoRequest::fsync(&file)).await.result.is_err());
        assert_eq!(lines(&journal).len(), 3);
        // A write-then-sync makes itself and the writes completed before it durable.
        let buf = IoBuf::from_slice(&[5; 4096]);
        engine
            .submit(IoRequest::write_then_sync(&file, 4096, buf))
            .await
            .result
            .unwrap();
        assert!(lines(&journal).is_empty(), "{:?}", lines(&journal));
    }
}
