//! Helpers shared by the integration tests: fixture reading and the shared-folder convention.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use burn::module::{ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};

mod env;
#[allow(unused_imports)]
pub use env::*;

/// A fixture folder of this crate.
pub fn fixture(case: &str) -> PathBuf {
    repo_root().join("crates/odpo-model/tests/fixtures").join(case)
}

/// A tensor read from a safetensors file, as f64 values with its shape.
#[derive(Clone, Debug)]
pub struct Arr {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Reads every tensor of a safetensors file (f32, f64, i64, i32) as f64.
pub fn read_safetensors(path: &std::path::Path) -> HashMap<String, Arr> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let b = v.data();
            let data: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => b.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect(),
                safetensors::Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
                safetensors::Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                safetensors::Dtype::I32 => b.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect(),
                d => panic!("{name}: unsupported dtype {d:?}"),
            };
            (name, Arr { shape: v.shape().to_vec(), data })
        })
        .collect()
}

pub fn int2(a: &Arr, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = a.data.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(data, [a.shape[0], a.shape[1]]), device)
}

pub fn float2(a: &Arr, device: &Device) -> Tensor<2> {
    let data: Vec<f32> = a.data.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(data, [a.shape[0], a.shape[1]]), device)
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Largest |ours - reference| of a model's logits over the real (unpadded) positions of a fixture batch;
/// `prefix` is "" (right padding) or "left_".
pub fn max_diff_logits(model: &odpo_model::CausalLm, exp: &HashMap<String, Arr>, prefix: &str, device: &Device) -> f64 {
    let ids = &exp[&format!("{prefix}input_ids")];
    let mask = &exp[&format!("{prefix}attention_mask")];
    let want = &exp[&format!("{prefix}logits")];
    let got = to_vec(model.forward(int2(ids, device), &int2(mask, device), None));
    assert_eq!(got.len(), want.data.len());
    let v = want.shape[2];
    let mut worst = 0.0f64;
    for (pos, m) in mask.data.iter().enumerate() {
        if *m == 1.0 {
            for j in 0..v {
                worst = worst.max((f64::from(got[pos * v + j]) - want.data[pos * v + j]).abs());
            }
        }
    }
    worst
}

/// Every gradient `grads` holds for a parameter of `model`, flattened, in module order.
pub fn param_grads(model: &odpo_model::CausalLm, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct V<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1.push(to_vec(g));
            }
        }
    }
    let mut v = V(grads, Vec::new());
    odpo_model::Module::visit(model, &mut v);
    v.1
}

/// Greedy generation with the KV cache from a left-padded batch of two prompts (7 and 3 tokens, 12
/// new tokens each) gives, at every step, the token and log-probability of a full forward pass over
/// the same batch so far without a cache, and (but for LongRoPE, whose frequencies follow the
/// batch's longest row) of one over each unpadded row alone.
pub fn check_cached_generation(case: &str) {
    use burn::tensor::activation::log_softmax;
    use odpo_model::generate::{GenerationConfig, SamplingConfig, generate};

    let device = test_device();
    let model = odpo_model::CausalLm::load(&fixture(case), &device).unwrap().model;
    let prompts = vec![vec![5u32, 17, 42, 9, 101, 33, 7], vec![60u32, 3, 88]];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        eos_token_ids: vec![],
        pad_token_id: 0,
        sampling: SamplingConfig { greedy: true, ..SamplingConfig::default() },
    };
    let out = generate(&model, &prompts, &cfg, &device).unwrap();
    let argmax = |lp: &[f32]| lp.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
    let t0 = prompts.iter().map(Vec::len).max().unwrap();
    let mut ids: Vec<Vec<i64>> = prompts.iter().map(|p| [vec![0; t0 - p.len()], p.iter().map(|&x| i64::from(x)).collect()].concat()).collect();
    let mut mask: Vec<Vec<i64>> = prompts.iter().map(|p| [vec![0; t0 - p.len()], vec![1; p.len()]].concat()).collect();
    for step in 0..cfg.max_new_tokens {
        let (b, t) = (ids.len(), ids[0].len());
        let flat = |rows: &[Vec<i64>]| Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), [b, t]), &device);
        let last = model.forward(flat(&ids), &flat(&mask), None).narrow(1, t - 1, 1).reshape([b as i32, -1]);
        let lp = to_vec(log_softmax(last, 1));
        for (row, lp) in lp.chunks(lp.len() / b).enumerate() {
            let next = argmax(lp);
            assert_eq!(out.tokens[row][step] as usize, next, "{case} batch row {row} step {step}");
            let d = (out.logprobs[row][step] - lp[next]).abs();
            assert!(d < 1e-4, "{case} batch row {row} step {step}: log-prob differs by {d}");
            ids[row].push(next as i64);
            mask[row].push(1);
        }
    }
    if model.rope_switch().is_some() {
        return;
    }
    for (b, prompt) in prompts.iter().enumerate() {
        let mut seq = prompt.clone();
        for step in 0..cfg.max_new_tokens {
            let t = seq.len();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(seq.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(), [1, t]), &device);
            let mask = Tensor::<2, Int>::ones([1, t], &device);
            let last = model.forward(ids, &mask, None).narrow(1, t - 1, 1).reshape([-1]);
            let lp = to_vec(log_softmax(last, 0));
            let next = lp.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0 as u32;
            assert_eq!(out.tokens[b][step], next, "{case} row {b} step {step}");
            let d = (out.logprobs[b][step] - lp[next as usize]).abs();
            assert!(d < 1e-4, "{case} row {b} step {step}: log-prob differs by {d}");
            seq.push(next);
        }
    }
}
