//! The replica server: serves this node's local replicas to peers over the wire protocol.
//!
//! Each accepted connection gets a reader loop and a writer task. The reader decodes request
//! frames and spawns one task per request, so requests on one connection execute
//! concurrently; each task sends its response, tagged with the request id, through a channel
//! to the writer, which writes responses in completion order. Clients match them by id.
//!
//! Invariants:
//! - Every data request's epoch is checked against the [`FenceTable`] before the replica is
//!   touched; an older epoch is answered with [`Response::Stale`] and does nothing.
//! - A data request holds its [`Admission`](crate::fence::Admission) from the fence check
//!   until its I/O completes, and `Register` waits for every admitted request (see
//!   [`crate::fence`]). So once a `Register` has been answered `Ok`, no request carrying an
//!   older epoch can still be running or start on this node, from a peer or from the local
//!   data path.
//! - At most [`MAX_IN_FLIGHT`] requests per connection run at once; the reader stops reading
//!   until one completes, which bounds the memory one peer can pin.
//! - With TLS ([`ReplicaServer::with_tls`]), nothing is served before a `Hello` naming a node
//!   the client certificate is valid for and the store lists; `Register`, `Delete`, `Create`,
//!   `Resize`, `Clone`, `DeleteSnapshot` and `TakeSnapshot` are then checked against the
//!   store, and every data request (and `Snapshot`, `Revert`, `Chain`, `ReadLink`) must come
//!   on the connection that registered the current epoch (see [`crate::tls`]).
//! - Peers are bounded ([`Limits`]): connections, the hello's and each frame's arrival, and the
//!   bytes requests hold per connection and per server.
//! - A malformed frame closes that connection only. Request tasks are never aborted: a write
//!   that has started runs to completion even if its connection or the server goes away.
//! - [`ServerHandle::stop`] returns only once every request task has finished (bounded by
//!   [`DRAIN_TIMEOUT`]), so the daemon closes storage after the last peer write returned;
//!   requests that arrive while it waits are not started.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use api::{format_size, ControlError, ErrorKind, VolumeControl, VolumeName, VolumeSpec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, RwLock, Semaphore};
use tokio::task::JoinHandle;
use volume::device::{BlockDevice, DeviceError, WriteFlags};
use volume::io::IoBuf;
use volume::pool::Storage;

use crate::fence::{FenceError, FenceTable, RegisterError};
use crate::tls::{self, Change, Members, Tls};
use crate::wire::{self, ErrCode, Request, Response, MAX_GENERATIONS, MAX_IO};

/// The most requests of one connection executing at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// The most connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 128;

/// The most request and response bytes one connection may hold at once (KiB).
pub const CONNECTION_BUDGET_KIB: u32 = 128 << 10;

/// The most request and response bytes every connection together may hold at once (KiB).
pub const SERVER_BUDGET_KIB: usize = 1 << 20;

/// How long a new connection may take to say hello (after the TLS handshake, if any).
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a frame may take to arrive once its first byte has: a peer that dribbles bytes
/// is cut off (an idle connection between frames is fine).
pub const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long [`ServerHandle::stop`] waits for requests in flight.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The bounds a server puts on its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as they come.
    pub max_connections: usize,
    /// How long a new connection may take to say hello (after the TLS handshake, if any).
    pub hello_timeout: std::time::Duration,
    /// How long a frame may take to arrive once its first byte has.
    pub frame_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            hello_timeout: HELLO_TIMEOUT,
            frame_timeout: FRAME_TIMEOUT,
        }
    }
}

/// Shared by every connection.
#[derive(Debug)]
struct Ctx {
    storage: Arc<Storage>,
    fence: Arc<FenceTable>,
    /// Held shared by every request task; [`ServerHandle::stop`] takes it exclusively to wait
    /// for them.
    drain: Arc<RwLock<()>>,
    /// Mutual TLS, and who may connect (see [`crate::tls`]); `None`: plaintext.
    tls: Option<(Arc<Tls>, Arc<dyn Members>)>,
    /// The bounds on peers.
    limits: Limits,
    /// Connections served now (see [`Limits::max_connections`]).
    connections: Arc<Semaphore>,
    /// Bytes held by requests of every connection, in KiB (see [`SERVER_BUDGET_KIB`]).
    budget: Arc<Semaphore>,
    /// The node's control plane, for the requests only it can carry out (set once it
    /// exists, after the server: see [`ServerHandle::set_control`]).
    control: Arc<std::sync::OnceLock<Arc<dyn Control>>>,
}

