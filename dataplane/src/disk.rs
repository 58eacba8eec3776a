//! The last good config on disk, `<data_dir>/config.json`, so a restarted
//! sidecar serves from it at once (even while the control plane is down)
//! and resumes its watch from the stored revision.
//!
//! * Out: [`spawn_writer`] follows the [`MeshConfig`] watch channel and
//!   writes the latest control-plane state after each change, off the hot
//!   path, at most once per [`MIN_WRITE_INTERVAL`] (a burst of deltas costs
//!   one write, and the last write is always the latest state). Writes are
//!   atomic: temporary file, fsync, rename, fsync of the directory
//!   ([`trellis_identity::write_file_atomic`]).
//! * In: [`load`] at start-up. A missing file is `Ok(None)`; a corrupt one
//!   is a [`DiskError`] naming the path, which the caller logs and ignores.
//!
//! Format: `{"format":1,"revision":R,"saved_at_unix_ms":T,"kvs":[{"key":..,
//! "value":"<utf-8 text>" | "value_hex":"<hex>", "create_revision":..,
//! "mod_revision":..,"version":..,"lease":..}]}`. Values are JSON documents,
//! so they are stored as text (readable with `jq`); a value that is not
//! UTF-8 is stored as hex instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_proto::sidecar::KeyValue;

use crate::mesh::{ConfigSource, MeshConfig, RawState};
use crate::updates::now_unix_ms;

/// Minimum time between two writes: a burst of changes (a bulk apply, a
/// snapshot followed by catch-up deltas) is one write, and the disk sees
/// at most 10 writes per second.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(100);

/// The file format version written and accepted.
pub const FORMAT_VERSION: u32 = 1;

/// A raw config state: revision and every key-value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskState {
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
}

