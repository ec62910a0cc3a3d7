//! The NBD server: listeners, the fixed newstyle handshake, and transmission.
//!
//! Role: accept connections on the unix socket (every volume) and on TCP listeners (the
//! volumes exported on them), negotiate an export, then serve its commands against the
//! volume's device. Devices come from a [`DeviceSource`] (the node's shared devices): an
//! export opens its volume exactly as an attach does (taking the attachment, with an epoch,
//! in cluster mode), shares the device with the block device and other connections of this
//! node, and gives it back when the connection ends. So an export of a replicated volume goes
//! through the nexus and is fenced like any attachment: once another node takes the volume
//! over, its requests fail with `EPERM`.
//!
//! Invariants:
//! - the unix socket has mode 0600 from the start, like the API socket: a connection can read
//!   and write every volume. TCP listeners serve only the volumes exported on them, and only
//!   over TLS (`NBD_OPT_STARTTLS`) with a client certificate from the cluster CA: before
//!   TLS, every option but `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD` and
//!   `NBD_OPT_EXPORT_NAME` closes the connection. A plaintext TCP listener exists only when
//!   the export asked for it explicitly (and it is logged as a warning);
//! - `NBD_OPT_INFO` and `NBD_OPT_LIST` open nothing: sizes and names come from the source;
//!   only `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME` open the volume, and a volume attached on
//!   another live node is refused with `NBD_REP_ERR_POLICY` and a message saying so;
//! - a connection's failure (bad magic, unknown client flags, a malformed request header,
//!   an unknown export at `NBD_OPT_EXPORT_NAME`, a peer that goes away) ends that connection
//!   only; listeners keep accepting;
//! - a request that is merely wrong (unaligned, out of range, unknown command or flag) gets an
//!   error reply and the connection stays usable; a write's payload is always consumed, so the
//!   stream stays in sync;
//! - at most [`MAX_CONNECTIONS`] connections per listener; a handshake must end within
//!   [`HANDSHAKE_TIMEOUT`] and each request arrive within [`FRAME_TIMEOUT`] of its first byte;
//!   TCP connections keep TCP keepalive on;
//! - requests run concurrently, at most [`MAX_IN_FLIGHT`] per connection (large ones count
//!   more, so buffers stay bounded, and all connections together hold at most
//!   [`SERVER_BUDGET_MIB`]); replies are written
//!   whole under the connection's writer lock, in completion order;
//! - on shutdown listeners stop accepting, connections stop reading new requests, and requests
//!   in flight complete before the connection closes (bounded by [`DRAIN_TIMEOUT`]), so storage
//!   is closed only after the last NBD write returned.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::api::{ControlError, ErrorKind, VolumeName};
use host::socket::{BoundSocket, LocalListener};
use replication::device::{DeviceSource, VolumeDevice};
use replication::tls::Tls;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use volume::device::{BlockDevice, DeviceError, DeviceErrorKind, WriteFlags};
use volume::io::{pool, IoBuf};

use super::proto::{self, ProtoError, Request};
use super::{BLOCK_SIZE, MAX_PAYLOAD};

/// Requests in flight per connection; a read or write also counts one per MiB of its buffer
/// (one more per MiB), which bounds a connection's buffer memory to about this many MiB.
pub const MAX_IN_FLIGHT: usize = 128;
/// How long a client may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request (its header and any payload) may take to arrive once its first byte
/// has: a client that dribbles bytes is cut off. An idle connection between requests stays.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once per listener (the unix socket, each TCP address); more are
/// closed as they come.
pub const MAX_CONNECTIONS: usize = 64;
/// Request buffers of every connection together, in MiB (each connection holds at most
/// about [`MAX_IN_FLIGHT`] MiB).
pub const SERVER_BUDGET_MIB: usize = 1024;
/// How long shutdown waits for a listener's connections to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Option data longer than this is discarded and refused with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Transmission flags of every export: flush, FUA, trim and write-zeroes are supported, and
/// a flush on any connection makes every completed write on the volume durable (it commits
/// the whole device), so several connections may share a volume (`NBD_FLAG_CAN_MULTI_CONN`).
const TRANSMISSION_FLAGS: u16 = proto::TFLAG_HAS_FLAGS
    | proto::TFLAG_SEND_FLUSH
    | proto::TFLAG_SEND_FUA
    | proto::TFLAG_SEND_TRIM
    | proto::TFLAG_SEND_WRITE_ZEROES
    | proto::TFLAG_CAN_MULTI_CONN;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed or the peer went away.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    /// `NBD_OPT_EXPORT_NAME` named no export (the protocol says: close).
    #[error("no export named {0:?}")]
    UnknownExport(String),
    /// The handshake took longer than [`HANDSHAKE_TIMEOUT`].
    #[error("handshake timed out")]
    Timeout,
    /// A request took longer than [`FRAME_TIMEOUT`] to arrive once begun.
    #[error("a request took longer than {FRAME_TIMEOUT:?} to arrive")]
    SlowRequest,
    /// `NBD_OPT_EXPORT_NAME` before TLS on a listener that requires it (the protocol says:
    /// close).
    #[error("the client asked for an export before starting TLS")]
    TlsRequired,
}

