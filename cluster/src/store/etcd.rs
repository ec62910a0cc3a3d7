//! The etcd backend: etcd's v3 API through its JSON gateway (`POST /v3/kv/range`, …) over
//! HTTP, or HTTPS with a client certificate (etcd's `--client-cert-auth`), with hyper. Bytes travel as base64 and 64-bit integers as JSON strings.
//!
//! Invariants:
//! - every request has a deadline ([`REQUEST_TIMEOUT`]) and every failure becomes a
//!   [`StoreError`]; an answer that is not etcd's documented shape is
//!   [`StoreError::BadAnswer`], never a panic nor a guess;
//! - endpoints are tried in order, starting with the last one that answered; a request moves
//!   on to the next endpoint when the connection could not be made (so it was never sent), or
//!   — only for requests that are safe to repeat (reads, renewals) — when it timed out or the
//!   member had no leader. A compare-and-swap that may have been applied is never sent twice;
//!   its caller gets [`StoreError::Unavailable`] and must read again.
//!
//! What an answer means is worked out in [`answer`], apart from the HTTP exchange, so that
//! the fuzz target `fuzz/fuzz_targets/etcd_json.rs` runs the same decoding on any bytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use self::answer::AnswerError;
use super::{base64, prefix_end, Kv, LeaseId, StoreError};

/// How long one request to one endpoint may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// gRPC status codes after which another member may do better.
const GRPC_UNAVAILABLE: i64 = 14;
const GRPC_DEADLINE_EXCEEDED: i64 = 4;

/// A client of an etcd cluster. Clones share connections.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Base URLs, `http://host:port` without a trailing slash.
    endpoints: Vec<String>,
    /// The index of the endpoint to try first: the last one that answered.
    preferred: AtomicUsize,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Whether a request may be sent again to another member after it may have been received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Safe,
    Unsafe,
}

/// Why one attempt on one endpoint failed.
enum Attempt {
    /// Try the next endpoint, if the request allows; the message says why.
    Next { sent: bool, message: String },
    /// Give up with this error.
    Fail(StoreError),
}

