//! The exclusive lock that keeps two daemons from sharing one data directory.
//!
//! The daemon takes a non-blocking exclusive `flock(2)` on `<data-dir>/lock` before it touches
//! anything else in the directory, and writes its pid into the file so that a refused second
//! daemon can name the one holding it.
//!
//! Invariants:
//! - while a [`DataDirLock`] lives, no other process holds the lock; the kernel releases it
//!   when the descriptor closes, so a crashed daemon never leaves a stale lock behind;
//! - the lock file itself is never deleted (deleting a file others may have open and be
//!   waiting to lock would let two processes each lock a different inode).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Errors taking the data-directory lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The data directory or its lock file could not be created or opened.
    #[error("cannot open lock file {path}")]
    Open {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("{}", held_message(.path, *.pid))]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, if it wrote one.
        pid: Option<u32>,
    },
    /// `flock` failed for another reason.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
}

fn held_message(path: &Path, pid: Option<u32>) -> String {
    let dir = path.parent().unwrap_or(path).display();
    match pid {
        Some(pid) => {
            format!("another ballast daemon (pid {pid}) is already using the data directory {dir}")
        }
        None => format!("another ballast daemon is already using the data directory {dir}"),
    }
}

/// The held lock; released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl DataDirLock {
    /// Lock `path` (creating it and its parent directory if needed) and record our pid.
    ///
    /// # Errors
    /// [`LockError::Held`] if another process holds it; otherwise the I/O error.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let open_err = |source| LockError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held {
                    path: path.to_owned(),
                    pid,
                });
            }
            Err((_, source)) => {
                return Err(LockError::Lock {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        // Record our pid for the error message of a second daemon. Failing to write it only
        // makes that message less precise, so it is not an error.
        let pid = std::process::id();
        let recorded = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .and_then(|()| file.flush());
        if let Err(e) = recorded {
            tracing::warn!(path = %path.display(), error = %e, "cannot write our pid into the lock file");
        }
        Ok(Self {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/lock");
        let held = DataDirLock::acquire(&path).unwrap();
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just as another process would.
        let err = DataDirLock::acquire(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("already using the data directory"), "{msg}");
        drop(held);
        DataDirLock::acquire(&path).unwrap();
    }
}
