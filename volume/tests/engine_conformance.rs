//! The engine conformance suite: one set of cases, run against every `IoEngine` backend.
//!
//! Each case in [`cases`] is instantiated once per engine by [`conformance_suite!`], so a
//! failure names the engine (`uring::scatter_gather`, `sync::scatter_gather`). Files live in a
//! temporary directory under `/var/tmp` (or `$BALLAST_TEST_DIR`), which must be on a real
//! filesystem that supports `O_DIRECT` (not tmpfs); the cases check that `O_DIRECT` is in
//! effect. [`identical_results_across_engines`] runs one script of operations on both engines
//! and requires the same outcome, error kind, errno and buffer contents from each.
//!
//! The io_uring cases fail if io_uring cannot be set up, unless `BALLAST_ALLOW_NO_URING=1`
//! is set, in which case they are skipped with a message.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use volume::io::{open_direct, probe, EngineKind, IoBuf, IoEngine, IoFile, IoRequest, Segment};

const BLOCK: usize = 4096;

/// An engine and a temporary directory on an `O_DIRECT`-capable filesystem.
struct Fixture {
    engine: Arc<dyn IoEngine>,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// `None` when io_uring is unavailable and the environment allows skipping it.
    fn new(kind: EngineKind) -> Option<Self> {
        let engine = match probe(kind, 2) {
            Ok(engine) => engine,
            Err(e) if std::env::var_os("BALLAST_ALLOW_NO_URING").is_some() => {
                eprintln!("skipping: the {kind:?} engine is unavailable here: {e}");
                return None;
            }
            Err(e) => panic!(
                "the {kind:?} engine cannot start ({e}); set BALLAST_ALLOW_NO_URING=1 to skip"
            ),
        };
        let expected = if kind == EngineKind::Uring {
            "io_uring"
        } else {
            "sync"
        };
        assert_eq!(engine.name(), expected);
        let base = std::env::var_os("BALLAST_TEST_DIR")
            .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix("ballast-engine-conformance")
            .tempdir_in(&base)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create a temporary directory in {}: {e}",
                    base.display()
                )
            });
        Some(Self { engine, dir })
    }

    /// A new `O_DIRECT` file in the fixture's directory.
    fn file(&self, name: &str) -> IoFile {
        let path = self.dir.path().join(name);
        let (file, direct) = open_direct(&path, true).expect("open the test file");
        assert!(
            direct,
            "{} does not support O_DIRECT; set BALLAST_TEST_DIR to a real filesystem",
            path.display()
        );
        file
    }

    fn file_len(&self, name: &str) -> u64 {
        std::fs::metadata(self.dir.path().join(name))
            .expect("stat the test file")
            .len()
    }
}

/// Deterministic, position-dependent, non-zero-heavy bytes for `seed`.
fn pattern(seed: u64, len: usize) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    buf
}

/// A buffer of `len` bytes all set to `byte`, to show which bytes a read overwrote.
fn filled(byte: u8, len: usize) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    buf.fill(byte);
    buf
}

async fn write(e: &dyn IoEngine, f: &IoFile, offset: u64, buf: IoBuf, dsync: bool) -> IoBuf {
    let expected = buf.clone();
    let c = e.submit(IoRequest::write(f, offset, buf, dsync)).await;
    c.result
        .unwrap_or_else(|err| panic!("{}: write at {offset}: {err}", e.name()));
    let buf = c.buf.expect("a write hands its buffer back");
    assert_eq!(
        &buf[..],
        &expected[..],
        "{}: a write changed its buffer",
        e.name()
    );
    buf
}

async fn read(e: &dyn IoEngine, f: &IoFile, offset: u64, len: usize) -> IoBuf {
    let c = e
        .submit(IoRequest::read(f, offset, filled(0xEE, len)))
        .await;
    c.result
        .unwrap_or_else(|err| panic!("{}: read of {len} at {offset}: {err}", e.name()));
    let buf = c.buf.expect("a read hands its buffer back");
    assert_eq!(buf.len(), len);
    buf
}

fn segment(file_offset: u64, buf_offset: usize, len: usize) -> Segment {
    Segment {
        file_offset,
        buf_offset,
        len,
    }
}

