//! The daemon's life: start-up, serving, and clean shutdown. This is the composition root
//! that wires the storage engine to the local API and the operator endpoint.
//!
//! [`run`] reads as the sequence it is:
//! 1. install SIGTERM/SIGINT handlers (a signal during start-up is handled once storage is
//!    open, so the engine is never abandoned half-opened);
//! 2. take the exclusive resources ([`Held`]): lock the data directory ([`DataDirLock`], two
//!    daemons never share one) and bind the API socket ([`BoundSocket`], refusing if another
//!    daemon answers on it; connections queue until step 5), and the CSI and Docker sockets;
//! 3. start the I/O engine and the operator endpoint ([`OpsEndpoint`]: `--http`, its bound
//!    address in `<data-dir>/http.addr`, `/healthz` 200, `/readyz` 503 for now, `/metrics`);
//! 4. open storage;
//! 5. start everything else ([`Running::start`]): the cluster (this node alone over the
//!    embedded store in standalone mode; the replica server too in cluster mode; the lease),
//!    NBD on `<data-dir>/nbd.sock`, the attach frontend (volumes recorded as attached
//!    are attached again), the Docker plugin, CSI, the local API and the periodic checkpoint
//!    ([`CHECKPOINT_INTERVAL`]); then report ready and serve until a signal;
//! 6. stop through the one shutdown path ([`Running::stop`]), whether start-up finished or
//!    not: report not ready, stop accepting and let requests in flight finish (bounded by
//!    [`DRAIN_TIMEOUT`]), detach, leave the cluster, flush and close storage
//!    ([`Storage::close`]); then remove the API socket, stop the operator endpoint and
//!    `http.addr`, release the lock.
//!
//! Invariant: once storage is open, every way out of [`run`] goes through `Storage::close`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use volume::pool::{PoolError, Storage, StorageConfig};

use crate::api;
use crate::api_socket::{BoundSocket, LocalListener, SocketError};
use crate::cli::AfterHandOver;
use crate::config::DaemonConfig;
use crate::data_dir_lock::{DataDirLock, LockError};
use crate::host::NodeHost;
use crate::metrics::MetricsExporter;
use crate::node_info::{NodeInfo, Phase};
use crate::ops_endpoint;
use cluster::control::Mode;
use cluster::model::NodeRecord;
use cluster::standalone;
use cluster::{publish_node, Cluster, ClusterSource};
use frontends::attach::{self, Attacher, FuseLoop};
use frontends::devices::SharedDevices;
use frontends::nbd::{self, NbdServer};
use replication::device::DeviceSource;

