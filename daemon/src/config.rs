//! The daemon's configuration: the TOML file, the flags, and the settings they resolve to.
//!
//! Precedence, highest first: command-line flags (and `BALLAST_API_SOCKET` for the socket),
//! then the `--config` file, then the built-in defaults. [`ConfigFile`] is what a user writes
//! and refuses unknown keys; [`DaemonConfig`] is the resolved, runtime form.
//!
//! Invariants of a [`DaemonConfig`]:
//! - `pools` is never empty: with no pool configured anywhere it holds the default pool file
//!   `<data_dir>/pool.img`, created sparse at [`DEFAULT_POOL_SIZE`] if missing;
//! - `io_threads` is at least 1;
//! - `node_id` is non-empty and has no `/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use volume::pool::DeviceSpec;

use ::cli::args::DEFAULT_API_SOCKET;

use crate::cli::{
    AfterHandOver, DaemonArgs, EngineChoice, FuseTransport, LogFormat, LEASE_TTL_SECONDS,
    REPLACE_AFTER_SECONDS,
};
use ::api::byte_size::ByteSize;

/// The data directory used when none is configured.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ballast";

/// The metrics and health address used when none is configured.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9470";

/// The size of the default pool file created under the data directory.
pub const DEFAULT_POOL_SIZE: u64 = 10 << 30;

/// The file name of the default pool under the data directory.
pub const DEFAULT_POOL_FILE: &str = "pool.img";

/// The node lease's time to live, in seconds, when none is configured.
pub const DEFAULT_LEASE_TTL: u64 = 5;
/// The default rebuild throttle, MiB per second per rebuild.
pub const DEFAULT_REBUILD_MIB_PER_SEC: u64 = 256;
/// The default wait before a gone node's replica is replaced, in seconds.
pub const DEFAULT_REPLACE_AFTER: u64 = 300;

/// The kubelet's root directory when none is configured.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

/// The number of data-path threads used when none is configured.
pub const DEFAULT_IO_THREADS: u16 = 2;

