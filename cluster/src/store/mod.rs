//! The cluster store: one key-value API with revisions, compare-and-swap and leases, over two
//! backends.
//!
//! - [`embedded`]: single node, no extra service; a JSON file in the data directory. The
//!   default.
//! - [`etcd`]: etcd's v3 API (its JSON gateway over HTTP), for multi-node clusters. etcd is
//!   the consensus; this module never tries to be one.
//!
//! [`Store`] is an enum that dispatches to the backend, so callers write one code path.
//!
//! Semantics shared by both backends (the conformance test in `cluster/tests/store.rs`
//! checks them against both):
//! - Every mutation that changes something gets a new, strictly greater store revision; a
//!   key's `mod_revision` is the revision of its last write and is never 0 for a key that
//!   exists. [`Store::cas`] with an expected revision of 0 therefore means "only if absent".
//! - [`Store::list`] returns keys in ascending byte order.
//! - A key written with a lease is deleted when the lease expires or is revoked; writing with a
//!   lease that is gone fails with [`StoreError::LeaseExpired`].
//! - [`Store::cas`] writes without a lease: compare-and-swap is for durable state (attachments,
//!   replica sets), leases are for liveness.
//! - No call panics on bad input or a bad answer: every failure is a [`StoreError`] whose
//!   message names the problem and, where there is one, the fix.
//!
//! [`spawn_keepalive`] renews a lease in the background and tells the node, through a
//! [`watch`] channel, when it can no longer be sure it holds the lease (it must then stop I/O).

pub mod embedded;
pub mod etcd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::embedded::EmbeddedStore;
use self::etcd::EtcdStore;

/// A lease's id, as the store granted it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// One key and its value, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value, as written.
    pub value: Vec<u8>,
    /// The store revision of the key's last write (never 0).
    pub mod_revision: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<i64>,
}

/// A decoded JSON value and the revision to compare against in [`Store::cas_json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// The key's `mod_revision`.
    pub mod_revision: u64,
}