fn pipe() -> (IoFile, IoFile) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two descriptors for `pipe2` to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (IoFile::new(r), IoFile::new(w))
}

/// Drop the last reference to an engine off the async threads, failing if it takes too long.
async fn drop_within(engine: Arc<dyn IoEngine>, limit: Duration) {
    assert_eq!(
        Arc::strong_count(&engine),
        1,
        "the test must hold the last reference"
    );
    let name = engine.name();
    let dropped = tokio::task::spawn_blocking(move || drop(engine));
    tokio::time::timeout(limit, dropped)
        .await
        .unwrap_or_else(|_| panic!("dropping the {name} engine hung"))
        .expect("the engine's drop panicked");
}

mod cases {
    use super::*;

    pub async fn write_read_round_trip(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("data");
        let data = pattern(1, 64 * 1024);
        write(e, &f, 1 << 20, data.clone(), false).await;
        assert_eq!(fx.file_len("data"), (1 << 20) + 64 * 1024);

        let back = read(e, &f, 1 << 20, 64 * 1024).await;
        assert_eq!(&back[..], &data[..]);

        // The never-written start of the file reads as zeros, overwriting the fill.
        let hole = read(e, &f, 0, 2 * BLOCK).await;
        assert!(hole.iter().all(|&b| b == 0), "a hole must read as zeros");

        // Overwrite one block in the middle; the neighbours keep their data.
        let patch = pattern(2, BLOCK);
        write(e, &f, (1 << 20) + 8 * 1024, patch.clone(), false).await;
        let back = read(e, &f, 1 << 20, 64 * 1024).await;
        assert_eq!(&back[..8 * 1024], &data[..8 * 1024]);
        assert_eq!(&back[8 * 1024..12 * 1024], &patch[..]);
        assert_eq!(&back[12 * 1024..], &data[12 * 1024..]);
    }

    pub async fn scatter_gather(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("sg");
        // Scatter: three pieces of one buffer to three places in the file, out of order.
        let data = pattern(3, 4 * BLOCK);
        let mut req = IoRequest::write(&f, 0, data.clone(), false);
        req.segments = vec![
            segment(3 * BLOCK as u64, 0, BLOCK),
            segment(0, BLOCK, BLOCK),
            segment(10 * BLOCK as u64, 2 * BLOCK, 2 * BLOCK),
        ];
        let c = e.submit(req).await;
        c.result.expect("scatter write");
        assert_eq!(&c.buf.expect("buffer back")[..], &data[..]);

        let whole = read(e, &f, 0, 12 * BLOCK).await;
        assert_eq!(&whole[..BLOCK], &data[BLOCK..2 * BLOCK]);
        assert!(whole[BLOCK..3 * BLOCK].iter().all(|&b| b == 0));
        assert_eq!(&whole[3 * BLOCK..4 * BLOCK], &data[..BLOCK]);
        assert!(whole[4 * BLOCK..10 * BLOCK].iter().all(|&b| b == 0));
        assert_eq!(&whole[10 * BLOCK..], &data[2 * BLOCK..]);

        // Gather: the same three places into a different layout of one buffer.
        let mut req = IoRequest::read(&f, 0, filled(0xEE, 4 * BLOCK));
        req.segments = vec![
            segment(10 * BLOCK as u64, 0, 2 * BLOCK),
            segment(0, 3 * BLOCK, BLOCK),
            segment(3 * BLOCK as u64, 2 * BLOCK, BLOCK),
        ];
        let c = e.submit(req).await;
        c.result.expect("gather read");
        let got = c.buf.expect("buffer back");
        assert_eq!(&got[..2 * BLOCK], &data[2 * BLOCK..]);
        assert_eq!(&got[2 * BLOCK..3 * BLOCK], &data[..BLOCK]);
        assert_eq!(&got[3 * BLOCK..], &data[BLOCK..2 * BLOCK]);
    }

    /// More segments in one request than the io_uring submission (256) and completion (512)
    /// queues hold, written in reverse block order.
    pub async fn many_segments(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("many");
        let n = 600;
        let data = pattern(4, n * BLOCK);
        let mut req = IoRequest::write(&f, 0, data.clone(), false);
        req.segments = (0..n)
            .map(|i| segment(((n - 1 - i) * BLOCK) as u64, i * BLOCK, BLOCK))
            .collect();
        e.submit(req).await.result.expect("600-segment write");

        let back = read(e, &f, 0, n * BLOCK).await;
        for i in 0..n {
            let file_block = &back[i * BLOCK..(i + 1) * BLOCK];
            let src = n - 1 - i;
            assert_eq!(
                file_block,
                &data[src * BLOCK..(src + 1) * BLOCK],
                "block {i}"
            );
        }
    }

