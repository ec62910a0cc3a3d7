//! Clients of a peer's replica server: a remote replica as a [`BlockDevice`], and a control
//! client to create, delete and inspect replicas.
//!
//! Both sit on one multiplexed TCP connection. Requests get increasing ids; a writer task
//! owns the socket's write half and writes frames in the order they are queued, and a reader
//! task routes each response to the waiting request by id. Callers never touch the socket, so
//! cancelling a request (dropping its future, or its timeout firing) can never leave half a
//! frame on the wire.
//!
//! Invariants:
//! - Every request is bounded by the connection's timeout. A timeout, an I/O error or a
//!   malformed response *breaks* the connection: it is closed, every pending request fails at
//!   once with [`DeviceErrorKind::Io`] and the reason, and every later request fails
//!   immediately. A timed-out write may still land on the replica later, so a connection that
//!   has timed out cannot be trusted with more I/O; the owner ejects the replica and, to use
//!   it again, connects anew (registering its epoch again).
//! - A write's buffer travels to the writer task and comes back to the caller after the frame
//!   has been written (or abandoned), so the caller always gets its buffer back.
//! - A `Stale` answer is reported as [`DeviceErrorKind::Fenced`]: a newer attachment owns the
//!   volume and this one must stop.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, ExtentGeneration, Generations,
    WriteFlags,
};
use volume::io::IoBuf;

use crate::nexus::Resizable;
use crate::tls::Tls;
use crate::wire::{self, Request, Response, MAX_IO};

/// Requests queued for the writer task before callers wait for room.
const QUEUE: usize = 256;

/// How to reach a replica server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The bound on connecting and on each request.
    pub timeout: Duration,
    /// This node's ID, sent in `Hello` (with TLS, the server checks that this node's
    /// certificate names it).
    pub node: String,
    /// Mutual TLS with the server, whose certificate must name node `peer`; `None`:
    /// plaintext.
    pub tls: Option<(Arc<Tls>, String)>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            node: String::from("unknown"),
            tls: None,
        }
    }
}

/// A request on its way to the writer task, with where to return it once written.
struct Outgoing {
    id: u64,
    req: Request,
    back: Option<oneshot::Sender<Request>>,
}

/// State shared between the connection handle and its tasks.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    pending: Mutex<Pending>,
    /// Set to `true` to make both tasks stop (and so close the socket).
    closing: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Response>>,
    /// Why the connection broke, once it has.
    broken: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A map of channels: no panic can leave it inconsistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Break the connection: remember why (the first reason wins), fail every pending request
    /// and stop both tasks.
    fn fail(&self, reason: String) {
        let waiters = {
            let mut p = self.lock();
            if p.broken.is_none() {
                tracing::warn!(addr = %self.addr, %reason, "replica connection broken");
                p.broken = Some(reason);
            }
            std::mem::take(&mut p.waiters)
        };
        // Dropping the senders wakes every waiter with the broken reason.
        drop(waiters);
        self.closing.send_replace(true);
    }

    fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }
}

/// One multiplexed connection to a replica server.
#[derive(Debug)]
struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    next_id: AtomicU64,
    timeout: Duration,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Nobody can send on this connection any more: stop the reader too.
        self.shared.closing.send_replace(true);
    }
}

/// Removes a request's waiter if its caller gives up before the response arrives.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiters.remove(&self.id);
    }
}

/// Why a call failed, before it is given a device-error shape.
struct CallError(String);

