//! The client commands of the CLI: `volume …`, `pool list` and `status`.
//!
//! Each command validates what it can locally (names, sizes) so that a typo gets a precise
//! message without a round trip, calls the local API, and renders the answer: aligned text by
//! default, or exactly the API's JSON with `-o json` (lists as JSON arrays).
//!
//! Invariant: commands return their whole output as a string and print nothing themselves,
//! so that `main` alone decides how output and errors reach the terminal.

use std::fmt::Write;

use ::api::{format_size, PoolStatus, SnapshotStatus, VolumeName, VolumeSource, VolumeStatus};
use hyper::StatusCode;
use serde::Serialize;

use ::api::byte_size::ByteSize;
use ::api::http::{
    AttachRequest, CreateSnapshotRequest, CreateVolumeRequest, DetachRequest, ExportInfo,
    ExportRequest, NodeList, NodeStatus, PoolList, ResizeVolumeRequest, RevertVolumeRequest,
    SnapshotList, VolumeList,
};
use ::api::Attachment;

use crate::args::{NodeCommand, OutputFormat, PoolCommand, SnapshotCommand, VolumeCommand};
use crate::client::{ApiClient, ClientError};
use crate::table::{duration, key_values, utc_timestamp, Table};

/// The outcome of a successful command: what to print on standard output.
pub type Output = String;

/// Run a `ballast volume …` command.
///
/// # Errors
/// A local validation failure, the daemon being unreachable, or the daemon's error answer.
pub async fn volume(client: &ApiClient, command: VolumeCommand) -> Result<Output, ClientError> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            from_snapshot,
            from_volume,
            replicas,
            output,
        } => {
            let name = validate_name(&name)?;
            let size = size.as_deref().map(validate_size).transpose()?;
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(VolumeSource::Snapshot(validate_name(&s)?)),
                (None, Some(v)) => Some(VolumeSource::Volume(validate_name(&v)?)),
                (None, None) => None,
            };
            if size.is_none() && source.is_none() {
                return Err(ClientError::InvalidArgument(
                    "give the volume a --size, or make it a copy with --from-snapshot or --from-volume".to_owned(),
                ));
            }
            let request = CreateVolumeRequest {
                name: name.to_string(),
                size,
                replicas,
                source,
            };
            let (status, volume): (_, VolumeStatus) = client.post("/v1/volumes", &request).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&volume),
                OutputFormat::Table if status == StatusCode::CREATED => {
                    format!("volume {} created: {}\n", volume.name, summary(&volume))
                }
                OutputFormat::Table => {
                    format!(
                        "volume {} already exists with this spec: {}\n",
                        volume.name,
                        summary(&volume)
                    )
                }
            })
        }
        VolumeCommand::List(output) => {
            let list: VolumeList = client.get("/v1/volumes").await?;
            Ok(match output.format {
                OutputFormat::Json => json(&list.volumes),
                OutputFormat::Table => volume_table(&list.volumes),
            })
        }
        VolumeCommand::Inspect { name, output, .. } => {
            let name = validate_name(&name)?;
            let volume: VolumeStatus = client.get(&volume_path(&name)).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&volume),
                OutputFormat::Table => volume_details(&volume),
            })
        }
        VolumeCommand::Delete { name } => {
            let name = validate_name(&name)?;
            client.delete(&volume_path(&name)).await?;
            Ok(format!("volume {name} deleted\n"))
        }
        VolumeCommand::Revert {
            name,
            snapshot,
            output,
        } => {
            let name = validate_name(&name)?;
            let snapshot = validate_name(&snapshot)?;
            let path = format!("{}/revert", volume_path(&name));
            let request = RevertVolumeRequest {
                snapshot: snapshot.to_string(),
            };
            let (_, volume): (_, VolumeStatus) = client.post(&path, &request).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&volume),
                OutputFormat::Table => {
                    format!("volume {} reverted to snapshot {snapshot}\n", volume.name)
                }
            })
        }
        VolumeCommand::Resize { name, size, output } => {
            let name = validate_name(&name)?;
            let size = validate_size(&size)?;
            let path = format!("{}/resize", volume_path(&name));
            let (_, volume): (_, VolumeStatus) =
                client.post(&path, &ResizeVolumeRequest { size }).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&volume),
                OutputFormat::Table => {
                    format!(
                        "volume {} resized to {}\n",
                        volume.name,
                        format_size(volume.size_bytes)
                    )
                }
            })
        }
        VolumeCommand::Export {
            name,
            tcp,
            insecure_plaintext,
            output,
        } => {
            let name = validate_name(&name)?;
            let path = format!("{}/export", volume_path(&name));
            let request = ExportRequest {
                tcp,
                insecure_plaintext,
            };
            let (_, export): (_, ExportInfo) = client.post(&path, &request).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&export),
                OutputFormat::Table => format!("{}\n", export.uri),
            })
        }
        VolumeCommand::Attach {
            name,
            force,
            output,
        } => {
            let name = validate_name(&name)?;
            let path = format!("{}/attach", volume_path(&name));
            let (_, att): (_, Attachment) = client.post(&path, &AttachRequest { force }).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&att),
                OutputFormat::Table => format!("{}\n", att.path),
            })
        }
        VolumeCommand::Detach {
            name,
            force,
            output,
        } => {
            let name = validate_name(&name)?;
            let path = format!("{}/detach", volume_path(&name));
            let (_, att): (_, Attachment) = client.post(&path, &DetachRequest { force }).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&att),
                OutputFormat::Table => format!("volume {name} detached\n"),
            })
        }
        VolumeCommand::Mount(args) => crate::mount::mount(client, args).await,
        VolumeCommand::Unmount(args) => crate::mount::unmount(client, args).await,
    }
}

