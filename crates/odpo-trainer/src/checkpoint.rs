//! Checkpoints: `<run>/checkpoints/step-NNNNNNNN/` holding the model (`model.bpk`, burnpack with
//! parameter ids, so the optimizer state still matches after loading), the optimizer state
//! (`optim.bpk`), `state.json` (step, data position, seed) and the resolved `config.toml`.
//!
//! Atomic by construction: everything is written into a hidden temporary folder that is renamed into
//! place last, so a folder named `step-*` is always complete. A run killed at any moment leaves at
//! worst a temporary folder, which the next save or resume removes.

use std::path::{Path, PathBuf};

use burn::store::{BurnpackStore, ModuleSnapshot};
use odpo_model::CausalLm;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::Optim;

/// The loop's position, saved with each checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Data position: training pairs consumed (the order is a function of the seed; see [`crate::data`]).
    pub pairs_seen: usize,
    /// Completion tokens consumed.
    pub tokens_seen: u64,
    /// The run seed: the data order is recomputed from it, and the dropout generator is reseeded from it and the step.
    pub seed: u64,
    /// The run's total steps, as planned when it started.
    pub total_steps: usize,
}

/// The checkpoints folder of a run.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint for `state.step` and keeps the newest `keep`. Returns its folder.
pub fn save(run_dir: &Path, model: &CausalLm, optim: &Optim, state: &TrainState, config_toml: &str, keep: usize) -> Result<PathBuf> {
    let root = dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    remove_temporaries(&root);
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;

    let mut store = BurnpackStore::from_file(tmp.join("model.bpk")).overwrite(true).metadata("step", state.step.to_string());
    model.save_into(&mut store).map_err(|e| TrainError::checkpoint(tmp.join("model.bpk"), e))?;
    optim.module().save(tmp.join("optim.bpk")).map_err(|e| TrainError::checkpoint(tmp.join("optim.bpk"), format!("{e:?}")))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::checkpoint(&tmp, e))?;
    write(&tmp.join("state.json"), json.as_bytes())?;
    write(&tmp.join("config.toml"), config_toml.as_bytes())?;

    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| TrainError::io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    for old in list(run_dir)?.iter().rev().skip(keep) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dest)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| TrainError::io(path, e))
}

fn remove_temporaries(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = dir(run_dir);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    remove_temporaries(&dir(run_dir));
    Ok(list(run_dir)?.pop())
}

/// Reads a checkpoint's state.
pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    let path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::checkpoint(&path, e))
}

/// Loads a checkpoint's weights (with their parameter ids) into `model` and its state into `optim`.
pub fn load(ckpt: &Path, mut model: CausalLm, optim: Optim) -> Result<(CausalLm, Optim, TrainState)> {
    let path = ckpt.join("model.bpk");
    let mut store = BurnpackStore::from_file(&path);
    let applied = model.load_from(&mut store).map_err(|e| TrainError::checkpoint(&path, e))?;
    if !applied.missing.is_empty() || !applied.errors.is_empty() {
        let msg = format!("does not fit the model: missing {:?}, errors {:?}", applied.missing, applied.errors);
        return Err(TrainError::checkpoint(&path, msg));
    }
    let opath = ckpt.join("optim.bpk");
    let optim = optim.load(&opath).map_err(|e| TrainError::checkpoint(&opath, e))?;
    Ok((model, optim, read_state(ckpt)?))
}
