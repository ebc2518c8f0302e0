//! The journal of a long pass over a model (sampling responses, a reward model's backbone
//! features): the rows of each finished batch, appended as the pass goes, so that a pass stopped
//! by a signal (or killed) resumes from its last whole batch instead of from the first. Such a pass
//! takes hours for a real model on a CPU; a stop must not cost them.
//!
//! The file holds a header line with the key of the pass (the model's bytes, the inputs' tokens,
//! the settings) and then one JSON line a row, in the pass's order: `{"prompt_index", "tokens"}`
//! for a response, `{"index", "bits"}` for a text's features (each `f32` as its bits, exact). Each
//! batch is appended and synced before the next starts. A reader keeps the whole batches of a
//! journal with its key; a torn last line or a part batch is dropped, and a journal of another key
//! is replaced. The passes compute each batch alone (sampling draws from a seed of its own a
//! batch), so the batches after the kept ones are those of a pass never stopped: the resumed pass
//! gives the same rows, to the bit.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};

const FORMAT: &str = "odpo-journal-v1";

/// Where a pass keeps its finished batches.
#[derive(Clone, Debug)]
pub struct Journal {
    path: PathBuf,
    model: String,
}

/// The header line.
#[derive(Serialize, serde::Deserialize)]
struct Header {
    journal: String,
    key: String,
}

/// The journal of a pass being written.
pub(crate) struct Open {
    file: std::fs::File,
    path: PathBuf,
}

