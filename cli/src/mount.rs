//! The client side of `ballast volume mount` and `ballast volume unmount`: their arguments
//! (clap) and how they call the local API and render its answer.
//!
//! Invariant: a relative PATH is made absolute against the CLI's working directory before it
//! is sent (the daemon's working directory is not the user's); whether it exists is checked by
//! the daemon, which is the one that mounts.

use std::path::{Path, PathBuf};

use ::api::VolumeName;
use clap::{Args, ValueEnum};

use ::api::http::{MountInfo, MountRequest, UnmountRequest};

use crate::args::{OutputArgs, OutputFormat};
use crate::client::{ApiClient, ClientError};

/// A filesystem `ballast volume mount` can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsType {
    /// ext4 (the default for an empty volume).
    Ext4,
    /// XFS.
    Xfs,
}

/// `ballast volume mount NAME PATH …`
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The volume name.
    pub name: String,
    /// The mount point: an existing directory.
    pub path: PathBuf,
    /// The filesystem to create if the volume is empty (default ext4). A volume that already
    /// holds a filesystem is never reformatted; with --fs, another type there is refused.
    #[arg(long, value_enum)]
    pub fs: Option<FsType>,
    /// Extra mkfs arguments (split on whitespace), used only when the volume is formatted.
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    pub mkfs_options: Option<String>,
    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `ballast volume unmount NAME PATH`
#[derive(Debug, Args)]
pub struct UnmountArgs {
    /// The volume name.
    pub name: String,
    /// The mount point.
    pub path: PathBuf,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

fn validate_name(name: &str) -> Result<VolumeName, ClientError> {
    VolumeName::new(name).map_err(|e| ClientError::InvalidArgument(e.message().to_owned()))
}

fn absolute(path: &Path) -> Result<PathBuf, ClientError> {
    std::path::absolute(path)
        .map_err(|e| ClientError::InvalidArgument(format!("mount point {}: {e}", path.display())))
}

fn render(info: &MountInfo, format: OutputFormat, text: String) -> String {
    match format {
        OutputFormat::Json => {
            let mut out = serde_json::to_string_pretty(info).expect("API types always serialize");
            out.push('\n');
            out
        }
        OutputFormat::Table => text,
    }
}

/// Run `ballast volume mount`.
///
/// # Errors
/// A bad name or path, the daemon being unreachable, or its error answer.
pub async fn mount(client: &ApiClient, args: MountArgs) -> Result<String, ClientError> {
    let name = validate_name(&args.name)?;
    let req = MountRequest {
        path: absolute(&args.path)?,
        fs: args.fs.map(|f| match f {
            FsType::Ext4 => "ext4".to_owned(),
            FsType::Xfs => "xfs".to_owned(),
        }),
        mkfs_options: args
            .mkfs_options
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        read_only: args.read_only,
    };
    let (_, info): (_, MountInfo) = client
        .post(&format!("/v1/volumes/{name}/mount"), &req)
        .await?;
    let text = if info.unchanged {
        format!(
            "volume {name} is already mounted at {} ({})\n",
            info.path, info.fs
        )
    } else if info.formatted {
        format!(
            "volume {name} formatted as {} and mounted at {}\n",
            info.fs, info.path
        )
    } else {
        format!("volume {name} ({}) mounted at {}\n", info.fs, info.path)
    };
    Ok(render(&info, args.output.format, text))
}

/// Run `ballast volume unmount`.
///
/// # Errors
/// A bad name or path, the daemon being unreachable, or its error answer.
pub async fn unmount(client: &ApiClient, args: UnmountArgs) -> Result<String, ClientError> {
    let name = validate_name(&args.name)?;
    let req = UnmountRequest {
        path: absolute(&args.path)?,
    };
    let (_, info): (_, MountInfo) = client
        .post(&format!("/v1/volumes/{name}/unmount"), &req)
        .await?;
    let text = if info.unchanged {
        format!("volume {name} is not mounted at {}\n", info.path)
    } else {
        format!("volume {name} unmounted from {}\n", info.path)
    };
    Ok(render(&info, args.output.format, text))
}