/// A future answered by a [`Control`].
pub type ControlFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ControlError>> + Send + 'a>>;

/// What the replica server asks of its node's control plane: requests that need more than
/// this node's storage.
pub trait Control: Send + Sync + std::fmt::Debug {
    /// Take snapshot `name` of `volume`, attached on this node, under its write barrier, and
    /// record it in the cluster store.
    fn take_snapshot<'a>(
        &'a self,
        volume: &'a VolumeName,
        name: &'a VolumeName,
    ) -> ControlFuture<'a>;
}

/// A bound replica server, not yet serving.
#[derive(Debug)]
pub struct ReplicaServer {
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: watch::Sender<bool>,
}

/// A running server spawned with [`ReplicaServer::spawn`].
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    drain: Arc<RwLock<()>>,
    control: Arc<std::sync::OnceLock<Arc<dyn Control>>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ask the server to stop: it stops accepting and closes every connection. Requests that
    /// already started still run to completion.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Hand the server its node's control plane (once; later calls change nothing). Until
    /// then, the requests that need it are refused as unavailable.
    pub fn set_control(&self, control: Arc<dyn Control>) {
        let _ = self.control.set(control);
    }

    /// Shut down, and wait for the accept loop to end and for every request in flight to
    /// finish (at most [`DRAIN_TIMEOUT`]).
    pub async fn stop(self) {
        self.shutdown();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "replica server task failed");
        }
        if tokio::time::timeout(DRAIN_TIMEOUT, self.drain.write())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "replica requests still in flight after shutdown");
        }
    }
}