/// The file could not be used. Not retry-safe: the same file fails again;
/// the sidecar starts empty instead.
#[derive(Debug, thiserror::Error)]
#[error("config cache {}: {reason}", path.display())]
pub struct DiskError {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOut {
    format: u32,
    revision: u64,
    #[serde(default)]
    saved_at_unix_ms: u64,
    kvs: Vec<FileKv>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKv {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    #[serde(default)]
    create_revision: u64,
    #[serde(default)]
    mod_revision: u64,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    lease: u64,
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// Serializes a state (as `save` writes it).
pub fn encode<'a>(revision: u64, kvs: impl Iterator<Item = &'a KeyValue>) -> Vec<u8> {
    let kvs = kvs
        .map(|kv| {
            let (value, value_hex) = match std::str::from_utf8(&kv.value) {
                Ok(s) => (Some(s.to_string()), None),
                Err(_) => (None, Some(to_hex(&kv.value))),
            };
            FileKv {
                key: kv.key.clone(),
                value,
                value_hex,
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                version: kv.version,
                lease: kv.lease,
            }
        })
        .collect();
    let file = FileOut {
        format: FORMAT_VERSION,
        revision,
        saved_at_unix_ms: now_unix_ms(),
        kvs,
    };
    // Plain strings and integers: serialization cannot fail.
    serde_json::to_vec(&file).unwrap_or_default()
}

/// Parses a file's bytes; the error is the reason (without the path).
pub fn decode(bytes: &[u8]) -> Result<DiskState, String> {
    let file: FileOut = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.format != FORMAT_VERSION {
        return Err(format!(
            "unsupported format {} (expected {FORMAT_VERSION})",
            file.format
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut kvs = Vec::with_capacity(file.kvs.len());
    for (i, f) in file.kvs.into_iter().enumerate() {
        let value = match (f.value, f.value_hex) {
            (Some(v), None) => v.into_bytes(),
            (None, Some(h)) => {
                from_hex(&h).ok_or_else(|| format!("kvs[{i}].value_hex: not hex"))?
            }
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => return Err(format!("kvs[{i}]: both value and value_hex")),
        };
        if f.key.is_empty() || !seen.insert(f.key.clone()) {
            return Err(format!("kvs[{i}].key: empty or repeated key {:?}", f.key));
        }
        if f.mod_revision > file.revision {
            return Err(format!(
                "kvs[{i}].mod_revision {} is after the file's revision {}",
                f.mod_revision, file.revision
            ));
        }
        kvs.push(KeyValue {
            key: f.key,
            value,
            create_revision: f.create_revision,
            mod_revision: f.mod_revision,
            version: f.version,
            lease: f.lease,
        });
    }
    Ok(DiskState {
        revision: file.revision,
        kvs,
    })
}

/// Writes `state` to `path` atomically (blocking: call from a blocking
/// context or `spawn_blocking`).
pub fn save(path: &Path, revision: u64, raw: &RawState) -> std::io::Result<()> {
    let bytes = encode(revision, raw.values().map(|e| &e.kv));
    trellis_identity::write_file_atomic(path, &bytes, false)
}

/// Reads `path`: `Ok(None)` if it does not exist.
pub fn load(path: &Path) -> Result<Option<DiskState>, DiskError> {
    let err = |reason: String| DiskError {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    decode(&bytes).map(Some).map_err(err)
}

/// Follows `rx` and writes every new control-plane config to `path`
/// (coalesced, see [`MIN_WRITE_INTERVAL`]). Ends, after writing the latest
/// state, once the sending side (the cache) is dropped.
pub fn spawn_writer(path: PathBuf, mut rx: watch::Receiver<Arc<MeshConfig>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        // The state last written: (revision, raw).
        let mut written: Option<(u64, Arc<RawState>)> = None;
        loop {
            let config = rx.borrow_and_update().clone();
            let is_new = !written
                .as_ref()
                .is_some_and(|(rev, raw)| *rev == config.revision && Arc::ptr_eq(raw, &config.raw));
            // A config loaded from disk is already there; an empty one is
            // never worth writing over a good file.
            if matches!(config.source, ConfigSource::ControlPlane { .. }) && is_new {
                let p = path.clone();
                let raw = Arc::clone(&config.raw);
                let revision = config.revision;
                match tokio::task::spawn_blocking(move || save(&p, revision, &raw)).await {
                    Ok(Ok(())) => {
                        tracing::debug!(revision, path = %path.display(), "saved config to disk");
                        written = Some((revision, Arc::clone(&config.raw)));
                    }
                    Ok(Err(e)) => tracing::warn!(revision, path = %path.display(), error = %e,
                        "cannot save config to disk; will retry on the next change"),
                    Err(e) => tracing::warn!(error = %e, "config writer task failed"),
                }
                tokio::time::sleep(MIN_WRITE_INTERVAL).await;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ConfigCache;

    fn kv(key: &str, value: &[u8], rev: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: 1,
            mod_revision: rev,
            version: 2,
            lease: 7,
        }
    }

    #[test]
    fn round_trip_text_and_binary_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert!(
            load(&path).unwrap().is_none(),
            "missing file is not an error"
        );
        let mut c = ConfigCache::default();
        c.apply_snapshot(
            1,
            9,
            vec![
                kv("/service/default/a", br#"{"x":"\u00e9"}"#, 3),
                kv("/bin", &[0, 0xff, 0x10], 9),
                kv("/empty", b"", 4),
            ],
        )
        .unwrap();
        save(&path, 9, &c.current().raw).unwrap();
        let got = load(&path).unwrap().unwrap();
        assert_eq!(got.revision, 9);
        let mut want: Vec<KeyValue> = c.current().raw.values().map(|e| e.kv.clone()).collect();
        want.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(got.kvs, want);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#""value_hex":"00ff10""#), "{text}");
    }

    #[test]
    fn save_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut c = ConfigCache::default();
        c.apply_snapshot(1, 1, vec![kv("/a", b"1", 1)]).unwrap();
        save(&path, 1, &c.current().raw).unwrap();
        c.apply_snapshot(1, 2, vec![kv("/b", b"2", 2)]).unwrap();
        save(&path, 2, &c.current().raw).unwrap();
        let got = load(&path).unwrap().unwrap();
        assert_eq!(got.revision, 2);
        assert_eq!(got.kvs.len(), 1);
        assert_eq!(got.kvs[0].key, "/b");
        // No temporary files left next to it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["config.json"]);
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        for bad in [
            &b"{\"format\":1,\"revision\":3,\"kvs\":[{\"key\":"[..],
            b"not json at all",
            br#"{"format":99,"revision":3,"kvs":[]}"#,
            br#"{"format":1,"revision":3,"kvs":[{"key":"/a","value_hex":"zz"}]}"#,
            br#"{"format":1,"revision":3,"kvs":[{"key":"/a"},{"key":"/a"}]}"#,
            br#"{"format":1,"revision":3,"kvs":[{"key":"/a","mod_revision":4}]}"#,
            br#"{"format":1,"revision":3,"kvs":[],"extra":1}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = load(&path).unwrap_err();
            assert_eq!(e.path, path);
            assert!(
                e.to_string()
                    .starts_with(&format!("config cache {}: ", path.display())),
                "{e}"
            );
        }
    }

    #[test]
    fn hex_round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)).unwrap(), all);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("+1").is_none());
    }

    #[tokio::test]
    async fn writer_coalesces_and_ends_with_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut c = ConfigCache::default();
        let writer = spawn_writer(path.clone(), c.subscribe());
        c.apply_snapshot(1, 1, vec![kv("/a", b"1", 1)]).unwrap();
        for rev in 2..=50 {
            c.apply_delta(
                1,
                &trellis_proto::sidecar::Delta {
                    revision: rev,
                    events: vec![trellis_proto::sidecar::Event {
                        r#type: 0,
                        kv: Some(kv("/a", rev.to_string().as_bytes(), rev)),
                    }],
                },
            )
            .unwrap();
        }
        drop(c);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
        let got = load(&path).unwrap().unwrap();
        assert_eq!(got.revision, 50);
        assert_eq!(got.kvs[0].value, b"50");
    }

    #[tokio::test]
    async fn writer_does_not_rewrite_a_disk_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut c = ConfigCache::default();
        c.load(5, vec![kv("/a", b"1", 5)]);
        let writer = spawn_writer(path.clone(), c.subscribe());
        drop(c);
        writer.await.unwrap();
        assert!(!path.exists());
    }
}