impl Conn {
    async fn connect(addr: SocketAddr, opts: &RemoteOptions) -> Result<Self, CallError> {
        let stream = match tokio::time::timeout(opts.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(CallError(format!(
                    "cannot connect to replica server {addr}: {e}"
                )))
            }
            Err(_) => {
                return Err(CallError(format!(
                    "connecting to replica server {addr} timed out after {:?}",
                    opts.timeout
                )))
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "could not set TCP_NODELAY");
        }
        let (closing, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            addr,
            pending: Mutex::default(),
            closing,
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Some((tls, peer)) = &opts.tls {
            let stream = match tokio::time::timeout(opts.timeout, tls.connect(peer, stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(CallError(format!(
                        "TLS with replica server {addr} (node {peer}) failed: {e}"
                    )))
                }
                Err(_) => {
                    return Err(CallError(format!(
                        "TLS with replica server {addr} (node {peer}) timed out after {:?}",
                        opts.timeout
                    )))
                }
            };
            let (rd, wr) = tokio::io::split(stream);
            tokio::spawn(write_requests(shared.clone(), BufWriter::new(wr), rx));
            tokio::spawn(read_responses(shared.clone(), rd));
        } else {
            let (rd, wr) = stream.into_split();
            tokio::spawn(write_requests(shared.clone(), BufWriter::new(wr), rx));
            tokio::spawn(read_responses(shared.clone(), rd));
        }
        let conn = Self {
            shared,
            tx,
            next_id: AtomicU64::new(1),
            timeout: opts.timeout,
        };
        match conn
            .call(Request::Hello {
                node: opts.node.clone(),
            })
            .await
            .0?
        {
            Response::Ok => Ok(conn),
            other => Err(CallError(format!(
                "replica server {addr} answered hello with {}",
                describe(&other)
            ))),
        }
    }

    /// Send `req` and wait for its response. A write's request comes back in the second
    /// element (so its buffer does).
    async fn call(&self, req: Request) -> (Result<Response, CallError>, Option<Request>) {
        let addr = self.shared.addr;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (resp_tx, resp_rx) = oneshot::channel();
        {
            let mut p = self.shared.lock();
            if let Some(reason) = &p.broken {
                let e = CallError(format!(
                    "connection to replica server {addr} is broken: {reason}"
                ));
                return (Err(e), Some(req));
            }
            p.waiters.insert(id, resp_tx);
        }
        let _guard = WaiterGuard {
            shared: &self.shared,
            id,
        };
        let (back_tx, back_rx) = if wire::Message::payload(&req).is_some() {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let mut unsent = Some(req);
        let result = tokio::time::timeout(self.timeout, async {
            // `reserve` is cancel-safe: nothing is moved until there is room.
            let Ok(permit) = self.tx.reserve().await else {
                return Err(self.broken_error());
            };
            if let Some(req) = unsent.take() {
                permit.send(Outgoing {
                    id,
                    req,
                    back: back_tx,
                });
            }
            resp_rx.await.map_err(|_| self.broken_error())
        })
        .await
        .unwrap_or_else(|_| {
            let reason = format!("request timed out after {:?}", self.timeout);
            self.shared.fail(reason.clone());
            Err(CallError(format!("replica server {addr}: {reason}")))
        });
        let req = match (unsent, back_rx) {
            (Some(req), _) => Some(req),
            (None, Some(back)) => {
                // The writer returns the request right after writing it, or as soon as the
                // connection is closing; the bound only guards against a writer that died.
                tokio::time::timeout(self.timeout, back)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            (None, None) => None,
        };
        (result, req)
    }

    fn broken_error(&self) -> CallError {
        let reason = self
            .shared
            .broken()
            .unwrap_or_else(|| "the connection closed".into());
        CallError(format!(
            "connection to replica server {} is broken: {reason}",
            self.shared.addr
        ))
    }
}

/// The writer task: write queued frames, flushing when the queue is empty, and return every
/// request that asked for it.
async fn write_requests<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut closing = shared.closing.subscribe();
    loop {
        let out = tokio::select! {
            o = rx.recv() => match o {
                Some(o) => o,
                None => break,
            },
            () = stopped(&mut closing) => break,
        };
        let result = tokio::select! {
            r = async {
                wire::write_frame(&mut w, out.id, &out.req).await?;
                if rx.is_empty() {
                    w.flush().await?;
                }
                Ok::<(), wire::WireError>(())
            } => r.map_err(|e| format!("writing to the replica server failed: {e}")),
            () = stopped(&mut closing) => Err("the connection is closing".into()),
        };
        if let Some(back) = out.back {
            let _ = back.send(out.req);
        }
        if let Err(reason) = result {
            shared.fail(reason);
            break;
        }
    }
    // Hand back anything still queued.
    rx.close();
    while let Ok(out) = rx.try_recv() {
        if let Some(back) = out.back {
            let _ = back.send(out.req);
        }
    }
    let _ = w.shutdown().await;
}

/// The reader task: route responses to their waiters until the connection ends.
async fn read_responses<R: AsyncRead + Unpin>(shared: Arc<Shared>, rd: R) {
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut closing = shared.closing.subscribe();
    loop {
        let frame = tokio::select! {
            f = wire::read_frame::<Response, _>(&mut rd) => f,
            () = stopped(&mut closing) => break,
        };
        match frame {
            Ok(Some((id, resp))) => {
                let waiter = shared.lock().waiters.remove(&id);
                match waiter {
                    Some(w) => {
                        let _ = w.send(resp);
                    }
                    None => {
                        tracing::debug!(addr = %shared.addr, id, "response to a request nobody waits for");
                    }
                }
            }
            Ok(None) => {
                shared.fail("the replica server closed the connection".into());
                break;
            }
            Err(e) => {
                shared.fail(format!("bad response from the replica server: {e}"));
                break;
            }
        }
    }
}

fn describe(r: &Response) -> String {
    match r {
        Response::Ok => "ok".into(),
        Response::Data(d) => format!("{} bytes of data", d.len()),
        Response::Stat { .. } => "stat".into(),
        Response::Generations { extents, .. } => format!("{} extent generations", extents.len()),
        Response::Stale { .. } => "stale".into(),
        Response::Error { code, message } => format!("error {code:?}: {message}"),
    }
}

/// Where an error happened, for turning responses into [`DeviceError`]s.
#[derive(Clone, Copy)]
struct At {
    op: &'static str,
    offset: u64,
    len: u64,
}

impl At {
    fn new(op: &'static str, offset: u64, len: u64) -> Self {
        Self { op, offset, len }
    }

