//! The plugin's errors and their wording: the one place that turns a failure into the
//! `{"Err": "…"}` text Docker shows the user.

use std::path::Path;

use api::{format_size, ControlError};
use host::mount::MountError;

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The request body is not the protocol's JSON.
    #[error("ballast: malformed request: {0}")]
    BadRequest(String),
    /// An option Ballast does not know.
    #[error(
        "ballast: unknown option {0:?}; Ballast volumes take -o size=, -o replicas= and -o fs="
    )]
    UnknownOption(String),
    /// A known option with a bad value.
    #[error("ballast: invalid option {key}: {message}")]
    Option {
        /// The option.
        key: String,
        /// What is wrong with its value.
        message: String,
    },
    /// A feature this build does not have yet.
    #[error("ballast: {0} are not available yet in this build")]
    Unavailable(&'static str),
    /// The volume exists with other options.
    #[error(
        "ballast: volume {name} already exists with size {} and {replicas} replica(s); remove it \
         first or create it with the same options", format_size(*size)
    )]
    Exists {
        /// The volume.
        name: String,
        /// Its size.
        size: u64,
        /// Its replicas.
        replicas: u8,
    },
    /// Remove of a mounted volume.
    #[error(
        "ballast: volume {name} is in use by {callers} container(s) on this node; stop them first"
    )]
    InUse {
        /// The volume.
        name: String,
        /// How many callers have it mounted.
        callers: usize,
    },
    /// Mount without a caller ID.
    #[error("ballast: the mount request has no ID")]
    MissingId,
    /// A control-plane error (not found, no capacity, attached elsewhere…).
    #[error("ballast: {}", .0.full_message())]
    Control(ControlError),
    /// A filesystem step failed.
    #[error("ballast: {}", .0.to_control().message())]
    Mount(MountError),
    /// A local file operation failed.
    #[error("ballast: cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// On which path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl PluginError {
    /// An I/O error doing `what` on `path`.
    pub fn io(what: &str, path: &Path, source: &std::io::Error) -> Self {
        Self::Io {
            what: what.to_owned(),
            path: path.display().to_string(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        }
    }
}

impl From<ControlError> for PluginError {
    fn from(e: ControlError) -> Self {
        Self::Control(e)
    }
}