    pub async fn large_transfer(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("large");
        let data = pattern(5, 8 << 20);
        write(e, &f, 4096, data.clone(), true).await;
        let back = read(e, &f, 4096, 8 << 20).await;
        assert!(
            back[..] == data[..],
            "an 8 MiB transfer reads back what was written"
        );
    }

    pub async fn dsync_writes_and_fsync(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("durable");
        let first = pattern(6, 2 * BLOCK);
        let second = pattern(7, BLOCK);
        write(e, &f, 0, first.clone(), true).await;
        write(e, &f, 2 * BLOCK as u64, second.clone(), false).await;

        let c = e.submit(IoRequest::fsync(&f)).await;
        c.result.expect("fsync of a regular file");
        assert!(c.buf.is_none(), "an fsync has no buffer to return");

        let back = read(e, &f, 0, 3 * BLOCK).await;
        assert_eq!(&back[..2 * BLOCK], &first[..]);
        assert_eq!(&back[2 * BLOCK..], &second[..]);

        // fdatasync on a pipe is EINVAL: fsync errors are reported, not swallowed.
        let (pipe_read, _pipe_write) = pipe();
        let c = e.submit(IoRequest::fsync(&pipe_read)).await;
        let err = c.result.expect_err("fsync of a pipe fails");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    /// A write-then-sync writes every segment, syncs, and returns the buffer; the sync is
    /// issued even with nothing to write, and its error is reported.
    pub async fn write_then_sync(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("write-then-sync");
        let data = pattern(9, 3 * BLOCK);
        let mut req = IoRequest::write_then_sync(&f, 0, data.clone());
        req.segments = vec![
            segment(4 * BLOCK as u64, 0, BLOCK),
            segment(0, BLOCK, 2 * BLOCK),
        ];
        let c = e.submit(req).await;
        c.result.expect("write then sync on a regular file");
        assert_eq!(c.buf.expect("the buffer comes back")[..], data[..]);
        let back = read(e, &f, 0, 5 * BLOCK).await;
        assert_eq!(&back[..2 * BLOCK], &data[BLOCK..]);
        assert_eq!(&back[4 * BLOCK..], &data[..BLOCK]);

        // Nothing to write: only the sync, whose failure on a pipe (EINVAL) is reported.
        let (pipe_read, _pipe_write) = pipe();
        let mut req = IoRequest::write_then_sync(&pipe_read, 0, IoBuf::zeroed(BLOCK));
        req.segments.clear();
        let err = e
            .submit(req)
            .await
            .result
            .expect_err("the sync of a pipe fails");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    /// Inside `volume::io::inline`, a request has run by the time `submit` returns: its
    /// completion is ready at the first poll, with the same results as outside.
    pub async fn inline_requests_complete_at_submission(fx: Fixture) {
        use std::future::Future;
        let e = &*fx.engine;
        let f = fx.file("inline");
        let data = pattern(11, 2 * BLOCK);
        let poll_now = |c: &mut volume::io::Completion| {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match std::pin::Pin::new(c).poll(&mut cx) {
                std::task::Poll::Ready(done) => done,
                std::task::Poll::Pending => panic!("an inline request was still pending"),
            }
        };
        let (wrote, synced, got, bad) = volume::io::inline(|| {
            let mut wrote = e.submit(IoRequest::write(&f, 0, data.clone(), false));
            let mut synced = e.submit(IoRequest::fsync(&f));
            let mut got = e.submit(IoRequest::read(&f, 0, IoBuf::zeroed(2 * BLOCK)));
            let mut bad = e.submit(IoRequest::read(&f, 8 * BLOCK as u64, IoBuf::zeroed(BLOCK)));
            (
                poll_now(&mut wrote),
                poll_now(&mut synced),
                poll_now(&mut got),
                poll_now(&mut bad),
            )
        });
        wrote.result.expect("inline write");
        synced.result.expect("inline fsync");
        got.result.expect("inline read");
        assert_eq!(got.buf.expect("the buffer comes back")[..], data[..]);
        let err = bad
            .result
            .expect_err("a read past the end fails inline too");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert!(bad.buf.is_some(), "the buffer comes back on failure");
        // Outside, the engine's threads serve requests again.
        let back = read(e, &f, 0, 2 * BLOCK).await;
        assert_eq!(back[..], data[..]);
    }

    pub async fn read_past_eof_fails_with_buffer(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("short");
        let data = pattern(8, 2 * BLOCK);
        write(e, &f, 0, data.clone(), false).await;

        // Wholly past the end.
        let c = e
            .submit(IoRequest::read(&f, 4 * BLOCK as u64, filled(0xEE, BLOCK)))
            .await;
        let err = c.result.expect_err("a read past EOF fails");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let buf = c.buf.expect("the buffer comes back with the error");
        assert_eq!(buf.len(), BLOCK);
        assert!(
            buf.iter().all(|&b| b == 0xEE),
            "nothing was read into the buffer"
        );

        // Straddling the end: the part before EOF is transferred, then the error.
        let c = e
            .submit(IoRequest::read(&f, BLOCK as u64, filled(0xEE, 2 * BLOCK)))
            .await;
        let err = c.result.expect_err("a read across EOF fails");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let buf = c.buf.expect("the buffer comes back with the error");
        assert_eq!(&buf[..BLOCK], &data[BLOCK..]);
    }

    pub async fn invalid_requests_are_refused_with_buffer(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("invalid");
        let data = pattern(9, BLOCK);

        // A segment that runs past the end of the buffer.
        let mut req = IoRequest::write(&f, 0, data.clone(), false);
        req.segments = vec![
            segment(0, 0, BLOCK),
            segment(BLOCK as u64, BLOCK / 2, BLOCK),
        ];
        let c = e.submit(req).await;
        assert_eq!(
            c.result.expect_err("segment outside the buffer").kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(&c.buf.expect("the buffer comes back")[..], &data[..]);
        assert_eq!(
            fx.file_len("invalid"),
            0,
            "nothing of a refused request is written"
        );

        // A segment whose end overflows.
        let mut req = IoRequest::read(&f, 0, IoBuf::zeroed(BLOCK));
        req.segments = vec![segment(0, usize::MAX, 2)];
        let c = e.submit(req).await;
        assert_eq!(
            c.result.expect_err("overflowing segment").kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(c.buf.is_some());

        // A read without a buffer.
        let mut req = IoRequest::read(&f, 0, IoBuf::zeroed(BLOCK));
        req.buf = None;
        let c = e.submit(req).await;
        assert_eq!(
            c.result.expect_err("read without buffer").kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(c.buf.is_none());

        // O_DIRECT refuses a misaligned file offset: the kernel's EINVAL, buffer returned.
        let c = e
            .submit(IoRequest::write(&f, 100, data.clone(), false))
            .await;
        let err = c.result.expect_err("misaligned O_DIRECT write");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert_eq!(&c.buf.expect("the buffer comes back")[..], &data[..]);
    }

    pub async fn empty_requests_complete(fx: Fixture) {
        let e = &*fx.engine;
        let f = fx.file("empty");
        let mut req = IoRequest::read(&f, 0, filled(0xEE, BLOCK));
        req.segments.clear();
        let c = e.submit(req).await;
        c.result.expect("a read without segments");
        assert!(c.buf.expect("buffer back").iter().all(|&b| b == 0xEE));

        let mut req = IoRequest::write(&f, 0, pattern(10, BLOCK), false);
        req.segments = vec![segment(0, 0, 0)];
        e.submit(req).await.result.expect("a zero-length write");
        assert_eq!(fx.file_len("empty"), 0);
    }

    /// 256 requests in flight at once from many tasks, each checked block by block.
    pub async fn concurrent_requests(fx: Fixture) {
        let f = fx.file("concurrent");
        let n: u64 = 256;
        let writes: Vec<_> = (0..n)
            .map(|i| {
                let (e, f) = (Arc::clone(&fx.engine), f.clone());
                tokio::spawn(async move {
                    let data = pattern(1000 + i, BLOCK);
                    let c = e
                        .submit(IoRequest::write(
                            &f,
                            i * BLOCK as u64,
                            data.clone(),
                            i % 2 == 0,
                        ))
                        .await;
                    c.result
                        .unwrap_or_else(|err| panic!("write of block {i}: {err}"));
                    assert_eq!(
                        &c.buf.expect("buffer back")[..],
                        &data[..],
                        "block {i}'s buffer"
                    );
                })
            })
            .collect();
        for t in writes {
            t.await.expect("write task");
        }
        assert_eq!(fx.file_len("concurrent"), n * BLOCK as u64);

        // Reads of single blocks and two-block writes beyond them, all at once.
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (e, f) = (Arc::clone(&fx.engine), f.clone());
                tokio::spawn(async move {
                    let c = e
                        .submit(IoRequest::read(&f, i * BLOCK as u64, filled(0xEE, BLOCK)))
                        .await;
                    c.result
                        .unwrap_or_else(|err| panic!("read of block {i}: {err}"));
                    assert_eq!(
                        &c.buf.expect("buffer back")[..],
                        &pattern(1000 + i, BLOCK)[..],
                        "block {i}"
                    );
                    let off = (n + 2 * i) * BLOCK as u64;
                    let c = e
                        .submit(IoRequest::write(
                            &f,
                            off,
                            pattern(5000 + i, 2 * BLOCK),
                            false,
                        ))
                        .await;
                    c.result
                        .unwrap_or_else(|err| panic!("write at block {}: {err}", n + 2 * i));
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("read task");
        }
        let back = read(&*fx.engine, &f, n * BLOCK as u64, 2 * n as usize * BLOCK).await;
        for (i, chunk) in back.chunks(2 * BLOCK).enumerate() {
            assert_eq!(
                chunk,
                &pattern(5000 + i as u64, 2 * BLOCK)[..],
                "two-block write {i}"
            );
        }
    }

    pub async fn drop_idle_engine_does_not_hang(fx: Fixture) {
        let Fixture { engine, dir } = fx;
        let f = {
            let (file, _) = open_direct(&dir.path().join("idle"), true).expect("open");
            file
        };
        write(&*engine, &f, 0, pattern(11, BLOCK), false).await;
        // Let the data-path threads fall asleep before the drop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop_within(engine, Duration::from_secs(10)).await;
    }

    /// Dropping the engine with requests still queued completes every one of them.
    pub async fn drop_with_queued_work_completes_it(fx: Fixture) {
        let f = fx.file("queued");
        let Fixture { engine, dir } = fx;
        let pending: Vec<_> = (0..64_u64)
            .map(|i| {
                engine.submit(IoRequest::write(
                    &f,
                    i * BLOCK as u64,
                    pattern(2000 + i, BLOCK),
                    false,
                ))
            })
            .collect();
        drop_within(engine, Duration::from_secs(10)).await;
        for (i, c) in pending.into_iter().enumerate() {
            let c = c.await;
            c.result
                .unwrap_or_else(|err| panic!("queued write {i}: {err}"));
            assert!(c.buf.is_some());
        }
        let written = std::fs::read(dir.path().join("queued")).expect("read back");
        for (i, chunk) in written.chunks(BLOCK).enumerate() {
            assert_eq!(chunk, &pattern(2000 + i as u64, BLOCK)[..], "block {i}");
        }
        assert_eq!(written.len(), 64 * BLOCK);
    }
}

/// Instantiate every case once per engine.
macro_rules! conformance_suite {
    ($($case:ident),* $(,)?) => {
        mod uring {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    if let Some(fx) = super::Fixture::new(volume::io::EngineKind::Uring) {
                        super::cases::$case(fx).await;
                    }
                }
            )*
        }
        mod sync {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let fx = super::Fixture::new(volume::io::EngineKind::Sync).expect("the sync engine always starts");
                    super::cases::$case(fx).await;
                }
            )*
        }
    };
}

conformance_suite!(
    write_read_round_trip,
    scatter_gather,
    many_segments,
    large_transfer,
    dsync_writes_and_fsync,
    write_then_sync,
    inline_requests_complete_at_submission,
    read_past_eof_fails_with_buffer,
    invalid_requests_are_refused_with_buffer,
    empty_requests_complete,
    concurrent_requests,
    drop_idle_engine_does_not_hang,
    drop_with_queued_work_completes_it,
);

/// What one request came to, in terms that must not depend on the engine.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    step: &'static str,
    /// `Ok`, or the error's kind and errno.
    result: Result<(), (io::ErrorKind, Option<i32>)>,
    /// The returned buffer's bytes, if one came back.
    buf: Option<Vec<u8>>,
}

/// One script of successful and failing requests; the outcome of each step, in order.
async fn run_script(e: &dyn IoEngine, f: &IoFile) -> Vec<Outcome> {
    let mut steps: Vec<(&'static str, IoRequest)> = Vec::new();
    steps.push((
        "write 16K at 0",
        IoRequest::write(f, 0, pattern(20, 4 * BLOCK), false),
    ));
    steps.push((
        "dsync write 4K at 32K",
        IoRequest::write(f, 8 * BLOCK as u64, pattern(21, BLOCK), true),
    ));
    let mut scatter = IoRequest::write(f, 0, pattern(22, 3 * BLOCK), false);
    scatter.segments = vec![
        segment(12 * BLOCK as u64, 0, BLOCK),
        segment(BLOCK as u64, BLOCK, 2 * BLOCK),
    ];
    steps.push(("scatter write", scatter));
    steps.push(("fsync", IoRequest::fsync(f)));
    steps.push((
        "write then sync 4K at 40K",
        IoRequest::write_then_sync(f, 10 * BLOCK as u64, pattern(24, BLOCK)),
    ));
    steps.push((
        "read 52K at 0",
        IoRequest::read(f, 0, filled(0xEE, 13 * BLOCK)),
    ));
    let mut gather = IoRequest::read(f, 0, filled(0xEE, 3 * BLOCK));
    gather.segments = vec![
        segment(12 * BLOCK as u64, 2 * BLOCK, BLOCK),
        segment(0, 0, 2 * BLOCK),
    ];
    steps.push(("gather read", gather));
    steps.push((
        "read past EOF",
        IoRequest::read(f, 20 * BLOCK as u64, filled(0xEE, BLOCK)),
    ));
    steps.push((
        "read across EOF",
        IoRequest::read(f, 12 * BLOCK as u64, filled(0xEE, 2 * BLOCK)),
    ));
    let mut outside = IoRequest::read(f, 0, filled(0xEE, BLOCK));
    outside.segments = vec![segment(0, BLOCK, 1)];
    steps.push(("segment outside buffer", outside));
    let mut no_buf = IoRequest::write(f, 0, IoBuf::zeroed(BLOCK), false);
    no_buf.buf = None;
    steps.push(("write without buffer", no_buf));
    steps.push((
        "misaligned write",
        IoRequest::write(f, 512 + 1, pattern(23, BLOCK), false),
    ));
    let mut empty = IoRequest::read(f, 0, filled(0xEE, BLOCK));
    empty.segments = vec![segment(0, 0, 0), segment(BLOCK as u64, 0, BLOCK)];
    steps.push(("empty and full segment", empty));

    let mut out = Vec::new();
    for (step, req) in steps {
        let c = e.submit(req).await;
        out.push(Outcome {
            step,
            result: c.result.map_err(|err| (err.kind(), err.raw_os_error())),
            buf: c.buf.map(|b| b.to_vec()),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_results_across_engines() {
    let Some(uring) = Fixture::new(EngineKind::Uring) else {
        return;
    };
    let sync = Fixture::new(EngineKind::Sync).expect("the sync engine always starts");
    let a = run_script(&*uring.engine, &uring.file("script")).await;
    let b = run_script(&*sync.engine, &sync.file("script")).await;
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "io_uring and sync differ at step {:?}", x.step);
    }
    // The script exercises both outcomes, so the comparison means something.
    assert!(a.iter().any(|o| o.result.is_ok()) && a.iter().any(|o| o.result.is_err()));
    let fa = std::fs::read(uring.dir.path().join("script")).expect("read back");
    let fb = std::fs::read(sync.dir.path().join("script")).expect("read back");
    assert_eq!(fa.len(), 13 * BLOCK);
    assert!(fa == fb, "the two engines left different file contents");
}