/// Why a TCP export cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// TCP exports need TLS, and the daemon has no TLS identity.
    #[error(
        "NBD over TCP needs TLS: start the daemon with --tls-ca, --tls-cert and --tls-key \
         (`ballast ca init`, `ballast cert issue --node NAME`; clients get `ballast cert issue \
         --client NAME`), or export with --insecure-plaintext on an isolated network"
    )]
    NeedsTls,
    /// A listener at that address already serves the other way (TLS or plaintext).
    #[error("{addr} already serves NBD {}; export there the same way, or use another address", if *.tls { "over TLS" } else { "in plaintext" })]
    Mismatch {
        /// The listener's address.
        addr: SocketAddr,
        /// Whether it serves TLS.
        tls: bool,
    },
    /// The address cannot be bound.
    #[error("cannot listen for NBD on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A TCP export made: where, and whether clients must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpBound {
    /// The bound address (useful for port 0).
    pub addr: SocketAddr,
    /// Clients must start TLS and present a certificate from the cluster CA.
    pub tls: bool,
}

/// Which volumes a listener serves.
#[derive(Debug, Clone)]
enum Scope {
    /// Every volume (the unix socket).
    All,
    /// Only these (a TCP listener, extended by each `volume export --tcp`).
    Only(Arc<RwLock<BTreeSet<String>>>),
}

impl Scope {
    fn allows(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.read().expect("scope lock").contains(name),
        }
    }
}

/// A TCP listener started by an export request.
#[derive(Debug)]
struct TcpExport {
    requested: SocketAddr,
    bound: SocketAddr,
    tls: bool,
    names: Arc<RwLock<BTreeSet<String>>>,
}

/// What every connection needs.
#[derive(Debug)]
struct Shared {
    devices: Arc<dyn DeviceSource>,
    stop: watch::Receiver<bool>,
    /// Request buffers of every connection, in MiB-ish slots (see [`slot_cost`]).
    budget: Arc<Semaphore>,
}

impl Shared {
    /// Run a blocking call of the device source on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn DeviceSource) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let devices = Arc::clone(&self.devices);
        tokio::task::spawn_blocking(move || f(&*devices))
            .await
            .unwrap_or_else(|e| Err(ControlError::new(ErrorKind::Internal, e.to_string())))
    }
}

