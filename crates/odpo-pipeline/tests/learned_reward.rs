//! The learned reward model on real material: SmolLM2-135M-Instruct under a ridge head, fitted to a
//! slice of the ODPO paper's scored IMDB texts, ranks held-out texts (other prompts) the way the
//! paper's sentiment scores do; saved and loaded, it scores as before.
//!
//! The shared folder is `$ODPO_SHARED`, else `../shared` beside the checkout. When it is missing the test
//! prints "skipping" and passes, unless `ODPO_REQUIRE_SHARED=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use odpo_pipeline::RewardModel;
use odpo_pipeline::compare::spearman;
use odpo_pipeline::learned::{FeatureSpec, FitOptions, LearnedReward};

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;


fn shared() -> Option<PathBuf> {
    env::shared_path("models/smollm2-135m-instruct")?;
    env::shared_dir()
}

#[test]
fn reward_head_on_smollm2_ranks_heldout_imdb_texts() {
    let Some(shared) = shared() else { return };
    let device = odpo_model::backend::device("flex").unwrap();
    let table = odpo_pipeline::ScoreTable::from_jsonl(&shared.join("data/odpo-paper/imdb-sft-test.jsonl")).unwrap();
    // Every 8th text (320 of 2,560, over most prompts), 48 tokens each: about a minute on 2 cores.
    let entries: Vec<(String, String, f64)> = table.entries().into_iter().step_by(8).collect();
    let opts = FitOptions {
        backbone: shared.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        features: FeatureSpec { max_length: 48, ..FeatureSpec::default() },
        heldout_fraction: 0.25,
        ..FitOptions::default()
    };
    // Too little data is refused before the backbone loads.
    let err = LearnedReward::fit(&entries[..3], &opts, &device).err().map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("3 scored texts; at least 10 are needed to fit a reward model"));
    let (model, report) = LearnedReward::fit(&entries, &opts, &device).unwrap();
    println!("{report:?}");
    assert!(report.heldout_texts >= 50, "{report:?}");
    assert!(report.spearman > 0.4, "held-out Spearman {} is too low to rank sentiment", report.spearman);
    assert!(report.rmse < report.heldout_std, "the head predicts worse than the mean score: {report:?}");

    // Saved and loaded: the same scores.
    let dir = env::scratch("learned-reward");
    model.save(&dir).unwrap();
    let again = LearnedReward::load(&dir, &device).unwrap();
    let (p, t): (Vec<String>, Vec<String>) = entries.iter().take(6).map(|e| (e.0.clone(), e.1.clone())).unzip();
    let a = model.score(&p, &t).unwrap();
    let b = again.score(&p, &t).unwrap();
    // The head is stored as JSON decimals: equal to the last bit or so.
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{a:?} vs {b:?}");
    }
    // And the scores rank a clearly positive text above a clearly negative one.
    let s = model.score(&["This movie".into(), "This movie".into()], &["was wonderful, moving and beautifully acted. I loved every minute.".into(), "was awful, boring and badly acted. I hated every minute.".into()]).unwrap();
    println!("positive {:.3}, negative {:.3}; ρ(a, b) = {}", s[0], s[1], spearman(&a, &b));
    assert!(s[0] > s[1], "positive {} <= negative {}", s[0], s[1]);
}
