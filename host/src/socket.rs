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
//! - the file is removed when the [`BoundSocket`] guard drops;
//! - whoever connects is checked too ([`LocalListener`]): a peer whose user is neither root nor
//!   the daemon's own (`SO_PEERCRED`) is disconnected before a byte is read, so a socket made
//!   reachable by mistake (a `chmod`, a bind mount into a container) still serves no one else.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

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
    pub fn bind(path: &Path) -> Result<(Self, LocalListener), SocketError> {
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
            LocalListener::new(listener),
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

/// A unix listener that accepts only peers running as root or as the daemon's user.
#[derive(Debug)]
pub struct LocalListener {
    inner: UnixListener,
    me: u32,
}

impl LocalListener {
    /// Check the peers of `inner`.
    pub fn new(inner: UnixListener) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        Self { inner, me }
    }

    /// Whether a peer running as `uid` may use the socket.
    pub fn admits(&self, uid: u32) -> bool {
        uid == 0 || uid == self.me
    }

    /// The next connection of an admitted peer; the others are closed (and logged).
    ///
    /// # Errors
    /// Accepting failed.
    pub async fn accept(&self) -> std::io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
        loop {
            let (stream, addr) = self.inner.accept().await?;
            match stream.peer_cred() {
                Ok(cred) if self.admits(cred.uid()) => return Ok((stream, addr)),
                Ok(cred) => {
                    tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), socket = ?self.inner.local_addr().ok(), "refused a local connection: its user is neither root nor the daemon's");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refused a local connection whose user cannot be read");
                }
            }
        }
    }

    /// The admitted connections as a stream (for tonic's `serve_with_incoming`).
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<UnixStream>> + Send + 'static {
        futures_util::stream::unfold(self, |l| async move {
            let next = l.accept().await.map(|(s, _)| s);
            Some((next, l))
        })
    }
}

impl axum::serve::Listener for LocalListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match LocalListener::accept(self).await {
                Ok(accepted) => return accepted,
                Err(e) => {
                    // Like axum's own listeners: out of descriptors and the like pass.
                    tracing::warn!(error = %e, "accepting a local connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
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