/// The daemon's NBD server.
#[derive(Debug)]
pub struct NbdServer {
    shared: Arc<Shared>,
    /// The node's TLS identity, which TCP exports require.
    tls: Option<Arc<Tls>>,
    socket: PathBuf,
    /// Removes the socket file when taken at shutdown.
    bound: std::sync::Mutex<Option<BoundSocket>>,
    tcp: Mutex<Vec<TcpExport>>,
    listeners: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl NbdServer {
    /// Listen on the unix socket `socket` (a stale file there is replaced: the caller holds
    /// the data directory lock) and serve every volume of `devices` until `stop` turns true.
    /// TCP exports are served over TLS with `tls` (the node's identity; clients need a
    /// certificate from its CA).
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn start(
        devices: Arc<dyn DeviceSource>,
        socket: PathBuf,
        stop: watch::Receiver<bool>,
        tls: Option<Arc<Tls>>,
    ) -> std::io::Result<Arc<Self>> {
        // Like the API socket (0600 from the start): whoever connects reads and writes every
        // volume.
        let (bound, listener) = BoundSocket::bind(&socket).map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            devices,
            stop,
            budget: Arc::new(Semaphore::new(SERVER_BUDGET_MIB)),
        });
        let task = tokio::spawn(accept_loop(
            Listener::Unix(listener),
            Arc::clone(&shared),
            Scope::All,
        ));
        tracing::info!(socket = %socket.display(), "serving NBD exports");
        Ok(Arc::new(Self {
            shared,
            tls,
            socket,
            bound: std::sync::Mutex::new(Some(bound)),
            tcp: Mutex::new(Vec::new()),
            listeners: std::sync::Mutex::new(vec![task]),
        }))
    }

    /// The unix socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The NBD URI of `name` on the unix socket.
    pub fn unix_uri(&self, name: &VolumeName) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Export `name` on TCP at `addr` too, starting a listener there unless one already runs
    /// (for the same requested or bound address). Clients must use TLS unless `plaintext`
    /// (an explicit, logged choice). TCP exports last until the daemon stops.
    ///
    /// # Errors
    /// No TLS identity and no `plaintext`, a listener there serving the other way, or the
    /// address cannot be bound.
    pub async fn export_tcp(
        &self,
        name: &VolumeName,
        addr: SocketAddr,
        plaintext: bool,
    ) -> Result<TcpBound, ExportError> {
        let tls = match (&self.tls, plaintext) {
            (_, true) => None,
            (Some(t), false) => Some(Arc::clone(t)),
            (None, false) => return Err(ExportError::NeedsTls),
        };
        let mut tcp = self.tcp.lock().await;
        if let Some(t) = tcp
            .iter()
            .find(|t| (t.requested == addr && addr.port() != 0) || t.bound == addr)
        {
            if t.tls != tls.is_some() {
                return Err(ExportError::Mismatch {
                    addr: t.bound,
                    tls: t.tls,
                });
            }
            t.names
                .write()
                .expect("scope lock")
                .insert(name.to_string());
            return Ok(TcpBound {
                addr: t.bound,
                tls: t.tls,
            });
        }
        let bind = |source| ExportError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let bound = listener.local_addr().map_err(bind)?;
        let names = Arc::new(RwLock::new(BTreeSet::from([name.to_string()])));
        let secure = tls.is_some();
        let task = tokio::spawn(accept_loop(
            Listener::Tcp(listener, tls),
            Arc::clone(&self.shared),
            Scope::Only(Arc::clone(&names)),
        ));
        self.listeners.lock().expect("listeners lock").push(task);
        if secure {
            tracing::info!(%bound, volume = %name, "serving an NBD export on TCP (TLS with client certificates)");
        } else {
            tracing::warn!(%bound, volume = %name, "SERVING AN NBD EXPORT ON TCP IN PLAINTEXT, UNAUTHENTICATED (--insecure-plaintext): whoever reaches this address reads and writes the volume");
        }
        tcp.push(TcpExport {
            requested: addr,
            bound,
            tls: secure,
            names,
        });
        Ok(TcpBound {
            addr: bound,
            tls: secure,
        })
    }

    /// Wait for every listener to stop and drain (call after the stop signal was sent), then
    /// remove the socket file.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.listeners.lock().expect("listeners lock"));
        for t in tasks {
            let _ = t.await;
        }
        drop(
            self.bound
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Debug)]
enum Listener {
    Unix(LocalListener),
    /// With the TLS identity its clients must use, if any.
    Tcp(TcpListener, Option<Arc<Tls>>),
}

/// An accepted connection, before the handshake.
enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A TCP connection that must start TLS with this identity.
    TcpTls(TcpStream, Arc<Tls>),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            Self::Unix(l) => Ok((Accepted::Unix(l.accept().await?.0), "unix".to_owned())),
            Self::Tcp(l, tls) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10))
                    .with_retries(3);
                if let Err(e) = socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive) {
                    tracing::debug!(%peer, error = %e, "could not set TCP keepalive");
                }
                let accepted = match tls {
                    Some(t) => Accepted::TcpTls(s, Arc::clone(t)),
                    None => Accepted::Tcp(s),
                };
                Ok((accepted, peer.to_string()))
            }
        }
    }
}

