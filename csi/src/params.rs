//! Parsing and validating what a CO sends: StorageClass parameters, capacity ranges, volume
//! capabilities, topology segments and names. Pure functions, unit-tested here.

use std::collections::HashMap;

use api::{
    round_volume_size, NodeRecord, ReplicaCount, VolumeName, ZoneSpread, MAX_VOLUME_SIZE,
    SIZE_GRANULARITY,
};
use tonic::Status;

use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::AccessType;
use crate::proto::{CapacityRange, Topology, VolumeCapability};
use crate::status::invalid;
use crate::{NODE_KEY, ZONE_KEY};

/// The size of a volume created without a capacity range (1 GiB).
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Filesystems the node service creates.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

/// Parameter keys with this prefix are Kubernetes' own (PVC and PV names from
/// `--extra-create-metadata`, secrets references); they are accepted and ignored.
pub const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// The volume-context key carrying the StorageClass's filesystem type to the node.
pub const CTX_FS_TYPE: &str = "fsType";

/// What a StorageClass's parameters ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    /// Synchronous replicas (default 1).
    pub replicas: u8,
    /// The filesystem for mount access, when set.
    pub fs_type: Option<String>,
    /// Zone spread (default soft).
    pub zone_spread: ZoneSpread,
}

/// Parse `params`; an unknown key or a bad value is `INVALID_ARGUMENT` naming it.
pub fn parameters<S: std::hash::BuildHasher>(
    params: &HashMap<String, String, S>,
) -> Result<Parameters, Status> {
    let mut out = Parameters {
        replicas: 1,
        fs_type: None,
        zone_spread: ZoneSpread::Soft,
    };
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    for key in keys {
        let value = params[key].trim();
        match key.as_str() {
            "replicas" => {
                out.replicas = value
                    .parse::<ReplicaCount>()
                    .map_err(|e| {
                        invalid(format!("parameter replicas is invalid: {}", e.message()))
                    })?
                    .get();
            }
            "fsType" => out.fs_type = Some(fs_type(value)?),
            "zoneSpread" => {
                out.zone_spread = value.parse().map_err(|e: api::ControlError| {
                    invalid(format!("parameter zoneSpread: {}", e.message()))
                })?;
            }
            k if k.starts_with(K8S_PREFIX) => {}
            k => {
                return Err(invalid(format!(
                    "unknown parameter {k:?}: Ballast StorageClasses take replicas, fsType and \
                     zoneSpread"
                )))
            }
        }
    }
    Ok(out)
}

/// Check a filesystem type.
pub fn fs_type(value: &str) -> Result<String, Status> {
    if FS_TYPES.contains(&value) {
        Ok(value.to_owned())
    } else {
        Err(invalid(format!(
            "filesystem type {value:?} is not supported: use ext4 or xfs"
        )))
    }
}

