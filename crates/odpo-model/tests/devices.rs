//! Device specs that name hardware the machine lacks (a CUDA device, a wgpu adapter) are refused
//! with an error that says what is missing, rather than a panic inside burn's runtimes or libtorch;
//! a tensor larger than the device holds is an out-of-memory error that names its size; logits
//! larger than one buffer of the device run through the LM head in runs that fit; half-precision
//! logits give the log-probabilities and gradients of the definition; the kernel census counts every
//! launch on the cubecl backends.
//! In builds with `cuda`, `tch`, `wgpu` or `vulkan` (the conformance binary has several); elsewhere
//! the backend's missing feature is named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::module::{ModuleVisitor, Param};
use burn::tensor::{Int, Tensor, TensorData};
use odpo_model::backend::{Backend, device};
use odpo_model::logprobs::{head_logprobs, logit_rows_per_buffer};
use odpo_model::{CausalLm, Module, ModelConfig};
use odpo_model::out_of_memory::{OutOfMemory, catch};

#[test]
fn cuda_devices_the_machine_lacks_are_refused_with_the_reason() {
    for (backend, spec) in [(Backend::Cuda, "cuda:4096"), (Backend::TchCuda, "tch-cuda:4096")] {
        let err = device(spec).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{spec} resolved"));
        if !backend.compiled() {
            assert!(err.contains("not compiled into this build"), "{err}");
            continue;
        }
        assert!(err.starts_with(&format!("device `{spec}`: ")), "{err}");
        assert!(err.contains("NVIDIA driver") || err.contains("libtorch sees"), "{err}");
        // Device 0 resolves where there is a GPU and is refused the same way where there is none.
        if let Err(e) = device(backend.name()) {
            let e = e.to_string();
            assert!(e.contains("NVIDIA driver") || e.contains("libtorch sees no CUDA device"), "{e}");
        }
    }
}

#[test]
fn wgpu_adapters_the_machine_lacks_are_refused_with_the_reason() {
    for backend in [Backend::Wgpu, Backend::Vulkan, Backend::Metal] {
        let spec = format!("{}:discrete:4096", backend.name());
        let err = device(&spec).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{spec} resolved"));
        if !backend.compiled() {
            assert!(err.contains("not compiled into this build"), "{err}");
            continue;
        }
        assert!(err.starts_with(&format!("device `{spec}`: ")) && err.contains("no matching"), "{err}");
        // The default adapter, where the machine has one, comes up once and is the same device
        // however often it is asked for.
        if let Ok(first) = device(backend.name()) {
            let x = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &first);
            assert_eq!(x.sum().into_scalar::<f32>(), 6.0);
            assert_eq!(device(backend.name()).ok(), Some(first));
        }
    }
}

#[test]
fn a_tensor_larger_than_the_device_is_an_out_of_memory_error() {
    // burn's CPU backend allocates through Rust's allocator, which ends the process on a failure.
    let spec = std::env::var("ODPO_TEST_DEVICE").unwrap_or_default();
    if spec.is_empty() || spec.starts_with("flex") {
        eprintln!("skipped on flex: a failed CPU allocation ends the process (the test runs on the other backends, `cargo xtask conformance`)");
        return;
    }
    let device = common::test_device();
    // 2^46 f32 = 256 TiB: more than any device, and than a 47-bit address space, holds.
    let bytes = 1u64 << 48;
    let oom = match catch(|| Tensor::<2>::zeros([1 << 23, 1 << 23], &device).try_into_data()) {
        Err(oom) => oom,                                                                        // libtorch: a panic
        Ok(Err(e)) => OutOfMemory::find(&format!("{e:?}")).unwrap_or_else(|| panic!("{spec}: not an allocation failure: {e:?}")), // cubecl: read back
        Ok(Ok(_)) => panic!("{spec}: 256 TiB allocated"),
    };
    eprintln!("{spec}: {oom}");
    // Where the backend gives the size, it is the tensor's (c10 prints it to two decimals).
    if let Some(b) = oom.bytes {
        assert!((b as f64 / bytes as f64 - 1.0).abs() < 0.01, "{spec}: {b} bytes");
    }
    // The failure is the tensor's alone: the device goes on computing.
    let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
    assert_eq!(x.sum().into_scalar::<f32>(), 6.0);
}