/// Resolves once shutdown is requested (or the sender is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, scope: Scope) {
    let mut stop = shared.stop.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((accepted, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(%peer, max = MAX_CONNECTIONS, "refused an NBD connection: too many connections");
                        drop(accepted);
                        continue;
                    }
                    conns.spawn(connection(accepted, peer, Arc::clone(&shared), scope.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = stopping(&mut stop) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("NBD requests still in flight at shutdown; closing their connections");
        conns.abort_all();
    }
}

/// An export chosen by the handshake: its volume is open until [`Export::close`], or until
/// it is dropped however the connection ends (a handshake cut short by its timeout
/// included), which gives the volume back on a blocking thread.
struct Export {
    name: VolumeName,
    device: VolumeDevice,
    devices: Arc<dyn DeviceSource>,
    open: bool,
}

impl Export {
    /// Give the volume back and wait for it.
    async fn close(mut self, shared: &Shared) {
        self.open = false;
        let name = self.name.clone();
        let _ = shared
            .blocking(move |d| {
                d.release(&name);
                Ok(())
            })
            .await;
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let (devices, name) = (Arc::clone(&self.devices), self.name.clone());
        // The release calls the store: never on an async worker.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || devices.release(&name))),
            Err(_) => devices.release(&name),
        }
    }
}

async fn connection(accepted: Accepted, peer: String, shared: Arc<Shared>, scope: Scope) {
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let Some((rd, mut wr, no_zeroes, secure)) = open_channel(accepted).await? else {
            return Ok(None);
        };
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let export = handshake(&mut rd, &mut wr, &shared, &scope, no_zeroes, secure).await?;
        Ok(export.map(|e| (rd, wr, e)))
    })
    .await
    .unwrap_or(Err(ConnError::Timeout));
    let (rd, wr, export) = match negotiated {
        Ok(Some(negotiated)) => negotiated,
        Ok(None) => return,
        Err(e) => {
            tracing::info!(%peer, error = %e, "NBD handshake failed; closing the connection");
            return;
        }
    };
    tracing::debug!(%peer, volume = %export.name, "NBD client connected");
    match transmission(
        rd,
        wr,
        export.device.clone(),
        shared.stop.clone(),
        Arc::clone(&shared.budget),
    )
    .await
    {
        Ok(()) => tracing::debug!(%peer, volume = %export.name, "NBD client disconnected"),
        Err(e) => {
            tracing::info!(%peer, volume = %export.name, error = %e, "NBD connection closed");
        }
    }
    export.close(&shared).await;
}

/// The greeting and the client's flags, then (on a TLS listener) the options before TLS up
/// to a successful `NBD_OPT_STARTTLS`: the channel the rest of the handshake and
/// transmission use, whether the client asked for no zeroes, and whether it is TLS.
/// `Ok(None)`: the client aborted.
async fn open_channel(
    accepted: Accepted,
) -> Result<Option<(BoxRead, BoxWrite, bool, bool)>, ConnError> {
    async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, ConnError> {
        s.write_all(&proto::greeting()).await?;
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).await?;
        Ok(proto::decode_client_flags(&flags)? & proto::FLAG_C_NO_ZEROES != 0)
    }
    let (mut tcp, tls) = match accepted {
        Accepted::Unix(mut s) => {
            let no_zeroes = greet(&mut s).await?;
            let (r, w) = s.into_split();
            return Ok(Some((Box::new(r), Box::new(w), no_zeroes, false)));
        }
        Accepted::Tcp(mut s) => {
            let no_zeroes = greet(&mut s).await?;
            let (r, w) = s.into_split();
            return Ok(Some((Box::new(r), Box::new(w), no_zeroes, false)));
        }
        Accepted::TcpTls(s, tls) => (s, tls),
    };
    let no_zeroes = greet(&mut tcp).await?;
    loop {
        // Unbuffered: nothing the client sends after STARTTLS may be read here.
        let (mut r, mut w) = tcp.split();
        let Some((option, data)) = read_option(&mut r, &mut w).await? else {
            continue;
        };
        match option {
            proto::OPT_STARTTLS if data.is_empty() => {
                reply(&mut tcp, option, proto::REP_ACK, &[]).await?;
                let stream = tls.accept(tcp).await?;
                let (r, w) = tokio::io::split(stream);
                return Ok(Some((Box::new(r), Box::new(w), no_zeroes, true)));
            }
            proto::OPT_STARTTLS => {
                let msg = b"NBD_OPT_STARTTLS has no data";
                reply(&mut tcp, option, proto::REP_ERR_INVALID, msg).await?;
            }
            proto::OPT_ABORT => {
                let _ = reply(&mut tcp, option, proto::REP_ACK, &[]).await;
                return Ok(None);
            }
            proto::OPT_EXPORT_NAME => return Err(ConnError::TlsRequired),
            _ => {
                let msg = b"this server requires TLS (NBD_OPT_STARTTLS) and a client certificate \
                            from the cluster CA (ballast cert issue --client NAME)";
                reply(&mut tcp, option, proto::REP_ERR_TLS_REQD, msg).await?;
            }
        }
    }
}

