//! The command line of the `ballast` binary: one daemon subcommand and the client commands.
//!
//! This module only describes the command line (clap derive types). What the daemon does with
//! its flags is in [`crate::config`] and [`crate::node`]; what the client commands do is in
//! [`crate::client`].
//!
//! Invariants:
//! - Daemon flags are all optional here, so that [`crate::config`] can tell a flag the user
//!   gave from one left out, and let flags override the config file. Defaults are therefore
//!   written in the help text rather than as clap defaults.
//! - The exit codes listed in the long help are the ones [`crate::client::exit_code`] defines.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// The environment variable naming the API socket, for the CLI and the daemon alike.
pub const API_SOCKET_ENV: &str = "BALLAST_API_SOCKET";

/// The API socket used when neither a flag, the environment nor the config file names one.
pub const DEFAULT_API_SOCKET: &str = "/run/ballast/api.sock";

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
#[derive(Debug, Parser)]
#[command(name = "ballast", version, about = "Ballast: replicated block storage for containers", long_about = LONG_ABOUT)]
pub struct Cli {
    /// The daemon's local API socket [default: /run/ballast/api.sock].
    #[arg(long, global = true, env = API_SOCKET_ENV, value_name = "PATH")]
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
    /// Create, list, inspect, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show this node's storage pools.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Show the daemon's status: version, node, engine, capacity, volumes.
    Status(OutputArgs),
    /// Show the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
}

/// `ballast node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the live nodes: id, zone, capacity, replica address.
    #[command(alias = "ls")]
    List(OutputArgs),
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

    /// The I/O engine [default: auto, which uses io_uring when the kernel allows it].
    #[arg(long, value_enum)]
    pub engine: Option<EngineChoice>,

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

    /// Where this node serves its replicas to peers (cluster mode), e.g. 10.0.0.5:9471.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// This node's zone label; replicas of a volume are spread over zones.
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,

    /// Seconds of the node's store lease; a node that cannot renew it within this time stops
    /// I/O, and its volumes can be taken over [default: 5].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(2..=60))]
    pub lease_ttl: Option<u64>,

    /// Copy at most this many MiB per second per replica rebuild; 0 for no limit
    /// [default: 256].
    #[arg(long, value_name = "MIB_PER_SEC")]
    pub rebuild_rate: Option<u64>,

    /// Replace a replica whose node has been gone this many seconds with a new one on another
    /// node [default: 300].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
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

/// `ballast volume …`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (idempotent when the spec is identical).
    Create {
        /// The volume name: a lowercase DNS label of at most 63 characters.
        name: String,
        /// The size, e.g. 10GiB, 500MiB, 1G or a number of bytes.
        #[arg(long)]
        size: String,
        /// Synchronous replicas, 1 to 5: on distinct nodes (cluster mode), or on distinct pool
        /// devices of this node (standalone).
        #[arg(long, default_value_t = 1)]
        replicas: u8,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List volumes.
    #[command(alias = "ls")]
    List(OutputArgs),
    /// Show one volume.
    Inspect {
        /// The volume name.
        name: String,
        /// Follow it: redraw every second with a progress bar per rebuilding replica, until
        /// every replica is healthy (or Ctrl-C). With `-o json`, one JSON object per line.
        #[arg(long, short = 'w')]
        watch: bool,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a volume and free its space.
    #[command(alias = "rm")]
    Delete {
        /// The volume name.
        name: String,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        /// The volume name.
        name: String,
        /// The new size, e.g. 20GiB.
        #[arg(long)]
        size: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print the NBD URI of a volume. Every volume is exported on the daemon's NBD unix
    /// socket (nbd.sock in the data directory); with --tcp it is also served on TCP until
    /// the daemon stops.
    Export {
        /// The volume name.
        name: String,
        /// Also serve the volume over TCP on this address (port 0 picks a free port).
        #[arg(long, value_name = "ADDR")]
        tcp: Option<SocketAddr>,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Make a volume a block device on this node and print its path (/dev/ballast/NAME).
    /// Idempotent; the volume is attached again when the daemon restarts.
    Attach {
        /// The volume name.
        name: String,
        /// Take a replicated volume over from a node that still holds it (the old writer is
        /// fenced by epoch and can no longer write).
        #[arg(long)]
        force: bool,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove a volume's block device from this node. Refused while the device is mounted or
    /// open, unless --force.
    Detach {
        /// The volume name.
        name: String,
        /// Detach even if the device is mounted or open.
        #[arg(long)]
        force: bool,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Mount a volume's filesystem at PATH (attaching it, and formatting it only if it is empty).
    Mount(crate::mount::command::MountArgs),
    /// Unmount a volume's filesystem from PATH (idempotent); the volume stays attached.
    Unmount(crate::mount::command::UnmountArgs),
}

/// `ballast pool …`
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List this node's pool devices with capacity and allocation.
    #[command(alias = "ls")]
    List(OutputArgs),
}

/// The `-o/--output` flag of client commands.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// How client commands print their result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Aligned, human-readable text.
    #[default]
    Table,
    /// JSON, as the API returns it.
    Json,
}

#[cfg(test)]
mod tests {
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
            Command::Volume(VolumeCommand::List(OutputArgs {
                format: OutputFormat::Json
            }))
        ));
    }
}
