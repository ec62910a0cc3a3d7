//! The daemon's life: start-up, serving, and clean shutdown. This is the composition root
//! that wires the storage engine to the local API and the operator endpoint.
//!
//! Start-up order, each step only after the previous one succeeded:
//! 1. install SIGTERM/SIGINT handlers (a signal during start-up is handled once storage is
//!    open, so the engine is never abandoned half-opened);
//! 2. lock the data directory ([`DataDirLock`]): two daemons never share one;
//! 3. bind the API socket ([`BoundSocket`]), refusing if another daemon answers on it;
//!    connections queue until step 6;
//! 4. start the I/O engine, bind the operator endpoint (`--http`), write the bound address to
//!    `<data-dir>/http.addr` and serve `/healthz` (200), `/readyz` (503 for now) and `/metrics`;
//! 5. open storage;
//! 6. serve NBD exports on `<data-dir>/nbd.sock` ([`NbdServer`]), serve the local API on the
//!    socket, start the periodic checkpoint ([`CHECKPOINT_INTERVAL`]), and only then report
//!    ready.
//!
//! Between 6's NBD and API steps, the attach frontend is set up (it mounts `<data-dir>/fuse`
//! on the first attach) and the volumes recorded as attached are attached again ([`Attacher::restore`]).
//!
//! Shutdown (SIGTERM or SIGINT): report not ready, stop accepting on both listeners and let
//! requests in flight finish (bounded by [`DRAIN_TIMEOUT`]), including NBD requests, flush and close storage
//! ([`Storage::close`]), remove the socket and `http.addr`, release the lock.
//!
//! Invariant: once storage is open, every way out of [`run`] goes through `Storage::close`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use volume::pool::{PoolError, Storage, StorageConfig};

use crate::api;
use crate::api_socket::{BoundSocket, SocketError};
use frontends::attach::{self, Attacher, FuseLoop};
use crate::config::DaemonConfig;
use crate::data_dir_lock::{DataDirLock, LockError};
use crate::host::NodeHost;
use crate::metrics::MetricsExporter;
use frontends::nbd::{self, NbdServer};
use crate::node_info::{NodeInfo, Phase};
use crate::ops_endpoint;
use replication::device::DeviceSource;
use cluster::model::NodeRecord;
use cluster::{publish_node, Cluster, ClusterSource};
use cluster::standalone::{self, LocalSource, ReplicaSets, Standalone};