/// Errors reading or resolving the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's description, with line and column.
        message: String,
    },
    /// A `--pool` value is malformed.
    #[error("invalid pool {spec:?}: {message}")]
    Pool {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        message: String,
    },
    /// No node ID was given and the hostname could not be read.
    #[error("cannot determine the node ID from the hostname; pass --node-id")]
    NodeId(#[source] nix::Error),
    /// A setting has a value the daemon cannot use.
    #[error("invalid {setting}: {message}")]
    Invalid {
        /// The setting's flag name.
        setting: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The TOML config file. Every key is optional and matches a `ballast daemon` flag.
///
/// ```toml
/// data_dir = "/var/lib/ballast"
/// node_id = "node-a"
/// api_socket = "/run/ballast/api.sock"
/// http = "0.0.0.0:9470"
/// engine = "auto"          # auto | uring | sync
/// fuse_transport = "classic"   # classic | io-uring
/// holder_socket = "/var/lib/ballast/holders/pod-a.sock"   # a standing holder
/// after_hand_over = "exit"      # exit | wait
/// io_threads = 2
/// force_format = false
/// log_format = "text"      # text | json
/// etcd = ["http://10.0.0.1:2379"]   # cluster mode; needs `listen`
/// etcd_ca = "/etc/ballast/etcd/ca.pem"        # https:// endpoints; etcd_cert and etcd_key
/// etcd_cert = "/etc/ballast/tls/node.pem"     # for etcd's --client-cert-auth
/// etcd_key = "/etc/ballast/tls/node-key.pem"
/// listen = "10.0.0.5:9471"          # where peers reach this node's replicas
/// tls_ca = "/etc/ballast/tls/ca.pem"          # mutual TLS between nodes (cluster mode)
/// tls_cert = "/etc/ballast/tls/node.pem"
/// tls_key = "/etc/ballast/tls/node-key.pem"
/// insecure_plaintext_replicas = false         # true: no TLS (isolated networks only)
/// zone = "zone-a"
/// lease_ttl = 5                     # seconds
/// rebuild_rate = 256                # MiB/s per rebuild; 0: no limit
/// replace_after = 300               # seconds before a gone node's replica is replaced
/// csi_socket = "/var/lib/kubelet/plugins/csi.ballast.dev/csi.sock"
/// kubelet_dir = "/var/lib/kubelet"
/// docker_socket = "/run/docker/plugins/ballast.sock"
///
/// [[pool]]
/// path = "/srv/ballast/pool0.img"
/// size = "100GiB"          # only used to create a missing file
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// See `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// See `--pool`.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolEntry>,
    /// See `--node-id`.
    pub node_id: Option<String>,
    /// See `--api-socket`.
    pub api_socket: Option<PathBuf>,
    /// See `--http`.
    pub http: Option<SocketAddr>,
    /// See `--engine`.
    pub engine: Option<EngineChoice>,
    /// See `--fuse-transport`.
    pub fuse_transport: Option<FuseTransport>,
    /// See `--holder-socket`.
    pub holder_socket: Option<PathBuf>,
    /// See `--after-hand-over`.
    pub after_hand_over: Option<AfterHandOver>,
    /// See `--io-threads`.
    pub io_threads: Option<u16>,
    /// See `--force-format`.
    pub force_format: Option<bool>,
    /// See `--log-format`.
    pub log_format: Option<LogFormat>,
    /// See `--etcd`.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// See `--listen`.
    pub listen: Option<SocketAddr>,
    /// See `--etcd-ca`.
    pub etcd_ca: Option<PathBuf>,
    /// See `--etcd-cert`.
    pub etcd_cert: Option<PathBuf>,
    /// See `--etcd-key`.
    pub etcd_key: Option<PathBuf>,
    /// See `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// See `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// See `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// See `--insecure-plaintext-replicas`.
    pub insecure_plaintext_replicas: Option<bool>,
    /// See `--zone`.
    pub zone: Option<String>,
    /// See `--lease-ttl`.
    pub lease_ttl: Option<u64>,
    /// See `--rebuild-rate`.
    pub rebuild_rate: Option<u64>,
    /// See `--replace-after`.
    pub replace_after: Option<u64>,
    /// See `--csi-socket`.
    pub csi_socket: Option<PathBuf>,
    /// See `--kubelet-dir`.
    pub kubelet_dir: Option<PathBuf>,
    /// See `--docker-socket`.
    pub docker_socket: Option<PathBuf>,
}

/// One `[[pool]]` table of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    /// The backing file or block device.
    pub path: PathBuf,
    /// Create a missing file sparse at this size.
    pub size: Option<ByteSize>,
}

impl PoolEntry {
    /// Parse a `--pool PATH[:SIZE]` value.
    ///
    /// The text after the last `:` is a size when it starts with a digit; otherwise the whole
    /// value is a path (so paths containing `:` still work when no size is given).
    ///
    /// # Errors
    /// [`ConfigError::Pool`] for an empty path or an unparseable size.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::Pool {
            spec: spec.to_owned(),
            message,
        };
        let (path, size) = match spec.rsplit_once(':') {
            Some((path, size)) if size.trim_start().starts_with(|c: char| c.is_ascii_digit()) => {
                let size = ByteSize::parse(size).map_err(|e| bad(e.message().to_owned()))?;
                (path, Some(size))
            }
            _ => (spec, None),
        };
        if path.is_empty() {
            return Err(bad(
                "the path is empty; use PATH[:SIZE], e.g. /srv/pool.img:100GiB".into(),
            ));
        }
        Ok(Self {
            path: PathBuf::from(path),
            size,
        })
    }
}

impl ConfigFile {
    /// Read and parse `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, or has unknown or mistyped keys.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parse TOML text; the error is the parser's message.
    fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned() + &span_suffix(text, e.span()))
    }
}

