//! The daemon's decoding of etcd's JSON-gateway answers (`cluster::store::etcd::answer`: the
//! body for an HTTP status, then range, put, txn, lease grant and keep-alive answers), and of
//! the records the store holds (volumes, nodes, intents), on the input as a body and on a
//! gateway-shaped answer built from the input. An error, never a panic; and:
//! - a success body is a JSON object, an error status never decodes to one; a built answer
//!   decodes to the JSON it was built from, and an error body to the error it says;
//! - a decoded key has a `mod_revision` > 0 and no lease 0; `list` is `kvs` sorted by key;
//!   `get` gives the one key asked for or fails; a put's revision and a lease's id are never
//!   0, a renewed lease's TTL at least a second;
//! - keys built from the input (base64 by the `base64` crate, 64-bit integers as strings or
//!   numbers) decode to what they were built from; a decoded key encodes back to the gateway's
//!   shape and decodes the same;
//! - a record that decodes encodes back to JSON that decodes to the same record.
#![no_main]

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cluster::model::{IntentRecord, NodeRecord, VolumeRecord};
use cluster::store::etcd::answer::{self, AnswerError};
use cluster::store::Kv;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

fuzz_target!(|data: &[u8]| {
    raw(data);
    records(data);
    let _ = built(&mut Unstructured::new(data));
});

/// The input as the body of an answer.
fn raw(bytes: &[u8]) {
    // (Each failed decoding quotes the whole body in its message: two statuses will do.)
    for status in [404, 503] {
        assert!(answer::body(status, bytes).is_err());
    }
    if let Ok(value) = answer::body(200, bytes) {
        assert!(value.is_object());
        decoders(&value);
    }
}

/// Every decoder of a success answer on `value`, and what holds of what they decode.
fn decoders(value: &Value) -> Option<Vec<Kv>> {
    let kvs = answer::kvs(value);
    match &kvs {
        Ok(kvs) => {
            for kv in kvs {
                assert!(kv.mod_revision > 0 && kv.lease != Some(0), "{kv:?}");
                assert_eq!(answer::decode_kv(&encode_kv(kv)).as_ref(), Ok(kv));
                records(&kv.value);
            }
            let mut sorted = kvs.clone();
            sorted.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(answer::list(value).as_ref(), Ok(&sorted));
            let first = kvs
                .first()
                .map_or("/ballast/v1/volumes/a", |kv| kv.key.as_str());
            match answer::get(value, first) {
                Ok(None) => assert!(kvs.is_empty()),
                Ok(Some(kv)) => assert!(kvs.len() == 1 && kv == kvs[0]),
                Err(_) => assert!(kvs.len() > 1),
            }
            if kvs.len() == 1 {
                let other = format!("{first}/other");
                assert!(answer::get(value, &other).is_err());
            }
        }
        Err(_) => {
            assert!(answer::list(value).is_err());
            assert!(answer::get(value, "/ballast").is_err());
        }
    }
    if let Ok(revision) = answer::put(value) {
        assert!(revision > 0);
    }
    let _ = answer::txn(value, "/ballast/v1/volumes/a");
    if let Ok(lease) = answer::lease_grant(value) {
        assert_ne!(lease.0, 0);
    }
    if let Ok(ttl) = answer::keep_alive(value) {
        assert!(ttl >= Duration::from_secs(1));
    }
    kvs.ok()
}

/// `kv` as the gateway writes it.
fn encode_kv(kv: &Kv) -> Value {
    let mut v = json!({
        "key": STANDARD.encode(kv.key.as_bytes()),
        "value": STANDARD.encode(&kv.value),
        "mod_revision": kv.mod_revision.to_string(),
        "create_revision": "1",
        "version": "1",
    });
    if let Some(lease) = kv.lease {
        v["lease"] = json!(lease.to_string());
    }
    v
}

/// A store value read as each record kind: what decodes encodes back to the same record.
fn records(bytes: &[u8]) {
    round_trip::<VolumeRecord>(bytes);
    round_trip::<NodeRecord>(bytes);
    round_trip::<IntentRecord>(bytes);
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(record) = serde_json::from_slice::<T>(bytes) {
        let again = serde_json::to_vec(&record).expect("a record encodes");
        assert_eq!(serde_json::from_slice::<T>(&again).ok(), Some(record));
    }
}

/// An int64 field as the gateway writes it (a string), or as it might (a number), or not.
fn int(u: &mut Unstructured<'_>, valid: i64) -> Result<(Value, bool)> {
    Ok(match u.int_in_range(0..=9)? {
        0..=4 => (json!(valid.to_string()), true),
        5 => (json!(valid), true),
        6 => (json!(u.arbitrary::<u64>()?), false),
        7 => (json!(u.arbitrary::<String>()?), false),
        8 => (json!(f64::from(u.arbitrary::<i32>()?) + 0.5), false),
        _ => (Value::Null, valid == 0),
    })
}

/// A base64 field: the `base64` crate's encoding of `bytes`, or any string, or not a string.
fn b64(u: &mut Unstructured<'_>, bytes: &[u8]) -> Result<(Value, bool)> {
    Ok(match u.int_in_range(0..=7)? {
        0..=4 => (json!(STANDARD.encode(bytes)), true),
        5 => (json!(STANDARD.encode(bytes).trim_end_matches('=')), true),
        6 => (json!(u.arbitrary::<String>()?), false),
        _ => (json!(u.arbitrary::<u8>()?), false),
    })
}

