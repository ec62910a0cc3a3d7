//! The embedded cluster store: single node, no external service.
//!
//! The whole store is an in-memory [`BTreeMap`] of keys to `(value, mod_revision, lease)`,
//! a global revision counter and a lease table, written as one JSON file after every
//! mutation (to `<file>.tmp`, fsync, rename over the file, fsync the directory) and read back
//! when the store is opened.
//!
//! Invariants:
//! - memory and file agree after every call that returned `Ok`: a mutation is applied to a
//!   copy, the copy is written, and only then does it replace the state in memory, so a
//!   failed write changes nothing;
//! - the revision grows by one for each mutation that changes something; every key's
//!   `mod_revision` is in `1..=revision`;
//! - every key's lease is in the lease table; a lease whose deadline has passed is deleted,
//!   with its keys, at the start of the next call (expiry is lazy, there is no timer);
//! - lease deadlines are wall-clock times (Unix milliseconds) so that they survive a restart;
//! - one process uses the file at a time (the daemon's data-directory lock guarantees it).
//!
//! File I/O runs on tokio's blocking pool, never on the async workers.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{base64, prefix_end, Kv, LeaseId, StoreError};

/// The version of the file format.
const FORMAT: u32 = 1;

/// The embedded store. Clones share the same state.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    state: Mutex<State>,
}

/// Everything the store holds: the file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: u32,
    revision: u64,
    next_lease: i64,
    keys: BTreeMap<String, Entry>,
    leases: BTreeMap<i64, LeaseEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(with = "bytes_as_base64")]
    value: Vec<u8>,
    mod_revision: u64,
    lease: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseEntry {
    ttl_ms: u64,
    expires_unix_ms: u64,
}