impl ReplicaServer {
    /// Bind the listening socket.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn bind(
        addr: SocketAddr,
        storage: Arc<Storage>,
        fence: Arc<FenceTable>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let (shutdown, _) = watch::channel(false);
        Ok(Self {
            listener,
            ctx: Arc::new(Ctx {
                storage,
                fence,
                drain: Arc::default(),
                tls: None,
                limits: Limits::default(),
                connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                budget: Arc::new(Semaphore::new(SERVER_BUDGET_KIB)),
                control: Arc::default(),
            }),
            shutdown,
        })
    }

    /// The address the server listens on (with the real port if bound to port 0).
    ///
    /// # Errors
    /// The socket cannot report its address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Bound peers by `limits` instead of the defaults (before [`Self::spawn`]).
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.limits = limits;
            ctx.connections = Arc::new(Semaphore::new(limits.max_connections));
        }
        self
    }

    /// Serve over mutual TLS only, to the nodes `members` names (before [`Self::spawn`]).
    #[must_use]
    pub fn with_tls(mut self, tls: Arc<Tls>, members: Arc<dyn Members>) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.tls = Some((tls, members));
        }
        self
    }

    /// Ask [`serve`](Self::serve) to stop (also before it starts).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Run on the current tokio runtime until [`ServerHandle::shutdown`] is called.
    ///
    /// # Errors
    /// The socket cannot report its address.
    pub fn spawn(self) -> io::Result<ServerHandle> {
        let addr = self.listener.local_addr()?;
        let shutdown = self.shutdown.clone();
        let drain = Arc::clone(&self.ctx.drain);
        let control = Arc::clone(&self.ctx.control);
        let task = tokio::spawn(self.serve());
        Ok(ServerHandle {
            addr,
            shutdown,
            task,
            drain,
            control,
        })
    }

    /// Accept and serve connections until shutdown is signalled.
    pub async fn serve(self) {
        let mut stop = self.shutdown.subscribe();
        tracing::info!(addr = ?self.listener.local_addr().ok(), "replica server listening");
        loop {
            tokio::select! {
                () = stopped(&mut stop) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = Arc::clone(&self.ctx.connections).try_acquire_owned() else {
                            tracing::warn!(%peer, max = self.ctx.limits.max_connections, "refused a replica connection: too many connections");
                            continue;
                        };
                        let ctx = self.ctx.clone();
                        let stop = self.shutdown.subscribe();
                        // Served on a network thread (see `crate::net`): the socket moves
                        // to that thread's runtime.
                        let stream = match stream.into_std() {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "cannot take an accepted replica connection");
                                continue;
                            }
                        };
                        crate::net::next().spawn(async move {
                            match TcpStream::from_std(stream) {
                                Ok(stream) => accepted_connection(ctx, stream, peer, stop).await,
                                Err(e) => tracing::warn!(%peer, error = %e, "cannot serve an accepted replica connection"),
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        // Usually a transient resource shortage (EMFILE); back off briefly.
                        tracing::warn!(error = %e, "accepting a replica connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        tracing::info!("replica server stopped");
    }
}

/// Set up an accepted connection (the TLS handshake, when configured), then serve it.
async fn accepted_connection(
    ctx: Arc<Ctx>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    // A peer that vanished (power, partition) is noticed within about a minute even when
    // nothing is sent.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%peer, error = %e, "could not set TCP keepalive");
    }
    let Some((tls, _)) = &ctx.tls else {
        return connection(ctx, stream, peer, stop, None).await;
    };
    match tls.accept(stream).await {
        Ok(stream) => {
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            connection(ctx, stream, peer, stop, cert).await;
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "refused a replica connection: TLS handshake failed");
        }
    }
}

/// Serve one connection until the peer closes it, it sends a malformed frame, or shutdown.
/// With TLS, `cert` is the client's verified certificate, and nothing is served until a
/// `Hello` names a node of the cluster that it certifies.
async fn connection<S>(
    ctx: Arc<Ctx>,
    stream: S,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let (tx, rx) = mpsc::channel::<(u64, Response)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_responses(BufWriter::new(wr), rx, peer));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(CONNECTION_BUDGET_KIB as usize));
    let mut node = String::from("?");
    let mut greeted = false;
    // Names this connection to the fence table: see `FenceTable::admit_session`.
    static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let session = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(%peer, "replica connection opened");
    loop {
        let permit = tokio::select! {
            () = stopped(&mut stop) => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let frame = tokio::select! {
            () = stopped(&mut stop) => break,
            f = next_frame(&mut rd, greeted, &ctx.limits) => f,
        };
        let (id, req) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%peer, %node, error = %e, "closing replica connection after a bad frame");
                break;
            }
        };
        if let Request::Hello { node: n } = &req {
            if let Some((_, members)) = &ctx.tls {
                let certified = cert.as_ref().is_some_and(|c| tls::certifies(c, n));
                if !certified || !members.is_node(n).await {
                    tracing::warn!(%peer, node = %n, certified, "refused a replica connection: its certificate does not name a node of the cluster");
                    let refused = error(ErrCode::Invalid, "not a node of this cluster");
                    let _ = tx.send((id, refused)).await;
                    break;
                }
            }
            tracing::debug!(%peer, node = %n, "replica client said hello");
            node.clone_from(n);
            greeted = true;
            if tx.send((id, Response::Ok)).await.is_err() {
                break;
            }
            continue;
        }
        if ctx.tls.is_some() && !greeted {
            tracing::warn!(%peer, "closing a replica connection: a request before hello");
            break;
        }
        // The bytes this request holds until its response is written: the reader waits
        // (reads nothing more) while this connection, or the server, is at its budget.
        let kib = request_kib(&req);
        let held = tokio::select! {
            () = stopped(&mut stop) => break,
            held = async {
                let mine = Arc::clone(&bytes).acquire_many_owned(kib).await.ok()?;
                let all = Arc::clone(&ctx.budget).acquire_many_owned(kib).await.ok()?;
                Some((mine, all))
            } => match held {
                Some(h) => h,
                None => break,
            },
        };
        // Stopping: requests that were not running yet are not started.
        let Ok(running) = Arc::clone(&ctx.drain).try_read_owned() else {
            break;
        };
        let ctx = ctx.clone();
        let tx = tx.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let _running = running;
            let resp = match authorize(&ctx, &node, &req).await {
                Ok(()) => handle(&ctx, req, session).await,
                Err(refused) => refused,
            };
            // The connection may be gone; the work is done either way.
            let _ = tx.send((id, resp)).await;
            drop(permit);
            drop(held);
        });
    }
    drop(tx);
    // The writer ends once every spawned request has replied (or the peer is gone). On
    // shutdown, stop waiting for it: the socket closes when it is dropped.
    if *stop.borrow() {
        writer.abort();
    } else if let Err(e) = writer.await {
        tracing::debug!(%peer, error = %e, "replica connection writer ended abnormally");
    }
    tracing::debug!(%peer, %node, "replica connection closed");
}