/// Run a `ballast snapshot …` command.
///
/// # Errors
/// A local validation failure, the daemon being unreachable, or the daemon's error answer.
pub async fn snapshot(client: &ApiClient, command: SnapshotCommand) -> Result<Output, ClientError> {
    match command {
        SnapshotCommand::Create {
            volume,
            name,
            output,
        } => {
            let volume = validate_name(&volume)?;
            let name = validate_name(&name)?;
            let request = CreateSnapshotRequest {
                name: name.to_string(),
                volume: volume.to_string(),
            };
            let (status, snap): (_, SnapshotStatus) =
                client.post("/v1/snapshots", &request).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&snap),
                OutputFormat::Table if status == StatusCode::CREATED => {
                    format!("snapshot {} of volume {volume} created\n", snap.name)
                }
                OutputFormat::Table => {
                    format!("snapshot {} of volume {volume} already exists\n", snap.name)
                }
            })
        }
        SnapshotCommand::List(output) => {
            let list: SnapshotList = client.get("/v1/snapshots").await?;
            Ok(match output.format {
                OutputFormat::Json => json(&list.snapshots),
                OutputFormat::Table => snapshot_table(&list.snapshots),
            })
        }
        SnapshotCommand::Inspect { name, output } => {
            let name = validate_name(&name)?;
            let snap: SnapshotStatus = client.get(&snapshot_path(&name)).await?;
            Ok(match output.format {
                OutputFormat::Json => json(&snap),
                OutputFormat::Table => snapshot_details(&snap),
            })
        }
        SnapshotCommand::Delete { name } => {
            let name = validate_name(&name)?;
            client.delete(&snapshot_path(&name)).await?;
            Ok(format!("snapshot {name} deleted\n"))
        }
    }
}

fn snapshot_path(name: &VolumeName) -> String {
    format!("/v1/snapshots/{name}")
}

fn source_cell(s: &SnapshotStatus) -> String {
    match (&s.source_volume, s.source_exists) {
        (Some(v), true) => v.to_string(),
        (Some(v), false) => format!("{v} (deleted)"),
        (None, _) => "-".to_owned(),
    }
}

fn snapshot_table(snaps: &[SnapshotStatus]) -> Output {
    if snaps.is_empty() {
        return "no snapshots\n".to_owned();
    }
    let mut t = Table::new(["NAME", "VOLUME", "SIZE", "EXCLUSIVE", "SHARED", "CREATED"]);
    for s in snaps {
        t.row([
            s.name.to_string(),
            source_cell(s),
            format_size(s.size_bytes),
            format_size(s.exclusive_bytes),
            format_size(s.shared_bytes),
            utc_timestamp(s.created_at),
        ]);
    }
    t.render()
}

