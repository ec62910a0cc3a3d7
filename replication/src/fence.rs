//! The epoch fencing table: per volume, the highest attachment epoch registered on this node.
//!
//! A new attachment registers its epoch with every replica before its first I/O; from then on
//! every data request must carry exactly that epoch. An older epoch is refused as stale (a newer
//! writer has taken the volume over), and a newer one as not registered (the writer must
//! register first, so a replica never learns an epoch implicitly from a write).
//!
//! Invariants:
//! - The epoch registered for a volume only grows while the volume is known (until
//!   [`FenceTable::forget`]).
//! - Every change is persisted to the table's JSON file (write a temporary file, fsync, rename,
//!   fsync the directory) before `register` or `forget` returns successfully, so a restarted
//!   node still rejects old writers.
//! - The in-memory table is updated *before* it is persisted, so a concurrent `check` never
//!   accepts an epoch that a completed `register` has fenced out. If persisting fails, the
//!   higher epoch stays in memory (still the safe direction) and the next `register` or
//!   `forget` retries the write.
//! - The table lock is held only for map operations, never across file I/O; file writes are
//!   serialised by a second lock and always write a snapshot at least as new as the last one
//!   written, so the file never goes backwards.
//! - **Admission:** every data request, from the replica server or the local data path, holds
//!   an [`Admission`] (a shared lock on its volume's gate) from its epoch check until its I/O
//!   has completed, and [`FenceTable::register`] takes the gate exclusively. So once a
//!   `register` has returned, no request admitted under an older epoch is still running, and
//!   none can start: nothing written under the old epoch lands after the new one is in force.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// Why a request's epoch is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// The request's epoch is older than the registered one.
    #[error("attachment epoch is stale: the replica has registered epoch {current}")]
    Stale {
        /// The registered (newer) epoch.
        current: u64,
    },
    /// The request's epoch is newer than the registered one, or none is registered.
    #[error("attachment epoch {epoch} is not registered (registered: {registered:?}); register it first")]
    NotRegistered {
        /// The request's epoch.
        epoch: u64,
        /// The registered epoch, if any.
        registered: Option<u64>,
    },
    /// The request came on a connection that another connection has since replaced (it
    /// registered the volume later); the client gave this one up.
    #[error("this connection was superseded by a later registration of the volume")]
    Superseded,
}

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// A newer epoch is already registered.
    #[error("a newer attachment epoch {current} is already registered")]
    Stale {
        /// The registered (newer) epoch.
        current: u64,
    },
    /// The table could not be made durable; the registration must be retried.
    #[error("could not persist the fencing table")]
    Persist(#[source] io::Error),
}

/// The on-disk form of the table.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    epochs: BTreeMap<String, u64>,
}

const FILE_VERSION: u32 = 1;

#[derive(Debug, Default)]
struct State {
    epochs: BTreeMap<String, u64>,
    /// Bumped on every change.
    generation: u64,
}

/// Per-volume attachment epochs, persisted to a JSON file. Share it behind an `Arc`.
#[derive(Debug)]
pub struct FenceTable {
    path: PathBuf,
    state: Mutex<State>,
    /// The generation last written to the file; held while writing it.
    persisted: Mutex<u64>,
    /// Per-volume gates ordering admitted data requests against registrations.
    gates: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    /// Per volume, the replica-server connection that registered last (in memory: after a
    /// restart every client connects, and registers, again). Only it may change the replica:
    /// see [`FenceTable::admit_session`].
    sessions: Mutex<HashMap<String, u64>>,
}

