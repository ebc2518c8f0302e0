//! Runs the crate's examples (`cargo test` builds examples but does not run them): each example's body
//! is a `run` function, called here on the same tiny settings as its `main`.
#![allow(clippy::unwrap_used, clippy::expect_used)]


#[allow(dead_code)]
#[path = "../examples/custom_loop.rs"]
mod custom_loop;

use custom_loop::{LoopConfig, run};

fn device() -> burn::tensor::Device {
    odpo_model::backend::device("flex").expect("the flex backend is compiled in")
}

#[test]
fn custom_loop_with_a_user_objective_learns_the_toy_preference() {
    let losses = run(&LoopConfig::default(), &device()).expect("custom loop runs");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first, "the loss should fall: {first} -> {last}");
}

#[test]
fn custom_loop_with_the_builtin_objective_runs() {
    let cfg = LoopConfig { steps: 20, custom_objective: false, ..LoopConfig::default() };
    let losses = run(&cfg, &device()).expect("custom loop runs");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[losses.len() - 1] < losses[0], "{losses:?}");
}