/// The next request of a connection: the first (the hello) must arrive whole within the
/// hello timeout; after that, waiting for a frame is unbounded but each must arrive whole
/// within the frame timeout of its first byte (see [`Limits`]).
async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    greeted: bool,
    limits: &Limits,
) -> Result<Option<(u64, Request)>, wire::WireError> {
    use tokio::io::AsyncBufReadExt;
    let limit = if greeted {
        if rd.fill_buf().await?.is_empty() {
            return Ok(None);
        }
        limits.frame_timeout
    } else {
        limits.hello_timeout
    };
    tokio::time::timeout(limit, wire::read_frame::<Request, _>(rd))
        .await
        .unwrap_or_else(|_| {
            Err(wire::WireError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("a frame took longer than {limit:?} to arrive"),
            )))
        })
}

/// What a request holds until its response is written, in KiB (at least 1): its data, or the
/// data it reads.
fn request_kib(req: &Request) -> u32 {
    let bytes = match req {
        Request::Write { data, .. } => data.len(),
        Request::Read { len, .. } => *len as usize,
        Request::ReadLink { .. } => volume::pool::format::EXTENT as usize,
        _ => 0,
    };
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Write responses as they complete, flushing whenever no more are queued.
async fn write_responses<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<(u64, Response)>,
    peer: SocketAddr,
) {
    while let Some((id, resp)) = rx.recv().await {
        let mut r = wire::write_frame(&mut w, id, &resp).await;
        if r.is_ok() && rx.is_empty() {
            r = w.flush().await.map_err(Into::into);
        }
        if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "writing a replica response failed");
            return;
        }
    }
    let _ = w.shutdown().await;
}