/// ` (line N)` for a parse error's span, if the parser gave one.
fn span_suffix(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        format!(
            " (line {})",
            text[..s.start.min(text.len())].lines().count().max(1)
        )
    })
    .unwrap_or_default()
}

/// The resolved settings the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The state directory (lock file, default pool, `http.addr`).
    pub data_dir: PathBuf,
    /// The backing devices; never empty.
    pub pools: Vec<PoolEntry>,
    /// This node's ID.
    pub node_id: String,
    /// The local API socket.
    pub api_socket: PathBuf,
    /// The health and metrics address.
    pub http: SocketAddr,
    /// The I/O engine.
    pub engine: EngineChoice,
    /// How FUSE requests reach the daemon.
    pub fuse_transport: FuseTransport,
    /// A standing holder's socket, instead of a holder the daemon spawns.
    pub holder_socket: Option<PathBuf>,
    /// Take over from the daemon running on the data directory (`--upgrade`).
    pub upgrade: bool,
    /// What to do once handed over.
    pub after_hand_over: AfterHandOver,
    /// Data-path threads, at least 1.
    pub io_threads: u16,
    /// Format devices even if they hold a foreign signature.
    pub force_format: bool,
    /// The log format.
    pub log_format: LogFormat,
    /// The etcd endpoints; empty for a single node.
    pub etcd: Vec<String>,
    /// etcd over TLS: its CA, and this node's client certificate and key if given.
    pub etcd_tls: Option<EtcdTls>,
    /// The replica server's address (cluster mode).
    pub listen: Option<SocketAddr>,
    /// Mutual TLS between nodes (cluster mode; `None` only with
    /// `--insecure-plaintext-replicas`, or standalone).
    pub tls: Option<replication::tls::TlsFiles>,
    /// The node's zone label.
    pub zone: Option<String>,
    /// The node lease's time to live.
    pub lease_ttl: std::time::Duration,
    /// Rebuild throttle in bytes per second (`None`: no limit).
    pub rebuild_rate: Option<u64>,
    /// How long a gone node's replica waits before it is replaced.
    pub replace_after: std::time::Duration,
    /// The CSI socket, when the CSI driver is served.
    pub csi_socket: Option<PathBuf>,
    /// Where CSI staging and target paths must lie.
    pub kubelet_dir: PathBuf,
    /// The Docker plugin socket, when the plugin is served.
    pub docker_socket: Option<PathBuf>,
}

