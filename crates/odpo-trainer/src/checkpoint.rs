//! Checkpoints: `<run>/checkpoints/step-NNNNNNNN/` holding the model (`model.bpk`, burnpack with
//! parameter ids, so the optimizer state still matches after loading), the optimizer state
//! (`optim.bpk`), `state.json` (step, data position, seed) and the resolved `config.toml`; under
//! TR-DPO (`train.sync_ref_model`) also the reference as it has moved (`reference.bpk`), which a
//! resume cannot rebuild from the starting model.
//!
//! Atomic by construction: everything is written into a hidden temporary folder that is renamed into
//! place last, so a folder named `step-*` is always complete. A run killed at any moment leaves at
//! worst a temporary folder, which the next save or resume removes. A write that fails (a full disk,
//! a read-only folder) stops the run with the path and the cause, and leaves the earlier
//! checkpoints as they were.
//!
//! Checked on resume: `checksums.json` holds the SHA-256 of every other file, written last; a
//! checkpoint whose files were damaged afterwards (a truncated `model.bpk`, a flipped bit) is
//! passed over, with a warning that names the file, for the newest intact one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::store::{BurnpackStore, ModuleSnapshot};
use odpo_model::CausalLm;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    /// Early stopping's record (`eval.early_stopping`); absent in checkpoints of runs without it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub early_stop: crate::early_stop::EarlyStopState,
}

fn is_default(s: &crate::early_stop::EarlyStopState) -> bool {
    *s == crate::early_stop::EarlyStopState::default()
}

/// The checkpoints folder of a run.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint for `state.step` and keeps the newest `keep`. Returns its folder. `reference`:
/// the reference model to keep beside the policy (TR-DPO's, which moves during training).
pub fn save(run_dir: &Path, model: &CausalLm, optim: &Optim, reference: Option<&CausalLm>, state: &TrainState, config_toml: &str, keep: usize) -> Result<PathBuf> {
    let root = dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    remove_temporaries(&root);
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    // A failed write (a full disk) takes its partial folder with it, and the earlier checkpoints stay.
    if let Err(e) = write_into(&tmp, model, optim, reference, state, config_toml) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| TrainError::io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    // Only now, with the new checkpoint complete, do others go: the newest `keep` are kept, the new
    // one always among them.
    let others: Vec<PathBuf> = list(run_dir)?.into_iter().filter(|c| *c != dest).collect();
    for old in others.iter().rev().skip(keep.max(1) - 1) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dest)
}

/// Writes a checkpoint's files into `tmp`, checksums last.
fn write_into(tmp: &Path, model: &CausalLm, optim: &Optim, reference: Option<&CausalLm>, state: &TrainState, config_toml: &str) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| TrainError::io(tmp, e))?;

    let mut store = BurnpackStore::from_file(tmp.join("model.bpk")).overwrite(true).metadata("step", state.step.to_string());
    model.save_into(&mut store).map_err(|e| TrainError::checkpoint(tmp.join("model.bpk"), e))?;
    if let Some(reference) = reference {
        let mut store = BurnpackStore::from_file(tmp.join(REFERENCE)).overwrite(true).metadata("step", state.step.to_string());
        reference.save_into(&mut store).map_err(|e| TrainError::checkpoint(tmp.join(REFERENCE), e))?;
    }
    optim.record(model).save(tmp.join("optim.bpk")).map_err(|e| TrainError::checkpoint(tmp.join("optim.bpk"), e))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::checkpoint(tmp, e))?;
    write(&tmp.join("state.json"), json.as_bytes())?;
    write(&tmp.join("config.toml"), config_toml.as_bytes())?;
    // The checksums of what is on disk now, written last.
    let mut sums = BTreeMap::new();
    for name in FILES.iter().chain(reference.map(|_| &REFERENCE)) {
        sums.insert(name.to_string(), sha256_file(&tmp.join(name))?);
    }
    let json = serde_json::to_string_pretty(&sums).map_err(|e| TrainError::checkpoint(tmp, e))?;
    write(&tmp.join(CHECKSUMS), json.as_bytes())?;
    Ok(())
}

/// The files of a checkpoint that `checksums.json` covers.
const FILES: [&str; 4] = ["model.bpk", "optim.bpk", "state.json", "config.toml"];
/// The moved reference of a TR-DPO run, checked too when `checksums.json` lists it.
const REFERENCE: &str = "reference.bpk";
const CHECKSUMS: &str = "checksums.json";

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| TrainError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks a checkpoint's files against its `checksums.json`: `Err` says what is damaged or missing.
/// A checkpoint written before checksums existed has none to check and passes.
pub fn verify(ckpt: &Path) -> std::result::Result<(), String> {
    let sums_path = ckpt.join(CHECKSUMS);
    if !sums_path.exists() && FILES.iter().all(|f| ckpt.join(f).is_file()) {
        tracing::warn!("checkpoint {} has no {CHECKSUMS} (written by an older odpo); its files are not checked", ckpt.display());
        return Ok(());
    }
    let text = std::fs::read_to_string(&sums_path).map_err(|e| format!("{CHECKSUMS}: {e}"))?;
    let sums: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| format!("{CHECKSUMS} is unreadable: {e}"))?;
    let reference = sums.contains_key(REFERENCE).then_some(REFERENCE);
    for name in FILES.into_iter().chain(reference) {
        let path = ckpt.join(name);
        let want = sums.get(name).ok_or_else(|| format!("{CHECKSUMS} has no entry for {name}"))?;
        let len = std::fs::metadata(&path).map(|m| m.len()).map_err(|e| format!("{name}: {e}"))?;
        let got = sha256_file(&path).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!("{name} ({len} bytes) does not match its checksum"));
        }
    }
    Ok(())
}