fn parse_endpoint(raw: &str, tls: bool) -> Result<String, StoreError> {
    let invalid = |reason: &str| StoreError::InvalidEndpoint {
        endpoint: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = raw.trim().trim_end_matches('/');
    let uri: Uri = trimmed.parse().map_err(|_| invalid("not a URL"))?;
    match (uri.scheme_str(), tls) {
        (Some("http"), false) | (Some("https"), true) => {}
        (Some("https"), false) => {
            return Err(invalid(
                "an https:// endpoint needs the etcd CA (--etcd-ca), and a client certificate \
                 (--etcd-cert, --etcd-key) if etcd asks for one",
            ))
        }
        (Some("http"), true) => {
            return Err(invalid(
                "with --etcd-ca, every endpoint must be https://: plain http would send the \
                 cluster's records unencrypted",
            ))
        }
        _ => return Err(invalid("the URL must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid("the URL must not have a path"));
    }
    Ok(trimmed.to_owned())
}

/// etcd's answers taken apart, without the HTTP exchange: [`EtcdStore`] runs these on every
/// answer it gets, the fuzz target `etcd_json` on any bytes. None panics; an answer that is
/// not etcd's documented shape is [`AnswerError::Bad`], never a guess.
#[doc(hidden)]
pub mod answer {
    use std::time::Duration;

    use hyper::StatusCode;
    use serde::Deserialize;
    use serde_json::Value;

    use super::{GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE};
    use crate::store::{base64, Kv, LeaseId, StoreError};

    /// Why an answer is not taken, before the endpoint it came from is named.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum AnswerError {
        /// Not etcd's documented shape: [`StoreError::BadAnswer`].
        Bad(String),
        /// etcd refused the request: [`StoreError::Rejected`].
        Rejected(String),
        /// [`StoreError::LeaseExpired`].
        LeaseExpired,
        /// The member could not serve the request (no leader, deadline exceeded), which it
        /// did receive: another member may do better.
        Retry(String),
    }

    impl AnswerError {
        /// The error, as answered by `endpoint`.
        pub fn at(self, endpoint: &str) -> StoreError {
            match self {
                Self::Bad(message) => StoreError::BadAnswer {
                    endpoint: endpoint.to_owned(),
                    message,
                },
                Self::Rejected(message) => StoreError::Rejected {
                    endpoint: endpoint.to_owned(),
                    message,
                },
                Self::LeaseExpired => StoreError::LeaseExpired,
                Self::Retry(message) => StoreError::Unavailable {
                    endpoints: endpoint.to_owned(),
                    message,
                },
            }
        }
    }

    /// etcd's error body: `{"error": "...", "code": 5, "message": "..."}`.
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        code: Option<i64>,
    }

    /// The body of an answer with HTTP status `status`: a JSON object if the status is a
    /// success, otherwise etcd's error (or a bad answer).
    pub fn body(status: u16, bytes: &[u8]) -> Result<Value, AnswerError> {
        let status_text =
            StatusCode::from_u16(status).map_or_else(|_| status.to_string(), |s| s.to_string());
        if (200..300).contains(&status) {
            let value: Value = serde_json::from_slice(bytes).map_err(|e| {
                AnswerError::Bad(format!(
                    "status {status_text} with a body that is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(bytes)
                ))
            })?;
            if !value.is_object() {
                return Err(AnswerError::Bad(format!(
                    "the answer is not a JSON object: {value}"
                )));
            }
            return Ok(value);
        }
        let Ok(err) = serde_json::from_slice::<ErrorBody>(bytes) else {
            return Err(AnswerError::Bad(format!(
                "status {status_text} with body {:?}",
                String::from_utf8_lossy(bytes).trim()
            )));
        };
        let message = err
            .message
            .or(err.error)
            .unwrap_or_else(|| format!("status {status_text}"));
        if message.contains("requested lease not found") {
            return Err(AnswerError::LeaseExpired);
        }
        match err.code {
            Some(GRPC_UNAVAILABLE | GRPC_DEADLINE_EXCEEDED) => Err(AnswerError::Retry(message)),
            _ => Err(AnswerError::Rejected(message)),
        }
    }

    /// An int64 field of an answer: a JSON string (as the gateway writes it) or number; absent
    /// means 0, as in protobuf.
    fn int(value: &Value, field: &str) -> Result<i64, String> {
        match value.get(field) {
            None | Some(Value::Null) => Ok(0),
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| format!("field {field:?} is not an integer: {s:?}")),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| format!("field {field:?} is not an integer: {n}")),
            Some(other) => Err(format!("field {field:?} is not an integer: {other}")),
        }
    }

    fn bytes(value: &Value, field: &str) -> Result<Vec<u8>, String> {
        match value.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => {
                base64::decode(s).map_err(|e| format!("field {field:?}: {e}"))
            }
            Some(other) => Err(format!("field {field:?} is not a base64 string: {other}")),
        }
    }

    fn revision(value: &Value, field: &str) -> Result<u64, String> {
        let n = int(value, field)?;
        u64::try_from(n).map_err(|_| format!("field {field:?} is negative: {n}"))
    }

    /// One key of a range answer (a `mvccpb.KeyValue`).
    pub fn decode_kv(value: &Value) -> Result<Kv, String> {
        let key = String::from_utf8(bytes(value, "key")?)
            .map_err(|_| "a key is not UTF-8 (written by another program?)".to_owned())?;
        let mod_revision = revision(value, "mod_revision")?;
        if mod_revision == 0 {
            return Err(format!("key {key:?} has no mod_revision"));
        }
        let lease = int(value, "lease")?;
        Ok(Kv {
            value: bytes(value, "value")?,
            mod_revision,
            lease: (lease != 0).then_some(lease),
            key,
        })
    }

    /// The keys of a range answer (`/v3/kv/range`), in etcd's order.
    pub fn kvs(answer: &Value) -> Result<Vec<Kv>, AnswerError> {
        let kvs = match answer.get("kvs") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(kvs)) => kvs,
            Some(other) => {
                return Err(AnswerError::Bad(format!(
                    "field \"kvs\" is not an array: {other}"
                )))
            }
        };
        kvs.iter()
            .map(|kv| decode_kv(kv).map_err(AnswerError::Bad))
            .collect()
    }

    /// The answer to a range request for the single key `key`.
    pub fn get(answer: &Value, key: &str) -> Result<Option<Kv>, AnswerError> {
        let mut kvs = kvs(answer)?;
        match kvs.len() {
            0 => Ok(None),
            1 if kvs[0].key == key => Ok(kvs.pop()),
            n => Err(AnswerError::Bad(format!(
                "{n} keys for a get of the single key {key:?}"
            ))),
        }
    }

    /// The answer to a range request for a prefix, sorted by key.
    pub fn list(answer: &Value) -> Result<Vec<Kv>, AnswerError> {
        let mut kvs = kvs(answer)?;
        // etcd sorts by key already; sorting again costs little and makes it a guarantee.
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(kvs)
    }

    /// The store revision of a put (`/v3/kv/put`), never 0.
    pub fn put(answer: &Value) -> Result<u64, AnswerError> {
        let header = answer.get("header").cloned().unwrap_or(Value::Null);
        let revision = revision(&header, "revision").map_err(AnswerError::Bad)?;
        if revision == 0 {
            return Err(AnswerError::Bad(
                "the put answer has no revision".to_owned(),
            ));
        }
        Ok(revision)
    }

    /// Whether a transaction (`/v3/kv/txn`) on `key` succeeded.
    pub fn txn(answer: &Value, key: &str) -> Result<bool, AnswerError> {
        match answer.get("succeeded") {
            None | Some(Value::Null | Value::Bool(false)) => Ok(false),
            Some(Value::Bool(true)) => Ok(true),
            Some(other) => Err(AnswerError::Bad(format!(
                "field \"succeeded\" of the transaction on {key:?} is not a boolean: {other}"
            ))),
        }
    }

    /// The lease of a grant (`/v3/lease/grant`), never 0.
    pub fn lease_grant(answer: &Value) -> Result<LeaseId, AnswerError> {
        if let Some(Value::String(e)) = answer.get("error") {
            if !e.is_empty() {
                return Err(AnswerError::Rejected(e.clone()));
            }
        }
        let id = int(answer, "ID").map_err(AnswerError::Bad)?;
        if id == 0 {
            return Err(AnswerError::Bad(
                "the lease grant answer has no ID".to_owned(),
            ));
        }
        Ok(LeaseId(id))
    }

    /// The lease's time to live after a renewal (`/v3/lease/keepalive`), at least a second.
    pub fn keep_alive(answer: &Value) -> Result<Duration, AnswerError> {
        // The gateway wraps stream messages: {"result": {...}} or {"error": {...}}.
        if let Some(error) = answer.get("error") {
            return Err(AnswerError::Rejected(error.to_string()));
        }
        let result = answer.get("result").unwrap_or(answer);
        let ttl = int(result, "TTL").map_err(AnswerError::Bad)?;
        match u64::try_from(ttl) {
            Ok(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
            _ => Err(AnswerError::LeaseExpired),
        }
    }
}