    fn io(self, message: String) -> DeviceError {
        DeviceError::new(DeviceErrorKind::Io, self.op, self.offset, self.len, message)
    }
}

/// A control client of one replica server: create, delete, stat and register, and the
/// snapshot requests answered by `Ok` ([`ReplicaClient::ask`]).
#[derive(Debug, Clone)]
pub struct ReplicaClient {
    conn: Arc<Conn>,
}

impl ReplicaClient {
    /// Connect to the replica server at `addr` and say hello.
    ///
    /// # Errors
    /// `Io` if the server cannot be reached in time or does not speak the protocol.
    pub async fn connect(addr: SocketAddr, opts: &RemoteOptions) -> Result<Self, DeviceError> {
        let opts = opts.clone();
        let conn = crate::net::run(async move { Conn::connect(addr, &opts).await })
            .await
            .map_err(|e| At::new("connect", 0, 0).io(e.0))?;
        Ok(Self {
            conn: Arc::new(conn),
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.conn.shared.addr
    }

    /// Send any request and return the raw response.
    ///
    /// # Errors
    /// `Io` if the connection is broken or the request timed out.
    pub async fn call(&self, req: Request) -> Result<Response, DeviceError> {
        self.conn
            .call(req)
            .await
            .0
            .map_err(|e| At::new("call", 0, 0).io(e.0))
    }

    async fn expect_ok(&self, at: At, req: Request) -> Result<(), DeviceError> {
        let resp = self.conn.call(req).await.0.map_err(|e| at.io(e.0))?;
        match resp {
            Response::Ok => Ok(()),
            other => Err(response_error(self.addr(), None, at, other)),
        }
    }

    /// Create the volume's replica on the server (idempotent for the same size).
    ///
    /// # Errors
    /// The server refused (see [`wire::ErrCode`]) or the connection failed.
    pub async fn create(&self, volume: &str, size: u64) -> Result<(), DeviceError> {
        let req = Request::Create {
            volume: volume.into(),
            size,
        };
        self.expect_ok(At::new("create", 0, size), req).await
    }

    /// Grow the volume's replica on the server to at least `size` bytes (idempotent: a
    /// replica that already holds `size` bytes is left alone). With `dry_run`, only check that
    /// it could: the replica exists and its pool device can hold `size` bytes.
    ///
    /// # Errors
    /// The server refused (`Closed` for no such replica, `NoSpace` when its pool device is
    /// too small; see [`wire::ErrCode`]) or the connection failed.
    pub async fn resize(&self, volume: &str, size: u64, dry_run: bool) -> Result<(), DeviceError> {
        let req = Request::Resize {
            volume: volume.into(),
            size,
            dry_run,
        };
        self.expect_ok(At::new("resize", 0, size), req).await
    }

    /// Delete the volume's replica on the server (idempotent).
    ///
    /// # Errors
    /// The server refused or the connection failed.
    pub async fn delete(&self, volume: &str) -> Result<(), DeviceError> {
        let req = Request::Delete {
            volume: volume.into(),
        };
        self.expect_ok(At::new("delete", 0, 0), req).await
    }

    /// Register an attachment epoch for the volume.
    ///
    /// # Errors
    /// `Fenced` if a newer epoch is registered; otherwise the server refused or the
    /// connection failed.
    pub async fn register(&self, volume: &str, epoch: u64) -> Result<(), DeviceError> {
        let req = Request::Register {
            volume: volume.into(),
            epoch,
        };
        self.expect_ok(At::new("register", 0, 0), req).await
    }

    /// Send a control request answered by `Ok` (a snapshot's clone, deletion or taking):
    /// the server's refusal comes back as the control error it was.
    ///
    /// # Errors
    /// What the server answered (`NotFound`, `InvalidArgument`, `Conflict`,
    /// `ResourceExhausted`, else `Unavailable` with its message), or `Unavailable` when the
    /// connection failed.
    pub async fn ask(&self, req: Request) -> Result<(), api::ControlError> {
        use api::{ControlError, ErrorKind};
        let addr = self.addr();
        match self.conn.call(req).await.0 {
            Ok(Response::Ok) => Ok(()),
            Ok(Response::Error { code, message }) => {
                let kind = match code {
                    wire::ErrCode::NotFound => ErrorKind::NotFound,
                    wire::ErrCode::Invalid => ErrorKind::InvalidArgument,
                    wire::ErrCode::Conflict => ErrorKind::Conflict,
                    wire::ErrCode::NoSpace => ErrorKind::ResourceExhausted,
                    _ => ErrorKind::Unavailable,
                };
                Err(ControlError::new(
                    kind,
                    format!("node at {addr}: {message}"),
                ))
            }
            Ok(other) => Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "node at {addr} sent an unexpected response ({})",
                    describe(&other)
                ),
            )),
            Err(e) => Err(ControlError::new(ErrorKind::Unavailable, e.0)),
        }
    }

