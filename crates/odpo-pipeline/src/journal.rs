//! The journal of a sampling pass: the responses of each finished generation batch, appended as the
//! pass goes, so that a pass stopped by a signal (or killed) resumes from its last whole batch
//! instead of from the first. Sampling a real model's responses on a CPU takes hours; a stop must
//! not cost them.
//!
//! The file (`<samples file>.journal`) holds a header line with the key of what is sampled (the
//! model's files, the prompts' tokens, the settings) and then one `{"prompt_index", "tokens"}` line
//! per response, in sampling order. Each batch is appended and synced before the next starts. A
//! reader keeps the whole batches of a journal with its key; a torn last line or a part batch is
//! dropped. Each batch draws from its own seed, so the batches after the kept ones are the ones an
//! unstopped pass samples: the resumed pass writes the same samples, byte for byte.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};
use crate::sample::SampleSettings;

const FORMAT: &str = "odpo-sampling-journal-v1";

/// Where a sampling pass keeps its finished batches.
#[derive(Clone, Debug)]
pub struct Journal {
    path: PathBuf,
    model: String,
}

/// The header line.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    journal: String,
    key: String,
}

/// A response line, read back.
#[derive(serde::Deserialize)]
struct Row {
    prompt_index: usize,
    tokens: Vec<u32>,
}

/// A response line, written.
#[derive(serde::Serialize)]
struct RowOut<'a> {
    prompt_index: usize,
    tokens: &'a [u32],
}

/// The journal of a pass being written.
pub(crate) struct Open {
    file: std::fs::File,
    path: PathBuf,
}

impl Journal {
    /// The journal of the samples file `out`, sampled from the model loaded from `model_path` (a
    /// folder or a `.gguf` file). The model's bytes are part of the key, so a retrained model
    /// samples afresh, while the same weights written again (a resumed pipeline exports its
    /// finished SFT stage again) keep the journal.
    pub fn beside(out: &Path, model_path: &Path) -> Result<Self> {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { path: out.with_file_name(format!("{name}.journal")), model: model_digest(model_path)? })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key of sampling `prompts` (token ids) under `settings`, in batches of `batch` with the
    /// special tokens `eos` and `pad`.
    pub(crate) fn key(&self, prompts: &[Vec<u32>], settings: &SampleSettings, batch: usize, eos: u32, pad: u32) -> String {
        let mut h = Sha256::new();
        h.update(FORMAT.as_bytes());
        h.update([0]);
        h.update(self.model.as_bytes());
        let SampleSettings { k, temperature, max_new_tokens, seed } = settings;
        for n in [*k as u64, temperature.to_bits(), *max_new_tokens as u64, *seed, batch as u64, u64::from(eos), u64::from(pad), prompts.len() as u64] {
            h.update(n.to_le_bytes());
        }
        for p in prompts {
            h.update((p.len() as u64).to_le_bytes());
            for t in p {
                h.update(t.to_le_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The responses kept under `key`: the longest run of whole batches of `batch` (or all of
    /// `jobs`) whose prompts are `jobs`' and whose lengths are at most `max_new_tokens`. None when
    /// there is no journal, or it is of another key.
    pub(crate) fn read(&self, key: &str, jobs: &[usize], batch: usize, max_new_tokens: usize) -> Option<Vec<Vec<u32>>> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut lines = text.lines();
        let header: Header = serde_json::from_str(lines.next()?).ok()?;
        if header.journal != FORMAT || header.key != key {
            tracing::warn!("{}: a journal of other prompts, settings or model, replaced: sampling afresh", self.path.display());
            return None;
        }
        let mut rows = Vec::new();
        for (line, &job) in lines.zip(jobs) {
            match serde_json::from_str::<Row>(line) {
                Ok(row) if row.prompt_index == job && row.tokens.len() <= max_new_tokens => rows.push(row.tokens),
                _ => break,
            }
        }
        if rows.len() < jobs.len() {
            rows.truncate(rows.len() - rows.len() % batch);
        }
        Some(rows)
    }

    /// Starts the journal afresh with `kept` (the responses to `jobs` read back, or none): written
    /// whole and atomically, then opened for appending.
    pub(crate) fn start(&self, key: &str, jobs: &[usize], kept: &[Vec<u32>]) -> Result<Open> {
        let mut buf = Vec::new();
        let header = Header { journal: FORMAT.into(), key: key.into() };
        line(&mut buf, &header);
        for (tokens, &prompt_index) in kept.iter().zip(jobs) {
            line(&mut buf, &RowOut { prompt_index, tokens });
        }
        odpo_model::weights::write_atomic(&self.path, &buf)?;
        let file = std::fs::OpenOptions::new().append(true).open(&self.path).map_err(|e| PipelineError::io(&self.path, e))?;
        Ok(Open { file, path: self.path.clone() })
    }

    /// Removes the journal once what it kept is in the samples file.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Open {
    /// Appends one finished batch (`tokens[i]` the response to prompt `prompts[i]`) and syncs it.
    pub(crate) fn append(&mut self, prompts: &[usize], tokens: &[Vec<u32>]) -> Result<()> {
        let mut buf = Vec::new();
        for (&prompt_index, t) in prompts.iter().zip(tokens) {
            line(&mut buf, &RowOut { prompt_index, tokens: t });
        }
        self.file.write_all(&buf).and_then(|()| self.file.sync_data()).map_err(|e| PipelineError::io(&self.path, e))
    }
}

/// SHA-256 of the model at `path`: the bytes of its files
/// ([`odpo_trainer::refcache::model_files`]). The pass has just loaded them (the pages are cached):
/// seconds for a model of gigabytes, small beside the sampling it keys.
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
fn line(buf: &mut Vec<u8>, value: &impl serde::Serialize) {
    if serde_json::to_writer(&mut *buf, value).is_ok() {
        buf.push(b'\n');
    }
}