/// How long shutdown waits for requests in flight before closing storage anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}")]
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
    /// The CSI socket could not be bound.
    #[error("cannot listen for CSI on {path}")]
    CsiSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Docker plugin socket could not be bound.
    #[error("cannot listen for Docker on {path}")]
    DockerSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A server stopped on its own.
    #[error("the {0} server stopped unexpectedly")]
    Serve(&'static str, #[source] std::io::Error),
    /// The replica-set file of standalone multi-replica volumes cannot be used.
    #[error("cannot open the replica-set file {path}")]
    ReplicaSets {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Cluster mode could not start.
    #[error("cannot join the cluster: {0}")]
    Cluster(String),
}

/// What cluster mode runs besides storage.
struct ClusterParts {
    cluster: Arc<Cluster>,
    server: replication::server::ServerHandle,
    lease_task: JoinHandle<()>,
}

/// How long a replica request may take before the replica is ejected.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);

/// Join the cluster: open the fence table, connect to etcd, serve replicas, register this
/// node under a lease and keep it renewed.
async fn start_cluster(
    cfg: &DaemonConfig,
    storage: &Arc<Storage>,
) -> Result<ClusterParts, NodeError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| NodeError::Cluster(format!("{what}: {e}"));
    let fence = replication::fence::FenceTable::open(cfg.data_dir.join("fence.json"))
        .map_err(|e| fail("cannot open the fence table", &e))?;
    let fence = Arc::new(fence);
    let store = cluster::store::Store::etcd(&cfg.etcd)
        .await
        .map_err(|e| fail("cannot reach the cluster store", &e))?;
    let listen = cfg
        .listen
        .ok_or_else(|| NodeError::Cluster("--listen is required with --etcd".into()))?;
    let server =
        replication::server::ReplicaServer::bind(listen, Arc::clone(storage), Arc::clone(&fence))
            .await
            .map_err(|e| fail(&format!("cannot listen for replicas on {listen}"), &e))?;
    let addr = server
        .local_addr()
        .map_err(|e| fail("cannot read the replica address", &e))?;
    let server = server
        .spawn()
        .map_err(|e| fail("cannot start the replica server", &e))?;
    let me = NodeRecord {
        id: cfg.node_id.clone(),
        replica_addr: addr.to_string(),
        zone: cfg.zone.clone(),
        capacity_bytes: 0,
        free_bytes: 0,
        version: crate::node_info::VERSION.to_owned(),
    };
    let cluster = Arc::new(Cluster::new(
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
    ));
    let lease = cluster
        .store()
        .grant_lease(cfg.lease_ttl)
        .await
        .map_err(|e| fail("cannot take a node lease", &e))?;
    publish_node(&cluster, lease)
        .await
        .map_err(|e| fail("cannot register this node", &e))?;
    tracing::info!(node = %cluster.node_id(), replica_addr = %addr, zone = ?cfg.zone, ttl = ?cfg.lease_ttl, "joined the cluster");
    let lease_task = tokio::spawn(lease_loop(Arc::clone(&cluster), lease, cfg.lease_ttl));
    Ok(ClusterParts {
        cluster,
        server,
        lease_task,
    })
}

