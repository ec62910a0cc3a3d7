//! The command line of the `ballast` binary: one daemon subcommand and the client commands.
//!
//! This module only describes the daemon's side of the command line (clap derive types); the
//! client commands are the `cli` crate's ([`::cli::args`]), flattened in. What the daemon does
//! with its flags is in [`crate::config`] and [`crate::node`].
//!
//! Invariants:
//! - Daemon flags are all optional here, so that [`crate::config`] can tell a flag the user
//!   gave from one left out, and let flags override the config file. Defaults are therefore
//!   written in the help text rather than as clap defaults.
//! - The exit codes listed in the long help are the ones [`::cli::exit_code`] defines.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

const LONG_ABOUT: &str = "\
Ballast: replicated block storage for containers, one daemon per node.

`ballast daemon` runs the node daemon. Every other command is a client that talks to the
daemon's local API socket (--api-socket, or the BALLAST_API_SOCKET environment variable,
default /run/ballast/api.sock).

Exit codes of the client commands:
  0  success
  1  generic or internal error
  2  usage error (bad flags or arguments)
  3  the daemon is not reachable on its API socket
  4  not found (no such volume)
  5  conflict (for example, a volume exists with a different spec)
  6  invalid argument (a bad name, size or option, found by the CLI or the daemon)";

/// The `ballast` command line.
/// The lease TTLs accepted, in seconds, from the flag and the config file alike.
pub const LEASE_TTL_SECONDS: std::ops::RangeInclusive<u64> = 2..=60;

/// The `replace_after` values accepted, in seconds (flag and file alike): up to a year.
pub const REPLACE_AFTER_SECONDS: std::ops::RangeInclusive<u64> = 1..=365 * 24 * 3600;

#[derive(Debug, Parser)]
#[command(name = "ballast", version, about = "Ballast: replicated block storage for containers", long_about = LONG_ABOUT)]
pub struct Cli {
    /// The daemon's local API socket [default: /run/ballast/api.sock].
    #[arg(long, global = true, env = ::cli::args::API_SOCKET_ENV, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon (storage, local API, health and metrics).
    Daemon(Box<DaemonArgs>),
    /// The cluster's certificate authority for mutual TLS between nodes.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Node certificates signed by the cluster CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The client commands (`volume`, `pool`, `status`, `node`).
    #[command(flatten)]
    Client(::cli::args::ClientCommand),
    /// Keep the attach FUSE session's descriptors across daemon restarts. Started by the
    /// daemon, or with --standing on its own (the holder container of a Kubernetes pod, given
    /// to the daemon as --holder-socket).
    #[command(hide = true)]
    Holder {
        /// The unix socket to answer on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The FUSE mount point of the session; the holder exits once it is unmounted.
        #[arg(long, value_name = "DIR")]
        mountpoint: PathBuf,
        /// Give the session up (its devices then fail their I/O) once no daemon has watched
        /// it for this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        give_up_after: u64,
        /// Outlive sessions: close a session given up or unmounted and wait for the next,
        /// until killed.
        #[arg(long)]
        standing: bool,
    },
}

/// `ballast ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make a new cluster CA: DIR/ca.pem (give it to every node as --tls-ca) and
    /// DIR/ca-key.pem (keep it secret; it signs node certificates). Refuses to replace an
    /// existing CA key.
    Init {
        /// Where to write the CA's files (created 0700 if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
}

/// `ballast cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a certificate and key signed by the CA in --ca-dir. With --node NAME: node
    /// NAME's, as OUT/NAME.pem (--tls-cert) and OUT/NAME-key.pem (--tls-key). With --client
    /// NAME: an NBD client's, as OUT/ca-cert.pem, OUT/client-cert.pem and OUT/client-key.pem
    /// (qemu's `tls-creds-x509,dir=OUT`, libnbd's `tls-certificates=OUT`).
    #[command(group(clap::ArgGroup::new("whom").required(true).args(["node", "client"])))]
    Issue {
        /// The node's ID (its --node-id), which the certificate names.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// An NBD client's name (any label): the certificate lets it use TCP exports and
        /// nothing else.
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// With --node: another IP address or DNS name the certificate names, for clients
        /// that dial the node by it (NBD over TCP). Repeatable.
        #[arg(long, value_name = "ADDR", requires = "node")]
        address: Vec<String>,
        /// The directory of `ballast ca init`.
        #[arg(long, value_name = "DIR", default_value = ".")]
        ca_dir: PathBuf,
        /// Where to write the files (created 0700 if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "DAYS", default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
    },
}

