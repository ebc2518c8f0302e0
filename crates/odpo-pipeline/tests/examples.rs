//! Runs the crate's examples (`cargo test` builds examples but does not run them): each example's body
//! is a `run` function, called here on tiny settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
#[path = "../examples/custom_offset.rs"]
mod custom_offset;
#[allow(dead_code)]
#[path = "../examples/custom_reward.rs"]
mod custom_reward;

#[path = "../../odpo-model/tests/common/env.rs"]
mod env;

use env::scratch;
use odpo_pipeline::RewardModel;

fn device() -> burn::tensor::Device {
    odpo_model::backend::device("flex").expect("the flex backend is compiled in")
}

#[test]
fn custom_offset_trains_odpo_with_the_user_offsets() {
    let dir = scratch("custom-offset");
    let summary = custom_offset::run(&dir, 10, &device()).expect("example runs");
    assert_eq!(summary.steps, 10);
    let (first, last) = summary.train_loss.expect("logged a loss");
    assert!(first.is_finite() && last.is_finite());
    // The offsets the run used are the user's: bounded by alpha = 1, and logged as the mean offset.
    let end = summary.eval_end.expect("evaluated");
    let mean_offset = end["offset/mean"];
    assert!(mean_offset > 0.0 && mean_offset < 1.0, "{mean_offset}");
    assert!(summary.exported.expect("exported").join("model.safetensors").is_file());
}

#[test]
fn bounded_offset_saturates() {
    let dir = scratch("bounded-offset");
    let path = dir.join("s.jsonl");
    custom_offset::write_scored_samples(&path, 4, 3, 0).unwrap();
    let cfg = odpo_data::DataConfig::new(&path, odpo_data::Format::ScoredJsonl);
    let pairs = odpo_data::load(&cfg).unwrap().pairs;
    assert!(!pairs.is_empty());
    for p in &pairs {
        let d = custom_offset::bounded_offset(p, 1.0);
        assert!(d > 0.0 && d < 1.0, "{d}");
    }
}

#[test]
fn custom_reward_drives_sample_score_pair_train() {
    let dir = scratch("custom-reward");
    let report = custom_reward::run(&dir, 10, &device()).expect("example runs");
    assert_eq!(report.reward_model, "word rule");
    assert!(report.policy.reward.mean.is_finite() && report.reference.reward.mean.is_finite());
    assert!(report.policy.kl.seq.mean.is_finite());
}

#[test]
fn word_rule_scores_by_hand() {
    let r = custom_reward::WordRule { liked: vec!["great"], disliked: vec!["bad"] };
    let s = r.score(&["p".into(), "p".into()], &["great great".into(), "bad".into()]).unwrap();
    assert!((s[0] - 1.9).abs() < 1e-9 && (s[1] + 1.05).abs() < 1e-9, "{s:?}");
}