/// The next option and its data. `Ok(None)`: its data was too long, was discarded and
/// refused (`NBD_REP_ERR_TOO_BIG`).
async fn read_option<R, W>(rd: &mut R, wr: &mut W) -> Result<Option<(u32, Vec<u8>)>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut header = [0u8; proto::OPTION_HEADER_LEN];
    rd.read_exact(&mut header).await?;
    let header = proto::decode_option_header(&header)?;
    if header.len > MAX_OPTION_DATA {
        tokio::io::copy(&mut rd.take(header.len.into()), &mut tokio::io::sink()).await?;
        let msg = b"option data too large";
        reply(wr, header.option, proto::REP_ERR_TOO_BIG, msg).await?;
        return Ok(None);
    }
    let mut data = vec![0u8; header.len as usize];
    rd.read_exact(&mut data).await?;
    Ok(Some((header.option, data)))
}

/// The volume `name` if this listener serves it.
fn in_scope(scope: &Scope, name: &str) -> Option<VolumeName> {
    let vn = VolumeName::new(name).ok()?;
    scope.allows(name).then_some(vn)
}

/// The option error reply for a volume that cannot be opened or described.
fn open_error(name: &str, e: &ControlError) -> (u32, String) {
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::InvalidArgument => {
            (proto::REP_ERR_UNKNOWN, format!("no such volume: {name:?}"))
        }
        ErrorKind::FailedPrecondition => (proto::REP_ERR_POLICY, e.full_message()),
        _ => (
            proto::REP_ERR_UNKNOWN,
            format!("volume {name:?} is not available: {}", e.full_message()),
        ),
    }
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    wr.write_all(&proto::option_reply(option, kind, data)).await
}

