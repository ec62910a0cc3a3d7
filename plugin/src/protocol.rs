//! The Docker volume plugin protocol's JSON: requests and answers of `/Plugin.Activate` and
//! `/VolumeDriver.*`. The field names are the protocol's (PascalCase); every answer carries
//! `Err`, empty on success.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `/VolumeDriver.Create`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateRequest {
    /// The volume name.
    #[serde(default)]
    pub name: String,
    /// `-o key=value` options.
    #[serde(default)]
    pub opts: Option<BTreeMap<String, String>>,
}

/// `/VolumeDriver.Remove`, `/VolumeDriver.Path`, `/VolumeDriver.Get`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NameRequest {
    /// The volume name.
    #[serde(default)]
    pub name: String,
}

/// `/VolumeDriver.Mount`, `/VolumeDriver.Unmount`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MountRequest {
    /// The volume name.
    #[serde(default)]
    pub name: String,
    /// The caller's ID (one per container use).
    #[serde(default, rename = "ID")]
    pub id: String,
}

/// An answer with only `Err`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrResponse {
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// The answer of Mount and Path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountResponse {
    /// Where the volume is mounted on this host.
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// One volume in Get and List.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// The name.
    #[serde(rename = "Name")]
    pub name: String,
    /// Where it is mounted on this host (empty when it is not).
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
    /// Creation time, RFC 3339.
    #[serde(
        rename = "CreatedAt",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub created_at: String,
    /// Size, replicas and replica health.
    #[serde(rename = "Status", skip_serializing_if = "BTreeMap::is_empty", default)]
    pub status: BTreeMap<String, serde_json::Value>,
}

/// The answer of Get.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GetResponse {
    /// The volume (absent on error).
    #[serde(rename = "Volume", skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeInfo>,
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// The answer of List.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListResponse {
    /// Every volume.
    #[serde(rename = "Volumes")]
    pub volumes: Vec<VolumeInfo>,
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// `/Plugin.Activate`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivateResponse {
    /// The subsystems implemented.
    #[serde(rename = "Implements")]
    pub implements: Vec<String>,
}

/// `/VolumeDriver.Capabilities`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapabilitiesResponse {
    /// The capabilities.
    #[serde(rename = "Capabilities")]
    pub capabilities: Capabilities,
}

/// The driver's capabilities.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    /// `global`: a volume's name is cluster-wide and any node can mount it.
    #[serde(rename = "Scope")]
    pub scope: String,
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2026-11-21T18:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let rem = secs % 86_400;
    let (year, month, day) = api::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_284_000), "2026-11-21T18:00:00Z");
    }

    #[test]
    fn requests_parse_without_optional_fields() {
        let r: MountRequest = serde_json::from_str(r#"{"Name":"v","ID":"abc"}"#).unwrap();
        assert_eq!((r.name.as_str(), r.id.as_str()), ("v", "abc"));
        let c: CreateRequest = serde_json::from_str(r#"{"Name":"v","Opts":null}"#).unwrap();
        assert!(c.opts.is_none());
        let empty: NameRequest = serde_json::from_str("{}").unwrap();
        assert!(empty.name.is_empty());
    }
}