/// The newest checkpoint whose files match their checksums. Damaged ones are passed over with a
/// warning naming what is damaged; when there are checkpoints and none is intact, the error lists
/// every one tried and why.
pub fn latest_intact(run_dir: &Path) -> Result<Option<PathBuf>> {
    remove_temporaries(&dir(run_dir));
    let all = list(run_dir)?;
    let mut tried = Vec::new();
    for ckpt in all.iter().rev() {
        match verify(ckpt) {
            Ok(()) => {
                if !tried.is_empty() {
                    tracing::warn!("resuming from {}, the newest intact checkpoint", ckpt.display());
                }
                // The damaged ones are set aside (not deleted): they are not checkpoints of this run's
                // future any more, and `keep_checkpoints` must not count them.
                for bad in all.iter().filter(|c| *c > ckpt) {
                    let name = bad.file_name().and_then(|n| n.to_str()).unwrap_or("step");
                    let aside = dir(run_dir).join(format!("damaged-{name}"));
                    let _ = std::fs::remove_dir_all(&aside);
                    match std::fs::rename(bad, &aside) {
                        Ok(()) => tracing::warn!("damaged checkpoint kept aside as {}", aside.display()),
                        Err(e) => return Err(TrainError::io(bad, e)),
                    }
                }
                return Ok(Some(ckpt.clone()));
            }
            Err(why) => {
                tracing::warn!("checkpoint {} is damaged: {why}; trying the one before", ckpt.display());
                tried.push(format!("{}: {why}", ckpt.file_name().and_then(|n| n.to_str()).unwrap_or("?")));
            }
        }
    }
    if tried.is_empty() {
        return Ok(None);
    }
    // Nothing is set aside here: which damaged checkpoint to give up is the user's call, and the
    // message says how (with no checkpoint left, `--resume` trains from step 0).
    Err(TrainError::checkpoint(
        dir(run_dir),
        format!(
            "no intact checkpoint to resume from; tried {}; to train from step 0 instead, move the step-* folders out of {} and resume again",
            tried.join("; "),
            dir(run_dir).display()
        ),
    ))
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
pub fn load(ckpt: &Path, model: CausalLm, optim: Optim) -> Result<(CausalLm, Optim, TrainState)> {
    let model = load_model(ckpt, model)?;
    let opath = ckpt.join("optim.bpk");
    let optim = optim.load(&opath).map_err(|e| TrainError::checkpoint(&opath, e))?;
    Ok((model, optim, read_state(ckpt)?))
}

/// Refuses a resume whose config builds other trainable parameters or another optimizer than the
/// checkpoint's own `config.toml` (the adapters' presence, rank and targets, a quantised base, the
/// optimizer): the saved weights would not load (burn lists every missing tensor), or the saved
/// optimizer state would be dropped without a word. What may change on resume (the steps, the
/// learning rate, evaluation, ...) is not compared, nor paths, which move with a run folder.
pub fn check_resumable(ckpt: &Path, cfg: &crate::RunConfig) -> Result<()> {
    let path = ckpt.join("config.toml");
    // Checked against `checksums.json` already; a config this build cannot read is the load's
    // error to give.
    let Some(saved) = std::fs::read_to_string(&path).ok().and_then(|t| toml::from_str::<crate::RunConfig>(&t).ok()) else {
        return Ok(());
    };
    let adapters = |c: &crate::RunConfig| match &c.lora {
        None => "none".to_string(),
        Some(l) => format!("rank {} on {:?}{}{}", l.rank, l.targets, if l.target_parameters.is_empty() { String::new() } else { format!(" and {:?}", l.target_parameters) }, if l.quantized_base { " over a quantised base" } else { "" }),
    };
    let optimizer = |c: &crate::RunConfig| crate::config::optimizer_name(c.optim.optimizer).to_string();
    for (key, now, then) in [("lora", adapters(cfg), adapters(&saved)), ("optim.optimizer", optimizer(cfg), optimizer(&saved))] {
        if now != then {
            return Err(TrainError::config(
                key,
                format!(
                    "is {now} here but {then} in the checkpoint being resumed ({}): a resumed run continues the weights and optimizer state it saved; set it back, or train a new run in another folder",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether a checkpoint keeps a TR-DPO reference (`reference.bpk`).
pub fn keeps_reference(ckpt: &Path) -> bool {
    ckpt.join(REFERENCE).is_file()
}

/// Loads the reference a TR-DPO checkpoint kept into `reference` (a model of the same architecture);
/// None when the checkpoint holds none (a run without `train.sync_ref_model`).
pub fn load_reference(ckpt: &Path, reference: CausalLm) -> Result<Option<CausalLm>> {
    if !keeps_reference(ckpt) {
        return Ok(None);
    }
    load_bpk(&ckpt.join(REFERENCE), reference).map(Some)
}

/// Loads a checkpoint's weights (with their parameter ids) into `model`.
pub fn load_model(ckpt: &Path, model: CausalLm) -> Result<CausalLm> {
    load_bpk(&ckpt.join("model.bpk"), model)
}

fn load_bpk(path: &Path, mut model: CausalLm) -> Result<CausalLm> {
    let path = path.to_path_buf();
    let mut store = BurnpackStore::from_file(&path);
    let applied = model.load_from(&mut store).map_err(|e| TrainError::checkpoint(&path, e))?;
    if !applied.missing.is_empty() || !applied.errors.is_empty() {
        let msg = format!("does not fit the model: missing {:?}, errors {:?}", applied.missing, applied.errors);
        return Err(TrainError::checkpoint(&path, msg));
    }
    Ok(model)
}
