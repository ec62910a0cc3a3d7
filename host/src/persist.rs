//! Small state files written atomically and durably, and read back strictly.
//!
//! Every state file beside the pools goes through here (the fence table, the attachments,
//! the Docker plugin's mount counts and the embedded cluster store), so each gets the same
//! guarantees:
//!
//! - [`write_atomic`] writes a temporary file next to the target, fsyncs it, renames it over
//!   the target and fsyncs the directory: after a crash the file is either the old or the new
//!   content, never a mix, and a completed write survives power loss;
//! - [`read_json`] treats a missing file as "no state yet" (`Ok(None)`) but a file that cannot
//!   be parsed as an error naming the file. Taking a corrupt file as empty would forget
//!   ejections, fences or attachments, so callers refuse to start instead.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file system call failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file (or its directory).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but does not hold what it should.
    #[error("state file {path} is corrupt (move it away only if you know its state is lost)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: serde_json::Error,
    },
    /// The value could not be encoded.
    #[error("cannot encode the state for {path}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// What the encoder said.
        #[source]
        source: serde_json::Error,
    },
}

impl From<PersistError> for std::io::Error {
    fn from(e: PersistError) -> Self {
        let kind = match &e {
            PersistError::Io { source, .. } => source.kind(),
            PersistError::Corrupt { .. } => std::io::ErrorKind::InvalidData,
            PersistError::Encode { .. } => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, e)
    }
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Replace `path` with `bytes`, atomically and durably (see the module docs). The parent
/// directory is created if it is missing.
///
/// # Errors
/// Any file system error, naming the step and the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io("create the directory", dir))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io("replace", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the directory", dir))
}

/// [`write_atomic`] of `value` as pretty JSON.
///
/// # Errors
/// As [`write_atomic`], or the value cannot be encoded.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), PersistError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| PersistError::Encode {
        path: path.to_owned(),
        source,
    })?;
    write_atomic(path, &bytes)
}

/// The JSON value in `path`, or `None` if the file does not exist.
///
/// # Errors
/// The file cannot be read, or it does not decode ([`PersistError::Corrupt`], never `None`).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, PersistError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| PersistError::Corrupt {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(read_json::<Vec<String>>(&path).unwrap().is_none());
        write_json(&path, &vec!["a".to_owned()]).unwrap();
        assert_eq!(read_json::<Vec<String>>(&path).unwrap().unwrap(), ["a"]);
        assert!(!dir.path().join("sub/state.json.tmp").exists());

        std::fs::write(&path, b"{not json").unwrap();
        let e = read_json::<Vec<String>>(&path).unwrap_err();
        assert!(matches!(e, PersistError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("state.json"), "{e}");
        let e: std::io::Error = e.into();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
