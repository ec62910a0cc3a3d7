//! The API of Ballast: what every adapter and client shares, and nothing of the engine.
//!
//! Volume names, specs, statuses, errors and their kinds, the [`VolumeControl`] and
//! [`NodeControl`] traits, size parsing, validated [`ReplicaCount`] and
//! [`byte_size::ByteSize`].
//! No engine and no I/O: the CLI, CSI and Docker crates depend on this alone.
//!
//! Every adapter (the local HTTP API and CLI, the CSI driver, the Docker plugin) speaks to the
//! storage through [`VolumeControl`], so the protocols cannot drift apart in meaning. Adapters
//! map [`ControlError::kind`] to their own wire codes in exactly one place each.
//!
//! Invariants:
//! - A [`VolumeName`] is a lowercase DNS label (1–63 chars of `a-z`, `0-9`, `-`, starting and
//!   ending with a letter or digit). It is the volume's identity across the cluster.
//! - Volume sizes are whole multiples of [`SIZE_GRANULARITY`]; requests are rounded up.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod byte_size;
pub mod http;

/// `err` followed by each of its sources, joined with `: `, for one-line messages.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        // Some errors repeat their source's message; don't print it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// The logical block size of every Ballast volume, in bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Volume sizes are rounded up to this many bytes (one extent).
pub const SIZE_GRANULARITY: u64 = 1 << 20;

/// The largest volume size we accept (64 TiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// The largest replica count a volume may ask for.
pub const MAX_REPLICAS: u8 = 5;

/// The stable kind of a control-plane error. Adapters match on this, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed: a bad name, size or option.
    InvalidArgument,
    /// The named volume or pool does not exist.
    NotFound,
    /// A volume with this name exists with a different spec.
    Conflict,
    /// No pool has room for the request.
    ResourceExhausted,
    /// The request is valid but the system is not in a state to honour it.
    FailedPrecondition,
    /// The request names a feature this build does not have yet.
    Unimplemented,
    /// The service is shutting down or not ready yet.
    Unavailable,
    /// Something failed inside the engine (an I/O error, corrupt metadata).
    Internal,
}

impl ErrorKind {
    /// The stable code string used on the wire (`"not_found"`, …).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Unimplemented => "unimplemented",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An error from the control plane: a stable kind, a human message, and an optional source.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ControlError {
    /// A new error of `kind` with a sentence-case `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The stable kind callers match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by every source in the chain, joined with `: `.
    pub fn full_message(&self) -> String {
        let mut out = self.message.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
}

/// A validated volume name: a lowercase DNS label of at most 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

impl VolumeName {
    /// The longest name accepted.
    pub const MAX_LEN: usize = 63;