/// How long shutdown waits for requests in flight before closing storage anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory could not be created, or made private.
    #[error("cannot create the data directory {path} or make it private (mode 0700)")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon uses the data directory, or the lock failed.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The operator endpoint could not listen.
    #[error("cannot listen for HTTP on {addr}")]
    HttpBind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bound HTTP address could not be recorded.
    #[error("cannot write the HTTP address to {path}")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API socket could not be bound.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The I/O engine could not start.
    #[error("cannot start the I/O engine")]
    Engine(#[source] std::io::Error),
    /// Storage could not be opened.
    #[error("cannot open storage")]
    Open(#[source] PoolError),
    /// Storage could not be flushed and closed.
    #[error("cannot close storage cleanly")]
    Close(#[source] PoolError),
    /// The NBD socket could not be bound.
    #[error("cannot listen for NBD on {path}")]
    NbdSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CSI socket could not be bound (the source names the path).
    #[error("cannot listen for CSI")]
    CsiSocket(#[source] SocketError),
    /// The Docker plugin socket could not be bound (the source names the path).
    #[error("cannot listen for Docker")]
    DockerSocket(#[source] SocketError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// `--upgrade`: the running daemon did not take the hand-over request.
    #[error("--upgrade: the daemon running on this data directory (pid {pid:?}) did not take the hand-over request; is it a ballast older than --upgrade, or is --api-socket not its socket?")]
    Upgrade {
        /// The running daemon's pid, if it recorded one.
        pid: Option<u32>,
        /// Why.
        #[source]
        source: ::cli::client::ClientError,
    },
    /// `--upgrade`: the running daemon did not let go of the data directory in time.
    #[error("--upgrade: the daemon running on this data directory (pid {pid:?}) has not stopped within {}s of handing over; see its log", UPGRADE_WAIT.as_secs())]
    UpgradeTimeout {
        /// The running daemon's pid, if it recorded one.
        pid: Option<u32>,
    },
    /// A server stopped on its own.
    #[error("the {0} server stopped unexpectedly")]
    Serve(&'static str, #[source] std::io::Error),
    /// The cluster (this node alone, in standalone mode) could not start.
    #[error("cannot start the cluster: {what}")]
    Cluster {
        /// The step that failed.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What runs besides storage to keep the volumes' records: the cluster (this node alone in
/// standalone mode), the replica server (cluster mode) and the lease task.
struct ClusterParts {
    cluster: Arc<Cluster>,
    server: Option<replication::server::ServerHandle>,
    lease_task: JoinHandle<()>,
    /// The node's TLS identity (cluster mode unless plaintext; standalone if given): the
    /// replica port's and TCP NBD exports'.
    tls: Option<Arc<replication::tls::Tls>>,
}

/// How long a replica request may take before the replica is ejected.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);

/// Start this node's part of the cluster: open the fence table and the store (etcd in
/// cluster mode, the embedded store in standalone mode), serve replicas to peers (cluster
/// mode), register this node under a lease and keep it renewed. In standalone mode, volumes
/// the store does not know yet are recorded ([`standalone::adopt`]).
async fn start_cluster(
    cfg: &DaemonConfig,
    storage: &Arc<Storage>,
) -> Result<ClusterParts, NodeError> {
    fn fail(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> NodeError {
        NodeError::Cluster {
            what: what.to_owned(),
            source: e.into(),
        }
    }
    let fence = replication::fence::FenceTable::open(cfg.data_dir.join("fence.json"))
        .map_err(|e| fail("cannot open the fence table", e))?;
    let fence = Arc::new(fence);
    let tls = match &cfg.tls {
        Some(files) => {
            Some(load_tls(files, &cfg.node_id).map_err(|e| fail("cannot set up TLS", e))?)
        }
        None if !cfg.etcd.is_empty() => {
            tracing::warn!("REPLICA TRAFFIC IS PLAINTEXT AND UNAUTHENTICATED (--insecure-plaintext-replicas): anyone who reaches the replica port can read, write and fence every replica");
            None
        }
        None => None,
    };
    let (mode, store, server) = if cfg.etcd.is_empty() {
        let path = cfg.data_dir.join(standalone::STORE_FILE);
        let store = cluster::store::Store::embedded(&path).map_err(|e| {
            fail(
                &format!("cannot open the embedded store {}", path.display()),
                e,
            )
        })?;
        (Mode::Standalone, store, None)
    } else {
        let etcd_tls = match &cfg.etcd_tls {
            Some(t) => Some(Arc::new(
                replication::tls::client_config(
                    &t.ca,
                    t.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                )
                .map_err(|e| fail("cannot set up TLS to etcd", e))?,
            )),
            None => None,
        };
        let store = cluster::store::Store::etcd_with(&cfg.etcd, etcd_tls)
            .await
            .map_err(|e| fail("cannot reach the cluster store", e))?;
        let listen = cfg
            .listen
            .ok_or_else(|| fail("cluster mode (--etcd) needs --listen", "no replica address"))?;
        let server = replication::server::ReplicaServer::bind(
            listen,
            Arc::clone(storage),
            Arc::clone(&fence),
        )
        .await
        .map_err(|e| fail(&format!("cannot listen for replicas on {listen}"), e))?;
        let server = match &tls {
            Some(t) => server.with_tls(
                Arc::clone(t),
                Arc::new(cluster::peer::StoreMembers {
                    store: store.clone(),
                    me: cfg.node_id.clone(),
                }),
            ),
            None => server,
        };
        let addr = server
            .local_addr()
            .map_err(|e| fail("cannot read the replica address", e))?;
        let server = server
            .spawn()
            .map_err(|e| fail("cannot start the replica server", e))?;
        (Mode::Cluster, store, Some((server, addr)))
    };
    let me = NodeRecord {
        id: cfg.node_id.clone(),
        replica_addr: server
            .as_ref()
            .map(|(_, addr)| addr.to_string())
            .unwrap_or_default(),
        zone: cfg.zone.clone(),
        capacity_bytes: 0,
        free_bytes: 0,
        version: crate::node_info::VERSION.to_owned(),
    };
    let cluster = Cluster::new(
        mode,
        store,
        me,
        Arc::clone(storage),
        fence,
        REPLICA_TIMEOUT,
        cluster::RepairPolicy {
            rate: cfg.rebuild_rate,
            replace_after: cfg.replace_after,
            ..cluster::RepairPolicy::default()
        },
    );
    let cluster = match &tls {
        Some(t) => cluster.with_tls(Arc::clone(t)),
        None => cluster,
    };
    let cluster = Arc::new(if mode == Mode::Cluster {
        cluster.with_attachment_ttl(cfg.lease_ttl)
    } else {
        cluster
    });
    let server = server.map(|(s, _)| s);
    if let Some(s) = &server {
        s.set_control(Arc::new(cluster::replicated_snapshots::ServerControl(
            Arc::downgrade(&cluster),
        )));
    }
    let stop_server = |server: Option<replication::server::ServerHandle>| async move {
        if let Some(s) = server {
            s.stop().await;
        }
    };
    let lease = match cluster.store().grant_lease(cfg.lease_ttl).await {
        Ok(l) => l,
        Err(e) => {
            stop_server(server).await;
            return Err(fail("cannot take a node lease", e));
        }
    };
    if let Err(e) = publish_node(&cluster, lease).await {
        stop_server(server).await;
        return Err(fail("cannot register this node", e));
    }
    if mode == Mode::Standalone {
        let legacy = cfg.data_dir.join(standalone::LEGACY_SETS_FILE);
        match standalone::adopt(&cluster, &legacy).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(volumes = n, "recorded this node's volumes in the store"),
            Err(e) => return Err(fail("cannot record this node's volumes", e)),
        }
        tracing::info!(node = %cluster.node_id(), "standalone: this node alone, over the embedded store");
    } else {
        tracing::info!(node = %cluster.node_id(), replica_addr = %cluster.record().await.replica_addr, zone = ?cfg.zone, ttl = ?cfg.lease_ttl, "joined the cluster");
        // Replicas replaced while this node was away are garbage now.
        match cluster.collect_orphans().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(replicas = n, "deleted orphan replicas"),
            Err(e) => {
                tracing::warn!(error = %e.full_message(), "cannot look for orphan replicas");
            }
        }
    }
    // Whatever ends the lease task (a panic included), this node can no longer vouch for its
    // lease: fence every attachment at once.
    let fence = {
        let cluster = Arc::clone(&cluster);
        move || cluster.fence_all()
    };
    let lease_task = tokio::spawn(fence_when_done(
        tokio::spawn(lease_loop(Arc::clone(&cluster), lease, cfg.lease_ttl)),
        fence,
    ));
    Ok(ClusterParts {
        cluster,
        server,
        lease_task,
        tls,
    })
}

/// Wait for `task` (the lease task) and call `fence` if it ends for any reason (returns or
/// panics). Aborting the returned future (at shutdown) aborts `task` too, without fencing.
async fn fence_when_done(task: JoinHandle<()>, fence: impl FnOnce()) {
    let mut task = AbortOnDrop(task);
    match (&mut task.0).await {
        Ok(()) => tracing::error!("the lease task ended; fencing this node's attachments"),
        Err(e) if e.is_panic() => {
            tracing::error!(error = %e, "the lease task failed; fencing this node's attachments");
        }
        Err(_) => return, // aborted from outside
    }
    fence();
}

/// Keep the node's lease; when it lapses, fence every attachment of this node, take a new
/// lease and register again. Capacity figures are republished on every round.
/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn lease_loop(cluster: Arc<Cluster>, mut lease: cluster::store::LeaseId, ttl: Duration) {
    // Attachments are confirmed against the store while the lease task runs (see
    // `Cluster::confirm_attachments`); they lapse by themselves if it stops.
    let _confirm = AbortOnDrop(tokio::spawn(Arc::clone(&cluster).confirm_attachments()));
    loop {
        let keep = cluster::store::spawn_keepalive(cluster.store().clone(), lease, ttl);
        let mut valid = keep.subscribe();
        let mut tick = tokio::time::interval(ttl);
        loop {
            tokio::select! {
                changed = valid.changed() => {
                    if changed.is_err() || !*valid.borrow() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    // In its own task: a store call that hangs must not delay noticing that
                    // the lease lapsed, which is when this node must stop I/O.
                    let cluster = Arc::clone(&cluster);
                    tokio::spawn(async move {
                        if let Err(e) = publish_node(&cluster, lease).await {
                            tracing::warn!(error = %e, "cannot refresh this node's record");
                        }
                    });
                }
            }
        }
        drop(keep);
        tracing::error!("the node lease lapsed: fencing this node's attachments");
        cluster.fence_all();
        // Register again at once (while unlisted, no other node reaches this node's replicas,
        // so a volume whose only healthy copy is here cannot attach anywhere), then every
        // TTL/5 while the store refuses.
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::time::sleep(ttl / 5).await;
            }
            match cluster.store().grant_lease(ttl).await {
                Ok(l) => match publish_node(&cluster, l).await {
                    Ok(()) => {
                        lease = l;
                        tracing::info!("registered again with a new lease");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot register again yet"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot take a new lease yet"),
            }
        }
    }
}

/// Run the daemon until SIGTERM or SIGINT; `Ok` means a clean shutdown.
///
/// Must be called inside a multi-threaded tokio runtime.
///
/// # Errors
/// Any start-up failure (the data directory is in use, the socket is live, storage does not
/// open, …), a server failing, or storage failing to close.
pub async fn run(cfg: DaemonConfig) -> Result<(), NodeError> {
    let mut signals = ShutdownSignals::install()?;
    let lock = lock_data_dir(&cfg).await?;
    let held = Held::acquire(&cfg, lock)?;
    let engine =
        volume::io::probe(cfg.engine.into(), cfg.io_threads.into()).map_err(NodeError::Engine)?;
    let node = Arc::new(NodeInfo::new(cfg.node_id.clone(), engine.name()));
    let metrics = Arc::new(MetricsExporter::<Storage>::new(Arc::clone(&node)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut ops = OpsEndpoint::start(&cfg, &node, &metrics, stop_rx.clone()).await?;

    tracing::info!(
        node_id = %cfg.node_id,
        engine = engine.name(),
        devices = ?cfg.pools.iter().map(|p| p.path.display().to_string()).collect::<Vec<_>>(),
        "opening storage"
    );
    let storage = Storage::open(StorageConfig {
        devices: cfg.device_specs(),
        node_id: cfg.node_id.clone(),
        force_format: cfg.force_format,
        engine,
    })
    .await
    .map_err(NodeError::Open)?;
    let storage = Arc::new(storage);
    metrics.attach(Arc::clone(&storage));

    // From here on, every way out goes through `Running::stop`, which closes storage.
    let mut running = Running::new(Arc::clone(&node), storage, stop_tx, stop_rx);
    let served = match running.start(&cfg, held.listeners, &metrics).await {
        Ok(()) => {
            node.advance(Phase::Ready);
            tracing::info!(api_socket = %held.socket.path().display(), http_addr = %ops.addr, "ballast daemon ready");
            running.serve(&mut signals, &mut ops.task).await
        }
        Err(e) => Err(e),
    };
    let ended = served.as_ref().ok().copied();
    let result = running.stop(served.map(drop)).await;
    drop(held.socket);
    ops.stop().await;
    drop(held.lock);
    if result.is_ok()
        && ended == Some(Ended::HandedOver)
        && cfg.after_hand_over == AfterHandOver::Wait
    {
        tracing::info!("handed over; waiting for SIGTERM (--after-hand-over wait)");
        let name = signals.recv().await;
        tracing::info!(signal = name, "exiting");
    }
    result
}

/// Why the daemon stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// SIGTERM or SIGINT.
    Signal,
    /// A `--upgrade` daemon asked for a hand-over.
    HandedOver,
}

/// How long `--upgrade` waits for the running daemon to stop once it agreed to hand over.
pub const UPGRADE_WAIT: Duration = Duration::from_secs(120);

/// Lock the data directory; with `--upgrade`, first have the daemon holding it hand over and
/// stop (`POST /v1/daemon/hand-over` on its API socket).
async fn lock_data_dir(cfg: &DaemonConfig) -> Result<DataDirLock, NodeError> {
    private_dir(&cfg.data_dir).map_err(|source| NodeError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let pid = match DataDirLock::acquire(&cfg.lock_file()) {
        Err(LockError::Held { pid, .. }) if cfg.upgrade => pid,
        Ok(lock) => {
            if cfg.upgrade {
                tracing::info!(
                    "--upgrade: no daemon runs on this data directory; starting as usual"
                );
            }
            return Ok(lock);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(pid, socket = %cfg.api_socket.display(), "--upgrade: asking the running daemon to hand over");
    let asked = std::time::Instant::now();
    let _: (_, serde_json::Value) = ::cli::client::ApiClient::new(&cfg.api_socket)
        .post("/v1/daemon/hand-over", &serde_json::json!({}))
        .await
        .map_err(|source| NodeError::Upgrade { pid, source })?;
    loop {
        match DataDirLock::acquire(&cfg.lock_file()) {
            Ok(lock) => {
                tracing::info!(
                    pid,
                    waited_ms = asked.elapsed().as_millis() as u64,
                    "--upgrade: the daemon before handed over and stopped"
                );
                return Ok(lock);
            }
            Err(LockError::Held { .. }) if asked.elapsed() < UPGRADE_WAIT => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(LockError::Held { .. }) => return Err(NodeError::UpgradeTimeout { pid }),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The exclusive resources taken before anything starts: the data directory's lock, the API
/// socket, and the CSI and Docker sockets when configured. Released when dropped.
struct Held {
    lock: DataDirLock,
    socket: BoundSocket,
    listeners: Listeners,
}

/// The listening sockets the servers take over.
struct Listeners {
    api: LocalListener,
    csi: Option<(BoundSocket, LocalListener)>,
    docker: Option<(BoundSocket, LocalListener)>,
}

/// Load this node's TLS files, and check that its certificate names it (peers would refuse
/// it otherwise).
fn load_tls(
    files: &replication::tls::TlsFiles,
    node_id: &str,
) -> Result<Arc<replication::tls::Tls>, Box<dyn std::error::Error + Send + Sync>> {
    let tls = replication::tls::Tls::load(files.clone())?;
    let pem = std::fs::read(&files.cert)?;
    let names_me = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .is_some_and(|c| replication::tls::certifies(&c, node_id));
    if !names_me {
        return Err(format!(
            "{} does not name this node ({node_id}); issue one with `ballast cert issue --node {node_id}`",
            files.cert.display()
        )
        .into());
    }
    tracing::info!(cert = %files.cert.display(), "TLS identity loaded: mutual TLS for replica traffic (cluster mode) and NBD over TCP");
    Ok(tls)
}

/// Create `dir` (and its parents) if missing, and make it mode 0700: the data directory holds
/// the attach FUSE mount, the NBD socket and the fence and attachment records, none of them
/// for any user but the daemon's.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        tracing::info!(path = %dir.display(), mode = format!("{mode:o}"), "making the data directory private (0700)");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Held {
    fn acquire(cfg: &DaemonConfig, lock: DataDirLock) -> Result<Self, NodeError> {
        tracing::debug!(path = %lock.path().display(), "locked the data directory");
        let (socket, api) = BoundSocket::bind(&cfg.api_socket)?;
        // The CSI and Docker sockets follow the same rules: 0600 from the start, a stale
        // socket replaced, a live one or another file refused.
        let bind = |path: &Option<PathBuf>, err: fn(SocketError) -> NodeError| {
            path.as_deref()
                .map(|p| BoundSocket::bind(p).map_err(err))
                .transpose()
        };
        let csi = bind(&cfg.csi_socket, NodeError::CsiSocket)?;
        let docker = bind(&cfg.docker_socket, NodeError::DockerSocket)?;
        Ok(Self {
            lock,
            socket,
            listeners: Listeners { api, csi, docker },
        })
    }
}

/// The operator endpoint (`/healthz`, `/readyz`, `/metrics`): up before storage opens and
/// down only after it closed, so probes see the whole start-up and shutdown.
struct OpsEndpoint {
    addr: SocketAddr,
    addr_file: AddrFile,
    task: ServerTask,
}

impl OpsEndpoint {
    async fn start(
        cfg: &DaemonConfig,
        node: &Arc<NodeInfo>,
        metrics: &Arc<MetricsExporter<Storage>>,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, NodeError> {
        let bind_error = |source| NodeError::HttpBind {
            addr: cfg.http,
            source,
        };
        let tcp = TcpListener::bind(cfg.http).await.map_err(bind_error)?;
        let addr = tcp.local_addr().map_err(bind_error)?;
        let addr_file = AddrFile::write(cfg.http_addr_file(), addr)?;
        tracing::info!(http_addr = %addr, addr_file = %addr_file.path.display(), "serving /healthz, /readyz and /metrics");
        let ops = ops_endpoint::router(Arc::clone(node), Arc::clone(metrics));
        let task = spawn_server(
            axum::serve(tcp, ops)
                .with_graceful_shutdown(stopped(stop))
                .into_future(),
        );
        Ok(Self {
            addr,
            addr_file,
            task,
        })
    }

    async fn stop(self) {
        drain("HTTP", self.task).await;
        drop(self.addr_file);
    }
}

/// Everything that runs once storage is open. Each part is recorded as soon as it started, so
/// [`Running::stop`] stops exactly what started, whether start-up finished or not.
struct Running {
    node: Arc<NodeInfo>,
    storage: Arc<Storage>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    nbd: Option<Arc<NbdServer>>,
    cluster: Option<ClusterParts>,
    attacher: Option<Arc<Attacher>>,
    /// The local API server.
    api: Option<ServerTask>,
    /// The other servers, with the socket each one removes when it stops.
    servers: Vec<(&'static str, ServerTask, BoundSocket)>,
    checkpoints: Option<JoinHandle<()>>,
    /// Signalled by `POST /v1/daemon/hand-over`.
    hand_over: Arc<tokio::sync::Notify>,
}

impl Running {
    fn new(
        node: Arc<NodeInfo>,
        storage: Arc<Storage>,
        stop_tx: watch::Sender<bool>,
        stop_rx: watch::Receiver<bool>,
    ) -> Self {
        Self {
            node,
            storage,
            stop_tx,
            stop_rx,
            nbd: None,
            cluster: None,
            attacher: None,
            api: None,
            servers: Vec::new(),
            checkpoints: None,
            hand_over: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Start the frontends, the cluster (in cluster mode) and every endpoint, in order.
    async fn start(
        &mut self,
        cfg: &DaemonConfig,
        listeners: Listeners,
        metrics: &MetricsExporter<Storage>,
    ) -> Result<(), NodeError> {
        let storage = Arc::clone(&self.storage);
        let parts = start_cluster(cfg, &storage).await?;
        metrics.attach_cluster(Arc::clone(&parts.cluster));
        let cluster = Arc::clone(&parts.cluster);
        let tls = parts.tls.clone();
        self.cluster = Some(parts);
        let volumes = Arc::new(ClusterSource(Arc::clone(&cluster)));
        // One open device per volume, shared by the block device and NBD connections.
        let devices: Arc<dyn DeviceSource> = Arc::new(SharedDevices::new(
            Arc::clone(&volumes) as Arc<dyn DeviceSource>
        ));
        let path = cfg.data_dir.join(nbd::SOCKET_NAME);
        let nbd = NbdServer::start(
            Arc::clone(&devices),
            path.clone(),
            self.stop_rx.clone(),
            tls,
        )
        .map_err(|source| NodeError::NbdSocket { path, source })?;
        self.nbd = Some(Arc::clone(&nbd));
        let source = Arc::clone(&devices);
        self.attacher = start_attacher(
            source,
            &cfg.data_dir,
            cfg.fuse_transport.into(),
            cfg.holder_socket.clone(),
        )
        .await;
        let host = Arc::new(NodeHost::new(
            Arc::clone(&self.node),
            cfg.zone.clone(),
            cluster,
            self.attacher.clone(),
        ));
        let api = api::router(Arc::clone(&volumes), Arc::clone(&self.node))
            .merge(api::nodes::router(Arc::clone(&host)))
            .merge(api::attach::router(Arc::clone(&host)))
            .merge(api::mount::router(Arc::clone(&host)))
            .merge(api::export::router(devices, nbd))
            .merge(api::hand_over_router(Arc::clone(&self.hand_over)));
        if let Some((socket, listener)) = listeners.docker {
            let config = plugin::PluginConfig {
                mount_root: cfg.data_dir.join(DOCKER_MOUNT_DIR),
                refs_file: cfg.data_dir.join(DOCKER_REFS_FILE),
                attach_wait: cfg.lease_ttl.saturating_mul(3),
            };
            let stop = stopped(self.stop_rx.clone());
            match start_docker(
                listener,
                Arc::clone(&volumes),
                Arc::clone(&host),
                config,
                stop,
            )
            .await
            {
                Ok(task) => self.servers.push(("Docker plugin", task, socket)),
                // The callers file is unreadable: mounting would lose track of users.
                Err(source) => tracing::error!(error = %source, "the Docker plugin is not served"),
            }
        }
        if let Some((socket, listener)) = listeners.csi {
            let config = csi::NodeConfig {
                allowed_root: cfg.kubelet_dir.clone(),
            };
            tracing::info!(socket = ?cfg.csi_socket, driver = csi::DRIVER_NAME, "serving CSI");
            let task = spawn_server(csi::serve(
                listener,
                Arc::clone(&volumes),
                host,
                config,
                stopped(self.stop_rx.clone()),
            ));
            self.servers.push(("CSI", task, socket));
        }
        self.api = Some(spawn_server(
            axum::serve(listeners.api, api)
                .with_graceful_shutdown(stopped(self.stop_rx.clone()))
                .into_future(),
        ));
        self.checkpoints = Some(tokio::spawn(checkpoint_loop(storage, self.stop_rx.clone())));
        Ok(())
    }

    /// Serve until a shutdown signal or a hand-over request (`Ok`), or until the local API or
    /// the operator endpoint fails.
    async fn serve(
        &mut self,
        signals: &mut ShutdownSignals,
        http: &mut ServerTask,
    ) -> Result<Ended, NodeError> {
        let api = self.api.as_mut().expect("started");
        tokio::select! {
            name = signals.recv() => {
                tracing::info!(signal = name, "shutting down");
                Ok(Ended::Signal)
            }
            () = self.hand_over.notified() => {
                tracing::info!("handing over to the next daemon (--upgrade) and shutting down");
                Ok(Ended::HandedOver)
            }
            r = api => Err(NodeError::Serve("local API", server_failure(r))),
            r = http => Err(NodeError::Serve("HTTP", server_failure(r))),
        }
    }

    /// The one shutdown path: report not ready, stop accepting and let requests in flight
    /// finish, detach the frontends, leave the cluster, then flush and close storage.
    /// Returns `served`, or the close failure if it was `Ok`.
    async fn stop(mut self, served: Result<(), NodeError>) -> Result<(), NodeError> {
        self.node.advance(Phase::Stopping);
        let _ = self.stop_tx.send(true);
        if let Some(task) = self.checkpoints.take() {
            let _ = task.await;
        }
        if let Some(task) = self.api.take() {
            drain("local API", task).await;
        }
        for (name, task, socket) in self.servers.drain(..) {
            drain(name, task).await;
            drop(socket);
        }
        if let Some(attacher) = self.attacher.take() {
            let _ = tokio::task::spawn_blocking(move || attacher.shutdown()).await;
        }
        if let Some(nbd) = self.nbd.take() {
            nbd.shutdown().await;
        }
        if let Some(p) = self.cluster.take() {
            p.lease_task.abort();
            if let Some(server) = p.server {
                server.stop().await;
            }
        }
        let closed = self.storage.close().await.map_err(NodeError::Close);
        match &closed {
            Ok(()) => tracing::info!("storage flushed and closed"),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(e), "storage did not close cleanly");
            }
        }
        served.and(closed)
    }
}

/// The Docker plugin's mount root under the data directory.
pub const DOCKER_MOUNT_DIR: &str = "docker";
/// The Docker plugin's callers file under the data directory.
pub const DOCKER_REFS_FILE: &str = "docker-mounts.json";

/// Load the Docker plugin's state, mount again the volumes that have callers, and serve it.
async fn start_docker<C: ::api::VolumeControl>(
    listener: LocalListener,
    control: Arc<C>,
    host: Arc<NodeHost>,
    config: plugin::PluginConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<ServerTask> {
    let plugin = Arc::new(plugin::Plugin::new(control, host, config)?);
    plugin.restore().await;
    tracing::info!(driver = "ballast", "serving the Docker volume plugin");
    Ok(spawn_server(plugin::serve(
        listener,
        plugin::router(plugin),
        stop,
    )))
}

/// Set up the attach frontend and attach again the volumes that were attached (blocking work,
/// on a blocking thread). `None`, with an error logged, if that thread fails.
async fn start_attacher(
    source: Arc<dyn DeviceSource>,
    data_dir: &Path,
    transport: attach::fuse::session::Transport,
    holder_socket: Option<PathBuf>,
) -> Option<Arc<Attacher>> {
    let mountpoint = data_dir.join(attach::FUSE_DIR);
    let runtime = tokio::runtime::Handle::current();
    let data_dir = data_dir.to_owned();
    let started = tokio::task::spawn_blocking(move || {
        let frontend = FuseLoop::new(mountpoint, runtime, transport, holder_socket);
        let attacher = Arc::new(Attacher::new(source, Box::new(frontend), &data_dir));
        attacher.restore();
        attacher
    })
    .await;
    match started {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(error = %e, "attaching volumes is unavailable");
            None
        }
    }
}

/// How often storage commits on its own when something changed (see [`Storage::checkpoint`]).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Commit changed pools every [`CHECKPOINT_INTERVAL`] until shutdown is requested.
async fn checkpoint_loop(storage: Arc<Storage>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = storage.checkpoint().await {
                    tracing::error!(error = %crate::error_chain(&e), "periodic checkpoint failed");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

type ServerTask = JoinHandle<std::io::Result<()>>;

fn spawn_server(server: impl Future<Output = std::io::Result<()>> + Send + 'static) -> ServerTask {
    tokio::spawn(server)
}

/// Resolves once shutdown is requested (or the sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The error of a server task that ended before shutdown was requested.
fn server_failure(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Error {
    match r {
        Ok(Ok(())) => std::io::Error::other("it returned without an error"),
        Ok(Err(e)) => e,
        Err(e) => std::io::Error::other(e.to_string()),
    }
}

/// Wait for a server to finish its requests in flight, at most [`DRAIN_TIMEOUT`].
async fn drain(name: &'static str, task: ServerTask) {
    if task.is_finished() {
        return;
    }
    let abort = task.abort_handle();
    if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_ok() {
        tracing::debug!(server = name, "server stopped");
    } else {
        tracing::warn!(server = name, timeout = ?DRAIN_TIMEOUT, "requests still in flight; closing their connections");
        abort.abort();
    }
}

/// SIGTERM and SIGINT, installed once at start-up.
#[derive(Debug)]
struct ShutdownSignals {
    term: Signal,
    int: Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self, NodeError> {
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(NodeError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(NodeError::Signals)?,
        })
    }

    /// The name of the next shutdown signal to arrive.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// `<data-dir>/http.addr`: the operator endpoint's bound address, for tools and tests that
/// asked for port 0. Written atomically; removed when dropped.
#[derive(Debug)]
struct AddrFile {
    path: PathBuf,
}

impl AddrFile {
    fn write(path: PathBuf, addr: SocketAddr) -> Result<Self, NodeError> {
        let tmp = path.with_extension("addr.tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| NodeError::AddrFile {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path })
    }
}

impl Drop for AddrFile {
    fn drop(&mut self) {
        remove_quietly(&self.path);
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove file");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_lease_task_that_panics_or_returns_fences() {
        for panics in [true, false] {
            let fenced = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(async move {
                assert!(!panics, "the lease task failed");
            });
            let flag = Arc::clone(&fenced);
            fence_when_done(task, move || flag.store(true, Ordering::SeqCst)).await;
            assert!(fenced.load(Ordering::SeqCst), "panics: {panics}");
        }
    }

    #[tokio::test]
    async fn shutting_the_supervisor_down_stops_the_task_without_fencing() {
        let fenced = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let task = tokio::spawn(async move {
            let _alive = tx;
            std::future::pending::<()>().await;
        });
        let flag = Arc::clone(&fenced);
        let sup = tokio::spawn(fence_when_done(task, move || {
            flag.store(true, Ordering::SeqCst);
        }));
        tokio::task::yield_now().await;
        sup.abort();
        let _ = sup.await;
        // The task was aborted: its sender is gone.
        assert!(rx.recv().await.is_none());
        assert!(!fenced.load(Ordering::SeqCst));
    }
}