/// A fresh model no host holds is refused before its weights are drawn, on every device: where the
/// device keeps its tensors in host memory (flex, libtorch's CPU) for all its weights, elsewhere for
/// its largest tensor, which is drawn on the host on its way (flex aborted the process on the
/// failed allocation).
#[test]
fn a_fresh_model_no_host_holds_is_refused_before_its_weights_are_drawn() {
    let spec = std::env::var("ODPO_TEST_DEVICE").unwrap_or_else(|_| "default".into());
    let device = common::test_device();
    let on_host = odpo_model::backend::in_host_memory(&device);
    let host_backend = spec == "default" || spec.starts_with("flex") || spec == "tch" || spec == "tch:0";
    assert_eq!(on_host, host_backend, "{spec}");
    // Each MLP projection 100,000 × 1,000,000: 400 GB (372.5 GiB); the model 2,592 billion weights, 10.4 TB.
    let json = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 100000, "intermediate_size": 1000000,
        "num_hidden_layers": 8, "num_attention_heads": 100, "num_key_value_heads": 20});
    let config = ModelConfig::from_hf_json(&json, "huge.json".as_ref()).unwrap();
    let started = std::time::Instant::now();
    let err = CausalLm::random(&config, 0, &device).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{spec}: a 10 TB model was built"));
    eprintln!("{spec}: {err}");
    if on_host {
        assert!(err.starts_with("<random init>: the model's 2592.2 billion parameters need at least 9.4 TiB of host memory as f32, where the device keeps them, and this machine has "), "{err}");
    } else {
        assert!(err.starts_with("<random init>: the model's largest tensor, `model.layers.0.mlp.gate_proj.weight` [100000, 1000000], needs 372.5 GiB of host memory, where it is drawn on its way to the device"), "{err}");
    }
    assert!(err.ends_with("free (memory and swap)"), "{err}");
    // Refused before anything was drawn.
    assert!(started.elapsed().as_secs() < 10, "{spec}: {:?}", started.elapsed());
}

/// The kernel census (`odpo bench --kernels`) sees every launch: each further addition in a chain
/// launches the same kernels as the one before, and a timed census counts the same launches and
/// times each kernel. flex and libtorch launch nothing the census sees.
#[test]
fn the_kernel_census_counts_every_launch() {
    let device = common::test_device();
    if !odpo_kernels::launches_kernels(&device) {
        eprintln!("skipped: {device:?} is not a cubecl device (the test runs on wgpu, vulkan and cuda, `cargo xtask conformance`)");
        return;
    }
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let (a, b) = (Tensor::<2>::random([64, 64], normal, &device), Tensor::<2>::random([64, 64], normal, &device));
    let chain = |n: usize| {
        let mut c = a.clone();
        for _ in 0..n {
            c = c + b.clone();
        }
        c.into_data()
    };
    chain(3); // compiles the kernels
    let census = |n: usize, timed: bool| odpo_kernels::kernel_census(timed, || chain(n)).1.expect("a cubecl build");
    let launches = |n: usize| census(n, false).iter().map(|k| k.launches).sum::<u64>();
    let (one, two, three) = (launches(1), launches(2), launches(3));
    eprintln!("launches of chains of 1, 2, 3 additions: {one}, {two}, {three}");
    assert!(one >= 1, "no launch seen");
    assert!(two > one && three - two == two - one, "launches {one}, {two}, {three}: each addition should add the same launches");
    let timed = census(3, true);
    assert_eq!(timed.iter().map(|k| k.launches).sum::<u64>(), three, "a timed census counts other launches: {timed:?}");
    assert!(timed.iter().all(|k| k.device_seconds.is_some_and(|s| s >= 0.0)), "{timed:?}");
    assert!(census(3, false).iter().all(|k| k.device_seconds.is_none()));
}