impl Journal {
    /// The journal at `path` of a pass over the model loaded from `model_path` (a folder or a
    /// `.gguf` file). The model's bytes are part of the key, so a retrained model starts afresh,
    /// while the same weights written again or copied elsewhere (with other modification times)
    /// keep the journal.
    pub fn at(path: &Path, model_path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), model: model_digest(model_path)? })
    }

    /// The journal of the file `out` (`<out>.journal`), of a pass over the model at `model_path`.
    pub fn beside(out: &Path, model_path: &Path) -> Result<Self> {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self::at(&out.with_file_name(format!("{name}.journal")), model_path)
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key of a pass of kind `pass` with the settings `numbers` over the token sequences
    /// `inputs`.
    pub(crate) fn key(&self, pass: &str, numbers: &[u64], inputs: &[Vec<u32>]) -> String {
        let mut h = Sha256::new();
        for part in [FORMAT, pass, &self.model] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for n in numbers.iter().chain(&[inputs.len() as u64]) {
            h.update(n.to_le_bytes());
        }
        for ids in inputs {
            h.update((ids.len() as u64).to_le_bytes());
            for t in ids {
                h.update(t.to_le_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The rows kept under `key`: the longest run from the start whose rows `fits(position, row)`,
    /// cut to whole batches of `batch` unless it has all `total`. None when there is no journal,
    /// or it is of another key.
    pub(crate) fn read<R: DeserializeOwned>(&self, key: &str, total: usize, batch: usize, fits: impl Fn(usize, &R) -> bool) -> Option<Vec<R>> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut lines = text.lines();
        let header: Header = serde_json::from_str(lines.next()?).ok()?;
        if header.journal != FORMAT || header.key != key {
            tracing::warn!("{}: a journal of other inputs, settings or model, replaced: starting afresh", self.path.display());
            return None;
        }
        let mut rows = Vec::new();
        for line in lines.take(total) {
            match serde_json::from_str::<R>(line) {
                Ok(row) if fits(rows.len(), &row) => rows.push(row),
                _ => break,
            }
        }
        if rows.len() < total {
            rows.truncate(rows.len() - rows.len() % batch.max(1));
        }
        Some(rows)
    }

    /// Starts the journal afresh with the rows `kept` (read back, or none): written whole and
    /// atomically, then opened for appending.
    pub(crate) fn start<R: Serialize>(&self, key: &str, kept: &[R]) -> Result<Open> {
        let mut buf = Vec::new();
        line(&mut buf, &Header { journal: FORMAT.into(), key: key.into() });
        for row in kept {
            line(&mut buf, row);
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
        }
        odpo_model::weights::write_atomic(&self.path, &buf)?;
        let file = std::fs::OpenOptions::new().append(true).open(&self.path).map_err(|e| PipelineError::io(&self.path, e))?;
        Ok(Open { file, path: self.path.clone() })
    }

    /// Removes the journal once what it kept is in the pass's output.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Open {
    /// Appends one finished batch's rows and syncs them.
    pub(crate) fn append<R: Serialize>(&mut self, rows: impl IntoIterator<Item = R>) -> Result<()> {
        let mut buf = Vec::new();
        for row in rows {
            line(&mut buf, &row);
        }
        self.file.write_all(&buf).and_then(|()| self.file.sync_data()).map_err(|e| PipelineError::io(&self.path, e))
    }
}

/// SHA-256 of the model at `path`: the bytes of its files
/// ([`odpo_trainer::refcache::model_files`]). The pass has just loaded them (the pages are cached):
/// seconds for a model of gigabytes, small beside the pass it keys.
fn model_digest(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for f in odpo_trainer::refcache::model_files(path)? {
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update([0]);
        let mut file = std::fs::File::open(&f).map_err(|e| PipelineError::io(&f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| PipelineError::io(&f, e))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `value` as one JSON line (these plain structs serialize into a vector without fail).
fn line(buf: &mut Vec<u8>, value: &impl Serialize) {
    if serde_json::to_writer(&mut *buf, value).is_ok() {
        buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_journal_gives_back_the_whole_batches_of_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let journal = Journal::at(&dir.path().join("pass.journal"), &model).unwrap();
        let inputs = [vec![1, 2], vec![3]];
        let key = journal.key("test", &[4], &inputs);
        let all = |key: &str| journal.read::<Vec<u32>>(key, 10, 4, |_, _| true);
        assert!(all(&key).is_none(), "no journal yet");

        // Ten rows in batches of four: a part batch is dropped until the rows are all there.
        let mut open = journal.start::<Vec<u32>>(&key, &[]).unwrap();
        open.append((0..4).map(|i| vec![i])).unwrap();
        open.append((4..7).map(|i| vec![i])).unwrap();
        assert_eq!(all(&key).unwrap(), (0..4).map(|i| vec![i]).collect::<Vec<_>>());
        open.append((7..10).map(|i| vec![i])).unwrap();
        assert_eq!(all(&key).unwrap().len(), 10);
        // Rows past the first that does not fit, and a torn line, go with their batch.
        assert_eq!(journal.read::<Vec<u32>>(&key, 10, 4, |at, _| at < 6).unwrap().len(), 4);
        let text = std::fs::read_to_string(journal.path()).unwrap();
        let torn: String = text.lines().take(6).map(|l| format!("{l}\n")).collect::<String>() + "[6, ";
        std::fs::write(journal.path(), torn).unwrap();
        assert_eq!(all(&key).unwrap().len(), 4);

        // Started again with what was read: the file holds those rows, then appends.
        let kept = all(&key).unwrap();
        let mut open = journal.start(&key, &kept).unwrap();
        open.append((4..10).map(|i| vec![i])).unwrap();
        assert_eq!(all(&key).unwrap(), (0..10).map(|i| vec![i]).collect::<Vec<_>>());

        // Another setting, input or model is another key, and its journal is not read.
        assert!(all(&journal.key("test", &[5], &inputs)).is_none());
        assert!(all(&journal.key("test", &[4], &inputs[..1])).is_none());
        std::fs::write(&model, b"weightz").unwrap();
        let retrained = Journal::at(journal.path(), &model).unwrap();
        assert_ne!(retrained.key("test", &[4], &inputs), key);
        journal.remove();
        assert!(!journal.path().exists());
    }
}