/// The option haggling of the fixed newstyle handshake, after the greeting (and TLS, if
/// `secure`). `Ok(None)`: the client aborted.
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    shared: &Shared,
    scope: &Scope,
    no_zeroes: bool,
    secure: bool,
) -> Result<Option<Export>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let Some((option, data)) = read_option(rd, wr).await? else {
            continue;
        };
        match option {
            proto::OPT_STARTTLS if secure => {
                reply(wr, option, proto::REP_ERR_INVALID, b"TLS is already on").await?;
            }
            proto::OPT_EXPORT_NAME => {
                let name = proto::decode_export_name(&data)?;
                let Some(vn) = in_scope(scope, &name) else {
                    return Err(ConnError::UnknownExport(name));
                };
                let v = vn.clone();
                let Ok(device) = shared.blocking(move |d| d.open(&v, false)).await else {
                    // This old option has no error reply: closing is the answer.
                    return Err(ConnError::UnknownExport(name));
                };
                let export = Export {
                    name: vn,
                    device,
                    devices: Arc::clone(&shared.devices),
                    open: true,
                };
                let sent = wr
                    .write_all(&proto::export_name_reply(
                        export.device.size(),
                        TRANSMISSION_FLAGS,
                        no_zeroes,
                    ))
                    .await;
                if let Err(e) = sent {
                    export.close(shared).await;
                    return Err(e.into());
                }
                return Ok(Some(export));
            }
            proto::OPT_ABORT => {
                // The client may already have closed; the reply is a courtesy.
                let _ = reply(wr, option, proto::REP_ACK, &[]).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply(
                        wr,
                        option,
                        proto::REP_ERR_INVALID,
                        b"NBD_OPT_LIST has no data",
                    )
                    .await?;
                    continue;
                }
                let names = shared.blocking(|d| d.names()).await.unwrap_or_default();
                for name in names.iter().filter(|n| scope.allows(n.as_str())) {
                    reply(
                        wr,
                        option,
                        proto::REP_SERVER,
                        &proto::server_entry(name.as_str()),
                    )
                    .await?;
                }
                reply(wr, option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let request = match proto::decode_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = e.to_string();
                        reply(wr, option, proto::REP_ERR_INVALID, msg.as_bytes()).await?;
                        continue;
                    }
                };
                let Some(vn) = in_scope(scope, &request.name) else {
                    let msg = format!("no such volume: {:?}", request.name);
                    reply(wr, option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                // GO opens the volume (and keeps it open); INFO only describes it.
                let v = vn.clone();
                let opened = if option == proto::OPT_GO {
                    shared
                        .blocking(move |d| d.open(&v, false))
                        .await
                        .map(|device| (device.size(), Some(device)))
                } else {
                    shared
                        .blocking(move |d| d.size(&v))
                        .await
                        .map(|s| (s, None))
                };
                let (size, device) = match opened {
                    Ok(o) => o,
                    Err(e) => {
                        let (kind, msg) = open_error(&request.name, &e);
                        reply(wr, option, kind, msg.as_bytes()).await?;
                        continue;
                    }
                };
                let export = device.map(|device| Export {
                    name: vn.clone(),
                    device,
                    devices: Arc::clone(&shared.devices),
                    open: true,
                });
                if let Err(e) = describe(wr, option, size, &request).await {
                    if let Some(export) = export {
                        export.close(shared).await;
                    }
                    return Err(e.into());
                }
                if let Some(export) = export {
                    return Ok(Some(export));
                }
            }
            other => {
                let msg = format!("option {other} is not supported");
                reply(wr, option, proto::REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

/// The information replies of `NBD_OPT_INFO` and `NBD_OPT_GO`, then the final ack.
async fn describe<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    size: u64,
    request: &proto::InfoRequest,
) -> std::io::Result<()> {
    let info = proto::info_export(size, TRANSMISSION_FLAGS);
    reply(wr, option, proto::REP_INFO, &info).await?;
    // Sent whether or not it was requested (the protocol allows it): requests must be
    // multiples of 4 KiB, the engine's block size.
    let sizes = proto::info_block_size(BLOCK_SIZE, BLOCK_SIZE, MAX_PAYLOAD);
    reply(wr, option, proto::REP_INFO, &sizes).await?;
    if request.requests.contains(&proto::INFO_NAME) {
        let info = proto::info_name(&request.name);
        reply(wr, option, proto::REP_INFO, &info).await?;
    }
    reply(wr, option, proto::REP_ACK, &[]).await
}

/// The connection's write side. Buffered so that a reply header and a small read's data
/// leave in one system call; every reply is flushed before the lock is released.
type Writer = Arc<Mutex<BufWriter<BoxWrite>>>;

/// Capacity of the reply buffer: a header plus up to 128 KiB of read data in one write.
const REPLY_BUFFER: usize = 128 * 1024 + proto::SIMPLE_REPLY_LEN;

/// Serve commands until `NBD_CMD_DISC`, end of stream, a broken request header or shutdown.
async fn transmission(
    mut rd: BufReader<BoxRead>,
    wr: BoxWrite,
    device: VolumeDevice,
    mut stop: watch::Receiver<bool>,
    budget: Arc<Semaphore>,
) -> Result<(), ConnError> {
    let writer: Writer = Arc::new(Mutex::new(BufWriter::with_capacity(REPLY_BUFFER, wr)));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        // Waiting for a request is unbounded; once it starts, it must arrive in time.
        tokio::select! {
            r = rd.fill_buf() => match r {
                Ok([]) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            },
            () = stopping(&mut stop) => break Ok(()),
        }
        match tokio::time::timeout(FRAME_TIMEOUT, rd.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Ok(Err(e)) => break Err(e.into()),
            Err(_) => break Err(ConnError::SlowRequest),
        }
        let req = match proto::decode_request(&header) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.kind == proto::CMD_DISC {
            break Ok(());
        }
        let checked = check(&req, device.size());
        // Take the request's share of the connection's budget before allocating its buffer.
        let cost = if checked.is_ok() && matches!(req.kind, proto::CMD_READ | proto::CMD_WRITE) {
            slot_cost(req.len)
        } else {
            1
        };
        let permit = Arc::clone(&slots)
            .acquire_many_owned(cost)
            .await
            .expect("the semaphore is never closed");
        let shared_permit = Arc::clone(&budget)
            .acquire_many_owned(cost)
            .await
            .expect("the semaphore is never closed");
        let payload = if req.kind == proto::CMD_WRITE {
            if checked.is_ok() {
                let mut buf = pool::take(req.len as usize);
                match tokio::time::timeout(FRAME_TIMEOUT, rd.read_exact(&mut buf)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Err(ConnError::SlowRequest),
                }
                Some(buf)
            } else {
                // Keep the stream in sync: consume the payload we refuse.
                let mut skip = (&mut rd).take(req.len.into());
                if let Err(e) = tokio::io::copy(&mut skip, &mut tokio::io::sink()).await {
                    break Err(e.into());
                }
                None
            }
        } else {
            None
        };
        let device = device.clone();
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            let (error, data) = match checked {
                Ok(()) => execute(&device, &req, payload).await,
                Err(errno) => (errno, None),
            };
            if error != 0 {
                tracing::debug!(command = %proto::CmdName(req.kind), offset = req.offset, len = req.len, error, "NBD request failed");
            }
            let mut w = writer.lock().await;
            let sent = async {
                w.write_all(&proto::simple_reply(error, req.cookie)).await?;
                if let Some(data) = &data {
                    w.write_all(data).await?;
                }
                w.flush().await
            }
            .await;
            if let Some(data) = data {
                pool::give(data);
            }
            drop(w);
            drop(permit);
            drop(shared_permit);
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot send an NBD reply");
            }
        });
    };
    // Let requests in flight finish and reply before closing.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    let _ = writer.lock().await.shutdown().await;
    result
}

