//! The Docker volume plugin (`docker volume create -d ballast`).
//!
//! An axum router speaking the Docker volume plugin protocol — `POST /Plugin.Activate` and
//! `POST /VolumeDriver.{Create,Remove,Mount,Unmount,Path,Get,List,Capabilities}` with JSON
//! bodies — on a unix socket (`/run/docker/plugins/ballast.sock` by default). The engine sends
//! no Content-Type header, so bodies are parsed here from raw bytes.
//!
//! Generic over [`api::VolumeControl`] (create, delete, inspect: the same trait the
//! local API and the CSI driver use) and [`api::NodeControl`] (attach on this node).
//! Every failure is an answer `{"Err": "…"}` naming the problem ([`errors`] is the one place
//! that words them); nothing panics and nothing waits without a bound.
//!
//! Semantics:
//! - scope `global`: a volume's name is cluster-wide and any node can mount it;
//! - Create takes `size`, `replicas` and `fs` (`encrypted` is refused until volumes can be
//!   encrypted); an unknown option or a bad value is an error naming it; the filesystem is
//!   made at Create, so whichever node mounts first finds it; creating again with the same
//!   options is a no-op;
//! - Mount attaches the volume on this node (fencing a dead previous node by epoch, waiting
//!   a bounded time for its lease to expire), mounts it under the mount root and counts the
//!   caller's ID; Unmount uncounts it, and the last one unmounts and detaches. The counts are
//!   persisted ([`refs`]), so they survive a daemon restart;
//! - Remove of a volume mounted here, or attached on another node, is refused.

pub mod errors;
pub mod protocol;
pub mod refs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{
    parse_size, ControlError, ErrorKind, NodeControl, ReplicaCount, VolumeControl, VolumeName,
    VolumeSpec, VolumeStatus,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use host::mount;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::errors::PluginError;
use crate::protocol::{
    ActivateResponse, Capabilities, CapabilitiesResponse, CreateRequest, ErrResponse, GetResponse,
    ListResponse, MountRequest, MountResponse, NameRequest, VolumeInfo,
};
use crate::refs::Refs;

/// Where Docker looks for the plugin named `ballast`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/ballast.sock";

/// The size of a volume created without `-o size`.
pub const DEFAULT_SIZE: u64 = 10 << 30;

/// The plugin's settings.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Volumes are mounted at `<mount_root>/<name>`.
    pub mount_root: PathBuf,
    /// Where the callers of mounted volumes are persisted.
    pub refs_file: PathBuf,
    /// How long Mount waits for another node's attachment to lapse (its lease to expire)
    /// before answering with an error.
    pub attach_wait: Duration,
}

/// The plugin's shared state.
#[derive(Debug)]
pub struct Plugin<C, N> {
    control: Arc<C>,
    node: Arc<N>,
    config: PluginConfig,
    /// Held across each operation: Docker's calls are rare and must not interleave per volume.
    refs: Mutex<Refs>,
}

impl<C: VolumeControl, N: NodeControl> Plugin<C, N> {
    /// The plugin over `control` and `node`, loading the persisted callers.
    ///
    /// # Errors
    /// The callers file exists but cannot be read.
    pub fn new(control: Arc<C>, node: Arc<N>, config: PluginConfig) -> std::io::Result<Self> {
        let refs = Refs::load(&config.refs_file)?;
        Ok(Self {
            control,
            node,
            config,
            refs: Mutex::new(refs),
        })
    }

    /// Mount again every volume that has callers (after a restart the old mount may be gone or
    /// stale). Failures are logged; the next Mount of that volume retries.
    pub async fn restore(&self) {
        let names = self.refs.lock().await.mounted();
        for name in names {
            let Ok(vn) = VolumeName::new(&name) else {
                continue;
            };
            if let Err(e) = self.ensure_mounted(&vn).await {
                tracing::error!(volume = %name, error = %e, "cannot mount a Docker volume again after restart");
            }
        }
    }

    fn mountpoint(&self, name: &VolumeName) -> PathBuf {
        self.config.mount_root.join(name.as_str())
    }

