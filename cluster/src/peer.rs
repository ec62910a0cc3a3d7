//! Control requests to peers over the replica protocol: create, grow and delete a replica;
//! clone, take and delete a snapshot (`ask`).

use ::api::{ControlError, ErrorKind};
use replication::remote::{RemoteOptions, ReplicaClient};
use volume::device::{DeviceError, DeviceErrorKind};

fn unavailable(addr: &str, what: &str, e: &DeviceError) -> ControlError {
    ControlError::new(
        ErrorKind::Unavailable,
        format!("cannot {what} on the replica server at {addr}: {e}"),
    )
}

async fn client(addr: &str, opts: &RemoteOptions) -> Result<ReplicaClient, ControlError> {
    let sock = addr.parse().map_err(|e| {
        ControlError::new(
            ErrorKind::Internal,
            format!("bad replica server address {addr}: {e}"),
        )
    })?;
    ReplicaClient::connect(sock, opts)
        .await
        .map_err(|e| unavailable(addr, "connect", &e))
}

/// Create the replica `volume` of `size` bytes on the node at `addr` (idempotent).
///
/// # Errors
/// The peer cannot be reached or refuses.
pub async fn create(
    addr: &str,
    volume: &str,
    size: u64,
    opts: &RemoteOptions,
) -> Result<(), ControlError> {
    client(addr, opts)
        .await?
        .create(volume, size)
        .await
        .map_err(|e| unavailable(addr, "create a replica", &e))
}

/// Grow the replica `volume` on the node at `addr` to at least `size` bytes (idempotent), or
/// with `dry_run` only check that its pool device can hold them.
///
/// # Errors
/// `ResourceExhausted` when its pool device is too small, `NotFound` when the node has no
/// such replica, `Unavailable` when it cannot be reached or fails.
pub async fn resize(
    addr: &str,
    volume: &str,
    size: u64,
    dry_run: bool,
    opts: &RemoteOptions,
) -> Result<(), ControlError> {
    client(addr, opts)
        .await?
        .resize(volume, size, dry_run)
        .await
        .map_err(|e| match e.kind {
            DeviceErrorKind::NoSpace => {
                ControlError::new(ErrorKind::ResourceExhausted, e.message.clone())
            }
            // The server's "no such replica".
            DeviceErrorKind::Closed => ControlError::new(ErrorKind::NotFound, e.message.clone()),
            _ => unavailable(addr, "grow a replica", &e),
        })
}

/// Send the node at `addr` a control request answered by `Ok` (a snapshot's clone, deletion
/// or taking); its refusal comes back as the control error it was.
///
/// # Errors
/// The peer cannot be reached or refuses.
pub async fn ask(
    addr: &str,
    req: replication::wire::Request,
    opts: &RemoteOptions,
) -> Result<(), ControlError> {
    client(addr, opts).await?.ask(req).await
}

/// Delete the replica `volume` on the node at `addr` (idempotent).
///
/// # Errors
/// The peer cannot be reached or refuses.
pub async fn delete(addr: &str, volume: &str, opts: &RemoteOptions) -> Result<(), ControlError> {
    client(addr, opts)
        .await?
        .delete(volume)
        .await
        .map_err(|e| unavailable(addr, "delete a replica", &e))
}

/// What the store lets peers of this node (`me`) do over TLS: connect if registered (a
/// node's record lives while its lease does), register the attachment recorded in the
/// volume's record, delete a replica the record no longer places here, create or grow one,
/// clone a snapshot, take or delete one, as its fresh intent says. A store that cannot be
/// read answers no.
#[derive(Debug, Clone)]
pub struct StoreMembers {
    /// The store.
    pub store: crate::store::Store,
    /// This node's ID.
    pub me: String,
}