/// The slots a read or write of `len` bytes takes: one, plus one per MiB of buffer, so that
/// a connection holds at most about [`MAX_IN_FLIGHT`] MiB of request buffers.
fn slot_cost(len: u32) -> u32 {
    (1 + len / (1024 * 1024)).min(MAX_IN_FLIGHT as u32)
}

/// Validate a request against the protocol and the export; `Err` is the errno to reply.
fn check(req: &Request, size: u64) -> Result<(), u32> {
    let known_flags = match req.kind {
        proto::CMD_WRITE | proto::CMD_TRIM => proto::CMD_FLAG_FUA,
        proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE,
        proto::CMD_READ | proto::CMD_FLUSH => 0,
        _ => return Err(proto::EINVAL),
    };
    if req.flags & !known_flags != 0 {
        return Err(proto::EINVAL);
    }
    if req.kind == proto::CMD_FLUSH {
        return Ok(());
    }
    let len = u64::from(req.len);
    if matches!(req.kind, proto::CMD_READ | proto::CMD_WRITE) && len > u64::from(MAX_PAYLOAD) {
        return Err(proto::EINVAL);
    }
    let block = u64::from(BLOCK_SIZE);
    if req.offset % block != 0 || len % block != 0 {
        return Err(proto::EINVAL);
    }
    if req.offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(if req.kind == proto::CMD_READ {
            proto::EINVAL
        } else {
            proto::ENOSPC
        });
    }
    Ok(())
}