fn snapshot_details(s: &SnapshotStatus) -> Output {
    key_values(&[
        ("name", s.name.to_string()),
        ("volume", source_cell(s)),
        (
            "size",
            format!("{} ({} bytes)", format_size(s.size_bytes), s.size_bytes),
        ),
        (
            "exclusive",
            format!("{} (freed by deleting it)", format_size(s.exclusive_bytes)),
        ),
        (
            "shared",
            format!(
                "{} (with its volume and copies)",
                format_size(s.shared_bytes)
            ),
        ),
        ("replicas", s.replicas.to_string()),
        ("ready", s.ready_to_use.to_string()),
        ("created", utc_timestamp(s.created_at)),
    ])
}

/// Run a `ballast pool …` command.
///
/// # Errors
/// The daemon being unreachable, or its error answer.
pub async fn pool(client: &ApiClient, command: PoolCommand) -> Result<Output, ClientError> {
    match command {
        PoolCommand::List(output) => {
            let list: PoolList = client.get("/v1/pools").await?;
            Ok(match output.format {
                OutputFormat::Json => json(&list.pools),
                OutputFormat::Table => pool_table(&list.pools),
            })
        }
    }
}

/// Run `ballast node …`.
///
/// # Errors
/// The daemon being unreachable, or its error answer.
pub async fn node(client: &ApiClient, command: NodeCommand) -> Result<Output, ClientError> {
    match command {
        NodeCommand::List(output) => {
            let list: NodeList = client.get("/v1/nodes").await?;
            Ok(match output.format {
                OutputFormat::Json => json(&list.nodes),
                OutputFormat::Table => {
                    let mut t =
                        Table::new(["NODE", "STATE", "ZONE", "CAPACITY", "FREE", "REPLICA-ADDR"]);
                    for n in &list.nodes {
                        t.row([
                            n.id.clone(),
                            "online".to_owned(),
                            n.zone.clone().unwrap_or_else(|| "-".into()),
                            format_size(n.capacity_bytes),
                            format_size(n.free_bytes),
                            if n.replica_addr.is_empty() {
                                "-".into()
                            } else {
                                n.replica_addr.clone()
                            },
                        ]);
                    }
                    t.render()
                }
            })
        }
    }
}

/// Run `ballast status`.
///
/// # Errors
/// The daemon being unreachable, or its error answer.
pub async fn status(client: &ApiClient, format: OutputFormat) -> Result<Output, ClientError> {
    let status: NodeStatus = client.get("/v1/status").await?;
    Ok(match format {
        OutputFormat::Json => json(&status),
        OutputFormat::Table => {
            let p = &status.pools;
            key_values(&[
                ("node", status.node_id.clone()),
                ("version", status.version.clone()),
                ("engine", status.engine.clone()),
                ("uptime", duration(status.uptime_seconds)),
                ("api socket", client.socket().display().to_string()),
                ("pool devices", p.devices.to_string()),
                ("capacity", format_size(p.capacity_bytes)),
                (
                    "allocated",
                    format!(
                        "{} ({})",
                        format_size(p.allocated_bytes),
                        percent(p.allocated_bytes, p.capacity_bytes)
                    ),
                ),
                ("free", format_size(p.free_bytes)),
                ("checksum errors", p.checksum_errors.to_string()),
                ("volumes", status.volumes.to_string()),
            ])
        }
    })
}

/// A hint to print under the error message, where one helps.
pub fn hint(err: &ClientError) -> Option<String> {
    match err {
        ClientError::NotRunning { .. } => Some(
            "start it with `ballast daemon` (or `sudo systemctl start ballast`), or point the CLI \
             at its socket with --api-socket or BALLAST_API_SOCKET"
                .to_owned(),
        ),
        ClientError::PermissionDenied { .. } => Some(
            "the API socket is only accessible to the daemon's user (mode 0600); run the command \
             as that user, e.g. with sudo"
                .to_owned(),
        ),
        ClientError::Api { code, .. } if code == "not_found" => {
            Some("`ballast volume list` shows the volumes that exist".to_owned())
        }
        _ => None,
    }
}

