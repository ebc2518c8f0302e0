//! Online rounds on the built-in task (seconds each): each round starts from the last round's model
//! and samples it, the reference stays the SFT model (`initial`) or follows the starting policy
//! (`previous`), the table and plot are written, and a run interrupted between rounds resumes in its
//! folder, keeping the finished rounds and redoing the rest to the same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use odpo_pipeline::{DefaultOptions, DefaultSummary, run_default};
use odpo_trainer::RunConfig;

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;

const SMALL: [&str; 7] = ["task.sft_texts=400", "task.pref_prompts=48", "task.eval_prompts=8", "sft.steps=30", "pref.epochs=2", "eval.samples_per_prompt=2", "pref.rounds=3"];

fn run(dir: &Path, extra: &[&str]) -> DefaultSummary {
    let sets = SMALL.iter().chain(extra).map(|s| s.to_string()).collect();
    let opts = DefaultOptions { config: None, sets, run_dir: Some(dir.to_path_buf()), verbose: false };
    run_default(&opts, &odpo_model::backend::device("flex").unwrap()).unwrap()
}

fn round_config(dir: &Path, k: usize) -> RunConfig {
    RunConfig::from_file(&dir.join(format!("odpo/round-{k}/config.toml")), &[]).unwrap().into_inner()
}

fn weights(model: &Path) -> Vec<u8> {
    std::fs::read(model.join("model.safetensors")).unwrap()
}

fn tmp(name: &str) -> env::Scratch {
    env::scratch(&format!("rounds-{name}"))
}

#[test]
fn rounds_chain_their_models_and_resume_between_rounds() {
    let dir = tmp("initial");
    let s = run(&dir, &[]);
    assert_eq!(s.rounds.len(), 3);
    for (k, r) in s.rounds.iter().enumerate() {
        // Each round starts from the last one's model, samples it on 16 fresh prompts, keeps the SFT reference.
        let start = if k == 0 { s.sft_model.clone() } else { s.rounds[k - 1].model.clone() };
        assert_eq!((r.round, r.prompts, &r.start, &r.reference), (k + 1, 16, &start, &s.sft_model));
        assert!(r.pairs > 0 && r.pairs <= 16, "round {}: {} pairs", r.round, r.pairs);
        let cfg = round_config(&dir, k + 1);
        assert_eq!(cfg.model.path, start);
        assert_eq!(cfg.model.reference, (k > 0).then(|| s.sft_model.clone()), "round {}", k + 1);
        assert!(r.eval.kl.seq.mean.is_finite() && r.eval.reward.mean.is_finite());
    }
    assert_eq!(s.policy_model, s.rounds[2].model);
    assert_eq!(s.pairs, s.rounds.iter().map(|r| r.pairs).sum::<usize>());
    let csv = std::fs::read_to_string(dir.join("rounds.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(dir.join("rounds.md").exists() && dir.join("rounds.png").exists());

    // Interrupted after round 1: rounds 2 and 3 (and round 3's samples) are gone. The rerun keeps
    // round 1 untouched and redoes the others to the same weights.
    let (round1, later) = (weights(&s.rounds[0].model), [weights(&s.rounds[1].model), weights(&s.rounds[2].model)]);
    let round1_time = std::fs::metadata(s.rounds[0].model.join("model.safetensors")).unwrap().modified().unwrap();
    for k in [2, 3] {
        std::fs::remove_dir_all(dir.join(format!("odpo/round-{k}"))).unwrap();
    }
    std::fs::remove_file(dir.join("data/samples-round-3.jsonl")).unwrap();
    let again = run(&dir, &[]);
    assert_eq!(std::fs::metadata(s.rounds[0].model.join("model.safetensors")).unwrap().modified().unwrap(), round1_time, "round 1 was trained again");
    assert_eq!(weights(&again.rounds[0].model), round1);
    assert!(weights(&again.rounds[1].model) == later[0] && weights(&again.rounds[2].model) == later[1], "a resumed round gave other weights");
    assert_eq!(again.rounds[2].eval, s.rounds[2].eval);
}

#[test]
fn a_moving_reference_is_the_starting_policy() {
    let dir = tmp("previous");
    let s = run(&dir, &["pref.round_reference=\"previous\""]);
    for (k, r) in s.rounds.iter().enumerate() {
        assert_eq!(r.reference, r.start);
        // The trainer's default reference is the starting point: nothing else is named.
        assert_eq!(round_config(&dir, k + 1).model.reference, None);
    }
}