fn b64(s: &str) -> String {
    base64::encode(s.as_bytes())
}

fn put_request(key: &str, value: &[u8], lease: Option<LeaseId>) -> Value {
    let mut put = json!({ "key": b64(key), "value": base64::encode(value) });
    if let Some(lease) = lease {
        put["lease"] = json!(lease.0.to_string());
    }
    put
}

/// A range request body for every key starting with `prefix`.
fn prefix_range(prefix: &str) -> Value {
    let end = prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0]);
    let key = if prefix.is_empty() { "\0" } else { prefix };
    json!({ "key": b64(key), "range_end": base64::encode(&end) })
}

impl EtcdStore {
    /// A client of `endpoints`, after checking that one of them answers.
    ///
    /// # Errors
    /// [`StoreError::InvalidEndpoint`] or [`StoreError::Unavailable`].
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        Self::connect_with(endpoints, None).await
    }

    /// [`EtcdStore::connect`] over TLS with `tls` (then every endpoint must be `https://`).
    ///
    /// # Errors
    /// See [`EtcdStore::connect`].
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<EtcdStore, StoreError> {
        let endpoints = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .filter(|e| !e.trim().is_empty())
            .map(|e| parse_endpoint(e, tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(StoreError::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no endpoint given".to_owned(),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        // Without TLS, a configuration that trusts nothing: only http:// endpoints were
        // accepted, and it is never used.
        let config = tls.map_or_else(
            || {
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                })
                .expect("the ring provider supports the default protocol versions")
            },
            |c| (*c).clone(),
        );
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let store = EtcdStore {
            inner: Arc::new(Inner {
                endpoints,
                preferred: AtomicUsize::new(0),
                client,
            }),
        };
        store
            .call("/v3/maintenance/status", &json!({}), Repeat::Safe)
            .await?;
        Ok(store)
    }

    /// The endpoints, as parsed.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// POST `body` to `path`, trying endpoints as the module docs say; the decoded answer.
    async fn call(&self, path: &str, body: &Value, repeat: Repeat) -> Result<Value, StoreError> {
        let body = Bytes::from(body.to_string());
        let count = self.inner.endpoints.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for i in 0..count {
            let index = (first + i) % count;
            let endpoint = &self.inner.endpoints[index];
            match self.attempt(endpoint, path, body.clone()).await {
                Ok(answer) => {
                    self.inner.preferred.store(index, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Next { sent, message }) => {
                    failures.push(format!("{endpoint}: {message}"));
                    if sent && repeat == Repeat::Unsafe {
                        return Err(StoreError::Unavailable {
                            endpoints: endpoint.clone(),
                            message: format!(
                                "{message} (the request may or may not have been applied)"
                            ),
                        });
                    }
                }
            }
        }
        Err(StoreError::Unavailable {
            endpoints: self.inner.endpoints.join(","),
            message: failures.join("; "),
        })
    }

    async fn attempt(&self, endpoint: &str, path: &str, body: Bytes) -> Result<Value, Attempt> {
        let fail = |e| Attempt::Fail(e);
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{endpoint}{path}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| {
                fail(StoreError::InvalidEndpoint {
                    endpoint: endpoint.to_owned(),
                    reason: e.to_string(),
                })
            })?;
        let exchange = async {
            let response = self.inner.client.request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => {
                return Err(Attempt::Next {
                    sent: true,
                    message: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                })
            }
            Ok(Err(e)) => {
                let connect = e
                    .downcast_ref::<hyper_util::client::legacy::Error>()
                    .is_some_and(hyper_util::client::legacy::Error::is_connect);
                return Err(Attempt::Next {
                    sent: !connect,
                    message: api::error_chain(&*e),
                });
            }
            Ok(Ok(answer)) => answer,
        };
        answer::body(status.as_u16(), &bytes).map_err(|e| match e {
            AnswerError::Retry(message) => Attempt::Next {
                sent: true,
                message,
            },
            e => Attempt::Fail(e.at(endpoint)),
        })
    }

    /// A decoded answer, or why it was not taken, as answered by the current endpoint.
    fn decoded<T>(&self, result: Result<T, AnswerError>) -> Result<T, StoreError> {
        result.map_err(|e| e.at(&self.current_endpoint()))
    }

    fn current_endpoint(&self) -> String {
        let count = self.inner.endpoints.len();
        self.inner.endpoints[self.inner.preferred.load(Ordering::Relaxed) % count].clone()
    }

    async fn txn_put_if(&self, key: &str, compare: Value, put: Value) -> Result<bool, StoreError> {
        let body = json!({
            "compare": [compare],
            "success": [{ "request_put": put }],
        });
        let answer = self.call("/v3/kv/txn", &body, Repeat::Unsafe).await?;
        self.decoded(answer::txn(&answer, key))
    }

    pub(super) async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let answer = self
            .call("/v3/kv/range", &json!({ "key": b64(key) }), Repeat::Safe)
            .await?;
        self.decoded(answer::get(&answer, key))
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        let answer = self
            .call("/v3/kv/range", &prefix_range(prefix), Repeat::Safe)
            .await?;
        self.decoded(answer::list(&answer))
    }

    pub(super) async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let answer = self
            .call(
                "/v3/kv/put",
                &put_request(key, value, lease),
                Repeat::Unsafe,
            )
            .await?;
        self.decoded(answer::put(&answer))
    }

    pub(super) async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        let compare = json!({
            "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0",
        });
        self.txn_put_if(key, compare, put_request(key, value, lease))
            .await
    }

    pub(super) async fn cas(
        &self,
        key: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let compare = if expected == 0 {
            json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
        } else {
            json!({
                "key": b64(key), "target": "MOD", "result": "EQUAL",
                "mod_revision": expected.to_string(),
            })
        };
        self.txn_put_if(key, compare, put_request(key, value, None))
            .await
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call(
            "/v3/kv/deleterange",
            &json!({ "key": b64(key) }),
            Repeat::Safe,
        )
        .await
        .map(drop)
    }

    pub(super) async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.call("/v3/kv/deleterange", &prefix_range(prefix), Repeat::Safe)
            .await
            .map(drop)
    }

    pub(super) async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let body = json!({ "TTL": seconds.max(1).to_string(), "ID": "0" });
        let answer = self.call("/v3/lease/grant", &body, Repeat::Unsafe).await?;
        self.decoded(answer::lease_grant(&answer))
    }

    pub(super) async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let body = json!({ "ID": lease.0.to_string() });
        let answer = self
            .call("/v3/lease/keepalive", &body, Repeat::Safe)
            .await?;
        self.decoded(answer::keep_alive(&answer))
    }

    pub(super) async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let body = json!({ "ID": lease.0.to_string() });
        match self.call("/v3/lease/revoke", &body, Repeat::Safe).await {
            Ok(_) | Err(StoreError::LeaseExpired) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::answer::{decode_kv, AnswerError};
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            parse_endpoint(" http://127.0.0.1:2379/ ", false).unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            parse_endpoint("https://etcd-0.etcd:2379", true).unwrap(),
            "https://etcd-0.etcd:2379"
        );
        for bad in [
            "https://h:1",
            "127.0.0.1:2379",
            "http://h:1/v3",
            "http://",
            "::",
        ] {
            let err = parse_endpoint(bad, false).unwrap_err();
            assert!(err.to_string().contains("--etcd URL"), "{bad}: {err}");
        }
        // TLS: https only (plain http would carry the records unencrypted).
        let err = parse_endpoint("http://h:1", true).unwrap_err().to_string();
        assert!(err.contains("must be https://"), "{err}");
        let err = parse_endpoint("https://h:1", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--etcd-ca"), "{err}");
    }

    #[test]
    fn kvs_decode_from_the_gateway_shape_and_bad_ones_are_errors() {
        let kv = json!({"key":"YQ==","create_revision":"2","mod_revision":"3","version":"1","value":"Yg==","lease":"7"});
        assert_eq!(
            decode_kv(&kv).unwrap(),
            Kv {
                key: "a".into(),
                value: b"b".to_vec(),
                mod_revision: 3,
                lease: Some(7)
            }
        );
        let no_value = json!({"key":"YQ==","mod_revision":"3"});
        assert_eq!(decode_kv(&no_value).unwrap().value, b"");
        for bad in [
            json!({"key":"YQ==","mod_revision":"x"}),
            json!({"key":"YQ==","mod_revision":"-1"}),
            json!({"key":"YQ=="}),
            json!({"key":"/w==","mod_revision":"1"}),
            json!({"key":"YQ==","mod_revision":"1","value":5}),
            json!({"key":"!","mod_revision":"1"}),
        ] {
            assert!(decode_kv(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_and_error_bodies_mean_what_etcd_says() {
        let range = br#"{"header":{"revision":"5"},"kvs":[{"key":"L2I=","value":"e30=","mod_revision":"3"},{"key":"L2E=","mod_revision":"4"}],"count":"2"}"#;
        let value = answer::body(200, range).unwrap();
        let keys = |kvs: Vec<Kv>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
        assert_eq!(keys(answer::kvs(&value).unwrap()), ["/b", "/a"]);
        assert_eq!(keys(answer::list(&value).unwrap()), ["/a", "/b"]);
        assert!(matches!(
            answer::get(&value, "/b"),
            Err(AnswerError::Bad(_))
        ));
        assert_eq!(answer::put(&value), Ok(5));
        assert_eq!(answer::txn(&json!({"succeeded": true}), "k"), Ok(true));
        assert_eq!(answer::txn(&json!({}), "k"), Ok(false));
        assert_eq!(
            answer::lease_grant(&json!({"ID": "7587", "TTL": "10"})),
            Ok(LeaseId(7587))
        );
        assert_eq!(
            answer::keep_alive(&json!({"result": {"ID": "7587", "TTL": "10"}})),
            Ok(Duration::from_secs(10))
        );
        assert_eq!(
            answer::keep_alive(&json!({"result": {"ID": "7587"}})),
            Err(AnswerError::LeaseExpired)
        );
        for bad in [&b"[1]"[..], b"not json", b""] {
            assert!(matches!(answer::body(200, bad), Err(AnswerError::Bad(_))));
        }
        let err = |code: i64, message: &str| {
            json!({"error": message, "code": code, "message": message}).to_string()
        };
        assert_eq!(
            answer::body(
                404,
                err(5, "etcdserver: requested lease not found").as_bytes()
            ),
            Err(AnswerError::LeaseExpired)
        );
        assert_eq!(
            answer::body(503, err(14, "etcdserver: no leader").as_bytes()),
            Err(AnswerError::Retry("etcdserver: no leader".into()))
        );
        assert_eq!(
            answer::body(400, err(3, "etcdserver: key is not provided").as_bytes()),
            Err(AnswerError::Rejected(
                "etcdserver: key is not provided".into()
            ))
        );
        assert_eq!(
            answer::body(502, b"Bad Gateway"),
            Err(AnswerError::Bad(
                "status 502 Bad Gateway with body \"Bad Gateway\"".into()
            ))
        );
    }

    #[test]
    fn prefix_ranges_cover_exactly_the_prefix() {
        assert_eq!(
            prefix_range("a/"),
            json!({"key": b64("a/"), "range_end": b64("a0")})
        );
        assert_eq!(
            prefix_range(""),
            json!({"key": "AA==", "range_end": "AA=="})
        );
    }
}