fn error(code: ErrCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn device_error(e: &DeviceError) -> Response {
    error(ErrCode::from(e.kind), e.to_string())
}

fn control_error(e: &ControlError) -> Response {
    let code = match e.kind() {
        ErrorKind::NotFound => ErrCode::NotFound,
        ErrorKind::InvalidArgument => ErrCode::Invalid,
        ErrorKind::Conflict => ErrCode::Conflict,
        ErrorKind::ResourceExhausted => ErrCode::NoSpace,
        _ => ErrCode::Io,
    };
    error(code, e.full_message())
}

/// With TLS, whether the store lets node `peer` make `req` here (see [`crate::tls`]);
/// without, everything is allowed.
async fn authorize(ctx: &Ctx, peer: &str, req: &Request) -> Result<(), Response> {
    let Some((_, members)) = &ctx.tls else {
        return Ok(());
    };
    let (allowed, what) = match req {
        Request::Register { volume, epoch } => (
            members.may_register(peer, volume, *epoch).await,
            format!("the attachment of {volume} by node {peer} with epoch {epoch}"),
        ),
        Request::Delete { volume } => (
            members.may_delete(volume).await,
            format!("the removal of the replica of {volume} here"),
        ),
        Request::Create { volume, size } => (
            members
                .may_change(peer, volume, Change::Create, *size)
                .await,
            format!("node {peer}'s creation of a replica of {volume} here, {size} bytes"),
        ),
        Request::Resize {
            volume,
            size,
            dry_run: false,
        } => (
            members
                .may_change(peer, volume, Change::Resize, *size)
                .await,
            format!("node {peer}'s growth of the replica of {volume} here to {size} bytes"),
        ),
        Request::Clone {
            snapshot,
            volume,
            size,
        } => (
            members.may_change(peer, volume, Change::Clone, *size).await,
            format!("node {peer}'s creation of volume {volume} from snapshot {snapshot} here"),
        ),
        Request::DeleteSnapshot { name } => (
            members
                .may_change(peer, name, Change::DeleteSnapshot, 0)
                .await,
            format!("node {peer}'s removal of snapshot {name} here"),
        ),
        Request::TakeSnapshot { volume, name } => (
            members
                .may_change(peer, name, Change::TakeSnapshot, 0)
                .await,
            format!("node {peer}'s snapshot {name} of volume {volume}"),
        ),
        _ => return Ok(()),
    };
    if allowed {
        return Ok(());
    }
    tracing::warn!(
        node = peer,
        what,
        "refused a replica request the cluster store does not allow"
    );
    Err(error(
        ErrCode::Invalid,
        format!("not allowed: the cluster store does not record {what}"),
    ))
}

/// A stale request learns nothing more than that: not the epoch now registered (a peer
/// could otherwise resend with it).
const STALE: Response = Response::Stale { epoch: 0 };

fn fence_error(e: &FenceError) -> Response {
    match e {
        FenceError::Stale { .. } => STALE,
        e => error(ErrCode::NotRegistered, e.to_string()),
    }
}

/// Execute one request that came on the connection `session`.
async fn handle(ctx: &Ctx, req: Request, session: u64) -> Response {
    match req {
        Request::Hello { .. } => Response::Ok,
        Request::Register { volume, epoch } => {
            if let Err(e) = VolumeName::new(&volume) {
                return control_error(&e);
            }
            match ctx.fence.register_session(&volume, epoch, session).await {
                Ok(()) => {
                    tracing::info!(%volume, epoch, "registered attachment epoch");
                    Response::Ok
                }
                Err(RegisterError::Stale { .. }) => STALE,
                Err(e) => error(ErrCode::Io, format!("{e}: {}", source_text(&e))),
            }
        }
        Request::Create { volume, size } => {
            let name = match VolumeName::new(&volume) {
                Ok(n) => n,
                Err(e) => return control_error(&e),
            };
            let spec = VolumeSpec {
                name,
                size_bytes: size,
                replicas: 1,
            };
            match ctx.storage.create_volume(spec).await {
                Ok(_) => Response::Ok,
                Err(e) => control_error(&e),
            }
        }
        Request::Delete { volume } => {
            let name = match VolumeName::new(&volume) {
                Ok(n) => n,
                Err(e) => return control_error(&e),
            };
            match ctx.storage.delete_volume(&name).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return control_error(&e),
            }
            let fence = ctx.fence.clone();
            match tokio::task::spawn_blocking(move || fence.forget(&volume)).await {
                Ok(Ok(())) => Response::Ok,
                Ok(Err(e)) => error(
                    ErrCode::Io,
                    format!("could not persist the fencing table: {e}"),
                ),
                Err(e) => error(ErrCode::Io, format!("forgetting the epoch failed: {e}")),
            }
        }
        Request::Resize {
            volume,
            size,
            dry_run,
        } => {
            let name = match VolumeName::new(&volume) {
                Ok(n) => n,
                Err(e) => return control_error(&e),
            };
            match resize_replica(&ctx.storage, &name, size, dry_run).await {
                Ok(_) => Response::Ok,
                Err(e) => control_error(&e),
            }
        }
        Request::Stat { volume } => {
            let replica = match VolumeName::new(&volume).and_then(|n| ctx.storage.replica(&n)) {
                Ok(r) => r,
                Err(e) => return control_error(&e),
            };
            Response::Stat {
                size: replica.size(),
                allocated: replica.allocated_bytes(),
            }
        }
        Request::Clone {
            snapshot,
            volume,
            size,
        } => {
            let names = VolumeName::new(&snapshot).and_then(|s| Ok((s, VolumeName::new(&volume)?)));
            let (snapshot, volume) = match names {
                Ok(n) => n,
                Err(e) => return control_error(&e),
            };
            match ctx.storage.clone_snapshot(&snapshot, &volume, size).await {
                Ok(_) => Response::Ok,
                Err(e) => control_error(&e),
            }
        }
        Request::DeleteSnapshot { name } => {
            let name = match VolumeName::new(&name) {
                Ok(n) => n,
                Err(e) => return control_error(&e),
            };
            match ctx.storage.delete_snapshot(&name).await {
                Ok(()) => Response::Ok,
                Err(e) if e.kind() == ErrorKind::NotFound => Response::Ok,
                Err(e) => control_error(&e),
            }
        }
        Request::TakeSnapshot { volume, name } => {
            let names = VolumeName::new(&volume).and_then(|v| Ok((v, VolumeName::new(&name)?)));
            let (volume, name) = match names {
                Ok(n) => n,
                Err(e) => return control_error(&e),
            };
            let Some(control) = ctx.control.get() else {
                return error(ErrCode::Io, "this node is still starting; try again");
            };
            match control.take_snapshot(&volume, &name).await {
                Ok(()) => Response::Ok,
                Err(e) => control_error(&e),
            }
        }
        req @ (Request::Snapshot { .. } | Request::Revert { .. }) => {
            snapshot_request(ctx, req, session).await
        }
        req @ (Request::Chain { .. } | Request::ReadLink { .. }) => {
            chain_request(ctx, req, session).await
        }
        req @ (Request::Read { .. }
        | Request::Write { .. }
        | Request::Flush { .. }
        | Request::Discard { .. }
        | Request::WriteZeroes { .. }
        | Request::Generations { .. }) => data_request(ctx, req, session).await,
    }
}

