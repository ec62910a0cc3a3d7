//! Control requests to peers over the replica protocol: create and delete a replica.

use std::time::Duration;

use replication::remote::{RemoteOptions, ReplicaClient};
use volume::api::{ControlError, ErrorKind};
use volume::device::DeviceError;

fn unavailable(addr: &str, what: &str, e: &DeviceError) -> ControlError {
    ControlError::new(
        ErrorKind::Unavailable,
        format!("cannot {what} on the replica server at {addr}: {e}"),
    )
}

async fn client(addr: &str, timeout: Duration) -> Result<ReplicaClient, ControlError> {
    let sock = addr.parse().map_err(|e| {
        ControlError::new(
            ErrorKind::Internal,
            format!("bad replica server address {addr}: {e}"),
        )
    })?;
    let opts = RemoteOptions {
        timeout,
        ..RemoteOptions::default()
    };
    ReplicaClient::connect(sock, &opts)
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
    timeout: Duration,
) -> Result<(), ControlError> {
    client(addr, timeout)
        .await?
        .create(volume, size)
        .await
        .map_err(|e| unavailable(addr, "create a replica", &e))
}

/// Delete the replica `volume` on the node at `addr` (idempotent).
///
/// # Errors
/// The peer cannot be reached or refuses.
pub async fn delete(addr: &str, volume: &str, timeout: Duration) -> Result<(), ControlError> {
    client(addr, timeout)
        .await?
        .delete(volume)
        .await
        .map_err(|e| unavailable(addr, "delete a replica", &e))
}