mod bytes_as_base64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::base64::encode(value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::base64::decode(&text).map_err(serde::de::Error::custom)
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    fn new() -> State {
        State {
            format: FORMAT,
            revision: 0,
            next_lease: 1,
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
        }
    }

    /// Check the invariants of a state read from a file.
    fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {} is not the supported format {FORMAT}",
                self.format
            ));
        }
        for (key, entry) in &self.keys {
            if entry.mod_revision == 0 || entry.mod_revision > self.revision {
                return Err(format!(
                    "key {key:?} has revision {} outside 1..={}",
                    entry.mod_revision, self.revision
                ));
            }
            if let Some(lease) = entry.lease {
                if !self.leases.contains_key(&lease) {
                    return Err(format!("key {key:?} refers to unknown lease {lease}"));
                }
            }
        }
        if let Some((&last, _)) = self.leases.last_key_value() {
            if last >= self.next_lease {
                return Err(format!(
                    "lease {last} is not below the next lease id {}",
                    self.next_lease
                ));
            }
        }
        Ok(())
    }

    /// The state without the leases expired at `now_ms` and their keys; `None` if none has.
    fn expired(&self, now_ms: u64) -> Option<State> {
        if !self.leases.values().any(|l| l.expires_unix_ms <= now_ms) {
            return None;
        }
        let mut next = self.clone();
        next.leases.retain(|_, l| l.expires_unix_ms > now_ms);
        let before = next.keys.len();
        let leases = next.leases.clone();
        next.keys
            .retain(|_, e| e.lease.is_none_or(|l| leases.contains_key(&l)));
        if next.keys.len() != before {
            next.revision += 1;
        }
        Some(next)
    }

    fn kv(key: &str, entry: &Entry) -> Kv {
        Kv {
            key: key.to_owned(),
            value: entry.value.clone(),
            mod_revision: entry.mod_revision,
            lease: entry.lease,
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id.0) => Err(StoreError::LeaseExpired),
            _ => Ok(()),
        }
    }

    /// Write `key` in a new revision; returns it.
    fn write(&mut self, key: &str, value: &[u8], lease: Option<LeaseId>) -> u64 {
        self.revision += 1;
        self.keys.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                mod_revision: self.revision,
                lease: lease.map(|l| l.0),
            },
        );
        self.revision
    }

    /// Remove the keys in `[start, end)` (`end` `None`: to the end) in a new revision if any.
    fn remove_range(&mut self, start: &str, end: Option<&[u8]>) -> bool {
        let doomed: Vec<String> = self
            .keys
            .range(start.to_owned()..)
            .take_while(|(k, _)| end.is_none_or(|end| k.as_bytes() < end))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &doomed {
            self.keys.remove(key);
        }
        if doomed.is_empty() {
            false
        } else {
            self.revision += 1;
            true
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code panics while holding the lock, and a state is only ever replaced whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn io(&self, action: &'static str, path: &Path, source: std::io::Error) -> StoreError {
        let _ = self;
        StoreError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// Write `next` to the file, then make it the state in memory.
    fn commit(&self, state: &mut State, next: State) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(&next)
            .map_err(|e| StoreError::Internal(format!("cannot encode the store: {e}")))?;
        host::persist::write_atomic(&self.path, &json).map_err(|e| match e {
            host::persist::PersistError::Io {
                action,
                path,
                source,
            } => StoreError::Io {
                action,
                path,
                source,
            },
            e => StoreError::Internal(api::error_chain(&e)),
        })?;
        *state = next;
        Ok(())
    }

    /// Lock the state, apply lease expiry, then run `op` on it.
    fn with_state<R>(
        &self,
        op: impl FnOnce(&Inner, &mut State) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut state = self.lock();
        if let Some(next) = state.expired(now_unix_ms()) {
            self.commit(&mut state, next)?;
        }
        op(self, &mut state)
    }
}

impl EmbeddedStore {
    /// Open the store in `path`, creating the file if it does not exist.
    ///
    /// # Errors
    /// [`StoreError::Io`] or [`StoreError::Corrupt`].
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let inner = Inner {
            path: path.to_owned(),
            state: Mutex::new(State::new()),
        };
        match fs::read(path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|s: State| s.validate().map(|()| s))
                    .map_err(|e| {
                        StoreError::Corrupt(format!(
                            "{}: {e}; restore it from a backup, or move it away to start with \
                             an empty store",
                            path.display()
                        ))
                    })?;
                *inner.lock() = state;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Create the file now, so that an unwritable location fails at start-up.
                let mut state = inner.lock();
                let next = state.clone();
                inner.commit(&mut state, next)?;
            }
            Err(e) => return Err(inner.io("read", path, e)),
        }
        Ok(EmbeddedStore {
            inner: Arc::new(inner),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `op` on the state on the blocking pool.
    async fn run<R: Send + 'static>(
        &self,
        op: impl FnOnce(&Inner, &mut State) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.with_state(op))
            .await
            .map_err(|e| StoreError::Internal(format!("embedded store task failed: {e}")))?
    }

    pub(super) async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let key = key.to_owned();
        self.run(move |_, s| Ok(s.keys.get(&key).map(|e| State::kv(&key, e))))
            .await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        let prefix = prefix.to_owned();
        self.run(move |_, s| {
            Ok(s.keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, e)| State::kv(k, e))
                .collect())
        })
        .await
    }

    pub(super) async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run(move |inner, s| {
            s.check_lease(lease)?;
            let mut next = s.clone();
            let revision = next.write(&key, &value, lease);
            inner.commit(s, next)?;
            Ok(revision)
        })
        .await
    }

    pub(super) async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run(move |inner, s| {
            if s.keys.contains_key(&key) {
                return Ok(false);
            }
            s.check_lease(lease)?;
            let mut next = s.clone();
            next.write(&key, &value, lease);
            inner.commit(s, next)?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn cas(
        &self,
        key: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.run(move |inner, s| {
            let current = s.keys.get(&key).map_or(0, |e| e.mod_revision);
            if current != expected {
                return Ok(false);
            }
            let mut next = s.clone();
            next.write(&key, &value, None);
            inner.commit(s, next)?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.run(move |inner, s| {
            if !s.keys.contains_key(&key) {
                return Ok(());
            }
            let mut next = s.clone();
            let mut end = key.as_bytes().to_vec();
            end.push(0);
            next.remove_range(&key, Some(&end));
            inner.commit(s, next)
        })
        .await
    }

    pub(super) async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let prefix = prefix.to_owned();
        self.run(move |inner, s| {
            let mut next = s.clone();
            let end = prefix_end(prefix.as_bytes());
            if next.remove_range(&prefix, end.as_deref()) {
                inner.commit(s, next)?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        self.run(move |inner, s| {
            let mut next = s.clone();
            let id = next.next_lease;
            next.next_lease = id
                .checked_add(1)
                .ok_or_else(|| StoreError::Corrupt("lease ids are exhausted".to_owned()))?;
            next.leases.insert(
                id,
                LeaseEntry {
                    ttl_ms,
                    expires_unix_ms: now_unix_ms().saturating_add(ttl_ms),
                },
            );
            inner.commit(s, next)?;
            Ok(LeaseId(id))
        })
        .await
    }

    pub(super) async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.run(move |inner, s| {
            let Some(entry) = s.leases.get(&lease.0) else {
                return Err(StoreError::LeaseExpired);
            };
            let ttl_ms = entry.ttl_ms;
            let mut next = s.clone();
            if let Some(entry) = next.leases.get_mut(&lease.0) {
                entry.expires_unix_ms = now_unix_ms().saturating_add(ttl_ms);
            }
            inner.commit(s, next)?;
            Ok(Duration::from_millis(ttl_ms))
        })
        .await
    }

    pub(super) async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.run(move |inner, s| {
            if !s.leases.contains_key(&lease.0) {
                return Ok(());
            }
            let mut next = s.clone();
            next.leases.remove(&lease.0);
            let before = next.keys.len();
            next.keys.retain(|_, e| e.lease != Some(lease.0));
            if next.keys.len() != before {
                next.revision += 1;
            }
            inner.commit(s, next)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::embedded(&dir.path().join("cluster.json")).unwrap()
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let r1 = store.put("a/1", b"one", None).await.unwrap();
        let r2 = store.put("a/2", &[0, 255, 7], None).await.unwrap();
        assert!(r2 > r1);
        store.put("b", b"x", None).await.unwrap();
        store.delete("b").await.unwrap();
        drop(store);

        let store = open(&dir);
        let kvs = store.list("a/").await.unwrap();
        assert_eq!(kvs.len(), 2);
        assert_eq!(kvs[0].value, b"one");
        assert_eq!(kvs[0].mod_revision, r1);
        assert_eq!(kvs[1].value, vec![0, 255, 7]);
        assert_eq!(store.get("b").await.unwrap(), None);
        // The revision counter survives too: new writes get larger revisions.
        let r3 = store.put("c", b"", None).await.unwrap();
        assert!(r3 > r2 + 1, "{r3} after {r2} and a delete");
    }

    #[tokio::test]
    async fn cas_compares_the_mod_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert!(store.cas("k", 0, b"v1").await.unwrap(), "0 = absent");
        assert!(!store.cas("k", 0, b"v2").await.unwrap(), "exists now");
        let rev = store.get("k").await.unwrap().unwrap().mod_revision;
        assert!(!store.cas("k", rev + 1, b"v2").await.unwrap());
        assert!(store.cas("k", rev, b"v2").await.unwrap());
        assert!(!store.cas("k", rev, b"v3").await.unwrap(), "stale revision");
        assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v2");
        assert!(!store.create("k", b"v4", None).await.unwrap());
        assert!(store.create("other", b"v", None).await.unwrap());
    }

    #[tokio::test]
    async fn expired_leases_delete_their_keys_also_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let short = store.grant_lease(Duration::from_millis(200)).await.unwrap();
        let long = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.put("short", b"1", Some(short)).await.unwrap();
        store.put("long", b"2", Some(long)).await.unwrap();
        store.put("plain", b"3", None).await.unwrap();
        assert_eq!(
            store.get("short").await.unwrap().unwrap().lease,
            Some(short.0)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(store.get("short").await.unwrap(), None);
        assert!(matches!(
            store.keep_alive(short).await,
            Err(StoreError::LeaseExpired)
        ));
        assert!(matches!(
            store.put("again", b"", Some(short)).await,
            Err(StoreError::LeaseExpired)
        ));
        assert_eq!(
            store.keep_alive(long).await.unwrap(),
            Duration::from_secs(60)
        );

        let short2 = store.grant_lease(Duration::from_millis(200)).await.unwrap();
        store.put("short2", b"", Some(short2)).await.unwrap();
        drop(store);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let store = open(&dir);
        let keys: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, ["long", "plain"]);

        store.revoke(long).await.unwrap();
        store.revoke(long).await.unwrap();
        assert_eq!(store.get("long").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_corrupt_file_is_reported_not_guessed_at() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        for bad in [
            &b"not json"[..],
            br#"{"format":1,"revision":1,"next_lease":1,"keys":{"k":{"value":"eA==","mod_revision":5,"lease":null}},"leases":{}}"#,
            br#"{"format":1,"revision":1,"next_lease":1,"keys":{"k":{"value":"!!","mod_revision":1,"lease":null}},"leases":{}}"#,
            br#"{"format":1,"revision":1,"next_lease":1,"keys":{"k":{"value":"eA==","mod_revision":1,"lease":3}},"leases":{}}"#,
        ] {
            fs::write(&path, bad).unwrap();
            let err = Store::embedded(&path).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
            assert!(err.to_string().contains("restore it from a backup"), "{err}");
        }
    }

    #[tokio::test]
    async fn prefixes_delete_and_list_only_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for key in ["a", "a/1", "a/2", "a0", "b"] {
            store.put(key, key.as_bytes(), None).await.unwrap();
        }
        let keys = |kvs: Vec<Kv>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
        assert_eq!(keys(store.list("a/").await.unwrap()), ["a/1", "a/2"]);
        store.delete_prefix("a/").await.unwrap();
        assert_eq!(keys(store.list("").await.unwrap()), ["a", "a0", "b"]);
        store.delete("a").await.unwrap();
        store.delete("missing").await.unwrap();
        assert_eq!(keys(store.list("a").await.unwrap()), ["a0"]);
    }

    #[tokio::test]
    async fn an_unwritable_location_fails_at_open() {
        // Below a file, not a directory: nothing can create it (not even root).
        let err = Store::embedded(Path::new("/dev/null/ballast/cluster.json")).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
    }
}