/// Grow this node's replica of `name` to at least `size` bytes (the volume's size, already
/// rounded), or with `dry_run` only check that it could; returns the replica's size then.
///
/// Idempotent: a replica that holds `size` bytes or more is left alone (one may be bigger than
/// its volume after a resize that stopped part-way; the volume's size is what the cluster
/// records). The replica grows in place ([`Storage`]'s resize) while it serves I/O.
///
/// # Errors
/// `NotFound` without a replica here; `ResourceExhausted` when its pool device cannot hold
/// `size` bytes; `Internal` when the grow cannot be committed.
pub async fn resize_replica(
    storage: &Storage,
    name: &VolumeName,
    size: u64,
    dry_run: bool,
) -> Result<u64, ControlError> {
    // Every copy on this node (one per pool device in standalone mode); the smallest counts.
    let copies = storage.replicas(name)?;
    let smallest = |copies: &[volume::pool::DiskReplica]| {
        copies.iter().map(|c| c.replica.size()).min().unwrap_or(0)
    };
    let have = smallest(&copies);
    if size <= have {
        return Ok(have);
    }
    let pools = storage.list_pools().await?;
    for copy in copies {
        let cap = pools
            .iter()
            .find(|p| p.id == copy.pool_id)
            .map_or(0, |p| p.capacity_bytes);
        if size > cap {
            return Err(ControlError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "volume {name} cannot grow to {}: its pool device {} holds at most {}",
                    format_size(size),
                    copy.path.display(),
                    format_size(cap)
                ),
            ));
        }
    }
    if dry_run {
        return Ok(have);
    }
    match storage.resize_volume(name, size).await {
        Ok(status) => Ok(status.size_bytes),
        // A concurrent resize grew it past `size` meanwhile (the pool refuses a "shrink").
        Err(e) if e.kind() == ErrorKind::InvalidArgument => match storage.replicas(name) {
            Ok(copies) if smallest(&copies) >= size => Ok(smallest(&copies)),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Execute a snapshot or revert of a local replica: fenced like a write, so only the node
/// that holds the volume's attachment (under its write barrier) can ask.
async fn snapshot_request(ctx: &Ctx, req: Request, session: u64) -> Response {
    let (volume, epoch, name, revert) = match req {
        Request::Snapshot {
            volume,
            epoch,
            name,
        } => (volume, epoch, name, false),
        Request::Revert {
            volume,
            epoch,
            snapshot,
        } => (volume, epoch, snapshot, true),
        _ => return error(ErrCode::Invalid, "not a snapshot request"),
    };
    let names = VolumeName::new(&volume).and_then(|v| Ok((v, VolumeName::new(&name)?)));
    let (vol, name) = match names {
        Ok(n) => n,
        Err(e) => return control_error(&e),
    };
    let _admitted = match ctx.fence.admit_session(&volume, epoch, session).await {
        Ok(a) => a,
        Err(e) => return fence_error(&e),
    };
    let done = if revert {
        ctx.storage.revert_volume(&vol, &name).await.map(drop)
    } else {
        ctx.storage.create_snapshot(&vol, &name).await.map(drop)
    };
    match done {
        Ok(()) => Response::Ok,
        Err(e) => control_error(&e),
    }
}

/// Answer a seed's question about the snapshots the local replica reads through: fenced like
/// a read, so only the node that holds the volume's attachment can ask.
async fn chain_request(ctx: &Ctx, req: Request, session: u64) -> Response {
    let (Request::Chain { volume, epoch } | Request::ReadLink { volume, epoch, .. }) = &req else {
        return error(ErrCode::Invalid, "not a chain request");
    };
    let replica = match VolumeName::new(volume).and_then(|n| ctx.storage.replica(&n)) {
        Ok(r) => r,
        Err(e) => return control_error(&e),
    };
    let _admitted = match ctx.fence.admit_session(volume, *epoch, session).await {
        Ok(a) => a,
        Err(e) => return fence_error(&e),
    };
    match req {
        Request::ReadLink {
            chain_epoch,
            link,
            extent,
            ..
        } => match replica.read_link(chain_epoch, link as usize, extent).await {
            Ok(data) => Response::Data(data),
            Err(e) => device_error(&e),
        },
        _ => match serde_json::to_vec(&replica.chain()) {
            Ok(json) if json.len() <= MAX_IO => Response::Data(IoBuf::from_slice(&json)),
            Ok(json) => error(
                ErrCode::Invalid,
                format!(
                    "the snapshot chain of {volume} takes {} bytes, above the {MAX_IO} an answer holds",
                    json.len()
                ),
            ),
            Err(e) => error(ErrCode::Io, format!("cannot encode the snapshot chain: {e}")),
        },
    }
}

/// Execute a fenced data request.
async fn data_request(ctx: &Ctx, req: Request, session: u64) -> Response {
    let (volume, epoch, io) = match req {
        Request::Read {
            volume,
            epoch,
            offset,
            len,
        } => (volume, epoch, Io::Read { offset, len }),
        Request::Write {
            volume,
            epoch,
            offset,
            fua,
            generation,
            data,
        } => (
            volume,
            epoch,
            Io::Write {
                offset,
                flags: WriteFlags { fua, generation },
                data,
            },
        ),
        Request::Flush { volume, epoch } => (volume, epoch, Io::Flush),
        Request::Discard {
            volume,
            epoch,
            offset,
            len,
        } => (volume, epoch, Io::Discard { offset, len }),
        Request::WriteZeroes {
            volume,
            epoch,
            offset,
            len,
        } => (volume, epoch, Io::WriteZeroes { offset, len }),
        Request::Generations {
            volume,
            epoch,
            from,
        } => (volume, epoch, Io::Generations { from }),
        _ => return error(ErrCode::Invalid, "not a data request"),
    };
    let replica = match VolumeName::new(&volume).and_then(|n| ctx.storage.replica(&n)) {
        Ok(r) => r,
        Err(e) => return control_error(&e),
    };
    let changes = matches!(
        io,
        Io::Write { .. } | Io::Discard { .. } | Io::WriteZeroes { .. }
    );
    // With TLS, reads too come only from the connection (so the node) that registered the
    // epoch: another node of the cluster, even knowing the epoch, reads nothing.
    let admitted = if changes || ctx.tls.is_some() {
        ctx.fence.admit_session(&volume, epoch, session).await
    } else {
        ctx.fence.admit(&volume, epoch).await
    };
    let _admitted = match admitted {
        Ok(a) => a,
        Err(e) => return fence_error(&e),
    };
    data_io(&replica, io).await
}

/// The device operation of a data request, without its addressing.
enum Io {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        flags: WriteFlags,
        data: IoBuf,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Generations {
        from: u64,
    },
}

async fn data_io(replica: &impl BlockDevice, io: Io) -> Response {
    let done = |r: Result<(), DeviceError>| match r {
        Ok(()) => Response::Ok,
        Err(e) => device_error(&e),
    };
    match io {
        Io::Read { offset, len } => {
            if len as usize > MAX_IO {
                return error(
                    ErrCode::Invalid,
                    format!("read of {len} bytes is above the maximum of {MAX_IO}"),
                );
            }
            match replica.read(offset, IoBuf::zeroed(len as usize)).await {
                Ok(buf) => Response::Data(buf),
                Err(e) => device_error(&e.error),
            }
        }
        Io::Write {
            offset,
            flags,
            data,
        } => match replica.write(offset, data, flags).await {
            Ok(_) => Response::Ok,
            Err(e) => device_error(&e.error),
        },
        Io::Flush => done(replica.flush().await),
        Io::Discard { offset, len } => done(replica.discard(offset, len).await),
        Io::WriteZeroes { offset, len } => done(replica.write_zeroes(offset, len).await),
        Io::Generations { from } => match replica.generations().await {
            Ok(g) => {
                let mut rest = g
                    .extents
                    .iter()
                    .skip_while(|e| e.extent < from)
                    .map(|e| (e.extent, e.generation));
                let extents: Vec<(u64, u64)> = rest.by_ref().take(MAX_GENERATIONS).collect();
                let next = rest.next().map(|(i, _)| i);
                Response::Generations {
                    extent_size: g.extent_size,
                    extents,
                    next,
                }
            }
            Err(e) => device_error(&e),
        },
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(ToString::to_string).unwrap_or_default()
}

/// Resolve once the watched flag is `true` (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not be held across an await, so drop it here.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