/// A step's logits larger than one buffer of the device (wgpu caps one buffer: 128 MiB on Mesa's
/// lavapipe, which CI runs) go through the LM head and the log-softmax in runs of rows that fit, with
/// the log-probabilities and the gradients of the head's weight and of the hidden states that the
/// definition gives, computed here in f64. A device without such a cap (flex, libtorch), or with
/// one that a test-sized step does not reach, runs the same step in runs of 257 rows.
#[test]
fn logits_past_one_buffer_of_the_device_run_through_the_head_in_runs() {
    let spec = std::env::var("ODPO_TEST_DEVICE").unwrap_or_else(|_| "default".into());
    let device = common::test_device();
    let vocab = 32_768;
    let Some(cap) = odpo_kernels::max_buffer_bytes(&device) else {
        eprintln!("`{spec}` caps no buffer below its memory: runs of 257 rows, as on a capped device");
        head_in_runs_against_f64(&device, &spec, vocab, 600, Some(257));
        return;
    };
    let per_buffer = logit_rows_per_buffer(&device, vocab).unwrap();
    // Enough rows that their f32 logits are more than one buffer holds.
    let rows = per_buffer + per_buffer / 4 + 1;
    if rows > 4096 {
        eprintln!("`{spec}`: one buffer holds {cap} bytes, {per_buffer} rows of logits, more than a test-sized step reaches: runs of 257 rows");
        head_in_runs_against_f64(&device, &spec, vocab, 600, Some(257));
        return;
    }
    eprintln!("`{spec}`: one buffer holds {cap} bytes, {per_buffer} rows of {vocab} f32 logits");
    let n = head_in_runs_against_f64(&device, &spec, vocab, rows, None);
    assert!(n as u64 * vocab as u64 * 4 > cap, "the logits of {n} rows should not fit in one buffer");
}

/// A one-layer Llama with a `vocab`-token tied head, two sequences of at least `rows / 2` predicting
/// positions through [`head_logprobs`] with `rows_per_run`, checked against the definition in f64.
/// Returns the number of rows.
fn head_in_runs_against_f64(device: &burn::tensor::Device, spec: &str, vocab: usize, rows: usize, rows_per_run: Option<usize>) -> usize {
    let d = 8;
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": d, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
    });
    let config = ModelConfig::from_hf_json(&cfg, "devices.rs".as_ref()).unwrap();
    let ad = device.clone().autodiff();
    let model = CausalLm::random(&config, 7, &ad).unwrap();
    let (b, t) = (2, rows.div_ceil(2) + 1);
    let ids: Vec<i64> = (0..b * t).map(|i| ((i * 7919 + 13) % vocab) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &ad);
    let attn = Tensor::<2, Int>::ones([b, t], &ad);
    let hidden = model.hidden(ids.clone(), &attn, None).narrow(1, 0, t - 1).detach().require_grad();
    let targets = ids.narrow(1, 1, t - 1);
    let lp = head_logprobs(&model, hidden.clone(), targets.clone(), rows_per_run);
    let grads = lp.clone().sum().backward();

    // The reference: log softmax(h·Wᵀ)[target], and the gradients of its sum, in f64.
    let n = b * (t - 1);
    eprintln!("`{spec}`: {n} rows, {} bytes of f32 logits", n * vocab * 4);
    let h = f64s(hidden.clone().inner());
    let (w, dw) = embedding(&model, [vocab, d], &grads);
    let tg: Vec<usize> = targets.into_data().convert::<i64>().try_into_vec::<i64>().unwrap().into_iter().map(|x| x as usize).collect();
    let (mut want_lp, mut want_dh, mut want_dw) = (vec![0.0; n], vec![0.0; n * d], vec![0.0; vocab * d]);
    let mut logits = vec![0.0; vocab];
    for r in 0..n {
        let hr = &h[r * d..(r + 1) * d];
        for (v, l) in logits.iter_mut().enumerate() {
            *l = hr.iter().zip(&w[v * d..(v + 1) * d]).map(|(a, b)| a * b).sum::<f64>();
        }
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        want_lp[r] = logits[tg[r]] - lse;
        for (v, l) in logits.iter().enumerate() {
            let coef = f64::from(u8::from(v == tg[r])) - (l - lse).exp();
            for k in 0..d {
                want_dh[r * d + k] += coef * w[v * d + k];
                want_dw[v * d + k] += coef * hr[k];
            }
        }
    }
    let close = |what: &str, got: &[f64], want: &[f64]| {
        assert_eq!(got.len(), want.len(), "{what}");
        let diff = got.iter().zip(want).fold(0.0_f64, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("`{spec}`: {what}: largest |diff| {diff:.2e}");
        assert!(diff < 1e-4, "{what}: largest |diff| {diff:.2e} > 1e-4");
    };
    close("log-probabilities", &f64s(lp.inner()), &want_lp);
    close("gradient of the hidden states", &f64s(hidden.grad(&grads).expect("the hidden states have a gradient")), &want_dh);
    close("gradient of the tied head's weight", &dw, &want_dw);
    n
}