/// A data request's permission to touch a replica under the epoch it was checked with. Hold
/// it until the request's I/O has completed: a [`FenceTable::register`] of a newer epoch
/// waits for it.
#[derive(Debug)]
#[must_use = "the admission ends when it is dropped"]
pub struct Admission {
    _gate: OwnedRwLockReadGuard<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected data is a plain map updated in single statements: a panic elsewhere
    // cannot leave it half-changed, so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FenceTable {
    /// Open the table persisted at `path`, or start an empty one if the file does not exist.
    ///
    /// # Errors
    /// The file cannot be read, or is not a valid table. A corrupt table is an error rather
    /// than an empty one: forgetting epochs would let fenced-out writers back in.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let epochs = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: FileFormat = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("fencing table {} is corrupt: {e}", path.display()),
                    )
                })?;
                if f.version != FILE_VERSION {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "fencing table {} has version {}, this build reads {FILE_VERSION}",
                            path.display(),
                            f.version
                        ),
                    ));
                }
                f.epochs
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            state: Mutex::new(State {
                epochs,
                generation: 0,
            }),
            persisted: Mutex::new(0),
            gates: Mutex::default(),
            sessions: Mutex::default(),
        })
    }

    fn gate(&self, volume: &str) -> Arc<RwLock<()>> {
        Arc::clone(lock(&self.gates).entry(volume.to_owned()).or_default())
    }

    /// Admit a data request for `volume` carrying `epoch`: wait for any registration in
    /// progress, then check the epoch. The request may touch the replica while it holds the
    /// returned [`Admission`].
    ///
    /// # Errors
    /// As [`FenceTable::check`].
    pub async fn admit(&self, volume: &str, epoch: u64) -> Result<Admission, FenceError> {
        let gate = self.gate(volume).read_owned().await;
        self.check(volume, epoch)?;
        Ok(Admission { _gate: gate })
    }

    /// [`FenceTable::admit`] for a request that changes the replica, arriving on the server
    /// connection `session`: also refused unless `session` registered the volume last.
    ///
    /// Why: a client that gave up on a connection (a timeout; it then ejects the replica and
    /// later rebuilds it over a new connection, which registers again) may have left writes
    /// in it that the server has not read yet. Under the same epoch they would pass the
    /// epoch check and land after the rebuild copied newer data: lost writes.
    ///
    /// # Errors
    /// As [`FenceTable::check`], or [`FenceError::Superseded`].
    pub async fn admit_session(
        &self,
        volume: &str,
        epoch: u64,
        session: u64,
    ) -> Result<Admission, FenceError> {
        let admission = self.admit(volume, epoch).await?;
        match lock(&self.sessions).get(volume) {
            Some(&current) if current != session => Err(FenceError::Superseded),
            _ => Ok(admission),
        }
    }

    /// [`FenceTable::register`] from the server connection `session`, which becomes the only
    /// one allowed to change the volume's replica (see [`FenceTable::admit_session`]). Changes
    /// admitted from other connections have finished when it returns.
    ///
    /// # Errors
    /// As [`FenceTable::register`].
    pub async fn register_session(
        self: &Arc<Self>,
        volume: &str,
        epoch: u64,
        session: u64,
    ) -> Result<(), RegisterError> {
        let _exclusive = self.gate(volume).write_owned().await;
        self.register_locked(volume, epoch).await?;
        lock(&self.sessions).insert(volume.to_owned(), session);
        Ok(())
    }

    /// The file the table is persisted to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Register `epoch` for `volume`, after every request admitted for it has completed (see
    /// [`FenceTable::admit`]). Registering the current epoch again is a no-op (it only
    /// retries a failed persist); a lower one is refused with the current epoch.
    ///
    /// # Errors
    /// [`RegisterError::Stale`] if a newer epoch is registered; [`RegisterError::Persist`] if
    /// the table could not be written (the epoch is then in force in memory, and registering
    /// again retries the write).
    pub async fn register(self: &Arc<Self>, volume: &str, epoch: u64) -> Result<(), RegisterError> {
        // Wait for every request admitted under an older epoch to finish, and keep new ones
        // out until the new epoch is in force.
        let _exclusive = self.gate(volume).write_owned().await;
        self.register_locked(volume, epoch).await
    }

    /// Register with the volume's gate held exclusively.
    async fn register_locked(
        self: &Arc<Self>,
        volume: &str,
        epoch: u64,
    ) -> Result<(), RegisterError> {
        let (table, v) = (Arc::clone(self), volume.to_owned());
        // Persisting fsyncs a file: keep it off the async workers.
        tokio::task::spawn_blocking(move || table.register_now(&v, epoch))
            .await
            .map_err(|e| RegisterError::Persist(io::Error::other(e)))?
    }

    fn register_now(&self, volume: &str, epoch: u64) -> Result<(), RegisterError> {
        {
            let mut st = lock(&self.state);
            match st.epochs.get(volume).copied() {
                Some(current) if current > epoch => {
                    return Err(RegisterError::Stale { current });
                }
                Some(current) if current == epoch => {}
                _ => {
                    st.epochs.insert(volume.to_owned(), epoch);
                    st.generation += 1;
                }
            }
        }
        self.persist().map_err(RegisterError::Persist)
    }

    /// Check that a request for `volume` carries the registered epoch.
    ///
    /// # Errors
    /// [`FenceError::Stale`] for an older epoch, [`FenceError::NotRegistered`] for a newer one
    /// or when none is registered.
    pub fn check(&self, volume: &str, epoch: u64) -> Result<(), FenceError> {
        let registered = self.current(volume);
        match registered {
            Some(current) if epoch == current => Ok(()),
            Some(current) if epoch < current => Err(FenceError::Stale { current }),
            _ => Err(FenceError::NotRegistered { epoch, registered }),
        }
    }

    /// The epoch registered for `volume`.
    pub fn current(&self, volume: &str) -> Option<u64> {
        lock(&self.state).epochs.get(volume).copied()
    }

    /// Drop `volume` from the table (when its replica is deleted).
    ///
    /// # Errors
    /// The table could not be written.
    pub fn forget(&self, volume: &str) -> io::Result<()> {
        lock(&self.gates).remove(volume);
        lock(&self.sessions).remove(volume);
        {
            let mut st = lock(&self.state);
            if st.epochs.remove(volume).is_some() {
                st.generation += 1;
            }
        }
        self.persist()
    }

    /// Write the newest snapshot to the file unless it is already there.
    fn persist(&self) -> io::Result<()> {
        let mut persisted = lock(&self.persisted);
        let (generation, snapshot) = {
            let st = lock(&self.state);
            (
                st.generation,
                FileFormat {
                    version: FILE_VERSION,
                    epochs: st.epochs.clone(),
                },
            )
        };
        if generation == *persisted {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&snapshot).map_err(io::Error::other)?;
        host::persist::write_atomic(&self.path, &bytes)?;
        *persisted = generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the seeded cluster fault runs (seed 10): writes a client had given up on,
    /// left unread in a stalled connection, landed after the replica was rebuilt over a new
    /// connection (same epoch) and overwrote newer data.
    #[tokio::test]
    async fn only_the_connection_that_registered_last_may_write() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(FenceTable::open(dir.path().join("fence.json")).unwrap());
        t.register_session("v", 1, 10).await.unwrap();
        drop(t.admit_session("v", 1, 10).await.unwrap());
        t.register_session("v", 1, 11).await.unwrap();
        assert!(matches!(
            t.admit_session("v", 1, 10).await,
            Err(FenceError::Superseded)
        ));
        drop(t.admit_session("v", 1, 11).await.unwrap());
        // Reads carry no session check.
        drop(t.admit("v", 1).await.unwrap());
    }

    #[tokio::test]
    async fn rules_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence.json");
        let t = Arc::new(FenceTable::open(&path).unwrap());
        assert!(matches!(
            t.check("v", 1),
            Err(FenceError::NotRegistered {
                registered: None,
                ..
            })
        ));
        t.register("v", 2).await.unwrap();
        t.register("v", 2).await.unwrap();
        assert!(matches!(
            t.register("v", 1).await,
            Err(RegisterError::Stale { current: 2 })
        ));
        t.check("v", 2).unwrap();
        assert!(matches!(
            t.check("v", 1),
            Err(FenceError::Stale { current: 2 })
        ));
        assert!(matches!(
            t.check("v", 3),
            Err(FenceError::NotRegistered {
                registered: Some(2),
                ..
            })
        ));
        t.register("w", 7).await.unwrap();
        t.forget("w").unwrap();
        drop(t);

        let t = FenceTable::open(&path).unwrap();
        assert_eq!(t.current("v"), Some(2));
        assert_eq!(t.current("w"), None);
        assert!(matches!(
            t.check("v", 1),
            Err(FenceError::Stale { current: 2 })
        ));
    }

    /// A registration waits for every admitted request, and nothing is admitted under the
    /// old epoch once it has returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn register_waits_for_admitted_requests() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(FenceTable::open(dir.path().join("fence.json")).unwrap());
        t.register("v", 1).await.unwrap();
        let admitted = t.admit("v", 1).await.unwrap();
        let reg = tokio::spawn({
            let t = Arc::clone(&t);
            async move { t.register("v", 2).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !reg.is_finished(),
            "register returned while a request was admitted"
        );
        // Other volumes are not held up.
        t.register("w", 1).await.unwrap();
        drop(admitted);
        reg.await.unwrap().unwrap();
        assert!(matches!(
            t.admit("v", 1).await,
            Err(FenceError::Stale { current: 2 })
        ));
        drop(t.admit("v", 2).await.unwrap());
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence.json");
        std::fs::write(&path, b"{not json").unwrap();
        let e = FenceTable::open(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