    /// The replica's size and allocated bytes.
    ///
    /// # Errors
    /// `Closed` if the server has no such replica; otherwise the connection failed.
    pub async fn stat(&self, volume: &str) -> Result<(u64, u64), DeviceError> {
        let at = At::new("stat", 0, 0);
        let req = Request::Stat {
            volume: volume.into(),
        };
        match self.conn.call(req).await.0.map_err(|e| at.io(e.0))? {
            Response::Stat { size, allocated } => Ok((size, allocated)),
            other => Err(response_error(self.addr(), None, at, other)),
        }
    }
}

/// Turn a non-success response into a device error.
fn response_error(addr: SocketAddr, epoch: Option<u64>, at: At, resp: Response) -> DeviceError {
    match resp {
        Response::Stale { .. } => {
            let ours = epoch.map_or_else(String::new, |e| format!(" than {e}"));
            DeviceError::new(
                DeviceErrorKind::Fenced,
                at.op,
                at.offset,
                at.len,
                format!(
                    "replica server {addr} has registered a newer attachment epoch{ours}; another node has taken the volume over"
                ),
            )
        }
        Response::Error { code, message } => DeviceError::new(
            code.device_kind(),
            at.op,
            at.offset,
            at.len,
            format!("replica server {addr}: {message}"),
        ),
        other => at.io(format!(
            "replica server {addr} sent an unexpected response ({})",
            describe(&other)
        )),
    }
}

/// A volume's replica on another node, used as a [`BlockDevice`]. Cheap to clone.
#[derive(Clone)]
pub struct RemoteReplica {
    inner: Arc<RemoteInner>,
}

struct RemoteInner {
    client: ReplicaClient,
    volume: String,
    epoch: u64,
    size: AtomicU64,
}

impl fmt::Debug for RemoteReplica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteReplica")
            .field("addr", &self.inner.client.addr())
            .field("volume", &self.inner.volume)
            .field("epoch", &self.inner.epoch)
            .finish_non_exhaustive()
    }
}

