//! The client commands' command line (clap derive types): `volume …`, `pool list`, `status`
//! and `node list`. The `ballast` binary flattens [`ClientCommand`] beside its `daemon`
//! subcommand; [`crate::run`] executes one.

use std::net::SocketAddr;

use clap::{Args, Subcommand, ValueEnum};

/// `ballast node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the live nodes: id, zone, capacity, replica address.
    #[command(alias = "ls")]
    List(OutputArgs),
}

/// `ballast volume …`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (idempotent when the spec is identical), empty or as a copy of a
    /// snapshot or of another volume (thin: it shares their extents, and is usable at once).
    Create {
        /// The volume name: a lowercase DNS label of at most 63 characters.
        name: String,
        /// The size, e.g. 10GiB, 500MiB, 1G or a number of bytes. A copy is its source's size
        /// unless a larger one is given.
        #[arg(long, required_unless_present_any = ["from_snapshot", "from_volume"])]
        size: Option<String>,
        /// Start as a copy of this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Start as a copy of this volume as it is now.
        #[arg(long)]
        from_volume: Option<String>,
        /// Synchronous replicas, 1 to 5: on distinct nodes (cluster mode), or on distinct pool
        /// devices of this node (standalone). Default 1; a copy has its source's.
        #[arg(long)]
        replicas: Option<u8>,
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
    /// Make a detached volume read what one of its snapshots holds. What it wrote since the
    /// snapshot is lost.
    Revert {
        /// The volume name.
        name: String,
        /// The snapshot to revert to.
        #[arg(long)]
        snapshot: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
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
        /// Also serve the volume over TCP on this address (port 0 picks a free port), over
        /// TLS: clients need a certificate from the cluster CA (`ballast cert issue --client
        /// NAME`).
        #[arg(long, value_name = "ADDR")]
        tcp: Option<SocketAddr>,
        /// Serve the TCP export in plaintext, unauthenticated: whoever reaches the address
        /// reads and writes the volume. Only on an isolated network.
        #[arg(long, requires = "tcp")]
        insecure_plaintext: bool,
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
    Mount(crate::mount::MountArgs),
    /// Unmount a volume's filesystem from PATH (idempotent); the volume stays attached.
    Unmount(crate::mount::UnmountArgs),
}

/// `ballast snapshot …`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume: a read-only image of it at one instant, taken at a write barrier
    /// (idempotent for the same volume and name).
    Create {
        /// The volume to snapshot.
        volume: String,
        /// The snapshot's name: a lowercase DNS label of at most 63 characters.
        name: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List snapshots.
    #[command(alias = "ls")]
    List(OutputArgs),
    /// Show one snapshot.
    Inspect {
        /// The snapshot's name.
        name: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a snapshot. Space only it holds is freed; volumes copied from it keep what
    /// they read.
    #[command(alias = "rm")]
    Delete {
        /// The snapshot's name.
        name: String,
    },
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

/// The environment variable naming the API socket, for the CLI and the daemon alike.
pub const API_SOCKET_ENV: &str = "BALLAST_API_SOCKET";

/// The API socket used when neither a flag, the environment nor the config file names one.
pub const DEFAULT_API_SOCKET: &str = "/run/ballast/api.sock";

/// The client commands: each one talks to the daemon's local API.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create, list, inspect, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Create, list, inspect and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Show this node's storage pools.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Show the daemon's status: version, node, engine, capacity, volumes.
    Status(OutputArgs),
    /// Show the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
}