impl StoreMembers {
    /// The record of `volume`: `Ok(None)` if there is none, `Err` if the store cannot say.
    async fn volume(&self, volume: &str) -> Result<Option<crate::model::VolumeRecord>, String> {
        match self.store.get(&crate::model::volume_key(volume)).await {
            Ok(None) => Ok(None),
            Ok(Some(kv)) => crate::control::decode_volume(&kv)
                .map(Some)
                .map_err(|e| e.full_message()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl replication::tls::Members for StoreMembers {
    fn is_node<'a>(&'a self, name: &'a str) -> replication::tls::Answer<'a> {
        Box::pin(async move {
            match self.store.get(&crate::model::node_key(name)).await {
                Ok(found) => found.is_some(),
                Err(e) => {
                    tracing::warn!(node = name, error = %e, "cannot check a connecting node against the store; refusing it");
                    false
                }
            }
        })
    }

    fn may_register<'a>(
        &'a self,
        peer: &'a str,
        volume: &'a str,
        epoch: u64,
    ) -> replication::tls::Answer<'a> {
        Box::pin(async move {
            match self.volume(volume).await {
                Ok(rec) => rec
                    .and_then(|r| r.attachment)
                    .is_some_and(|a| a.node == peer && a.epoch == epoch),
                Err(e) => {
                    tracing::warn!(volume, node = peer, error = %e, "cannot check a registration against the store; refusing it");
                    false
                }
            }
        })
    }

    fn may_delete<'a>(&'a self, volume: &'a str) -> replication::tls::Answer<'a> {
        Box::pin(async move {
            match self.volume(volume).await {
                Ok(rec) => rec.is_none_or(|r| r.placement.iter().all(|p| p.node != self.me)),
                Err(e) => {
                    tracing::warn!(volume, error = %e, "cannot check a replica deletion against the store; refusing it");
                    false
                }
            }
        })
    }

    fn may_change<'a>(
        &'a self,
        peer: &'a str,
        volume: &'a str,
        change: replication::tls::Change,
        size: u64,
    ) -> replication::tls::Answer<'a> {
        Box::pin(async move {
            let key = crate::model::change_intent_key(change, volume, &self.me);
            let intent = match self
                .store
                .get_json::<crate::model::IntentRecord>(&key)
                .await
            {
                Ok(found) => found.map(|v| v.value),
                Err(e) => {
                    tracing::warn!(volume, node = peer, error = %e, "cannot check a replica change against the store; refusing it");
                    return false;
                }
            };
            let now = crate::control::now_secs();
            intent.is_some_and(|i| {
                i.by == peer
                    && i.change == change
                    && i.size_bytes == size
                    && now.abs_diff(i.at) <= crate::model::IntentRecord::TTL.as_secs()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use replication::tls::{Change, Members};

    use super::StoreMembers;
    use crate::model::{intent_key, IntentRecord};

    #[tokio::test]
    async fn a_change_is_allowed_only_as_a_fresh_intent_of_that_node_says() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::embedded(&dir.path().join("store.json")).unwrap();
        let members = StoreMembers {
            store: store.clone(),
            me: "node-b".into(),
        };
        let now = crate::control::now_secs();
        let intent = |at| IntentRecord {
            by: "node-a".into(),
            change: Change::Create,
            size_bytes: 4096,
            at,
        };
        let key = intent_key("v", "node-b");
        assert!(
            !members
                .may_change("node-a", "v", Change::Create, 4096)
                .await
        );
        store.put_json(&key, &intent(now), None).await.unwrap();
        assert!(
            members
                .may_change("node-a", "v", Change::Create, 4096)
                .await
        );
        // Not another node, change, size or volume; nor an intent about another node.
        assert!(
            !members
                .may_change("node-c", "v", Change::Create, 4096)
                .await
        );
        assert!(
            !members
                .may_change("node-a", "v", Change::Resize, 4096)
                .await
        );
        assert!(
            !members
                .may_change("node-a", "v", Change::Create, 8192)
                .await
        );
        assert!(
            !members
                .may_change("node-a", "w", Change::Create, 4096)
                .await
        );
        let elsewhere = StoreMembers {
            store: store.clone(),
            me: "node-c".into(),
        };
        assert!(
            !elsewhere
                .may_change("node-a", "v", Change::Create, 4096)
                .await
        );
        // A snapshot's intents have keys of their own: one about volume "v" authorizes no
        // change to snapshot "v", and the other way round.
        for change in [Change::TakeSnapshot, Change::DeleteSnapshot] {
            let snapshot = IntentRecord {
                change,
                size_bytes: 0,
                ..intent(now)
            };
            store
                .put_json(
                    &key,
                    &IntentRecord {
                        change,
                        ..snapshot.clone()
                    },
                    None,
                )
                .await
                .unwrap();
            assert!(!members.may_change("node-a", "v", change, 0).await);
            let snapshot_key = crate::model::change_intent_key(change, "v", "node-b");
            assert_ne!(snapshot_key, key);
            store
                .put_json(&snapshot_key, &snapshot, None)
                .await
                .unwrap();
            assert!(members.may_change("node-a", "v", change, 0).await);
            assert!(!members.may_change("node-c", "v", change, 0).await);
            store.delete(&snapshot_key).await.unwrap();
        }
        store.put_json(&key, &intent(now), None).await.unwrap();
        // A stale intent (its asker died before deleting it) authorizes nothing.
        let stale = now - IntentRecord::TTL.as_secs() - 1;
        store.put_json(&key, &intent(stale), None).await.unwrap();
        assert!(
            !members
                .may_change("node-a", "v", Change::Create, 4096)
                .await
        );
    }
}