/// Why a cluster store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No etcd endpoint answered (connection refused, timeout, no leader, …).
    #[error("cannot reach etcd at {endpoints}: {message}; is etcd running? (--etcd URL)")]
    Unavailable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What went wrong with each.
        message: String,
    },
    /// The lease has expired or was revoked.
    #[error(
        "the cluster store lease has expired or was revoked; stop I/O, grant a new lease and \
         register again"
    )]
    LeaseExpired,
    /// The store holds data that cannot be read.
    #[error("the cluster store holds unreadable data: {0}")]
    Corrupt(String),
    /// The embedded store's file could not be read or written.
    #[error("cannot {action} the cluster store file {}", .path.display())]
    Io {
        /// What was being done (`read`, `write`, …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An etcd endpoint is not a URL we can use.
    #[error(
        "invalid etcd endpoint {endpoint:?}: {reason}; expected http://HOST:PORT (--etcd URL)"
    )]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// etcd answered, but refused the request.
    #[error("etcd at {endpoint} refused the request: {message}")]
    Rejected {
        /// The endpoint that answered.
        endpoint: String,
        /// etcd's message.
        message: String,
    },
    /// etcd answered something that is not its documented API.
    #[error("unexpected answer from etcd at {endpoint}: {message}; is this an etcd v3 endpoint?")]
    BadAnswer {
        /// The endpoint that answered.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
    /// A value could not be encoded as JSON.
    #[error("cannot encode the value for cluster store key {key:?}: {message}")]
    Encode {
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// A background task of the store failed (a bug).
    #[error("internal cluster store error: {0}")]
    Internal(String),
}

/// The cluster store: one API over the embedded and the etcd backend.
///
/// Cloning is cheap and clones share the backend.
#[derive(Debug, Clone)]
pub enum Store {
    /// The single-node store in a local file.
    Embedded(EmbeddedStore),
    /// An etcd cluster.
    Etcd(EtcdStore),
}

impl Store {
    /// Open (or create) the embedded store kept in the file `path`.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the file cannot be read or created, [`StoreError::Corrupt`] if it
    /// is not a store file.
    pub fn embedded(path: &Path) -> Result<Store, StoreError> {
        EmbeddedStore::open(path).map(Store::Embedded)
    }

    /// Connect to etcd at `endpoints` (each `http://HOST:PORT`; an item may hold several,
    /// comma-separated) and check that one of them answers.
    ///
    /// # Errors
    /// [`StoreError::InvalidEndpoint`] or [`StoreError::Unavailable`].
    pub async fn etcd(endpoints: &[String]) -> Result<Store, StoreError> {
        EtcdStore::connect(endpoints).await.map(Store::Etcd)
    }

    /// [`Store::etcd`] over TLS with `tls` (`https://` endpoints).
    ///
    /// # Errors
    /// See [`Store::etcd`].
    pub async fn etcd_with(
        endpoints: &[String],
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Store, StoreError> {
        EtcdStore::connect_with(endpoints, tls)
            .await
            .map(Store::Etcd)
    }

    /// The value of `key`, if it exists.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        match self {
            Store::Embedded(s) => s.get(key).await,
            Store::Etcd(s) => s.get(key).await,
        }
    }

    /// Every key starting with `prefix`, in ascending key order.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn list(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        match self {
            Store::Embedded(s) => s.list(prefix).await,
            Store::Etcd(s) => s.list(prefix).await,
        }
    }

    /// Write `key`, attached to `lease` if given; returns the new store revision.
    ///
    /// # Errors
    /// [`StoreError::LeaseExpired`] if the lease is gone; see [`StoreError`].
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => s.put(key, value, lease).await,
            Store::Etcd(s) => s.put(key, value, lease).await,
        }
    }

    /// Write `key` only if it does not exist; `false` if it existed (nothing written).
    ///
    /// # Errors
    /// [`StoreError::LeaseExpired`] if the lease is gone; see [`StoreError`].
    pub async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.create(key, value, lease).await,
            Store::Etcd(s) => s.create(key, value, lease).await,
        }
    }

    /// Write `key` (without a lease) only if its `mod_revision` is `expected_mod_revision`
    /// (0: only if absent); `false` if it was not (nothing written).
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn cas(
        &self,
        key: &str,
        expected_mod_revision: u64,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.cas(key, expected_mod_revision, value).await,
            Store::Etcd(s) => s.cas(key, expected_mod_revision, value).await,
        }
    }

    /// Delete `key` (no error if absent).
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.delete(key).await,
            Store::Etcd(s) => s.delete(key).await,
        }
    }

    /// Delete every key starting with `prefix`.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.delete_prefix(prefix).await,
            Store::Etcd(s) => s.delete_prefix(prefix).await,
        }
    }

    /// Grant a lease of (at least) `ttl`. etcd counts in whole seconds and may raise a short
    /// TTL to its minimum; [`Store::keep_alive`] returns the TTL actually in force.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        match self {
            Store::Embedded(s) => s.grant_lease(ttl).await,
            Store::Etcd(s) => s.grant_lease(ttl).await,
        }
    }

    /// Renew `lease`; returns its TTL from now.
    ///
    /// # Errors
    /// [`StoreError::LeaseExpired`] if the lease is gone; see [`StoreError`].
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        match self {
            Store::Embedded(s) => s.keep_alive(lease).await,
            Store::Etcd(s) => s.keep_alive(lease).await,
        }
    }

    /// Revoke `lease`, deleting its keys (no error if it is already gone).
    ///
    /// # Errors
    /// See [`StoreError`].
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.revoke(lease).await,
            Store::Etcd(s) => s.revoke(lease).await,
        }
    }

    /// The JSON value of `key` and its revision, if it exists.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the value is not a JSON `T`; see [`StoreError`].
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let Some(kv) = self.get(key).await? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&kv.value).map_err(|e| {
            StoreError::Corrupt(format!("key {key:?} is not the expected JSON: {e}"))
        })?;
        Ok(Some(Versioned {
            value,
            mod_revision: kv.mod_revision,
        }))
    }

    /// Write `value` as JSON; see [`Store::put`].
    ///
    /// # Errors
    /// See [`Store::put`] and [`StoreError::Encode`].
    pub async fn put_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let bytes = encode_json(key, value)?;
        self.put(key, &bytes, lease).await
    }

    /// Compare-and-swap `value` as JSON; see [`Store::cas`].
    ///
    /// # Errors
    /// See [`Store::cas`] and [`StoreError::Encode`].
    pub async fn cas_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        expected_mod_revision: u64,
        value: &T,
    ) -> Result<bool, StoreError> {
        let bytes = encode_json(key, value)?;
        self.cas(key, expected_mod_revision, &bytes).await
    }
}