/// How the daemon reaches an etcd served over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate etcd's certificate is checked against.
    pub ca: PathBuf,
    /// This node's client certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl DaemonConfig {
    /// Resolve flags over the config file (if `args.config` names one) over the defaults.
    /// `api_socket` is the global `--api-socket` flag or `BALLAST_API_SOCKET`.
    ///
    /// # Errors
    /// The config file is unreadable or invalid, a flag is malformed, or the node ID cannot be
    /// determined.
    pub fn resolve(args: &DaemonArgs, api_socket: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        Self::merge(args, api_socket, file, hostname)
    }

    fn merge(
        args: &DaemonArgs,
        api_socket: Option<&Path>,
        file: ConfigFile,
        hostname: impl FnOnce() -> Result<String, nix::Error>,
    ) -> Result<Self, ConfigError> {
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut pools = if args.pools.is_empty() {
            file.pools
        } else {
            args.pools
                .iter()
                .map(|p| PoolEntry::parse(p))
                .collect::<Result<_, _>>()?
        };
        if pools.is_empty() {
            pools.push(PoolEntry {
                path: data_dir.join(DEFAULT_POOL_FILE),
                size: ByteSize::from_bytes(DEFAULT_POOL_SIZE),
            });
        }
        let node_id = match args.node_id.clone().or(file.node_id) {
            Some(id) => id,
            None => hostname().map_err(ConfigError::NodeId)?,
        };
        if node_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                setting: "--node-id",
                message: "it is empty".into(),
            });
        }
        if node_id.contains('/') {
            // Node ids are store keys and name replicas (`NODE/DEVICE`).
            return Err(ConfigError::Invalid {
                setting: "--node-id",
                message: format!("{node_id:?} contains '/'; use letters, digits, '-' or '.'"),
            });
        }
        let etcd_given = !args.etcd.is_empty() || !file.etcd.is_empty();
        if etcd_given && args.listen.or(file.listen).is_none() {
            return Err(ConfigError::Invalid {
                setting: "--listen",
                message: "cluster mode (--etcd) needs the address where this node serves its \
                          replicas to peers, e.g. --listen 10.0.0.5:9471"
                    .into(),
            });
        }
        let etcd_tls = Self::etcd_tls(
            args,
            [
                file.etcd_ca.clone(),
                file.etcd_cert.clone(),
                file.etcd_key.clone(),
            ],
        )?;
        let tls = Self::tls(
            args,
            [
                file.tls_ca.clone(),
                file.tls_cert.clone(),
                file.tls_key.clone(),
            ],
            file.insecure_plaintext_replicas,
            etcd_given,
        )?;
        let io_threads = args
            .io_threads
            .or(file.io_threads)
            .unwrap_or(DEFAULT_IO_THREADS);
        if io_threads == 0 {
            return Err(ConfigError::Invalid {
                setting: "io_threads",
                message: "it must be at least 1".into(),
            });
        }
        // The file is checked like the flags: a lease of 0 s would stop the lease task, and
        // with it the node's fencing.
        let lease_ttl = args
            .lease_ttl
            .or(file.lease_ttl)
            .unwrap_or(DEFAULT_LEASE_TTL);
        in_range("lease_ttl", lease_ttl, &LEASE_TTL_SECONDS)?;
        let replace_after = args
            .replace_after
            .or(file.replace_after)
            .unwrap_or(DEFAULT_REPLACE_AFTER);
        in_range("replace_after", replace_after, &REPLACE_AFTER_SECONDS)?;
        Ok(Self {
            data_dir,
            pools,
            node_id,
            api_socket: api_socket
                .map(Path::to_owned)
                .or(file.api_socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET)),
            http: args.http.or(file.http).unwrap_or_else(|| {
                DEFAULT_HTTP_ADDR
                    .parse()
                    .expect("the default HTTP address is valid")
            }),
            engine: args.engine.or(file.engine).unwrap_or_default(),
            fuse_transport: args
                .fuse_transport
                .or(file.fuse_transport)
                .unwrap_or_default(),
            holder_socket: args.holder_socket.clone().or(file.holder_socket),
            upgrade: args.upgrade,
            after_hand_over: args
                .after_hand_over
                .or(file.after_hand_over)
                .unwrap_or_default(),
            io_threads,
            force_format: args.force_format || file.force_format.unwrap_or(false),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            etcd: if args.etcd.is_empty() {
                file.etcd
            } else {
                args.etcd.clone()
            },
            listen: args.listen.or(file.listen),
            etcd_tls,
            tls,
            zone: args.zone.clone().or(file.zone),
            lease_ttl: std::time::Duration::from_secs(lease_ttl),
            rebuild_rate: Some(
                args.rebuild_rate
                    .or(file.rebuild_rate)
                    .unwrap_or(DEFAULT_REBUILD_MIB_PER_SEC),
            )
            .filter(|&r| r > 0)
            .map(|r| r.saturating_mul(1 << 20)),
            replace_after: std::time::Duration::from_secs(replace_after),
            csi_socket: args.csi_socket.clone().or(file.csi_socket),
            kubelet_dir: args
                .kubelet_dir
                .clone()
                .or(file.kubelet_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_KUBELET_DIR)),
            docker_socket: args.docker_socket.clone().or(file.docker_socket),
        })
    }

    /// The etcd TLS files: a CA, and a client certificate with its key, or neither.
    fn etcd_tls(
        args: &DaemonArgs,
        [file_ca, file_cert, file_key]: [Option<PathBuf>; 3],
    ) -> Result<Option<EtcdTls>, ConfigError> {
        let ca = args.etcd_ca.clone().or(file_ca);
        let cert = args.etcd_cert.clone().or(file_cert);
        let key = args.etcd_key.clone().or(file_key);
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    setting: "--etcd-cert, --etcd-key",
                    message: "give both: the client certificate and its key".into(),
                })
            }
        };
        match ca {
            Some(ca) => Ok(Some(EtcdTls { ca, identity })),
            None if identity.is_some() => Err(ConfigError::Invalid {
                setting: "--etcd-ca",
                message: "a client certificate for etcd needs the CA that etcd's certificate \
                          is checked against (--etcd-ca), and https:// endpoints"
                    .into(),
            }),
            None => Ok(None),
        }
    }

    /// The node's TLS files. Cluster mode: all three, or none with the explicit insecure
    /// setting. Standalone: all three (for NBD over TCP) or none.
    fn tls(
        args: &DaemonArgs,
        [file_ca, file_cert, file_key]: [Option<PathBuf>; 3],
        file_insecure: Option<bool>,
        cluster: bool,
    ) -> Result<Option<replication::tls::TlsFiles>, ConfigError> {
        let insecure = args.insecure_plaintext_replicas || file_insecure.unwrap_or(false);
        let ca = args.tls_ca.clone().or(file_ca);
        let cert = args.tls_cert.clone().or(file_cert);
        let key = args.tls_key.clone().or(file_key);
        if !cluster {
            return match (ca, cert, key) {
                (Some(ca), Some(cert), Some(key)) => {
                    Ok(Some(replication::tls::TlsFiles { ca, cert, key }))
                }
                (None, None, None) => Ok(None),
                _ => Err(ConfigError::Invalid {
                    setting: "--tls-ca, --tls-cert, --tls-key",
                    message: "give all three or none (standalone, they secure NBD over TCP; \
                              make them with `ballast ca init` and `ballast cert issue --node \
                              NAME`)"
                        .into(),
                }),
            };
        }
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) if !insecure => {
                Ok(Some(replication::tls::TlsFiles { ca, cert, key }))
            }
            (None, None, None) if insecure => Ok(None),
            (_, _, _) if insecure => Err(ConfigError::Invalid {
                setting: "--insecure-plaintext-replicas",
                message: "it contradicts --tls-ca, --tls-cert and --tls-key; give one or the other"
                    .into(),
            }),
            _ => Err(ConfigError::Invalid {
                setting: "--tls-ca, --tls-cert, --tls-key",
                message: "cluster mode (--etcd) encrypts and authenticates replica traffic with \
                          mutual TLS: give all three (make them with `ballast ca init` and \
                          `ballast cert issue --node NAME`), or --insecure-plaintext-replicas \
                          on an isolated network"
                    .into(),
            }),
        }
    }

    /// The devices to hand to the storage engine.
    pub fn device_specs(&self) -> Vec<DeviceSpec> {
        self.pools
            .iter()
            .map(|p| DeviceSpec {
                path: p.path.clone(),
                create_size: p.size.map(ByteSize::bytes),
            })
            .collect()
    }

    /// The file the daemon writes its bound HTTP address into.
    pub fn http_addr_file(&self) -> PathBuf {
        self.data_dir.join("http.addr")
    }

    /// The data directory's lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join("lock")
    }
}