    /// Attach, waiting a bounded time for another node's attachment to lapse.
    async fn attach(&self, name: &VolumeName) -> Result<PathBuf, PluginError> {
        let deadline = Instant::now() + self.config.attach_wait;
        loop {
            match self.node.attach(name, false).await {
                Ok(a) => return Ok(PathBuf::from(a.path)),
                Err(e)
                    if e.kind() == ErrorKind::FailedPrecondition && Instant::now() < deadline =>
                {
                    tracing::info!(volume = %name, error = %e.full_message(), "waiting for another node's attachment to lapse");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(PluginError::Control(e)),
            }
        }
    }

    /// Attach and mount `name` at its mount point (idempotent); returns the mount point.
    async fn ensure_mounted(&self, name: &VolumeName) -> Result<PathBuf, PluginError> {
        let dev = self.attach(name).await?;
        let path = self.mountpoint(name);
        let p = path.clone();
        blocking(move || {
            std::fs::create_dir_all(&p).map_err(|e| PluginError::io("create", &p, &e))?;
            match mount::ensure_mounted(&dev, &p, None, &[], false, &[]) {
                Ok(_) => Ok(()),
                // A mount left by an earlier run of the daemon, on a device that is gone.
                Err(mount::MountError::OtherMount { .. }) => {
                    lazy_unmount(&p);
                    mount::ensure_mounted(&dev, &p, None, &[], false, &[])
                        .map(drop)
                        .map_err(PluginError::Mount)
                }
                Err(e) => Err(PluginError::Mount(e)),
            }
        })
        .await?;
        Ok(path)
    }

    async fn create(&self, req: CreateRequest) -> Result<(), PluginError> {
        let name = VolumeName::new(&req.name).map_err(PluginError::Control)?;
        let opts = CreateOptions::parse(req.opts.unwrap_or_default())?;
        let _guard = self.refs.lock().await;
        if let Ok(existing) = self.control.get_volume(&name).await {
            if existing.size_bytes == api::round_volume_size(opts.size)?
                && existing.replicas == opts.replicas
            {
                return Ok(());
            }
            return Err(PluginError::Exists {
                name: name.to_string(),
                size: existing.size_bytes,
                replicas: existing.replicas,
            });
        }
        self.control
            .create_volume(VolumeSpec {
                name: name.clone(),
                size_bytes: opts.size,
                replicas: opts.replicas,
            })
            .await?;
        // Make the filesystem now, so that whichever node mounts first finds it.
        if let Err(e) = self.format(&name, &opts.fs).await {
            let _ = self.node.detach(&name, false).await;
            if let Err(d) = self.control.delete_volume(&name).await {
                tracing::error!(volume = %name, error = %d.full_message(), "cannot delete a volume whose formatting failed");
            }
            return Err(e);
        }
        tracing::info!(volume = %name, size = opts.size, replicas = opts.replicas, fs = %opts.fs, "Docker created a volume");
        Ok(())
    }

    async fn format(&self, name: &VolumeName, fs: &str) -> Result<(), PluginError> {
        let dev = self.attach(name).await?;
        let fs = fs.to_owned();
        blocking(move || {
            mount::format_if_empty(&dev, &fs, &[])
                .map(drop)
                .map_err(PluginError::Mount)
        })
        .await?;
        self.node.detach(name, false).await?;
        Ok(())
    }

    async fn remove(&self, req: NameRequest) -> Result<(), PluginError> {
        let name = VolumeName::new(&req.name).map_err(PluginError::Control)?;
        let refs = self.refs.lock().await;
        let callers = refs.callers(name.as_str());
        if callers > 0 {
            return Err(PluginError::InUse {
                name: name.to_string(),
                callers,
            });
        }
        match self.control.delete_volume(&name).await {
            Ok(()) => {
                tracing::info!(volume = %name, "Docker removed a volume");
                Ok(())
            }
            Err(e) => Err(PluginError::Control(e)),
        }
    }

    async fn mount(&self, req: MountRequest) -> Result<PathBuf, PluginError> {
        let name = VolumeName::new(&req.name).map_err(PluginError::Control)?;
        if req.id.is_empty() {
            return Err(PluginError::MissingId);
        }
        let mut refs = self.refs.lock().await;
        self.control.get_volume(&name).await?;
        let path = self.ensure_mounted(&name).await?;
        let n = refs
            .add(name.as_str(), &req.id)
            .map_err(|e| PluginError::io("record the mount in", &self.config.refs_file, &e))?;
        tracing::info!(volume = %name, id = %req.id, callers = n, path = %path.display(), "Docker mounted a volume");
        Ok(path)
    }

    async fn unmount(&self, req: MountRequest) -> Result<(), PluginError> {
        let name = VolumeName::new(&req.name).map_err(PluginError::Control)?;
        let mut refs = self.refs.lock().await;
        if !refs.has(name.as_str(), &req.id) {
            // Docker may repeat an Unmount; a caller that holds nothing has nothing to undo.
            return Ok(());
        }
        if refs.callers(name.as_str()) == 1 {
            let p = self.mountpoint(&name);
            blocking(move || mount::unmount(&p).map(drop).map_err(PluginError::Mount)).await?;
            match self.node.detach(&name, false).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(PluginError::Control(e)),
            }
        }
        let left = refs
            .remove(name.as_str(), &req.id)
            .map_err(|e| PluginError::io("record the unmount in", &self.config.refs_file, &e))?;
        tracing::info!(volume = %name, id = %req.id, callers = left, "Docker unmounted a volume");
        Ok(())
    }