    /// Validate `name`.
    ///
    /// # Errors
    /// `InvalidArgument` with a message naming the rule that was broken.
    pub fn new(name: &str) -> Result<Self, ControlError> {
        let rule = "names are lowercase DNS labels: 1-63 characters of a-z, 0-9 and '-', \
                    starting and ending with a letter or digit";
        if name.is_empty() {
            return Err(ControlError::invalid(format!(
                "volume name is empty; {rule}"
            )));
        }
        if name.len() > Self::MAX_LEN {
            return Err(ControlError::invalid(format!(
                "volume name is {} characters long; {rule}",
                name.len()
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(ControlError::invalid(format!(
                "volume name {name:?} contains {c:?}; {rule}"
            )));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(ControlError::invalid(format!(
                "volume name {name:?} starts or ends with '-'; {rule}"
            )));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VolumeName {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for VolumeName {
    type Error = ControlError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<VolumeName> for String {
    fn from(n: VolumeName) -> String {
        n.0
    }
}

/// Parse a human size such as `10GiB`, `500MiB`, `1G`, `4096` or `1.5TiB` into bytes.
///
/// Binary suffixes (`KiB`, `MiB`, `GiB`, `TiB`, `PiB`, and `Ki`, `Mi`, …) are powers of 1024;
/// decimal suffixes (`K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB`, `P`/`PB`) are powers of 1000, as
/// Kubernetes quantities are. Case is ignored for the unit, and a trailing `B` is optional.
///
/// # Errors
/// `InvalidArgument` naming the bad input and showing valid examples.
pub fn parse_size(input: &str) -> Result<u64, ControlError> {
    let bad = |why: &str| {
        ControlError::invalid(format!(
            "invalid size {input:?}: {why}; use a number with an optional unit, e.g. 10GiB, 500MiB, 1G"
        ))
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad("it does not start with a number"));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u64.pow(2),
        "g" | "gb" => 1000_u64.pow(3),
        "t" | "tb" => 1000_u64.pow(4),
        "p" | "pb" => 1000_u64.pow(5),
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        "pi" | "pib" => 1 << 50,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
            return Err(bad("malformed number"));
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad("too large"))?
        };
        let digits = frac.len().min(9) as u32;
        let frac_val: u64 = if digits == 0 {
            0
        } else {
            frac[..digits as usize]
                .parse()
                .map_err(|_| bad("malformed number"))?
        };
        let whole = int.checked_mul(mult).ok_or_else(|| bad("too large"))?;
        let part = (u128::from(frac_val) * u128::from(mult)) / 10_u128.pow(digits);
        whole
            .checked_add(part as u64)
            .ok_or_else(|| bad("too large"))?
    } else {
        let n: u64 = num.parse().map_err(|_| bad("too large"))?;
        n.checked_mul(mult).ok_or_else(|| bad("too large"))?
    };
    if bytes == 0 {
        return Err(bad("a size must be greater than zero"));
    }
    Ok(bytes)
}

/// The calendar date (year, month 1-12, day 1-31) `days` days after 1970-01-01, in the
/// proleptic Gregorian calendar (the civil-from-days conversion).
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Format `bytes` for humans with binary units (`1.5 GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

/// Round `bytes` up to the volume size granularity.
///
/// # Errors
/// `InvalidArgument` when the result is zero or above [`MAX_VOLUME_SIZE`].
pub fn round_volume_size(bytes: u64) -> Result<u64, ControlError> {
    if bytes == 0 {
        return Err(ControlError::invalid(
            "volume size must be greater than zero",
        ));
    }
    if bytes > MAX_VOLUME_SIZE {
        return Err(ControlError::invalid(format!(
            "volume size {} is above the maximum of {}",
            format_size(bytes),
            format_size(MAX_VOLUME_SIZE)
        )));
    }
    Ok(bytes.div_ceil(SIZE_GRANULARITY) * SIZE_GRANULARITY)
}

/// What a user asks for when creating a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// The volume's cluster-wide name.
    pub name: VolumeName,
    /// The size in bytes; rounded up to [`SIZE_GRANULARITY`] on create.
    pub size_bytes: u64,
    /// How many synchronous replicas to keep.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
}

fn default_replicas() -> u8 {
    1
}

/// The health of a volume as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VolumeState {
    /// Every replica is healthy.
    Online,
    /// At least one replica is missing or stale, but the volume serves I/O.
    Degraded,
    /// No healthy replica is reachable.
    Faulted,
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeState::Online => "online",
            VolumeState::Degraded => "degraded",
            VolumeState::Faulted => "faulted",
        })
    }
}

/// One replica of a volume as the control plane reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The node that holds the replica.
    pub node_id: String,
    /// The pool (backing device) UUID on that node.
    pub pool_id: String,
    /// Bytes of the pool this replica occupies.
    pub allocated_bytes: u64,
    /// `healthy`, `ejected`, `rebuilding`, …
    pub state: String,
    /// The rebuild in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
    /// The last rebuild that finished, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<RebuildStatus>,
}

/// A replica rebuild's progress (while it runs) or outcome (once finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// `delta` (a returning replica gets what it missed) or `full` (a new replica).
    pub kind: String,
    /// Bytes to copy.
    pub total_bytes: u64,
    /// Bytes copied.
    pub done_bytes: u64,
    /// Estimated seconds left, once there is a rate.
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// Milliseconds since it started (the whole duration once finished).
    pub elapsed_ms: u64,
}

/// What the control plane reports about a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The volume's stable UUID, assigned at create.
    pub id: String,
    /// The volume's name.
    pub name: VolumeName,
    /// The provisioned size in bytes.
    pub size_bytes: u64,
    /// The desired replica count.
    pub replicas: u8,
    /// Bytes of pool space the volume occupies (thin provisioning: written extents only), its
    /// own: not counting what it reads from its snapshots.
    pub allocated_bytes: u64,
    /// Bytes the volume reads from snapshots it is based on, shared with them (copied into
    /// its own at its first write to each 1 MiB extent).
    #[serde(default)]
    pub shared_bytes: u64,
    /// Overall health.
    pub state: VolumeState,
    /// Seconds since the Unix epoch when the volume was created.
    pub created_at: u64,
    /// Each replica's placement and state.
    pub replica_status: Vec<ReplicaStatus>,
}

/// What the control plane reports about a snapshot: a read-only, crash-consistent image of a
/// volume at one instant, taken at a write barrier on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// Its name, which is also its id.
    pub name: VolumeName,
    /// The volume it was taken of (`None` only if no record of its name is left).
    pub source_volume: Option<VolumeName>,
    /// Whether that volume still exists (it may be deleted; the snapshot stays).
    pub source_exists: bool,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// Seconds since the Unix epoch when it was taken.
    pub created_at: u64,
    /// Whether it can be cloned or reverted to (always, once taken).
    pub ready_to_use: bool,
    /// Bytes of pool space only it holds (what deleting it frees), over its replicas.
    pub exclusive_bytes: u64,
    /// Bytes of pool space it shares with its volume and clones, over its replicas.
    pub shared_bytes: u64,
    /// How many replicas of it there are.
    pub replicas: u8,
}

/// What a new volume starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeSource {
    /// A copy of a snapshot: thin, sharing its extents.
    Snapshot(VolumeName),
    /// A copy of a volume as it is now (through a snapshot that is not listed).
    Volume(VolumeName),
}

/// What the control plane reports about a pool (one backing device of a node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The device's UUID.
    pub id: String,
    /// The node-wide pool UUID this device belongs to.
    pub pool_uuid: String,
    /// The node that owns it.
    pub node_id: String,
    /// The backing file or block device.
    pub path: String,
    /// Bytes usable for volume data.
    pub capacity_bytes: u64,
    /// Bytes allocated to volumes.
    pub allocated_bytes: u64,
    /// `capacity_bytes - allocated_bytes`.
    pub free_bytes: u64,
    /// Number of replicas on this device.
    pub volumes: u32,
    /// Checksum mismatches detected on reads since the pool was opened.
    pub checksum_errors: u64,
    /// `online` or a reason it is not.
    pub state: String,
}

/// How strictly a volume's replicas must sit in distinct zones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneSpread {
    /// Distinct zones while there are enough; then shared zones, with a warning.
    #[default]
    Soft,
    /// Distinct zones or no volume (`ResourceExhausted`).
    Hard,
}

impl FromStr for ZoneSpread {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "soft" => Ok(Self::Soft),
            "hard" => Ok(Self::Hard),
            other => Err(ControlError::invalid(format!(
                "invalid zone spread {other:?}: use \"hard\" (replicas in distinct zones or no \
                 volume) or \"soft\" (distinct zones while there are enough)"
            ))),
        }
    }
}

/// Where a new volume's replicas may and should go.
///
/// Hints shape a new volume only: they are not part of its identity, so creating an existing
/// volume again with other hints returns it unchanged. A single-node backend has one place for
/// everything and ignores them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementHints {
    /// Nodes that should hold a replica, best first (e.g. the node that will run the workload,
    /// so its reads stay local).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_nodes: Vec<String>,
    /// When set, replicas go only to these nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_nodes: Option<Vec<String>>,
    /// Whether distinct zones are required or only preferred.
    #[serde(default)]
    pub zone_spread: ZoneSpread,
}

/// A validated replica count: 1 to [`MAX_REPLICAS`]. Every adapter (the local API, CSI
/// parameters, Docker options, the engine and the cluster) checks counts through
/// [`ReplicaCount::new`], so they accept and refuse alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaCount(u8);

impl ReplicaCount {
    /// One replica.
    pub const ONE: Self = Self(1);

    /// `n` if it is between 1 and [`MAX_REPLICAS`].
    ///
    /// # Errors
    /// `InvalidArgument` naming the allowed range.
    pub fn new(n: u64) -> Result<Self, ControlError> {
        if (1..=u64::from(MAX_REPLICAS)).contains(&n) {
            Ok(Self(n as u8))
        } else {
            Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!("replicas must be between 1 and {MAX_REPLICAS}, got {n}"),
            ))
        }
    }

    /// The count.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl FromStr for ReplicaCount {
    type Err = ControlError;

    /// A whole number from 1 to [`MAX_REPLICAS`], as users write it in parameters and options.
    fn from_str(s: &str) -> Result<Self, ControlError> {
        let n = s.trim().parse::<u64>().map_err(|_| {
            ControlError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{s:?} is not a replica count: use a whole number from 1 to {MAX_REPLICAS}"
                ),
            )
        })?;
        Self::new(n)
    }
}

/// The control operations every adapter calls: the local API, CSI and the Docker plugin.
///
/// Operations are idempotent where the protocols need them to be: creating a volume that
/// exists with an identical spec returns it; with a different spec it is a `Conflict`.
pub trait VolumeControl: Send + Sync + 'static {
    /// Create a volume, or return the existing one if the spec is identical.
    fn create_volume(
        &self,
        spec: VolumeSpec,
    ) -> impl Future<Output = Result<VolumeStatus, ControlError>> + Send;

    /// [`VolumeControl::create_volume`], placing a new volume's replicas by `hints`.
    ///
    /// The default ignores the hints: right for a backend whose volumes all live on one node.
    fn create_volume_placed(
        &self,
        spec: VolumeSpec,
        hints: &PlacementHints,
    ) -> impl Future<Output = Result<VolumeStatus, ControlError>> + Send {
        let _ = hints;
        self.create_volume(spec)
    }

    /// Delete a volume and free its space. `NotFound` if it does not exist.
    fn delete_volume(
        &self,
        name: &VolumeName,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;

    /// Look up one volume.
    fn get_volume(
        &self,
        name: &VolumeName,
    ) -> impl Future<Output = Result<VolumeStatus, ControlError>> + Send;

    /// Every volume, sorted by name.
    fn list_volumes(&self) -> impl Future<Output = Result<Vec<VolumeStatus>, ControlError>> + Send;

    /// Grow a volume to `new_size_bytes` (rounded up). Shrinking is refused.
    fn resize_volume(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
    ) -> impl Future<Output = Result<VolumeStatus, ControlError>> + Send;

    /// Every pool device of this node.
    fn list_pools(&self) -> impl Future<Output = Result<Vec<PoolStatus>, ControlError>> + Send;

    /// Snapshot `volume` as `name`, at a write barrier: every write completed before it is
    /// in the snapshot, none after. Taking it again answers with it; the name taken by a
    /// snapshot of another volume is a `Conflict`.
    fn create_snapshot(
        &self,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> impl Future<Output = Result<SnapshotStatus, ControlError>> + Send {
        let _ = (volume, name);
        async { Err(no_snapshots()) }
    }

    /// Delete a snapshot; what clones of it read stays. `NotFound` if it does not exist.
    fn delete_snapshot(
        &self,
        name: &VolumeName,
    ) -> impl Future<Output = Result<(), ControlError>> + Send {
        let _ = name;
        async { Err(no_snapshots()) }
    }

    /// Look up one snapshot.
    fn get_snapshot(
        &self,
        name: &VolumeName,
    ) -> impl Future<Output = Result<SnapshotStatus, ControlError>> + Send {
        let _ = name;
        async { Err(no_snapshots()) }
    }

    /// Every snapshot, sorted by name.
    fn list_snapshots(
        &self,
    ) -> impl Future<Output = Result<Vec<SnapshotStatus>, ControlError>> + Send {
        async { Err(no_snapshots()) }
    }

    /// Create volume `spec` from `source` (its size may be 0: the source's; its replica count
    /// 0: the source's, which is the only count a copy can have). Idempotent for the same
    /// clone.
    fn create_volume_from(
        &self,
        spec: VolumeSpec,
        source: VolumeSource,
    ) -> impl Future<Output = Result<VolumeStatus, ControlError>> + Send {
        let _ = (spec, source);
        async { Err(no_snapshots()) }
    }

    /// Make the detached volume `name` read what its snapshot `snapshot` holds; what it wrote
    /// since is gone.
    fn revert_volume(
        &self,
        name: &VolumeName,
        snapshot: &VolumeName,
    ) -> impl Future<Output = Result<VolumeStatus, ControlError>> + Send {
        let _ = (name, snapshot);
        async { Err(no_snapshots()) }
    }
}

/// The answer of a [`VolumeControl`] without snapshots.
fn no_snapshots() -> ControlError {
    ControlError::new(
        ErrorKind::Unimplemented,
        "this backend has no snapshots or clones",
    )
}

/// A storage node: what the cluster records of it (under its lease), what placement sees, and
/// what `GET /v1/nodes` lists. In standalone mode, the one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node id (`--node-id`).
    pub id: String,
    /// Where its replica server listens (`--listen`).
    pub replica_addr: String,
    /// Its zone label (`--zone`), if any.
    #[serde(default)]
    pub zone: Option<String>,
    /// Bytes of pool space in all.
    pub capacity_bytes: u64,
    /// Bytes of pool space not yet allocated.
    pub free_bytes: u64,
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
}

impl NodeRecord {
    /// Set the node's capacity and free space from its pool devices: the sums over them.
    pub fn count_pools(&mut self, pools: &[PoolStatus]) {
        self.capacity_bytes = pools.iter().map(|p| p.capacity_bytes).sum();
        self.free_bytes = pools.iter().map(|p| p.free_bytes).sum();
    }
}

/// A volume's attachment on a node: the answer of attach and detach, wherever they come from
/// (the local API, CSI, Docker).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    /// The volume.
    pub volume: String,
    /// The stable device name (`/dev/ballast/NAME`).
    pub path: String,
    /// The kernel device (`/dev/loopN`).
    pub device: String,
    /// Whether the volume is attached now.
    pub attached: bool,
}

/// What only the node that runs a workload can do: attach its volumes here, and say where
/// "here" is. The CSI node service and the Docker plugin use it beside [`VolumeControl`].
pub trait NodeControl: Send + Sync + 'static {
    /// This node's ID.
    fn node_id(&self) -> &str;

    /// This node's zone label, if it has one.
    fn zone(&self) -> Option<&str>;

    /// Whether the daemon has booted and serves requests (the meaning of `/readyz`).
    fn ready(&self) -> bool;

    /// Whether any node can attach any volume (a cluster), or only this node (standalone).
    fn shared(&self) -> bool;

    /// The storage nodes volumes can be placed on (only this one when standalone).
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRecord>, ControlError>> + Send;

    /// Attach `name` on this node (idempotent) and return the attachment. In a cluster the
    /// volume is taken over from a dead node, whose writes are fenced by epoch; a live
    /// node's attachment is `FailedPrecondition` unless `force` (which fences that node).
    fn attach(
        &self,
        name: &VolumeName,
        force: bool,
    ) -> impl Future<Output = Result<Attachment, ControlError>> + Send;

    /// The block device of `name` if it is attached on this node.
    fn device(&self, name: &VolumeName) -> Option<std::path::PathBuf>;

    /// Detach `name` from this node (idempotent). `FailedPrecondition` while it is mounted or
    /// open, unless `force`.
    fn detach(
        &self,
        name: &VolumeName,
        force: bool,
    ) -> impl Future<Output = Result<Attachment, ControlError>> + Send;

    /// Make this node's attached device of `name` show the volume's current size (after a
    /// resize); returns that size in bytes. `FailedPrecondition` if it is not attached here.
    fn refresh_size(
        &self,
        name: &VolumeName,
    ) -> impl Future<Output = Result<u64, ControlError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "db-0", "x".repeat(63).as_str(), "0abc"] {
            assert!(VolumeName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", "é", &"x".repeat(64)] {
            let e = VolumeName::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn replica_counts() {
        assert_eq!("3".parse::<ReplicaCount>().unwrap().get(), 3);
        assert_eq!(ReplicaCount::new(1).unwrap(), ReplicaCount::ONE);
        for bad in ["0", "6", "-1", "two", "", "300"] {
            let e = bad.parse::<ReplicaCount>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
            assert!(
                e.message().contains("1 to 5") || e.message().contains("between 1 and 5"),
                "{}",
                e.message()
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("500MiB").unwrap(), 500 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 2 mib ").unwrap(), 2 << 20);
        for bad in [
            "",
            "banana",
            "10XB",
            "GiB",
            "0",
            "1.2.3",
            "99999999999999999999",
            "20000PiB",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
            assert!(e.message().contains("invalid size"), "{}", e.message());
        }
        assert_eq!(round_volume_size(1).unwrap(), SIZE_GRANULARITY);
        assert_eq!(round_volume_size(1_000_000_000).unwrap(), 954 << 20);
        assert!(round_volume_size(MAX_VOLUME_SIZE + 1).is_err());
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536), "1.50 KiB");
    }
}