fn hostname() -> Result<String, nix::Error> {
    Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned())
}

/// `value` of `setting` must lie in `range`.
fn in_range(
    setting: &'static str,
    value: u64,
    range: &std::ops::RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        setting,
        message: format!(
            "{value} is out of range; use {} to {} seconds",
            range.start(),
            range.end()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::unnecessary_wraps)] // the signature `merge` expects
    fn fixed_host() -> Result<String, nix::Error> {
        Ok("host-1".into())
    }

    #[test]
    fn pool_specs() {
        let p = PoolEntry::parse("/srv/a.img:10GiB").unwrap();
        assert_eq!(p.path, Path::new("/srv/a.img"));
        assert_eq!(p.size.unwrap().bytes(), 10 << 30);
        let p = PoolEntry::parse("/dev/disk/by-id/x:y").unwrap();
        assert_eq!(p.path, Path::new("/dev/disk/by-id/x:y"));
        assert!(p.size.is_none());
        let e = PoolEntry::parse("/a.img:10XB").unwrap_err().to_string();
        assert!(e.contains("invalid size"), "{e}");
        assert!(PoolEntry::parse(":1G").is_err());
    }

    #[test]
    fn defaults() {
        let cfg = DaemonConfig::merge(
            &DaemonArgs::default(),
            None,
            ConfigFile::default(),
            fixed_host,
        )
        .unwrap();
        assert_eq!(cfg.data_dir, Path::new(DEFAULT_DATA_DIR));
        assert_eq!(cfg.pools.len(), 1);
        assert_eq!(cfg.pools[0].path, Path::new("/var/lib/ballast/pool.img"));
        assert_eq!(cfg.pools[0].size.unwrap().bytes(), DEFAULT_POOL_SIZE);
        assert_eq!(cfg.node_id, "host-1");
        assert_eq!(cfg.api_socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(cfg.http.port(), 9470);
        assert_eq!(cfg.io_threads, 2);
        assert_eq!(cfg.engine, EngineChoice::Auto);
    }

    #[test]
    fn cluster_mode_needs_tls_or_an_explicit_plaintext_flag() {
        let cluster = |edit: &dyn Fn(&mut DaemonArgs), file: &str| {
            let mut args = DaemonArgs {
                etcd: vec!["http://127.0.0.1:2379".into()],
                listen: Some("127.0.0.1:9471".parse().unwrap()),
                ..DaemonArgs::default()
            };
            edit(&mut args);
            DaemonConfig::merge(&args, None, ConfigFile::parse(file).unwrap(), fixed_host)
        };
        let e = cluster(&|_| {}, "").unwrap_err().to_string();
        assert!(
            e.contains("--tls-ca") && e.contains("ballast ca init"),
            "{e}"
        );
        let all = |a: &mut DaemonArgs| {
            a.tls_ca = Some("/t/ca.pem".into());
            a.tls_cert = Some("/t/n.pem".into());
            a.tls_key = Some("/t/n-key.pem".into());
        };
        let tls = cluster(&all, "").unwrap().tls.unwrap();
        assert_eq!(tls.cert, Path::new("/t/n.pem"));
        // From the file too.
        let file = "tls_ca = \"/f/ca.pem\"\ntls_cert = \"/f/n.pem\"\ntls_key = \"/f/k.pem\"";
        assert_eq!(
            cluster(&|_| {}, file).unwrap().tls.unwrap().key,
            Path::new("/f/k.pem")
        );
        // Two of three: refused.
        let e = cluster(&|a| a.tls_ca = Some("/t/ca.pem".into()), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("all three"), "{e}");
        // Plaintext only when asked for, and not together with TLS files.
        let insecure = cluster(&|a| a.insecure_plaintext_replicas = true, "").unwrap();
        assert!(insecure.tls.is_none());
        assert!(cluster(&|_| {}, "insecure_plaintext_replicas = true")
            .unwrap()
            .tls
            .is_none());
        let both = |a: &mut DaemonArgs| {
            all(a);
            a.insecure_plaintext_replicas = true;
        };
        let e = cluster(&both, "").unwrap_err().to_string();
        assert!(e.contains("contradicts"), "{e}");
        // Standalone needs none of it, takes all three (for NBD over TCP), refuses a part.
        let standalone = |f: &dyn Fn(&mut DaemonArgs)| {
            let mut a = DaemonArgs::default();
            f(&mut a);
            DaemonConfig::merge(&a, None, ConfigFile::default(), fixed_host)
        };
        assert!(standalone(&|_| {}).unwrap().tls.is_none());
        assert!(standalone(&all).unwrap().tls.is_some());
        let e = standalone(&|a| a.tls_cert = Some("/t/n.pem".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("all three or none"), "{e}");
    }

    #[test]
    fn etcd_tls_needs_its_ca_and_a_whole_identity() {
        let merge =
            |args: &DaemonArgs| DaemonConfig::merge(args, None, ConfigFile::default(), fixed_host);
        let mut args = DaemonArgs {
            etcd_ca: Some("/e/ca.pem".into()),
            ..DaemonArgs::default()
        };
        let t = merge(&args).unwrap().etcd_tls.unwrap();
        assert!(t.identity.is_none());
        args.etcd_cert = Some("/e/c.pem".into());
        let e = merge(&args).unwrap_err().to_string();
        assert!(e.contains("give both"), "{e}");
        args.etcd_key = Some("/e/k.pem".into());
        let t = merge(&args).unwrap().etcd_tls.unwrap();
        assert_eq!(t.identity.unwrap().1, Path::new("/e/k.pem"));
        args.etcd_ca = None;
        let e = merge(&args).unwrap_err().to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
    }

    #[test]
    fn flags_override_file() {
        let file = ConfigFile::parse(
            r#"
            data_dir = "/d"
            node_id = "from-file"
            engine = "sync"
            io_threads = 8
            http = "127.0.0.1:1"
            [[pool]]
            path = "/file.img"
            size = "1GiB"
            "#,
        )
        .unwrap();
        let args = DaemonArgs {
            node_id: Some("from-flag".into()),
            pools: vec!["/flag.img:2GiB".into()],
            ..DaemonArgs::default()
        };
        let cfg = DaemonConfig::merge(&args, Some(Path::new("/s.sock")), file, fixed_host).unwrap();
        assert_eq!(cfg.data_dir, Path::new("/d"));
        assert_eq!(cfg.node_id, "from-flag");
        assert_eq!(cfg.engine, EngineChoice::Sync);
        assert_eq!(cfg.io_threads, 8);
        assert_eq!(cfg.pools, [PoolEntry::parse("/flag.img:2GiB").unwrap()]);
        assert_eq!(cfg.api_socket, Path::new("/s.sock"));
    }

    #[test]
    fn the_file_is_range_checked_like_the_flags() {
        for (key, bad) in [
            ("lease_ttl", "0"),
            ("lease_ttl", "61"),
            ("lease_ttl", "9223372036854775807"),
            ("replace_after", "0"),
            ("replace_after", "9223372036854775807"),
        ] {
            let file = ConfigFile::parse(&format!("{key} = {bad}\n"));
            let e = match file {
                Ok(file) => DaemonConfig::merge(&DaemonArgs::default(), None, file, fixed_host)
                    .unwrap_err()
                    .to_string(),
                Err(e) => e,
            };
            assert!(e.contains(key), "{key} = {bad}: {e}");
        }
        let file = ConfigFile::parse("lease_ttl = 2\nreplace_after = 1\n").unwrap();
        let cfg = DaemonConfig::merge(&DaemonArgs::default(), None, file, fixed_host).unwrap();
        assert_eq!(cfg.lease_ttl, std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_node_id_with_a_slash_is_refused() {
        let args = DaemonArgs {
            node_id: Some("rack/1".into()),
            ..DaemonArgs::default()
        };
        let e = DaemonConfig::merge(&args, None, ConfigFile::default(), fixed_host).unwrap_err();
        assert!(e.to_string().contains("--node-id"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = ConfigFile::parse("data_dri = \"/x\"\n").unwrap_err();
        assert!(e.contains("unknown field `data_dri`"), "{e}");
        let e = ConfigFile::parse("[[pool]]\npath = \"/a\"\nsise = 1\n").unwrap_err();
        assert!(e.contains("unknown field `sise`"), "{e}");
    }
}