    async fn info(&self, status: &VolumeStatus) -> VolumeInfo {
        let mounted = self.refs.lock().await.callers(status.name.as_str()) > 0;
        let mut s = BTreeMap::new();
        s.insert(
            "size".to_owned(),
            api::format_size(status.size_bytes).into(),
        );
        s.insert("sizeBytes".to_owned(), status.size_bytes.into());
        s.insert("replicas".to_owned(), status.replicas.into());
        s.insert("state".to_owned(), status.state.to_string().into());
        s.insert(
            "replicaHealth".to_owned(),
            status
                .replica_status
                .iter()
                .map(|r| serde_json::json!({"node": r.node_id, "state": r.state}))
                .collect::<Vec<_>>()
                .into(),
        );
        VolumeInfo {
            name: status.name.to_string(),
            mountpoint: if mounted {
                self.mountpoint(&status.name).display().to_string()
            } else {
                String::new()
            },
            created_at: protocol::rfc3339(status.created_at),
            status: s,
        }
    }
}

/// What `-o` options ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Bytes.
    pub size: u64,
    /// Synchronous replicas.
    pub replicas: u8,
    /// The filesystem made at create.
    pub fs: String,
}

impl CreateOptions {
    /// Parse `-o` options; an unknown key or a bad value is an error naming it.
    ///
    /// # Errors
    /// [`PluginError::Option`] or [`PluginError::Unavailable`].
    pub fn parse(opts: BTreeMap<String, String>) -> Result<Self, PluginError> {
        let mut out = Self {
            size: DEFAULT_SIZE,
            replicas: 1,
            fs: mount::DEFAULT_FS.to_owned(),
        };
        for (key, value) in opts {
            match key.as_str() {
                "size" => {
                    out.size = parse_size(&value).map_err(|e| PluginError::Option {
                        key,
                        message: e.message().to_owned(),
                    })?;
                }
                "replicas" => {
                    out.replicas = value
                        .parse::<ReplicaCount>()
                        .map_err(|e| PluginError::Option {
                            key,
                            message: e.message().to_owned(),
                        })?
                        .get();
                }
                "fs" => {
                    if !mount::SUPPORTED_FS.contains(&value.as_str()) {
                        return Err(PluginError::Option {
                            key,
                            message: format!("{value:?} is not supported: use ext4 or xfs"),
                        });
                    }
                    out.fs = value;
                }
                "encrypted" => return Err(PluginError::Unavailable("encrypted volumes")),
                _ => return Err(PluginError::UnknownOption(key)),
            }
        }
        Ok(out)
    }
}

fn lazy_unmount(path: &Path) {
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status();
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, PluginError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PluginError::Control(ControlError::new(ErrorKind::Internal, e.to_string())))?
}

/// Parse a request body; the engine sends no Content-Type, and an empty body is `{}`.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, PluginError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| PluginError::BadRequest(e.to_string()))
}

fn err_text(r: Result<(), PluginError>) -> ErrResponse {
    ErrResponse {
        err: r.err().map(|e| e.to_string()).unwrap_or_default(),
    }
}

/// The plugin's routes.
pub fn router<C: VolumeControl, N: NodeControl>(plugin: Arc<Plugin<C, N>>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create::<C, N>))
        .route("/VolumeDriver.Remove", post(remove::<C, N>))
        .route("/VolumeDriver.Mount", post(mount_volume::<C, N>))
        .route("/VolumeDriver.Unmount", post(unmount_volume::<C, N>))
        .route("/VolumeDriver.Path", post(path::<C, N>))
        .route("/VolumeDriver.Get", post(get::<C, N>))
        .route("/VolumeDriver.List", post(list::<C, N>))
        .with_state(plugin)
}

async fn activate() -> Json<ActivateResponse> {
    Json(ActivateResponse {
        implements: vec!["VolumeDriver".to_owned()],
    })
}

async fn capabilities() -> Json<CapabilitiesResponse> {
    Json(CapabilitiesResponse {
        capabilities: Capabilities {
            scope: "global".to_owned(),
        },
    })
}

type St<C, N> = State<Arc<Plugin<C, N>>>;

async fn create<C: VolumeControl, N: NodeControl>(
    State(p): St<C, N>,
    bytes: Bytes,
) -> Json<ErrResponse> {
    let r = match body::<CreateRequest>(&bytes) {
        Ok(req) => p.create(req).await,
        Err(e) => Err(e),
    };
    Json(err_text(r))
}