/// Keep the node's lease; when it lapses, fence every attachment of this node, take a new
/// lease and register again. Capacity figures are republished on every round.
async fn lease_loop(cluster: Arc<Cluster>, mut lease: cluster::store::LeaseId, ttl: Duration) {
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
        loop {
            tokio::time::sleep(ttl / 5).await;
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
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| NodeError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let lock = DataDirLock::acquire(&cfg.lock_file())?;
    tracing::debug!(path = %lock.path().display(), "locked the data directory");

    let (socket, listener) = BoundSocket::bind(&cfg.api_socket)?;
    let csi_listener = match &cfg.csi_socket {
        Some(path) => Some(csi::bind(path).map_err(|source| NodeError::CsiSocket {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let docker_listener = match &cfg.docker_socket {
        // The same rules as the CSI socket: create the directory, replace a stale socket.
        Some(path) => Some(csi::bind(path).map_err(|source| NodeError::DockerSocket {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let engine =
        volume::io::probe(cfg.engine.into(), cfg.io_threads.into()).map_err(NodeError::Engine)?;
    let node = Arc::new(NodeInfo::new(cfg.node_id.clone(), engine.name()));
    let metrics = Arc::new(MetricsExporter::<Storage>::new(Arc::clone(&node)));
    let (stop_tx, stop_rx) = watch::channel(false);

    let tcp = TcpListener::bind(cfg.http)
        .await
        .map_err(|source| NodeError::HttpBind {
            addr: cfg.http,
            source,
        })?;
    let http_addr = tcp.local_addr().map_err(|source| NodeError::HttpBind {
        addr: cfg.http,
        source,
    })?;
    let addr_file = AddrFile::write(cfg.http_addr_file(), http_addr)?;
    tracing::info!(%http_addr, addr_file = %addr_file.path.display(), "serving /healthz, /readyz and /metrics");
    let ops = ops_endpoint::router(Arc::clone(&node), Arc::clone(&metrics));
    let mut http_task = spawn_server(
        axum::serve(tcp, ops)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );

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

    // NBD serves local replicas directly, so it runs only on a standalone node: in cluster
    // mode it would bypass the nexus and its fencing.
    let nbd_socket = cfg.data_dir.join(nbd::SOCKET_NAME);
    let nbd = match cfg
        .etcd
        .is_empty()
        .then(|| NbdServer::start(Arc::clone(&storage), nbd_socket.clone(), stop_rx.clone()))
        .transpose()
    {
        Ok(nbd) => nbd,
        Err(source) => {
            if let Err(e) = storage.close().await {
                tracing::error!(error = %crate::error_chain(&e), "storage did not close cleanly");
            }
            return Err(NodeError::NbdSocket {
                path: nbd_socket,
                source,
            });
        }
    };

    let cluster = if cfg.etcd.is_empty() {
        None
    } else {
        match start_cluster(&cfg, &storage).await {
            Ok(parts) => Some(parts),
            Err(e) => {
                if let Some(nbd) = &nbd {
                    nbd.shutdown().await;
                }
                if let Err(e) = storage.close().await {
                    tracing::error!(error = %crate::error_chain(&e), "storage did not close cleanly");
                }
                return Err(e);
            }
        }
    };
    if let Some(p) = &cluster {
        metrics.attach_cluster(Arc::clone(&p.cluster));
    }
    // Standalone mode: the API and the attach source know which replicas of multi-replica
    // volumes (one per pool device) are in sync.
    let (source, standalone_api): (Arc<dyn DeviceSource>, Option<Arc<Standalone>>) = if let Some(
        p,
    ) = &cluster
    {
        (Arc::new(ClusterSource(Arc::clone(&p.cluster))), None)
    } else {
        let path = cfg.data_dir.join(standalone::FILE_NAME);
        match ReplicaSets::open(&path) {
            Ok(sets) => {
                let sets = Arc::new(sets);
                (
                    Arc::new(LocalSource::new(Arc::clone(&storage), Arc::clone(&sets))),
                    Some(Arc::new(Standalone::new(Arc::clone(&storage), sets))),
                )
            }
            Err(source) => {
                if let Some(nbd) = &nbd {
                    nbd.shutdown().await;
                }
                if let Err(e) = storage.close().await {
                    tracing::error!(error = %crate::error_chain(&e), "storage did not close cleanly");
                }
                return Err(NodeError::ReplicaSets { path, source });
            }
        }
    };
    let attacher = start_attacher(source, &cfg.data_dir).await;
    let host = Arc::new(NodeHost::new(
        Arc::clone(&node),
        cfg.zone.clone(),
        Arc::clone(&storage),
        cluster.as_ref().map(|p| Arc::clone(&p.cluster)),
        attacher.clone(),
    ));
    let api = match &cluster {
        Some(p) => api::router(
            Arc::new(ClusterSource(Arc::clone(&p.cluster))),
            Arc::clone(&node),
        ),
        None => api::router(
            standalone_api.clone().expect("standalone mode has its API"),
            Arc::clone(&node),
        ),
    }
    .merge(api::nodes::router(Arc::clone(&host)))
    .merge(api::attach::router(Arc::clone(&host)))
    .merge(api::mount::router(Arc::clone(&host)))
    .merge(match &nbd {
        Some(nbd) => api::export::router(Arc::clone(&storage), Arc::clone(nbd)),
        None => api::export::unavailable_router(),
    });
    let docker_task = match docker_listener {
        Some(listener) => {
            let config = plugin::PluginConfig {
                mount_root: cfg.data_dir.join(DOCKER_MOUNT_DIR),
                refs_file: cfg.data_dir.join(DOCKER_REFS_FILE),
                attach_wait: cfg.lease_ttl * 3,
            };
            let stop = stopped(stop_rx.clone());
            let started = match (&cluster, &standalone_api) {
                (Some(p), _) => {
                    start_docker(
                        listener,
                        Arc::new(ClusterSource(Arc::clone(&p.cluster))),
                        Arc::clone(&host),
                        config,
                        stop,
                    )
                    .await
                }
                (None, Some(s)) => {
                    start_docker(listener, Arc::clone(s), Arc::clone(&host), config, stop).await
                }
                (None, None) => unreachable!("standalone mode has its API"),
            };
            match started {
                Ok(task) => Some(task),
                Err(source) => {
                    // The callers file is unreadable: mounting would lose track of users.
                    tracing::error!(error = %source, "the Docker plugin is not served");
                    None
                }
            }
        }
        None => None,
    };
    let csi_task = csi_listener.map(|listener| {
        let host = Arc::clone(&host);
        let config = csi::NodeConfig {
            allowed_root: cfg.kubelet_dir.clone(),
        };
        let stop = stopped(stop_rx.clone());
        tracing::info!(socket = ?cfg.csi_socket, driver = csi::DRIVER_NAME, "serving CSI");
        match (&cluster, &standalone_api) {
            (Some(p), _) => spawn_server(csi::serve(
                listener,
                Arc::new(ClusterSource(Arc::clone(&p.cluster))),
                host,
                config,
                stop,
            )),
            (None, Some(s)) => {
                spawn_server(csi::serve(listener, Arc::clone(s), host, config, stop))
            }
            (None, None) => unreachable!("standalone mode has its API"),
        }
    });
    let stop_rx_checkpoint = stop_rx.clone();
    let mut api_task = spawn_server(
        axum::serve(listener, api)
            .with_graceful_shutdown(stopped(stop_rx))
            .into_future(),
    );
    let checkpoints = tokio::spawn(checkpoint_loop(Arc::clone(&storage), stop_rx_checkpoint));
    node.advance(Phase::Ready);
    tracing::info!(api_socket = %socket.path().display(), %http_addr, "ballast daemon ready");

    let served = tokio::select! {
        name = signals.recv() => {
            tracing::info!(signal = name, "shutting down");
            Ok(())
        }
        r = &mut api_task => Err(NodeError::Serve("local API", server_failure(r))),
        r = &mut http_task => Err(NodeError::Serve("HTTP", server_failure(r))),
    };

    node.advance(Phase::Stopping);
    let _ = stop_tx.send(true);
    let _ = checkpoints.await;
    drain("local API", api_task).await;
    if let Some(task) = docker_task {
        drain("Docker plugin", task).await;
        if let Some(path) = &cfg.docker_socket {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(task) = csi_task {
        drain("CSI", task).await;
        if let Some(path) = &cfg.csi_socket {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(attacher) = attacher {
        let _ = tokio::task::spawn_blocking(move || attacher.shutdown()).await;
    }
    if let Some(nbd) = &nbd {
        nbd.shutdown().await;
    }
    if let Some(p) = cluster {
        p.lease_task.abort();
        p.server.stop().await;
    }
    let closed = storage.close().await.map_err(NodeError::Close);
    match &closed {
        Ok(()) => tracing::info!("storage flushed and closed"),
        Err(e) => tracing::error!(error = %crate::error_chain(e), "storage did not close cleanly"),
    }
    drop(socket);
    drain("HTTP", http_task).await;
    drop(addr_file);
    drop(lock);
    served.and(closed)
}

/// The Docker plugin's mount root under the data directory.
pub const DOCKER_MOUNT_DIR: &str = "docker";
/// The Docker plugin's callers file under the data directory.
pub const DOCKER_REFS_FILE: &str = "docker-mounts.json";

/// Load the Docker plugin's state, mount again the volumes that have callers, and serve it.
async fn start_docker<C: ::api::VolumeControl>(
    listener: tokio::net::UnixListener,
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
async fn start_attacher(source: Arc<dyn DeviceSource>, data_dir: &Path) -> Option<Arc<Attacher>> {
    let mountpoint = data_dir.join(attach::FUSE_DIR);
    let runtime = tokio::runtime::Handle::current();
    let data_dir = data_dir.to_owned();
    let started = tokio::task::spawn_blocking(move || {
        let frontend = FuseLoop::new(mountpoint, runtime);
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
