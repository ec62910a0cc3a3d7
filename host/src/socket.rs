//! Unix sockets the daemon serves (the local API, NBD, CSI, Docker): binding one safely and
//! removing it on shutdown. The one socket-bind helper of the project.
//!
//! Invariants:
//! - a live socket (one where `connect` succeeds) is never replaced: that means another daemon
//!   is serving there, and this one refuses to start;
//! - a stale socket (left by a daemon that was killed) is removed and re-bound;
//! - a path that exists but is not a socket is never deleted;
//! - the socket is mode 0600 (only root, or the daemon's user, may manage volumes) from the
//!   moment its path exists: it is bound in a private (0700) directory next to it, `chmod`ed
//!   there, then hard-linked into place (so no umask, and no window between `bind` and
//!   `chmod`, lets another user connect); its parent directory, if the daemon creates it, is
//!   mode 0700;
//! - the file is removed when the [`BoundSocket`] guard drops.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Errors binding a unix socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A daemon already answers on the socket.
    #[error("a ballast daemon is already running and serving on {0}")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The path is longer than a unix socket address allows (with room for the private
    /// directory it is bound in first).
    #[error(
        "the socket path {0} is too long: a unix socket path has at most 107 bytes, and ballast \
         needs {MARGIN} more to bind it privately first; choose a shorter path"
    )]
    TooLong(PathBuf),
    /// Creating, removing, binding or `chmod`ing failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A bound unix socket; the file is removed when this drops.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
}

impl BoundSocket {
    /// Bind `path`, replacing a stale socket, and return the guard and the listener.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`SocketError::InUse`] if a daemon answers there, [`SocketError::NotASocket`] if the
    /// path is something else, otherwise the I/O error.
    pub fn bind(path: &Path) -> Result<(Self, UnixListener), SocketError> {
        let io = |action, source| SocketError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        // sun_path is 108 bytes including the terminating NUL.
        if path.as_os_str().len() + MARGIN > 107 {
            return Err(SocketError::TooLong(path.to_owned()));
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("create the directory of", e))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse(path.to_owned()));
                }
                tracing::info!(path = %path.display(), "removing a stale socket left by a previous daemon");
                std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
            }
            Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspect", e)),
        }
        let listener = bind_private(dir, path).map_err(|(action, e)| io(action, e))?;
        Ok((
            Self {
                path: path.to_owned(),
            },
            listener,
        ))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What the private directory's name adds to a socket path (`/.b` and a pid of up to 7
/// digits, then `/s`).
const MARGIN: usize = 12;

/// Bind a socket at `path` (in `dir`) that is mode 0600 when it appears there: bind it in a
/// fresh 0700 directory of `dir`, `chmod` it, hard-link it to `path` (which fails if anything
/// appeared there meanwhile), and remove the directory.
fn bind_private(dir: &Path, path: &Path) -> Result<UnixListener, (&'static str, std::io::Error)> {
    let private = dir.join(format!(".b{}", std::process::id()));
    // Left by a daemon of this pid that died here: it holds nothing.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| ("create a private directory to bind", e))?;
    let tmp = private.join("s");
    let bound = UnixListener::bind(&tmp)
        .map_err(|e| ("bind", e))
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| ("set the permissions of", e))?;
            std::fs::hard_link(&tmp, path).map_err(|e| ("link the bound socket to", e))?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed the socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_live_and_foreign_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/api.sock");

        let (guard, listener) = BoundSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            BoundSocket::bind(&path),
            Err(SocketError::InUse(_))
        ));

        // A socket whose listener is gone is stale and gets replaced.
        drop(listener);
        std::mem::forget(guard);
        let (guard, _listener) = BoundSocket::bind(&path).unwrap();
        drop(guard);
        assert!(!path.exists(), "the guard removes the socket");

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            BoundSocket::bind(&path),
            Err(SocketError::NotASocket(_))
        ));
    }
}
