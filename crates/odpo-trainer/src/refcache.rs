//! Reference log-probs computed once and cached on disk.
//!
//! The key is a SHA-256 over the model's identity (path, and size and modification time of each weight
//! and config file; or the config and seed of a random init) and every pair's token ids (prompt,
//! chosen, rejected), so the data, the tokenizer, the chat template, the separator and the length
//! settings are all covered by what they produce. A later run with the same key reads the file instead
//! of running the reference model.
//!
//! The file carries a SHA-256 of its rows: a damaged or truncated file is never read as numbers, but
//! reported and recomputed. It is written through a temporary file of the writer's own and a rename,
//! so two runs filling the same cache at once each leave a whole file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use odpo_data::TokenizedPair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ModelSection;
use crate::error::{Result, TrainError};

/// Reference log-probs `(chosen, rejected)` by pair id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RefCache {
    /// The cache key (hex SHA-256).
    pub key: String,
    /// `[pair_id, log π_ref(y_w|x), log π_ref(y_l|x)]` rows.
    pub rows: Vec<(usize, f32, f32)>,
    /// SHA-256 of the key and the rows' bits ([`RefCache::checksum`]), checked when read.
    #[serde(default)]
    pub checksum: String,
    #[serde(skip)]
    index: HashMap<usize, (f32, f32)>,
}

impl RefCache {
    /// A cache from computed rows.
    pub fn new(key: String, rows: Vec<(usize, f32, f32)>) -> Self {
        let index = rows.iter().map(|&(id, c, r)| (id, (c, r))).collect();
        let checksum = Self::checksum(&key, &rows);
        Self { key, rows, checksum, index }
    }

    /// SHA-256 over the key and every row's pair id and the bits of its two log-probs.
    pub fn checksum(key: &str, rows: &[(usize, f32, f32)]) -> String {
        let mut h = Sha256::new();
        h.update(key.as_bytes());
        for &(id, c, r) in rows {
            h.update((id as u64).to_le_bytes());
            h.update(c.to_bits().to_le_bytes());
            h.update(r.to_bits().to_le_bytes());
        }
        hex(&h.finalize())
    }

    /// The `[2B]` reference row log-probs (chosen first) of the given pairs, or the first missing id.
    pub fn rows_for(&self, pair_ids: &[usize]) -> std::result::Result<Vec<f32>, usize> {
        let mut chosen = Vec::with_capacity(pair_ids.len() * 2);
        let mut rejected = Vec::with_capacity(pair_ids.len());
        for id in pair_ids {
            let &(c, r) = self.index.get(id).ok_or(*id)?;
            chosen.push(c);
            rejected.push(r);
        }
        chosen.extend(rejected);
        Ok(chosen)
    }

    /// The file of `key` under `dir`.
    pub fn path(dir: &Path, key: &str) -> PathBuf {
        dir.join(format!("ref-{}.json", &key[..key.len().min(32)]))
    }

    /// The file of the rows computed so far for `key`, kept while they are computed: every 60 s, and
    /// when a stop is asked for, so that the next run goes on from them.
    pub fn partial_path(dir: &Path, key: &str) -> PathBuf {
        dir.join(format!("ref-{}.partial.json", &key[..key.len().min(32)]))
    }

    /// Reads the cache for `key`, if there is one. A file that is unreadable, truncated, or whose
    /// rows do not match its checksum is reported and ignored (the caller recomputes and rewrites it).
    pub fn read(dir: &Path, key: &str) -> Option<Self> {
        Self::read_from(&Self::path(dir, key), key)
    }

    /// [`Self::read`] of the file at `path` (the whole cache or the partial one).
    pub fn read_from(path: &Path, key: &str) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str::<RefCache>(&text) {
            Ok(c) if c.key == key && c.checksum == Self::checksum(&c.key, &c.rows) => Some(Self::new(c.key, c.rows)),
            Ok(c) if c.key == key => {
                tracing::warn!("reference cache {} is damaged (its rows do not match its checksum); recomputing it", path.display());
                None
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("reference cache {} is unreadable ({e}); recomputing it", path.display());
                None
            }
        }
    }

    /// Writes the cache atomically (serde_json writes f32 in shortest round-trip form: exact).
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        self.write_to(&Self::path(dir, &self.key))
    }

    /// [`Self::write`] to `path`, creating its folder.
    pub fn write_to(&self, path: &Path) -> Result<PathBuf> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        let json = serde_json::to_vec(self).map_err(|e| TrainError::checkpoint(path, e))?;
        odpo_model::weights::write_atomic(path, &json)?;
        Ok(path.to_path_buf())
    }
}