impl RemoteReplica {
    /// Connect to `volume`'s replica on the server at `addr`, register `epoch` and learn the
    /// replica's size.
    ///
    /// # Errors
    /// `Fenced` if the server has a newer epoch registered; `Closed` if it has no replica of
    /// the volume; `Io` if it cannot be reached in time or misbehaves.
    pub async fn connect(
        addr: SocketAddr,
        volume: &str,
        epoch: u64,
        opts: RemoteOptions,
    ) -> Result<Self, DeviceError> {
        let client = ReplicaClient::connect(addr, &opts).await?;
        client
            .expect_ok(
                At::new("register", 0, 0),
                Request::Register {
                    volume: volume.into(),
                    epoch,
                },
            )
            .await
            .map_err(|mut e| {
                if e.kind == DeviceErrorKind::Fenced {
                    e.message = format!("{}; epoch {epoch} cannot be registered", e.message);
                }
                e
            })?;
        let (size, _) = client.stat(volume).await?;
        Ok(Self {
            inner: Arc::new(RemoteInner {
                client,
                volume: volume.into(),
                epoch,
                size: AtomicU64::new(size),
            }),
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.client.addr()
    }

    /// The volume.
    pub fn volume(&self) -> &str {
        &self.inner.volume
    }

    /// The attachment epoch every request carries.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Why the connection broke, if it has; a broken replica fails every request.
    pub fn broken(&self) -> Option<String> {
        self.inner.client.conn.shared.broken()
    }

    /// Ask the server for the replica's size (remembered for [`BlockDevice::size`]) and
    /// allocated bytes.
    ///
    /// # Errors
    /// As [`ReplicaClient::stat`].
    pub async fn stat(&self) -> Result<(u64, u64), DeviceError> {
        let (size, allocated) = self.inner.client.stat(&self.inner.volume).await?;
        self.inner.size.store(size, Ordering::Relaxed);
        Ok((size, allocated))
    }

    /// Snapshot the replica as `name` on its server (idempotent), or with `revert` make it
    /// read what its snapshot `name` holds; fenced by this attachment's epoch. The caller
    /// holds the volume's writes (see [`crate::nexus::Nexus::hold_writes`]).
    ///
    /// # Errors
    /// `Fenced` for a newer attachment; the server's refusal; the connection failed.
    pub async fn snapshot(&self, name: &str, revert: bool) -> Result<(), DeviceError> {
        let (volume, epoch) = (self.inner.volume.clone(), self.inner.epoch);
        let (op, req) = if revert {
            let snapshot = name.into();
            (
                "revert",
                Request::Revert {
                    volume,
                    epoch,
                    snapshot,
                },
            )
        } else {
            let name = name.into();
            (
                "snapshot",
                Request::Snapshot {
                    volume,
                    epoch,
                    name,
                },
            )
        };
        self.simple(At::new(op, 0, 0), req).await
    }

    /// The snapshots the replica reads through (see [`volume::pool::Replica::chain`]).
    ///
    /// # Errors
    /// The server refused, or sent something else than a chain.
    pub async fn chain(&self) -> Result<volume::pool::Chain, DeviceError> {
        let at = At::new("chain", 0, 0);
        let req = Request::Chain {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
        };
        match self.inner.client.conn.call(req).await.0 {
            Ok(Response::Data(json)) => serde_json::from_slice(&json)
                .map_err(|e| at.io(format!("replica server {}: a bad chain: {e}", self.addr()))),
            Ok(other) => Err(self.error(at, other)),
            Err(e) => Err(at.io(e.0)),
        }
    }

    /// The extent `extent` that link `link` of the chain read at `chain_epoch` maps itself
    /// (see [`volume::pool::Replica::read_link`]).
    ///
    /// # Errors
    /// The chain changed, the server refused, or the connection failed.
    pub async fn read_link(
        &self,
        chain_epoch: u64,
        link: usize,
        extent: u64,
    ) -> Result<IoBuf, DeviceError> {
        let size = volume::pool::format::EXTENT;
        let at = At::new("read_link", extent * size, size);
        let req = Request::ReadLink {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
            chain_epoch,
            link: u32::try_from(link).unwrap_or(u32::MAX),
            extent,
        };
        match self.inner.client.conn.call(req).await.0 {
            Ok(Response::Data(data)) if data.len() as u64 == size => Ok(data),
            Ok(Response::Data(data)) => Err(at.io(format!(
                "replica server {} returned {} bytes for an extent",
                self.addr(),
                data.len()
            ))),
            Ok(other) => Err(self.error(at, other)),
            Err(e) => Err(at.io(e.0)),
        }
    }

    fn error(&self, at: At, resp: Response) -> DeviceError {
        response_error(self.addr(), Some(self.inner.epoch), at, resp)
    }

    async fn simple(&self, at: At, req: Request) -> Result<(), DeviceError> {
        match self
            .inner
            .client
            .conn
            .call(req)
            .await
            .0
            .map_err(|e| at.io(e.0))?
        {
            Response::Ok => Ok(()),
            other => Err(self.error(at, other)),
        }
    }
}

fn too_large(at: At) -> DeviceError {
    at.io(format!(
        "requests above {MAX_IO} bytes cannot be sent to a remote replica; split them"
    ))
}

impl BlockDevice for RemoteReplica {
    fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Relaxed)
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> BufResult {
        let at = At::new("read", offset, buf.len() as u64);
        if buf.len() > MAX_IO {
            return Err(BufError {
                error: too_large(at),
                buf,
            });
        }
        let req = Request::Read {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
            offset,
            len: buf.len() as u32,
        };
        let error = match self.inner.client.conn.call(req).await.0 {
            Ok(Response::Data(data)) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                return Ok(buf);
            }
            Ok(Response::Data(data)) => at.io(format!(
                "replica server {} returned {} bytes for a read of {}",
                self.addr(),
                data.len(),
                buf.len()
            )),
            Ok(other) => self.error(at, other),
            Err(e) => at.io(e.0),
        };
        Err(BufError { error, buf })
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let at = At::new("write", offset, buf.len() as u64);
        if buf.len() > MAX_IO {
            return Err(BufError {
                error: too_large(at),
                buf,
            });
        }
        let len = buf.len();
        let req = Request::Write {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
            offset,
            fua: flags.fua,
            generation: flags.generation,
            data: buf,
        };
        let (result, back) = self.inner.client.conn.call(req).await;
        let buf = match back {
            Some(Request::Write { data, .. }) => data,
            // Only if the writer task died holding the buffer; its contents are lost.
            _ => IoBuf::zeroed(len),
        };
        let error = match result {
            Ok(Response::Ok) => return Ok(buf),
            Ok(other) => self.error(at, other),
            Err(e) => at.io(e.0),
        };
        Err(BufError { error, buf })
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let req = Request::Flush {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
        };
        self.simple(At::new("flush", 0, 0), req).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let req = Request::Discard {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
            offset,
            len,
        };
        self.simple(At::new("discard", offset, len), req).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let req = Request::WriteZeroes {
            volume: self.inner.volume.clone(),
            epoch: self.inner.epoch,
            offset,
            len,
        };
        self.simple(At::new("write_zeroes", offset, len), req).await
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        let at = At::new("generations", 0, 0);
        let mut out = Generations::default();
        let mut from = 0;
        loop {
            let req = Request::Generations {
                volume: self.inner.volume.clone(),
                epoch: self.inner.epoch,
                from,
            };
            match self.inner.client.conn.call(req).await.0 {
                Ok(Response::Generations {
                    extent_size,
                    extents,
                    next,
                }) => {
                    out.extent_size = extent_size;
                    // Pages never add up to more extents than the largest volume has.
                    let most = (api::MAX_VOLUME_SIZE / extent_size.max(1)) as usize;
                    if out.extents.len().saturating_add(extents.len()) > most {
                        return Err(at.io(format!(
                            "the replica server sent more than {most} extent generations"
                        )));
                    }
                    out.extents.extend(
                        extents
                            .into_iter()
                            .map(|(extent, generation)| ExtentGeneration { extent, generation }),
                    );
                    match next {
                        Some(n) if n > from => from = n,
                        Some(_) => return Err(at.io("the replica server repeated a page".into())),
                        None => return Ok(out),
                    }
                }
                Ok(other) => return Err(self.error(at, other)),
                Err(e) => return Err(at.io(e.0)),
            }
        }
    }
}

impl Resizable for RemoteReplica {
    /// Asks the server: the size it reports is remembered for [`BlockDevice::size`].
    async fn refresh_size(&self) -> Result<u64, DeviceError> {
        self.stat().await.map(|(size, _)| size)
    }
}

/// Resolve once the watched flag is `true` (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not be held across an await, so drop it here.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
