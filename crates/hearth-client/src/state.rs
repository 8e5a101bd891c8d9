//! The incremental-export state file: for each server and request, the `transactionTime` of
//! the last complete export, which the next run sends as `_since`. Kept in the output
//! directory, so a copy of the directory carries its own position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The state file's name inside the output directory.
pub const STATE_FILE: &str = ".hearth-export-state.json";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IncrementalState {
    /// Keyed by [`state_key`].
    #[serde(default)]
    pub exports: BTreeMap<String, Checkpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// The `transactionTime` of the last complete export.
    pub transaction_time: String,
    /// The subdirectory that export was saved in.
    pub directory: String,
}

/// One entry per server base and request (less `_since`): a different `_type` list needs its
/// own position, or the next run would miss what the other list left out.
pub fn state_key(base: &str, request_identity: &str) -> String {
    format!("{} {request_identity}", base.trim_end_matches('/'))
}

impl IncrementalState {
    fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads the state of `dir`; a directory without one starts empty.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes the state atomically: a crash leaves the old state or the new one.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = Self::path(dir);
        let temp = dir.join(format!("{STATE_FILE}.part"));
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
        text.push(b'\n');
        write_atomically(&temp, &path, &text)
    }
}

/// Writes `bytes` to `temp`, flushes it to disk and renames it to `path`.
pub(crate) fn write_atomically(temp: &Path, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let mut file = std::fs::File::create(temp).map_err(|e| Error::io(temp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(temp, e))?;
    file.sync_all().map_err(|e| Error::io(temp, e))?;
    drop(file);
    std::fs::rename(temp, path).map_err(|e| Error::io(path, e))
}

/// A directory name for an export from its `transactionTime` (colons are not welcome in every
/// file system); names sort in time order.
pub fn run_directory(transaction_time: &str) -> String {
    transaction_time
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_starts_empty() {
        let dir = tempfile::TempDir::new().unwrap();
        let empty = IncrementalState::load(dir.path()).unwrap();
        assert!(empty.exports.is_empty());
        let mut state = IncrementalState::default();
        let key = state_key("http://h/fhir/", "level=system");
        assert_eq!(key, "http://h/fhir level=system");
        state.exports.insert(
            key.clone(),
            Checkpoint {
                transaction_time: "2024-01-01T00:00:00Z".into(),
                directory: run_directory("2024-01-01T00:00:00Z"),
            },
        );
        state.save(dir.path()).unwrap();
        let loaded = IncrementalState::load(dir.path()).unwrap();
        assert_eq!(loaded.exports[&key].directory, "2024-01-01T00-00-00Z");
        assert!(!dir.path().join(format!("{STATE_FILE}.part")).exists());
    }

    #[test]
    fn a_broken_state_file_is_an_error_not_a_fresh_start() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(IncrementalState::load(dir.path()).is_err());
    }
}