/// The identity of the reference model (`model.reference` when set, else the policy's starting point): its files' names, sizes and modification times, or for a
/// random init its config file's bytes and the seed.
pub fn model_identity(model: &ModelSection, seed: u64) -> Result<String> {
    if let Some(reference) = &model.reference {
        return model_identity(&ModelSection { path: reference.clone(), tokenizer: None, random_init: false, reference: None }, seed);
    }
    let path = &model.path;
    let config_json = if path.is_dir() { path.join("config.json") } else { path.clone() };
    if model.random_init {
        let bytes = std::fs::read(&config_json).map_err(|e| TrainError::io(&config_json, e))?;
        return Ok(format!("random:{}:{}", hex(&Sha256::digest(&bytes)), seed));
    }
    let mut id = format!("{}", path.display());
    for f in model_files(path)? {
        let meta = std::fs::metadata(&f).map_err(|e| TrainError::io(&f, e))?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        id.push_str(&format!("|{}:{}:{}", f.file_name().and_then(|n| n.to_str()).unwrap_or(""), meta.len(), mtime));
    }
    Ok(id)
}

/// The files that make the model at `path`: a file itself, or a folder's `config.json`,
/// safetensors files and their index, in name order.
pub fn model_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| TrainError::io(path, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The cache key of `pairs` under the reference model `model_id`.
pub fn cache_key<'a>(model_id: &str, pairs: impl IntoIterator<Item = &'a TokenizedPair>) -> String {
    let mut h = Sha256::new();
    h.update(b"odpo-refcache-v1\0");
    h.update(model_id.as_bytes());
    let mut put = |ids: &[u32]| {
        h.update((ids.len() as u64).to_le_bytes());
        for t in ids {
            h.update(t.to_le_bytes());
        }
    };
    for p in pairs {
        put(&[p.pair_id as u32]);
        put(&p.prompt);
        put(&p.chosen);
        put(&p.rejected);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: usize, prompt: &[u32]) -> TokenizedPair {
        TokenizedPair { pair_id: id, prompt: prompt.to_vec(), chosen: vec![1], rejected: vec![2], offset: 0.0, weight: None }
    }

    #[test]
    fn key_follows_tokens_and_model() {
        let a = [pair(0, &[5, 6]), pair(1, &[7])];
        let b = [pair(0, &[5]), pair(1, &[6, 7])];
        assert_ne!(cache_key("m", &a), cache_key("m", &b));
        assert_ne!(cache_key("m", &a), cache_key("n", &a));
        assert_eq!(cache_key("m", &a), cache_key("m", &a.clone()));
    }

    #[test]
    fn round_trips_exactly() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        let c = RefCache::new("abc".into(), vec![(3, -1.234_567_9, -0.1), (7, f32::MIN_POSITIVE, -1e-30)]);
        c.write(dir)?;
        let back = RefCache::read(dir, "abc").ok_or_else(|| TrainError::config("x", "cache not read back"))?;
        assert_eq!(back.rows, c.rows);
        assert_eq!(back.rows_for(&[7, 3]), Ok(vec![f32::MIN_POSITIVE, -1.234_567_9, -1e-30, -0.1]));
        assert_eq!(back.rows_for(&[4]), Err(4));
        assert!(RefCache::read(dir, "abd").is_none());
        Ok(())
    }

    #[test]
    fn damaged_or_truncated_files_are_not_read() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        let c = RefCache::new("k".into(), vec![(0, -1.5, -2.5), (1, -3.25, -4.0)]);
        let path = c.write(dir)?;
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        // A changed digit still parses as numbers; the checksum catches it.
        std::fs::write(&path, text.replace("-3.25", "-3.35")).map_err(|e| TrainError::io(&path, e))?;
        assert!(RefCache::read(dir, "k").is_none(), "a damaged cache was read");
        std::fs::write(&path, &text[..text.len() / 2]).map_err(|e| TrainError::io(&path, e))?;
        assert!(RefCache::read(dir, "k").is_none(), "a truncated cache was read");
        std::fs::write(&path, &text).map_err(|e| TrainError::io(&path, e))?;
        assert_eq!(RefCache::read(dir, "k").map(|c| c.rows), Some(c.rows));
        Ok(())
    }
}