/// The size to create for `range`: the required bytes rounded up to the allocation unit
/// (1 MiB), or 1 GiB (capped by the limit) when only a limit or nothing is given.
///
/// `INVALID_ARGUMENT` for negative values or a limit below the requirement; `OUT_OF_RANGE`
/// when no whole number of allocation units fits, or the size is above the maximum.
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(invalid(format!(
            "capacity range has a negative value (required_bytes {required}, limit_bytes {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && limit < required {
        return Err(invalid(format!(
            "capacity range limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    if required > MAX_VOLUME_SIZE {
        return Err(Status::out_of_range(format!(
            "{required} bytes is above the largest volume, {MAX_VOLUME_SIZE} bytes"
        )));
    }
    let size = if required == 0 {
        let want = if limit == 0 {
            DEFAULT_SIZE
        } else {
            limit.min(DEFAULT_SIZE)
        };
        // Round down under a limit, so it is honoured.
        want / SIZE_GRANULARITY * SIZE_GRANULARITY
    } else {
        round_volume_size(required).map_err(|e| Status::out_of_range(e.message().to_owned()))?
    };
    if size == 0 || (limit != 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "no volume size fits between required_bytes {required} and limit_bytes {limit}: \
             sizes are whole multiples of {SIZE_GRANULARITY} bytes"
        )));
    }
    Ok(size)
}

/// Whether an existing volume of `size` bytes satisfies `range`.
pub fn size_fits(size: u64, range: Option<&CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    let required = u64::try_from(r.required_bytes).unwrap_or(0);
    let limit = u64::try_from(r.limit_bytes).unwrap_or(0);
    size >= required && (limit == 0 || size <= limit)
}

/// Why `cap` cannot be served, or `None` when it can. Ballast volumes have one writer at a
/// time, so the single-node modes are supported and the multi-node ones are not.
pub fn unsupported(cap: &VolumeCapability) -> Option<String> {
    let mode = cap.access_mode.as_ref().map_or(
        Mode::Unknown,
        crate::proto::volume_capability::AccessMode::mode,
    );
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter => {}
        Mode::Unknown => return Some("access_mode is required".to_owned()),
        other => {
            return Some(format!(
                "access mode {} is not supported: a Ballast volume is used by one node at a \
                 time (use ReadWriteOnce or ReadWriteOncePod)",
                other.as_str_name()
            ))
        }
    }
    match &cap.access_type {
        None => Some("access_type (block or mount) is required".to_owned()),
        Some(AccessType::Block(_)) => None,
        Some(AccessType::Mount(m)) => {
            if m.fs_type.is_empty() || FS_TYPES.contains(&m.fs_type.as_str()) {
                None
            } else {
                Some(format!(
                    "filesystem type {:?} is not supported: use ext4 or xfs",
                    m.fs_type
                ))
            }
        }
    }
}

/// Check every capability of a request that needs at least one.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities is required"));
    }
    for cap in caps {
        if let Some(why) = unsupported(cap) {
            return Err(invalid(why));
        }
    }
    Ok(())
}

/// Whether a capability is read-only by its access mode.
pub fn read_only_mode(cap: &VolumeCapability) -> bool {
    cap.access_mode
        .as_ref()
        .is_some_and(|m| m.mode() == Mode::SingleNodeReaderOnly)
}