fn validate_name(name: &str) -> Result<VolumeName, ClientError> {
    VolumeName::new(name).map_err(|e| ClientError::InvalidArgument(e.message().to_owned()))
}

fn validate_size(size: &str) -> Result<ByteSize, ClientError> {
    ByteSize::parse(size).map_err(|e| ClientError::InvalidArgument(e.message().to_owned()))
}

fn volume_path(name: &VolumeName) -> String {
    // A valid name is a DNS label, so it needs no escaping in a URL path.
    format!("/v1/volumes/{name}")
}

fn json<T: Serialize + ?Sized>(value: &T) -> Output {
    let mut out = serde_json::to_string_pretty(value).expect("API types always serialize");
    out.push('\n');
    out
}

fn summary(v: &VolumeStatus) -> String {
    let replicas = if v.replicas == 1 {
        "1 replica".to_owned()
    } else {
        format!("{} replicas", v.replicas)
    };
    format!("{}, {replicas}, id {}", format_size(v.size_bytes), v.id)
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_owned();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

fn volume_table(volumes: &[VolumeStatus]) -> Output {
    if volumes.is_empty() {
        return "no volumes\n".to_owned();
    }
    let mut t = Table::new(["NAME", "SIZE", "ALLOCATED", "REPLICAS", "STATE", "ID"]);
    for v in volumes {
        t.row([
            v.name.to_string(),
            format_size(v.size_bytes),
            format_size(v.allocated_bytes),
            v.replicas.to_string(),
            v.state.to_string(),
            v.id.clone(),
        ]);
    }
    t.render()
}

/// Follow `name` until every replica is healthy: each second, `emit` gets a frame (a screen
/// redraw on a terminal, a line per change otherwise, a JSON object per line with
/// `json`). Returns the last frame's summary line.
///
/// # Errors
/// The name is invalid or the daemon answers with an error.
pub async fn watch_volume(
    client: &ApiClient,
    name: &str,
    format: OutputFormat,
    tty: bool,
    emit: &mut dyn FnMut(&str),
) -> Result<Output, ClientError> {
    let name = validate_name(name)?;
    let mut last = String::new();
    loop {
        let v: VolumeStatus = client.get(&volume_path(&name)).await?;
        let done = v.replica_status.iter().all(|r| r.state == "healthy");
        let frame = match format {
            OutputFormat::Json => json(&v),
            OutputFormat::Table if tty => format!("\x1b[H\x1b[2J{}", volume_details(&v)),
            OutputFormat::Table => progress_lines(&v),
        };
        if frame != last {
            emit(&frame);
            last = frame;
        }
        if done {
            return Ok(match format {
                OutputFormat::Json => String::new(),
                OutputFormat::Table => format!("volume {name}: every replica is healthy\n"),
            });
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A bar of `width` characters, `done` of `total` filled.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as f64 / total as f64) * width as f64).round() as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// One line per replica: its state, and a progress bar while it is rebuilt.
fn progress_lines(v: &VolumeStatus) -> Output {
    let mut out = String::new();
    for r in &v.replica_status {
        let _ = write!(out, "{} {}: {}", v.name, r.node_id, r.state);
        if let Some(b) = &r.rebuild {
            let _ = write!(
                out,
                " {} {} / {} {}",
                bar(b.done_bytes, b.total_bytes, 30),
                format_size(b.done_bytes),
                format_size(b.total_bytes),
                percent(b.done_bytes, b.total_bytes),
            );
            if let Some(eta) = b.eta_seconds {
                let _ = write!(out, " eta {}", duration(eta));
            }
        }
        out.push('\n');
    }
    out
}

/// The rebuild column of a replica: progress while it runs, else the last one's outcome.
fn rebuild_cell(r: &::api::ReplicaStatus) -> String {
    if let Some(b) = &r.rebuild {
        let eta = b
            .eta_seconds
            .map(|e| format!(" eta {}", duration(e)))
            .unwrap_or_default();
        return format!(
            "{} {} {}{eta}",
            b.kind,
            bar(b.done_bytes, b.total_bytes, 20),
            percent(b.done_bytes, b.total_bytes)
        );
    }
    match &r.last_rebuild {
        Some(b) => format!(
            "last: {} {} in {:.1}s",
            b.kind,
            format_size(b.done_bytes),
            b.elapsed_ms as f64 / 1000.0
        ),
        None => "-".to_owned(),
    }
}

fn volume_details(v: &VolumeStatus) -> Output {
    let mut out = key_values(&[
        ("name", v.name.to_string()),
        ("id", v.id.clone()),
        (
            "size",
            format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes),
        ),
        (
            "allocated",
            format!(
                "{} ({})",
                format_size(v.allocated_bytes),
                percent(v.allocated_bytes, v.size_bytes)
            ),
        ),
        (
            "shared",
            format!("{} (read from its snapshots)", format_size(v.shared_bytes)),
        ),
        ("replicas", v.replicas.to_string()),
        ("state", v.state.to_string()),
        ("created", utc_timestamp(v.created_at)),
    ]);
    if !v.replica_status.is_empty() {
        let mut t = Table::new(["NODE", "POOL", "ALLOCATED", "STATE", "REBUILD"]);
        for r in &v.replica_status {
            t.row([
                r.node_id.clone(),
                r.pool_id.clone(),
                format_size(r.allocated_bytes),
                r.state.clone(),
                rebuild_cell(r),
            ]);
        }
        out.push_str("\nreplicas:\n");
        for line in t.render().lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn pool_table(pools: &[PoolStatus]) -> Output {
    if pools.is_empty() {
        return "no pools\n".to_owned();
    }
    let mut t = Table::new([
        "PATH",
        "CAPACITY",
        "ALLOCATED",
        "FREE",
        "USED",
        "VOLUMES",
        "CHECKSUM-ERRORS",
        "STATE",
        "ID",
    ]);
    for p in pools {
        t.row([
            p.path.clone(),
            format_size(p.capacity_bytes),
            format_size(p.allocated_bytes),
            format_size(p.free_bytes),
            percent(p.allocated_bytes, p.capacity_bytes),
            p.volumes.to_string(),
            p.checksum_errors.to_string(),
            p.state.clone(),
            p.id.clone(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use ::api::{RebuildStatus, ReplicaStatus, VolumeState};

    use super::*;

    fn replica(node: &str, state: &str, rebuild: Option<RebuildStatus>) -> ReplicaStatus {
        ReplicaStatus {
            node_id: node.into(),
            pool_id: String::new(),
            allocated_bytes: 0,
            state: state.into(),
            rebuild,
            last_rebuild: None,
        }
    }

    #[test]
    fn bars_fill_in_proportion_and_never_overflow() {
        assert_eq!(bar(0, 100, 10), "[----------]");
        assert_eq!(bar(50, 100, 10), "[#####-----]");
        assert_eq!(bar(150, 100, 4), "[####]");
        assert_eq!(bar(0, 0, 4), "[####]", "nothing to copy is done");
    }

    #[test]
    fn a_rebuilding_replica_shows_progress_and_eta() {
        let v = VolumeStatus {
            id: "id".into(),
            name: VolumeName::new("db").unwrap(),
            size_bytes: 1 << 30,
            replicas: 2,
            allocated_bytes: 0,
            shared_bytes: 0,
            state: VolumeState::Degraded,
            created_at: 0,
            replica_status: vec![
                replica("a", "healthy", None),
                replica(
                    "b",
                    "rebuilding",
                    Some(RebuildStatus {
                        kind: "delta".into(),
                        total_bytes: 8 << 20,
                        done_bytes: 2 << 20,
                        eta_seconds: Some(3),
                        elapsed_ms: 1000,
                    }),
                ),
            ],
        };
        let lines = progress_lines(&v);
        assert!(lines.starts_with("db a: healthy\n"), "{lines}");
        assert!(lines.contains("db b: rebuilding [########---"), "{lines}");
        assert!(lines.contains("2 MiB / 8 MiB 25.0%"), "{lines}");
        assert!(lines.contains("eta 3s"), "{lines}");
        assert!(
            volume_details(&v).contains("delta [#####"),
            "{}",
            volume_details(&v)
        );
    }
}