/// The protocol's errno for a device error.
fn errno(e: &DeviceError, kind: u16) -> u32 {
    match e.kind {
        DeviceErrorKind::Unaligned => proto::EINVAL,
        DeviceErrorKind::OutOfRange if kind == proto::CMD_READ => proto::EINVAL,
        DeviceErrorKind::OutOfRange | DeviceErrorKind::NoSpace => proto::ENOSPC,
        DeviceErrorKind::Closed => proto::ESHUTDOWN,
        // Another node holds the volume now: this writer is fenced out.
        DeviceErrorKind::Fenced => proto::EPERM,
        _ => proto::EIO,
    }
}

/// Run a validated request; returns the errno (0 for success) and the data of a read.
async fn execute(
    device: &VolumeDevice,
    req: &Request,
    payload: Option<IoBuf>,
) -> (u32, Option<IoBuf>) {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, u64::from(req.len));
    let fail = |e: &DeviceError| {
        tracing::debug!(error = %e, "NBD I/O failed");
        errno(e, req.kind)
    };
    let then_flush = |r: Result<(), DeviceError>| async move {
        match r {
            Ok(()) if fua => device.flush().await,
            r => r,
        }
    };
    let done = |r: Result<(), DeviceError>| r.err().map_or(0, |e| fail(&e));
    match req.kind {
        proto::CMD_READ if len == 0 => (0, Some(IoBuf::zeroed(0))),
        proto::CMD_READ => match device.read(offset, pool::take(len as usize)).await {
            Ok(buf) => (0, Some(buf)),
            Err(e) => (fail(&e.error), None),
        },
        proto::CMD_WRITE => match payload {
            Some(buf) if !buf.is_empty() => {
                match device
                    .write(
                        offset,
                        buf,
                        WriteFlags {
                            fua,
                            ..WriteFlags::default()
                        },
                    )
                    .await
                {
                    Ok(buf) => {
                        pool::give(buf);
                        (0, None)
                    }
                    Err(e) => {
                        pool::give(e.buf);
                        (fail(&e.error), None)
                    }
                }
            }
            _ => (done(then_flush(Ok(())).await), None),
        },
        proto::CMD_FLUSH => (done(device.flush().await), None),
        proto::CMD_TRIM | proto::CMD_WRITE_ZEROES if len == 0 => {
            (done(then_flush(Ok(())).await), None)
        }
        proto::CMD_TRIM => (
            done(then_flush(device.discard(offset, len).await).await),
            None,
        ),
        proto::CMD_WRITE_ZEROES => (
            done(then_flush(device.write_zeroes(offset, len).await).await),
            None,
        ),
        _ => (proto::EINVAL, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn big_requests_cost_more_slots() {
        assert_eq!(slot_cost(4096), 1);
        assert_eq!(slot_cost(1024 * 1024), 2);
        assert_eq!(slot_cost(MAX_PAYLOAD), 33);
        assert_eq!(slot_cost(u32::MAX), MAX_IN_FLIGHT as u32);
    }

    #[test]
    fn requests_are_checked() {
        let size = 1 << 20;
        assert_eq!(check(&req(proto::CMD_READ, 0, 0, 4096), size), Ok(()));
        assert_eq!(
            check(
                &req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 4096, 8192),
                size
            ),
            Ok(())
        );
        assert_eq!(
            check(&req(proto::CMD_READ, 0, 512, 4096), size),
            Err(proto::EINVAL)
        );
        assert_eq!(
            check(&req(proto::CMD_READ, 0, size, 4096), size),
            Err(proto::EINVAL)
        );
        assert_eq!(
            check(&req(proto::CMD_WRITE, 0, size, 4096), size),
            Err(proto::ENOSPC)
        );
        assert_eq!(
            check(&req(proto::CMD_TRIM, 0, u64::MAX - 4095, 4096), size),
            Err(proto::ENOSPC)
        );
        assert_eq!(check(&req(proto::CMD_FLUSH, 0, 7, 3), size), Ok(()));
        assert_eq!(check(&req(99, 0, 0, 0), size), Err(proto::EINVAL));
        assert_eq!(
            check(&req(proto::CMD_READ, proto::CMD_FLAG_FUA, 0, 4096), size),
            Err(proto::EINVAL)
        );
        assert_eq!(
            check(&req(proto::CMD_READ, 0, 0, MAX_PAYLOAD + 4096), u64::MAX),
            Err(proto::EINVAL)
        );
    }
}