fn encode_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// A lease renewed in the background by [`spawn_keepalive`]; renewal stops when it is dropped.
///
/// Invariant: once [`KeepAlive::is_valid`] is `false` it stays `false` — a lease that may
/// have expired may already have been taken over, so the node must stop I/O and start again
/// with a new lease.
#[derive(Debug)]
pub struct KeepAlive {
    lease: LeaseId,
    valid: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl KeepAlive {
    /// The lease being renewed.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Whether the lease is still certainly held.
    pub fn is_valid(&self) -> bool {
        *self.valid.borrow()
    }

    /// A receiver that changes to `false` when the lease can no longer be relied on.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.valid.clone()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renew `lease` (granted with `ttl`) every `ttl / 3` until the returned [`KeepAlive`] is
/// dropped. Must be called within a tokio runtime.
///
/// The lease counts as valid until `ttl` after the *sending* of the last successful renewal
/// (counted from this call for the first one), so clock skew with the store only ever makes
/// the node stop early, never late. It becomes invalid for good when that deadline passes or
/// when the store says the lease is gone.
pub fn spawn_keepalive(store: Store, lease: LeaseId, ttl: Duration) -> KeepAlive {
    let (tx, rx) = watch::channel(true);
    let task = tokio::spawn(renew_loop(store, lease, ttl, tx));
    KeepAlive {
        lease,
        valid: rx,
        task,
    }
}

async fn renew_loop(store: Store, lease: LeaseId, ttl: Duration, valid: watch::Sender<bool>) {
    let ttl = ttl.max(Duration::from_millis(30));
    let interval = ttl / 3;
    // After a failed attempt, try again soon: the next regular renewal could fall after the
    // deadline, and a short store outage must not cost the lease.
    let retry = (ttl / 30).max(Duration::from_millis(10));
    let mut last_ok = Instant::now();
    loop {
        let deadline = last_ok + ttl;
        let sent = Instant::now();
        let mut pause = retry;
        match tokio::time::timeout_at(deadline, store.keep_alive(lease)).await {
            Ok(Ok(_)) => {
                last_ok = sent;
                pause = interval;
            }
            Ok(Err(StoreError::LeaseExpired)) => {
                tracing::error!(%lease, "the cluster store lease has expired; stopping I/O");
                valid.send_replace(false);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%lease, error = %api::error_chain(&e), "cannot renew the cluster store lease; retrying");
            }
            Err(_) => {}
        }
        let deadline = last_ok + ttl;
        if Instant::now() >= deadline {
            tracing::error!(%lease, ttl_ms = ttl.as_millis() as u64, "the cluster store lease could not be renewed within its TTL; stopping I/O");
            valid.send_replace(false);
            return;
        }
        tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's
/// `range_end`); `None` if there is none (the prefix is empty or all `0xff` bytes), meaning
/// "to the end of the key space".
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Standard base64 (RFC 4648, with padding), as etcd's JSON gateway uses for bytes.
pub(crate) mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Encode `data`.
    pub(crate) fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }

    /// Decode `text`; padding is optional; anything else that is not base64 is an error.
    pub(crate) fn decode(text: &str) -> Result<Vec<u8>, String> {
        let bytes = text.trim_end_matches('=').as_bytes();
        if text.len() - bytes.len() > 2 || bytes.len() % 4 == 1 {
            return Err(format!("{text:?} is not base64 (bad length)"));
        }
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                let v =
                    value(c).ok_or_else(|| format!("{text:?} is not base64 (bad character)"))?;
                n |= v << (18 - 6 * i);
            }
            let produced = chunk.len() - 1;
            for i in 0..produced {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64::encode(plain.as_bytes()), coded);
            assert_eq!(base64::decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64::decode(&base64::encode(&all)).unwrap(), all);
        assert!(base64::decode("Zm9v!").is_err());
        assert!(base64::decode("Z").is_err());
        assert!(base64::decode("Zg===").is_err());
    }

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"a/"), Some(b"a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