/// Flags of `ballast daemon`. Each one overrides the same setting in `--config`.
#[derive(Debug, Default, Args)]
pub struct DaemonArgs {
    /// A TOML config file with the same settings as these flags; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where the daemon keeps its state: lock file, default pool, http.addr
    /// [default: /var/lib/ballast].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// A backing device or file, repeatable. A missing file is created sparse at SIZE
    /// (e.g. /srv/pool.img:100GiB). Without any, <data-dir>/pool.img of 10 GiB is used.
    #[arg(long = "pool", value_name = "PATH[:SIZE]")]
    pub pools: Vec<String>,

    /// This node's ID [default: the hostname].
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,

    /// Address for /healthz, /readyz and /metrics [default: 127.0.0.1:9470]. Port 0 picks a
    /// free port; the bound address is logged and written to <data-dir>/http.addr.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// Take over from the daemon running on this data directory: ask it (over its API
    /// socket) to hand its attached volumes over and stop, wait for it to let go, then start.
    /// Attached devices see a pause, not an error. Without a running daemon, start as usual.
    #[arg(long)]
    pub upgrade: bool,

    /// What this daemon does once it has handed over to a `--upgrade` daemon [default:
    /// exit]: exit (0), or wait, doing nothing, until SIGTERM (in a Kubernetes pod, whose
    /// container would otherwise be restarted).
    #[arg(long, value_enum, value_name = "WHAT")]
    pub after_hand_over: Option<AfterHandOver>,

    /// The socket of a standing holder (`ballast holder --standing`, started on its own) that
    /// keeps the attach session across daemon restarts, instead of one the daemon spawns in
    /// <data-dir>. Other holders' sockets in the same directory are searched for a session to
    /// take over (another pod's, during a DaemonSet update).
    #[arg(long, value_name = "PATH")]
    pub holder_socket: Option<PathBuf>,

    /// The I/O engine [default: auto, which uses io_uring when the kernel allows it].
    #[arg(long, value_enum)]
    pub engine: Option<EngineChoice>,

    /// How the kernel's FUSE requests for attached volumes reach the daemon [default:
    /// classic]: classic reads /dev/fuse with worker threads; io-uring uses FUSE over io_uring
    /// (Linux 6.14+; falls back to classic, logged, where the kernel lacks it).
    #[arg(long, value_enum)]
    pub fuse_transport: Option<FuseTransport>,

    /// Data-path threads [default: 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: Option<u16>,

    /// Format devices even if they hold a filesystem, a partition table or another pool.
    #[arg(long)]
    pub force_format: bool,

    /// Log format [default: text]. RUST_LOG selects what is logged (default: info).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Join a multi-node cluster whose store is etcd at these endpoints (comma-separated
    /// http:// URLs). Without it the node runs alone.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// The CA certificate (PEM) of an etcd served over TLS: the --etcd endpoints are then
    /// https:// URLs.
    #[arg(long, value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,

    /// The client certificate (PEM) this node presents to etcd (etcd's --client-cert-auth);
    /// with --etcd-key. The node's --tls-cert serves, if etcd trusts the cluster CA.
    #[arg(long, value_name = "PEM")]
    pub etcd_cert: Option<PathBuf>,

    /// The key (PEM) of --etcd-cert.
    #[arg(long, value_name = "PEM")]
    pub etcd_key: Option<PathBuf>,