/// The volume name for a CO's volume name: the name itself when it is a valid Ballast name,
/// otherwise a valid one derived from it deterministically (so retries find the same volume).
pub fn volume_name_for(name: &str) -> Result<VolumeName, Status> {
    if name.is_empty() {
        return Err(invalid("name is required"));
    }
    if name.len() > 128 {
        return Err(invalid(format!(
            "name is {} bytes long; CSI names are at most 128",
            name.len()
        )));
    }
    if let Ok(v) = VolumeName::new(name) {
        return Ok(v);
    }
    let mut base: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(46);
    let base = base.trim_matches('-');
    let hash = fnv1a(name.as_bytes());
    let derived = if base.is_empty() {
        format!("csi-{hash:016x}")
    } else {
        format!("{base}-{hash:016x}")
    };
    VolumeName::new(&derived).map_err(|e| invalid(e.message().to_owned()))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A volume ID as a volume name; `NOT_FOUND` for one that cannot name a Ballast volume.
pub fn volume_id(id: &str) -> Result<VolumeName, Status> {
    if id.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    VolumeName::new(id).map_err(|_| Status::not_found(format!("volume {id:?} does not exist")))
}

/// Whether `node` lies in `segment`. Unknown keys are `INVALID_ARGUMENT`.
pub fn matches(node: &NodeRecord, segment: &Topology) -> Result<bool, Status> {
    for (k, v) in &segment.segments {
        let ok = match k.as_str() {
            NODE_KEY => node.id == *v,
            ZONE_KEY => node.zone.as_deref() == Some(v.as_str()),
            other => {
                return Err(invalid(format!(
                    "unknown topology key {other:?}: Ballast reports {NODE_KEY} and {ZONE_KEY}"
                )))
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The topology segment of one node, as NodeGetInfo reports it.
pub fn node_segment(id: &str, zone: Option<&str>) -> Topology {
    let mut segments = HashMap::from([(NODE_KEY.to_owned(), id.to_owned())]);
    if let Some(z) = zone {
        segments.insert(ZONE_KEY.to_owned(), z.to_owned());
    }
    Topology { segments }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn p(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parameters_are_checked_and_unknown_ones_named() {
        let ok = parameters(&p(&[
            ("replicas", "3"),
            ("fsType", "xfs"),
            ("zoneSpread", "hard"),
            ("csi.storage.k8s.io/pvc/name", "data-0"),
        ]))
        .unwrap();
        assert_eq!(ok.replicas, 3);
        assert_eq!(ok.fs_type.as_deref(), Some("xfs"));
        assert_eq!(ok.zone_spread, ZoneSpread::Hard);
        let e = parameters(&p(&[("nosuch", "1")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("\"nosuch\""), "{}", e.message());
        for bad in [
            ("replicas", "0"),
            ("replicas", "9"),
            ("replicas", "x"),
            ("fsType", "btrfs"),
            ("zoneSpread", "maybe"),
        ] {
            let e = parameters(&p(&[bad])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn capacity_ranges() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&r(1, 0))).unwrap(), SIZE_GRANULARITY);
        assert_eq!(
            size_for(Some(&r(1_000_000_000, 0))).unwrap(),
            954 * SIZE_GRANULARITY
        );
        assert_eq!(size_for(Some(&r(0, 10 << 20))).unwrap(), 10 << 20);
        assert_eq!(
            size_for(Some(&r(-1, 0))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(Some(&r(10, 5))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        // 1 MiB + 1 rounds to 2 MiB, above a 1.5 MiB limit.
        assert_eq!(
            size_for(Some(&r((1 << 20) + 1, 3 << 19)))
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&r(i64::MAX, 0))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&r(0, 1000))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert!(size_fits(2 << 20, Some(&r(1 << 20, 0))));
        assert!(!size_fits(2 << 20, Some(&r(3 << 20, 0))));
        assert!(!size_fits(2 << 20, Some(&r(0, 1 << 20))));
    }

    #[test]
    fn capabilities() {
        let cap = |mode: Mode, block: bool, fs: &str| VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: fs.to_owned(),
                    ..Default::default()
                })
            }),
        };
        assert!(unsupported(&cap(Mode::SingleNodeWriter, true, "")).is_none());
        assert!(unsupported(&cap(Mode::SingleNodeWriter, false, "xfs")).is_none());
        assert!(unsupported(&cap(Mode::MultiNodeMultiWriter, true, "")).is_some());
        assert!(unsupported(&cap(Mode::SingleNodeWriter, false, "ntfs")).is_some());
        assert!(unsupported(&cap(Mode::Unknown, false, "")).is_some());
        assert!(check_capabilities(&[]).is_err());
    }

    #[test]
    fn names_map_deterministically_to_valid_volume_names() {
        assert_eq!(volume_name_for("pvc-1234").unwrap().as_str(), "pvc-1234");
        let a = volume_name_for("My_Volume").unwrap();
        assert_eq!(a, volume_name_for("My_Volume").unwrap());
        assert!(a.as_str().starts_with("my-volume-"), "{a}");
        assert_ne!(a, volume_name_for("my_volume").unwrap());
        let long = "x".repeat(100);
        assert!(volume_name_for(&long).unwrap().as_str().len() <= 63);
        assert_eq!(
            volume_name_for("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn topology_segments_match_nodes() {
        let n = NodeRecord {
            replica_addr: String::new(),
            version: String::new(),
            id: "a".into(),
            zone: Some("z1".into()),
            capacity_bytes: 0,
            free_bytes: 0,
        };
        let seg = |kv: &[(&str, &str)]| Topology { segments: p(kv) };
        assert!(matches(&n, &seg(&[(ZONE_KEY, "z1")])).unwrap());
        assert!(matches(&n, &seg(&[(NODE_KEY, "a"), (ZONE_KEY, "z1")])).unwrap());
        assert!(!matches(&n, &seg(&[(NODE_KEY, "b")])).unwrap());
        assert!(matches(&n, &seg(&[("rack", "r1")])).is_err());
    }
}