/// Half-precision logits, in each dtype the device computes in, give the f32 log-probabilities of
/// the logits as rounded and a gradient in their own dtype, one rounding of the definition's (worked
/// here in f64): on libtorch's CUDA the backward pass widens and rounds inside torch's kernels, on its
/// CPU through an f32 copy, on the cubecl devices in backend operations.
#[test]
fn half_precision_logits_give_the_definitions_log_probabilities_and_gradients() {
    use burn::tensor::{DType, FloatDType};
    let spec = std::env::var("ODPO_TEST_DEVICE").unwrap_or_else(|_| "default".into());
    let device = common::test_device();
    let ad = device.clone().autodiff();
    let (n, v) = (9, 2_000);
    let x: Vec<f32> = (0..n * v).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 30.0).collect();
    let t: Vec<i64> = vec![0, 1999, 3, 700, 700, 12, 999, 1500, 1];
    let w = vec![1.0f32, -0.5, 0.0, 2.0, 1.0, 0.25, -1.0, 3.0, -2.0];
    let mut ran = 0;
    // One rounding to the dtype: at most half its spacing, 2^-8 of the value in bf16, 2^-11 in f16.
    for (dtype, kind, tol) in [(DType::BF16, FloatDType::BF16, 4e-3), (DType::F16, FloatDType::F16, 5e-4)] {
        if !device.supports_dtype(dtype) {
            eprintln!("`{spec}` does not compute in {dtype:?}");
            continue;
        }
        let xs = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &ad).cast(kind).require_grad();
        let rounded = f64s(xs.clone().inner());
        let ts = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &ad);
        let ws = Tensor::<1>::from_data(TensorData::new(w.clone(), [n]), &ad);
        // The output of an operation, as a model's head hands the logits over.
        let lp = odpo_kernels::token_logprobs(xs.clone().mul_scalar(1.0), ts);
        assert_eq!(lp.dtype(), DType::F32, "`{spec}` {dtype:?}: the log-probabilities are f32");
        let grads = (lp.clone() * ws).sum().backward();
        let g = xs.grad(&grads).expect("the logits have a gradient");
        assert_eq!(g.dtype(), dtype, "`{spec}`: the gradient comes back in the logits' dtype");
        let (g, lp) = (f64s(g), f64s(lp.inner()));
        let (mut lp_diff, mut g_ratio) = (0.0_f64, 0.0_f64);
        for (r, row) in rounded.chunks(v).enumerate() {
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|a| (a - max).exp()).sum::<f64>().ln();
            lp_diff = lp_diff.max((lp[r] - (row[t[r] as usize] - lse)).abs());
            for (c, a) in row.iter().enumerate() {
                let want = f64::from(w[r]) * (f64::from(u8::from(c as i64 == t[r])) - (a - lse).exp());
                g_ratio = g_ratio.max((g[r * v + c] - want).abs() / (tol * want.abs() + 1e-7));
            }
        }
        eprintln!("`{spec}` {dtype:?}: log-probabilities within {lp_diff:.1e}, the gradient within {g_ratio:.2} of one rounding");
        assert!(lp_diff < 2e-5, "`{spec}` {dtype:?}: log-probabilities {lp_diff:.2e} from the definition");
        assert!(g_ratio <= 1.0, "`{spec}` {dtype:?}: the gradient {g_ratio:.2} times one rounding from the definition");
        ran += 1;
    }
    if ran == 0 {
        eprintln!("`{spec}` computes in neither bf16 nor f16: nothing to check");
    }
}

fn f64s<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_into_vec::<f64>().unwrap()
}

/// The model's one parameter of shape `dims` (the token embedding, the tied head's weight) and its
/// gradient, row-major.
fn embedding(model: &CausalLm, dims: [usize; 2], grads: &burn::tensor::Gradients) -> (Vec<f64>, Vec<f64>) {
    struct V<'a>([usize; 2], &'a burn::tensor::Gradients, Option<(Vec<f64>, Vec<f64>)>);
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            if t.dims().as_slice() == self.0.as_slice() {
                let grad = t.grad(self.1).expect("the embedding has a gradient");
                self.2 = Some((f64s(t.inner()), f64s(grad)));
            }
        }
    }
    let mut v = V(dims, grads, None);
    model.visit(&mut v);
    v.2.expect("a parameter of the embedding's shape")
}