    /// Where this node serves its replicas to peers (cluster mode), e.g. 10.0.0.5:9471.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// The cluster CA's certificate (PEM): peers' replica connections (cluster mode) and NBD
    /// clients over TCP must present a certificate it signed (`ballast ca init` makes one).
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// This node's certificate (PEM), signed by the cluster CA, naming this node
    /// (`ballast cert issue --node NAME`). Read again when it changes.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// This node's private key (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// Serve and reach replicas over plaintext TCP, with no authentication: anyone who can
    /// reach --listen can read, write and fence every replica. Only for a trusted, isolated
    /// network; TLS (--tls-ca, --tls-cert, --tls-key) is the default in cluster mode.
    #[arg(long, env = "BALLAST_INSECURE_PLAINTEXT_REPLICAS")]
    pub insecure_plaintext_replicas: bool,

    /// This node's zone label; replicas of a volume are spread over zones.
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,

    /// Seconds of the node's store lease; a node that cannot renew it within this time stops
    /// I/O, and its volumes can be taken over [default: 5].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(LEASE_TTL_SECONDS))]
    pub lease_ttl: Option<u64>,

    /// Copy at most this many MiB per second per replica rebuild; 0 for no limit
    /// [default: 256].
    #[arg(long, value_name = "MIB_PER_SEC")]
    pub rebuild_rate: Option<u64>,

    /// Replace a replica whose node has been gone this many seconds with a new one on another
    /// node [default: 300].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(REPLACE_AFTER_SECONDS))]
    pub replace_after: Option<u64>,

    /// Serve the Kubernetes CSI driver (csi.ballast.dev) on this unix socket, e.g.
    /// /var/lib/kubelet/plugins/csi.ballast.dev/csi.sock.
    #[arg(long, value_name = "PATH")]
    pub csi_socket: Option<PathBuf>,

    /// The kubelet's root directory: CSI staging and target paths must lie under it
    /// [default: /var/lib/kubelet].
    #[arg(long, value_name = "DIR")]
    pub kubelet_dir: Option<PathBuf>,

    /// Serve the Docker volume plugin `ballast` on this unix socket; without a value, on
    /// /run/docker/plugins/ballast.sock, where Docker finds it.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = plugin::DEFAULT_SOCKET)]
    pub docker_socket: Option<PathBuf>,
}

/// Which I/O engine the daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else the sync engine.
    #[default]
    Auto,
    /// io_uring, or fail to start.
    Uring,
    /// The portable thread-pool engine.
    Sync,
}

impl From<EngineChoice> for volume::io::EngineKind {
    fn from(choice: EngineChoice) -> Self {
        match choice {
            EngineChoice::Auto => Self::Auto,
            EngineChoice::Uring => Self::Uring,
            EngineChoice::Sync => Self::Sync,
        }
    }
}

/// What a daemon does once it has handed over to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterHandOver {
    /// Exit with status 0.
    #[default]
    Exit,
    /// Stay, doing nothing, until SIGTERM or SIGINT.
    Wait,
}

/// How FUSE requests reach the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FuseTransport {
    /// Worker threads read /dev/fuse.
    #[default]
    Classic,
    /// FUSE over io_uring.
    IoUring,
}

impl From<FuseTransport> for frontends::attach::fuse::session::Transport {
    fn from(choice: FuseTransport) -> Self {
        match choice {
            FuseTransport::Classic => Self::Classic,
            FuseTransport::IoUring => Self::IoUring,
        }
    }
}

/// How the daemon writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use ::cli::args::{ClientCommand, OutputArgs, OutputFormat, VolumeCommand};
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::parse_from([
            "ballast",
            "daemon",
            "--pool",
            "/a.img:1GiB",
            "--pool",
            "/dev/sdb",
            "--http",
            "127.0.0.1:0",
            "--engine",
            "sync",
            "--io-threads",
            "4",
        ]);
        let Command::Daemon(args) = cli.command else {
            panic!("not the daemon command")
        };
        assert_eq!(args.pools, ["/a.img:1GiB", "/dev/sdb"]);
        assert_eq!(args.engine, Some(EngineChoice::Sync));
        assert_eq!(args.io_threads, Some(4));

        let cli = Cli::parse_from([
            "ballast",
            "volume",
            "list",
            "-o",
            "json",
            "--api-socket",
            "/x",
        ]);
        assert_eq!(cli.api_socket.as_deref(), Some(std::path::Path::new("/x")));
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Volume(VolumeCommand::List(OutputArgs {
                format: OutputFormat::Json
            })))
        ));
    }
}