/// A volume record's JSON, mostly well formed.
fn volume_record(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut placement = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let state = *u.choose(&["healthy", "ejected", "rebuilding", "lost"])?;
        let mut r = json!({ "node": u.arbitrary::<String>()?, "state": state });
        if u.arbitrary()? {
            r["device"] = json!(u.arbitrary::<String>()?);
        }
        if u.arbitrary()? {
            r["since"] = json!(u.arbitrary::<u64>()?);
        }
        if u.arbitrary()? {
            r["rebuild"] = json!({
                "kind": "delta", "total_bytes": u.arbitrary::<u64>()?,
                "done_bytes": u.arbitrary::<u64>()?, "eta_seconds": u.arbitrary::<Option<u64>>()?,
                "elapsed_ms": u.arbitrary::<u64>()?, "updated_at": u.arbitrary::<u64>()?,
            });
        }
        placement.push(r);
    }
    let mut v = json!({
        "name": u.arbitrary::<String>()?, "id": u.arbitrary::<String>()?,
        "size_bytes": u.arbitrary::<u64>()?, "replicas": u.arbitrary::<u8>()?,
        "created_at": u.arbitrary::<u64>()?, "placement": placement,
    });
    if u.arbitrary()? {
        v["attachment"] =
            json!({ "node": u.arbitrary::<String>()?, "epoch": u.arbitrary::<u64>()? });
    }
    if u.arbitrary()? {
        v["epoch"] = json!(u.arbitrary::<u64>()?);
    }
    Ok(serde_json::to_vec(&v).expect("JSON encodes"))
}

/// A gateway-shaped answer built from the input: it decodes to the JSON it was built from,
/// and the keys in it to the keys it was built from when they are well formed.
fn built(u: &mut Unstructured<'_>) -> Result<()> {
    let mut answer = Map::new();
    let revision = u.arbitrary::<i64>()?;
    let (rev, _) = int(u, revision)?;
    answer.insert(
        "header".into(),
        json!({"cluster_id": "14841639068965178418", "member_id": "10276657743932975437",
               "revision": rev, "raft_term": "2"}),
    );
    let mut kvs = Vec::new();
    let mut expected = Some(Vec::new());
    for _ in 0..u.int_in_range(0..=4)? {
        let key = u.arbitrary::<String>()?;
        let value = if u.ratio(1, 3)? {
            volume_record(u)?
        } else {
            u.arbitrary::<Vec<u8>>()?
        };
        let mod_revision = u.int_in_range(1..=i64::MAX)?;
        let lease = if u.arbitrary()? {
            u.arbitrary::<i64>()?
        } else {
            0
        };
        let mut kv = Map::new();
        let mut ok = true;
        for (field, (v, good)) in [
            ("key", b64(u, key.as_bytes())?),
            ("value", b64(u, &value)?),
            ("mod_revision", int(u, mod_revision)?),
            ("lease", int(u, lease)?),
            ("create_revision", int(u, 1)?),
        ] {
            ok &= good || field == "create_revision";
            if !v.is_null() {
                kv.insert(field.into(), v);
            }
        }
        kvs.push(Value::Object(kv));
        if !ok {
            expected = None;
        }
        if let Some(e) = &mut expected {
            e.push(Kv {
                key,
                value,
                mod_revision: mod_revision as u64,
                lease: (lease != 0).then_some(lease),
            });
        }
    }
    if !kvs.is_empty() || u.arbitrary()? {
        answer.insert("count".into(), json!(kvs.len().to_string()));
        answer.insert("kvs".into(), Value::Array(kvs));
    }
    if u.arbitrary()? {
        let succeeded = if u.ratio(7, 8)? {
            json!(u.arbitrary::<bool>()?)
        } else {
            json!(u.arbitrary::<String>()?)
        };
        answer.insert("succeeded".into(), succeeded);
    }
    let id = u.arbitrary()?;
    let (id, _) = int(u, id)?;
    let ttl = u.int_in_range(-1..=3600)?;
    let (ttl, _) = int(u, ttl)?;
    match u.int_in_range(0..=3)? {
        0 => {
            answer.insert("ID".into(), id);
            answer.insert("TTL".into(), ttl);
        }
        1 => {
            answer.insert("result".into(), json!({"ID": id, "TTL": ttl}));
        }
        2 => {
            answer.insert("error".into(), json!(u.arbitrary::<String>()?));
        }
        _ => {}
    }

    let value = Value::Object(answer);
    let bytes = serde_json::to_vec(&value).expect("JSON encodes");
    assert_eq!(answer::body(200, &bytes).as_ref(), Ok(&value));
    let kvs = decoders(&value);
    if let Some(expected) = expected {
        assert_eq!(kvs, Some(expected));
    }

    // An error body: etcd's `{"error", "code", "message"}`.
    let message = if u.ratio(1, 4)? {
        format!(
            "etcdserver: requested lease not found{}",
            u.arbitrary::<String>()?
        )
    } else {
        u.arbitrary::<String>()?
    };
    let code = *u.choose(&[3_i64, 4, 5, 9, 14, 13])?;
    let status = *u.choose(&[400_u16, 404, 408, 500, 503])?;
    let body = json!({"error": message, "code": code, "message": message}).to_string();
    match answer::body(status, body.as_bytes()) {
        Err(AnswerError::LeaseExpired) => assert!(message.contains("requested lease not found")),
        Err(AnswerError::Retry(m)) => assert!(m == message && (code == 4 || code == 14)),
        Err(AnswerError::Rejected(m)) => assert!(m == message && code != 4 && code != 14),
        other => panic!("an error body decoded as {other:?}"),
    }
    Ok(())
}
