//! Data-parallel training equals single-device training with the same global batch: six ODPO steps
//! of the tiny GPT-2 (batch 8 = 2 devices × 2 micro-batches × 2 pairs) on one device and on two, then
//! the logged losses and every exported weight compared.
//!
//! The two devices: `ODPO_DP_DEVICES` (a comma list of device specs, e.g. `cuda:0,cuda:1`, or one device
//! twice, `cuda,cuda`, on a machine with one GPU); else, when the device is a wgpu one, `wgpu` and
//! `wgpu:cpu` (`vulkan` and `vulkan:cpu` on Vulkan; two separate wgpu devices; on a machine without a GPU
//! both run on Mesa's llvmpipe, so tensors really move between device servers); else the build's
//! default device twice (two policy copies on one device: checks the split of the batch and the sum
//! of the gradients, not transfers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::Device;
use common::*;

fn dp_devices() -> (Vec<Device>, String) {
    let specs: Vec<String> = match std::env::var("ODPO_DP_DEVICES") {
        Ok(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
        Err(_) if format!("{:?}", test_device()).contains("Wgpu") => {
            // The wgpu flavour the suites run on (`vulkan`, `metal` or `wgpu`), and its software adapter.
            let spec = std::env::var("ODPO_TEST_DEVICE").unwrap_or_default();
            let name = ["vulkan", "metal"].into_iter().find(|n| spec.split(':').next() == Some(n)).unwrap_or("wgpu");
            vec![name.to_string(), format!("{name}:cpu")]
        }
        Err(_) => return (vec![test_device(), test_device()], "the default device twice".into()),
    };
    let devices = specs.iter().map(|s| odpo_model::backend::device(s).expect("device spec")).collect();
    (devices, specs.join(", "))
}

fn run(dir: &std::path::Path, name: &str, devices: &[Device]) -> std::path::PathBuf {
    let model = tiny_model(dir);
    let run = dir.join(name);
    let sets = ["train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=6", "train.log_every=1", "eval.every=0", "eval.max_pairs=8"];
    let cfg = config(&model, &run, "", &sets);
    let summary = odpo_trainer::train_on_devices(&cfg, data(48, 8), devices, false, None).expect("training");
    assert_eq!(summary.steps, 6);
    run
}

#[test]
fn two_devices_equal_one_with_the_same_global_batch() {
    let (devices, which) = dp_devices();
    println!("data-parallel devices: {which}");
    let dir = scratch("data-parallel");
    let one = run(&dir, "one", &devices[..1]);
    let two = run(&dir, "two", &devices);

    let losses = |run| -> Vec<f64> { metric_rows(run, "train").iter().map(|r| r["loss"].as_f64().expect("loss")).collect() };
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 6);
    for (step, (a, b)) in l1.iter().zip(&l2).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "step {}: loss {a} on one device, {b} on two", step + 1);
    }
    // The training moved the weights; the two runs agree far more closely than one step moves them.
    let (w1, w2) = (exported_floats(&one), exported_floats(&two));
    assert_eq!(w1.len(), w2.len());
    let (mut worst, mut moved) = (0f32, 0f32);
    let init = {
        let cfg = config(&tiny_model(&dir), &dir.join("init"), "", &[]);
        let (config, policy) = odpo_trainer::load_policy(&cfg.model, cfg.train.seed, &devices[0]).expect("policy");
        odpo_trainer::export(&policy, &config, &dir.join("init/model"), None).expect("export");
        exported_floats(&dir.join("init"))
    };
    for (((name, a), (_, b)), (_, i)) in w1.iter().zip(&w2).zip(&init) {
        // The key third of the fused QKV bias has an exactly-zero gradient: rounding noise there is
        // turned into ±lr steps by AdamW on either side, whatever the summation order.
        let skip = if name.contains("c_attn.bias") { a.len() / 3..2 * a.len() / 3 } else { 0..0 };
        for (j, ((x, y), z)) in a.iter().zip(b).zip(i).enumerate() {
            if !skip.contains(&j) {
                worst = worst.max((x - y).abs());
                moved = moved.max((x - z).abs());
            }
        }
    }
    println!("largest weight difference {worst:.3e}; largest move from the start {moved:.3e}");
    assert!(moved > 1e-3, "training did not move the weights ({moved})");
    assert!(worst <= 2e-5, "one device and two differ by {worst} (the weights moved by up to {moved})");
}

#[test]
fn a_batch_that_does_not_split_evenly_is_refused() {
    let dir = scratch("data-parallel-split");
    let model = tiny_model(&dir);
    let cfg = config(&model, &dir.join("run"), "", &["train.batch_size=6", "train.micro_batch_size=2", "train.max_steps=1"]);
    let devices = [test_device(), test_device()];
    let err = odpo_trainer::train_on_devices(&cfg, data(16, 0), &devices, false, None).map(|_| ()).expect_err("6 pairs on 2 devices of 2");
    assert_eq!(err.to_string(), "config: `train.batch_size` (6) must be a multiple of 2 devices × `train.micro_batch_size` (2) = 4, so that every device gets whole micro-batches");
}
