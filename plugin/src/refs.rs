//! Which callers (container IDs) have each volume mounted on this node, persisted so the count
//! survives a daemon restart: a volume is unmounted and detached only when its last caller
//! unmounts.
//!
//! The file is JSON, written whole to a temporary file, fsynced and renamed over the old one,
//! so it is always either the old or the new set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// The callers of each mounted volume.
#[derive(Debug)]
pub struct Refs {
    path: PathBuf,
    volumes: BTreeMap<String, BTreeSet<String>>,
}

impl Refs {
    /// Load the set persisted at `path`, or start empty when there is none.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed: forgetting callers would unmount a volume
    /// under a running container, so a corrupt file is never taken as empty.
    pub fn load(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let volumes = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is corrupt: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self { path, volumes })
    }

    /// The callers of `name`.
    pub fn callers(&self, name: &str) -> usize {
        self.volumes.get(name).map_or(0, BTreeSet::len)
    }

    /// Every volume with a caller.
    pub fn mounted(&self) -> Vec<String> {
        self.volumes.keys().cloned().collect()
    }

    /// Add `id` to `name`'s callers and persist; returns the count.
    ///
    /// # Errors
    /// The file cannot be written; nothing changed then.
    pub fn add(&mut self, name: &str, id: &str) -> std::io::Result<usize> {
        let mut next = self.volumes.clone();
        next.entry(name.to_owned())
            .or_default()
            .insert(id.to_owned());
        self.commit(next)?;
        Ok(self.callers(name))
    }

    /// Remove `id` from `name`'s callers and persist; returns the count left.
    ///
    /// # Errors
    /// The file cannot be written; nothing changed then.
    pub fn remove(&mut self, name: &str, id: &str) -> std::io::Result<usize> {
        let mut next = self.volumes.clone();
        if let Some(ids) = next.get_mut(name) {
            ids.remove(id);
            if ids.is_empty() {
                next.remove(name);
            }
        }
        self.commit(next)?;
        Ok(self.callers(name))
    }

    /// Whether `id` is a caller of `name`.
    pub fn has(&self, name: &str, id: &str) -> bool {
        self.volumes.get(name).is_some_and(|ids| ids.contains(id))
    }

    fn commit(&mut self, next: BTreeMap<String, BTreeSet<String>>) -> std::io::Result<()> {
        host::persist::write_json(&self.path, &next)?;
        self.volumes = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mounts.json");
        let mut r = Refs::load(&path).unwrap();
        assert_eq!(r.add("v", "c1").unwrap(), 1);
        assert_eq!(r.add("v", "c2").unwrap(), 2);
        assert_eq!(r.add("v", "c2").unwrap(), 2, "the same caller counts once");
        let mut again = Refs::load(&path).unwrap();
        assert_eq!(again.callers("v"), 2);
        assert_eq!(again.remove("v", "c1").unwrap(), 1);
        assert_eq!(again.remove("v", "c2").unwrap(), 0);
        assert!(Refs::load(&path).unwrap().mounted().is_empty());
        std::fs::write(&path, b"{nope").unwrap();
        assert!(Refs::load(&path).is_err());
    }
}