async fn remove<C: VolumeControl, N: NodeControl>(
    State(p): St<C, N>,
    bytes: Bytes,
) -> Json<ErrResponse> {
    let r = match body::<NameRequest>(&bytes) {
        Ok(req) => p.remove(req).await,
        Err(e) => Err(e),
    };
    Json(err_text(r))
}

async fn mount_volume<C: VolumeControl, N: NodeControl>(
    State(p): St<C, N>,
    bytes: Bytes,
) -> Json<MountResponse> {
    let r = match body::<MountRequest>(&bytes) {
        Ok(req) => p.mount(req).await,
        Err(e) => Err(e),
    };
    Json(match r {
        Ok(path) => MountResponse {
            mountpoint: path.display().to_string(),
            err: String::new(),
        },
        Err(e) => MountResponse {
            mountpoint: String::new(),
            err: e.to_string(),
        },
    })
}

async fn unmount_volume<C: VolumeControl, N: NodeControl>(
    State(p): St<C, N>,
    bytes: Bytes,
) -> Json<ErrResponse> {
    let r = match body::<MountRequest>(&bytes) {
        Ok(req) => p.unmount(req).await,
        Err(e) => Err(e),
    };
    Json(err_text(r))
}

async fn path<C: VolumeControl, N: NodeControl>(
    State(p): St<C, N>,
    bytes: Bytes,
) -> Json<MountResponse> {
    let r = async {
        let req = body::<NameRequest>(&bytes)?;
        let name = VolumeName::new(&req.name).map_err(PluginError::Control)?;
        let status = p.control.get_volume(&name).await?;
        Ok::<_, PluginError>(p.info(&status).await.mountpoint)
    }
    .await;
    Json(match r {
        Ok(mountpoint) => MountResponse {
            mountpoint,
            err: String::new(),
        },
        Err(e) => MountResponse {
            mountpoint: String::new(),
            err: e.to_string(),
        },
    })
}

async fn get<C: VolumeControl, N: NodeControl>(
    State(p): St<C, N>,
    bytes: Bytes,
) -> Json<GetResponse> {
    let r = async {
        let req = body::<NameRequest>(&bytes)?;
        let name = VolumeName::new(&req.name).map_err(PluginError::Control)?;
        let status = p.control.get_volume(&name).await?;
        Ok::<_, PluginError>(p.info(&status).await)
    }
    .await;
    Json(match r {
        Ok(v) => GetResponse {
            volume: Some(v),
            err: String::new(),
        },
        Err(e) => GetResponse {
            volume: None,
            err: e.to_string(),
        },
    })
}

async fn list<C: VolumeControl, N: NodeControl>(State(p): St<C, N>) -> Json<ListResponse> {
    match p.control.list_volumes().await {
        Ok(all) => {
            let mut volumes = Vec::with_capacity(all.len());
            for s in &all {
                volumes.push(p.info(s).await);
            }
            Json(ListResponse {
                volumes,
                err: String::new(),
            })
        }
        Err(e) => Json(ListResponse {
            volumes: Vec::new(),
            err: PluginError::Control(e).to_string(),
        }),
    }
}

/// Serve `router` on `listener` until `shutdown` completes.
///
/// # Errors
/// The server failed.
pub async fn serve(
    listener: host::socket::LocalListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn options_are_checked_and_named() {
        let o = CreateOptions::parse(opts(&[("size", "1GiB"), ("replicas", "3"), ("fs", "xfs")]))
            .unwrap();
        assert_eq!((o.size, o.replicas, o.fs.as_str()), (1 << 30, 3, "xfs"));
        let d = CreateOptions::parse(BTreeMap::new()).unwrap();
        assert_eq!(
            (d.size, d.replicas, d.fs.as_str()),
            (DEFAULT_SIZE, 1, "ext4")
        );
        for (kv, want) in [
            (("size", "banana"), "size"),
            (("replicas", "9"), "replicas"),
            (("fs", "ntfs"), "ntfs"),
            (("nosuch", "1"), "nosuch"),
            (("encrypted", "true"), "encrypted"),
        ] {
            let e = CreateOptions::parse(opts(&[kv])).unwrap_err().to_string();
            assert!(e.contains(want), "{kv:?}: {e}");
        }
    }

    #[test]
    fn bodies_parse_without_content_type_and_empty_is_default() {
        let r: MountRequest = body(&Bytes::from_static(br#"{"Name":"v","ID":"x"}"#)).unwrap();
        assert_eq!(r.name, "v");
        let e: NameRequest = body(&Bytes::new()).unwrap();
        assert!(e.name.is_empty());
        assert!(body::<NameRequest>(&Bytes::from_static(b"{not json")).is_err());
    }
}
