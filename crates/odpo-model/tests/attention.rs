//! `odpo_kernels::masked_attention` on the test device (flex by default; each backend under
//! `cargo xtask conformance`): its output and the gradients of q, k and v equal burn's own
//! attention on the CPU (flex, else libtorch, else the test device; its differentiable form, with
//! the mask as a 0 / −∞ bias), with padding and a causal mask, with `Tq < Tk`, with several
//! heads reading one mask through a stride of 0, and with grouped keys and values (fewer key/value
//! heads than query heads, repeated inside the operation) and a mask given over one head, with
//! and without autodiff, and with a mask that lets queries see later keys; on libtorch, that the
//! backward pass reuses what the forward pass kept, that its kernels skip the future's blocks
//! where the mask is causal, and that they take grouped keys and values as they are where they can.
//! The reference stays on the CPU because a GPU
//! backend's own attention may compute its f32 products in TF32 (burn's CUDA backend does), which
//! the extension does not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Distribution, Tensor, TensorData};
use common::test_device;

fn vec(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

#[test]
fn masked_attention_values_and_gradients_match_burns_attention() {
    let device = test_device().autodiff();
    // The first CPU backend of the build (`cargo xtask conformance` adds flex where no CPU backend
    // is named), else the device.
    let cpu = ["flex", "tch"].iter().find_map(|b| odpo_model::backend::device(b).ok()).map_or_else(|| device.clone(), |d| d.autodiff());
    // (batch, query heads, key/value heads, Tq, Tk, Dh, the mask given over one head, future keys
    // hidden). Padding comes with a second sequence: the fourth mask is causal and nothing more;
    // the fifth has grouped heads over `Tq < Tk` (a step of generation); the last lets queries see
    // later keys.
    for (b, h, h_kv, tq, tk, dh, one_head, causal) in [
        (2, 3, 3, 7, 7, 8, false, true),
        (1, 2, 2, 3, 9, 4, false, true),
        (2, 6, 2, 5, 5, 4, true, true),
        (1, 4, 2, 6, 6, 8, true, true),
        (2, 4, 2, 3, 7, 4, true, true),
        (2, 4, 2, 6, 6, 4, true, false),
    ] {
        let past = (tk - tq) as i64;
        let future = if causal { Tensor::<2, Bool>::tril_mask([tq, tk], past, &device) } else { Tensor::<2, Bool>::from_data(TensorData::new(vec![false; tq * tk], [tq, tk]), &device) };
        // The second sequence's first two keys are padding, except for a query's own key.
        let mut pad = vec![false; b * tq * tk];
        for q in 0..tq {
            for key in 0..2usize.min(tk) {
                if b > 1 && key as i64 != q as i64 + past {
                    pad[tq * tk + q * tk + key] = true;
                }
            }
        }
        let pad = Tensor::<4, Bool>::from_data(TensorData::new(pad, [b, 1, tq, tk]), &device);
        let mask = pad.bool_or(future.reshape([1, 1, tq, tk]).expand([b, 1, tq, tk]));
        let mask = if one_head { mask } else { mask.expand([b, h, tq, tk]) };
        let inputs: Vec<Tensor<4>> =
            [(h, tq), (h_kv, tk), (h_kv, tk)].iter().map(|&(heads, t)| Tensor::<4>::random([b, heads, t, dh], Distribution::Normal(0.0, 1.0), &device)).collect();
        let dout = Tensor::<4>::random([b, h, tq, dh], Distribution::Normal(0.0, 1.0), &device);
        let scale = 0.3f32;
        // Read once, outside the census below (a read of a device tensor may copy it).
        let (inputs_data, mask_data, dout_data) = (inputs.iter().map(|t| t.to_data()).collect::<Vec<_>>(), mask.to_data(), dout.to_data());
        let run = |ours: bool| {
            let on = if ours { &device } else { &cpu };
            let [q, k, v] = std::array::from_fn(|i| Tensor::<4>::from_data(inputs_data[i].clone(), on).require_grad());
            let (mask, dout) = (Tensor::<4, Bool>::from_data(mask_data.clone(), on), Tensor::<4>::from_data(dout_data.clone(), on));
            let y = if ours {
                let before = odpo_kernels::masked_attention_calls();
                let y = odpo_kernels::masked_attention(q.clone(), k.clone(), v.clone(), mask.clone(), scale)
                    .unwrap_or_else(|| panic!("no masked_attention extension on {device:?}"));
                assert!(odpo_kernels::masked_attention_calls() > before);
                y
            } else {
                // transformers' `repeat_kv`, in tensor operations.
                let widen = |x: Tensor<4>| x.unsqueeze_dim::<5>(2).expand([b, h_kv, h / h_kv, tk, dh]).reshape([b, h, tk, dh]);
                let bias = Tensor::<4>::zeros([b, h, tq, tk], on).mask_fill(mask.clone().expand([b, h, tq, tk]), f32::NEG_INFINITY);
                let options = AttentionModuleOptions { scale: Some(f64::from(scale)), softcap: None, is_causal: false };
                attention(q.clone(), widen(k.clone()), widen(v.clone()), None, Some(bias), options)
            };
            let grads = (y.clone() * dout).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).expect("a gradient");
            (y.inner(), g(&q), g(&k), g(&v))
        };
        let read = |(y, dq, dk, dv): (Tensor<4>, Tensor<4>, Tensor<4>, Tensor<4>)| (vec(y), vec(dq), vec(dk), vec(dv));
        let (fused_before, reruns_before, causal_before) =
            (odpo_kernels::fused_attention_backward_calls(), odpo_kernels::fused_attention_forward_reruns(), odpo_kernels::causal_attention_kernels());
        // On the cubecl backends both passes take the grouped keys and values as they are: no
        // copy repeats them to the query heads (the census covers the passes, not the reads).
        let grouped_before = odpo_kernels::grouped_attention_kernels();
        let (ours, census) = odpo_kernels::kernel_census(false, || run(true));
        let grouped_tracked = odpo_kernels::grouped_attention_kernels() - grouped_before;
        // The weights are one kernel each time they are formed (forward, and again backward), and
        // the scores' gradient one more: no reduction or mask fill of burn's.
        if odpo_kernels::launches_kernels(&device) {
            let census = census.unwrap_or_default();
            let launches = |name: &str| census.iter().filter(|k| k.kernel == name).map(|k| k.launches).sum::<u64>();
            assert_eq!(launches("CopyKernel"), 0, "copies in the attention of {h} heads over {h_kv} on {device:?}");
            let softmax = (launches("MaskedSoftmaxKernel"), launches("SoftmaxGradKernel"), launches("ReduceKernel"), launches("MaskFillKernel"));
            assert_eq!(softmax, (2, 1, 0, 0), "softmax, its gradient, reductions and mask fills of the attention on {device:?}: {census:?}");
        }
        let (ours, burns) = (read(ours), read(run(false)));
        // Without autodiff the same call widens the heads before the backend's body.
        let plain = test_device();
        let [q, k, v] = std::array::from_fn(|i| Tensor::<4>::from_data(inputs[i].to_data(), &plain));
        let grouped_before = odpo_kernels::grouped_attention_kernels();
        let untracked = odpo_kernels::masked_attention(q, k, v, Tensor::<4, Bool>::from_data(mask.to_data(), &plain), scale).expect("the extension");
        let grouped_untracked = odpo_kernels::grouped_attention_kernels() - grouped_before;
        for (x, y) in vec(untracked).iter().zip(&ours.0) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "untracked {x} against tracked {y} on {plain:?}");
        }
        // libtorch on the CPU runs the backward pass through torch's flash-attention kernel, from
        // the output and log-sum-exp its forward pass kept (the kernel's forward does not run
        // again); flex through its own loop.
        let name = format!("{device:?}");
        if name.contains("LibTorch(Cpu)") || name.contains("Flex") {
            assert!(odpo_kernels::fused_attention_backward_calls() > fused_before, "the fused attention backward did not run on {device:?}");
        }
        if name.contains("LibTorch") {
            assert_eq!(odpo_kernels::fused_attention_forward_reruns(), reruns_before, "the attention's forward kernel ran again in the backward pass on {device:?}");
            // torch's kernels skip the future's blocks where the mask hides every later key over
            // as many queries as keys, and only there; they take no bias where the mask is the
            // causal mask and nothing more (no padding), and only there (the values below would be
            // wrong otherwise).
            let (told, unbiased) = odpo_kernels::causal_attention_kernels();
            let expected = (usize::from(causal && tq == tk), usize::from(causal && tq == tk && b == 1));
            assert_eq!((told - causal_before.0, unbiased - causal_before.1), expected, "forward kernels told the mask is causal, and of those without a bias, {tq} queries over {tk} keys, causal {causal}, {b} sequences, on {device:?}");
            // Grouped keys and values go to torch's kernels as they are wherever those take them:
            // the CPU's flash kernel always, CUDA's in half precision over the causal mask with no
            // bias (cuDNN's or flash attention's; its memory-efficient kernel, which takes a bias,
            // has no groups, nor flash attention f32). This test runs in f32.
            let takes_groups = h != h_kv && name.contains("LibTorch(Cpu)");
            assert_eq!((grouped_tracked, grouped_untracked), (usize::from(takes_groups), usize::from(takes_groups)), "forward passes with grouped keys and values, tracked and untracked, {h} heads over {h_kv}, on {device:?}");
        }
        // The two differ in the order of their operations only: a wrong formula misses by O(1).
        for (name, a, b) in [("out", &ours.0, &burns.0), ("dq", &ours.1, &burns.1), ("dk", &ours.2, &burns.2), ("dv", &ours.3, &burns.3)] {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{name}: {x} against {y} on {device:?}");
            }
        }
    }
}

/// A query whose every key is masked gets a zero output and passes no gradient on, on the
/// backends whose attention says so (flex's loop and the cubecl kernels; the tensor operations and
/// torch's kernels give NaN there, and no model row is: each query sees its own key).
#[test]
fn a_query_with_every_key_masked_gets_zeros() {
    let device = test_device().autodiff();
    let name = format!("{device:?}");
    if !(odpo_kernels::launches_kernels(&device) || name.contains("Flex")) {
        println!("skipping: {device:?} gives NaN for a fully masked row");
        return;
    }
    // One sequence, two heads over one key/value head, three queries over four keys; the second
    // query sees no key, the others see the first two.
    let masked: Vec<bool> = (0..12).map(|n| n / 4 == 1 || n % 4 >= 2).collect();
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(masked, [1, 1, 3, 4]), &device);
    let [q, k, v] = [(2, 3), (1, 4), (1, 4)].map(|(heads, t)| Tensor::<4>::random([1, heads, t, 8], Distribution::Normal(0.0, 1.0), &device).require_grad());
    let y = odpo_kernels::masked_attention(q.clone(), k.clone(), v.clone(), mask, 0.5).expect("the extension");
    let grads = y.clone().sum().backward();
    let (out, dq) = (vec(y.inner()), vec(q.grad(&grads).expect("a gradient")));
    for head in 0..2 {
        let row = (head * 3 + 1) * 8..(head * 3 + 2) * 8;
        assert!(out[row.clone()].iter().all(|&x| x == 0.0), "head {head}: {:?}", &out[row.clone()]);
        assert!(dq[row.clone()].iter().all(|&x| x == 0.0), "head {head}: {:?}", &dq[row]);
    }
    assert!(out.iter().chain(&dq).all(|x| x.is_finite()), "{out:?} {dq:?}");
    assert!(out.iter().any(|&x| x != 0.0));
}

/// On libtorch, grouped keys and values in half precision over the causal mask (rows without
/// padding, as a training step's) reach torch's kernels as they are, under autodiff and without
/// (on CUDA that is cuDNN's or flash attention's kernels told `enable_gqa`, as PyTorch's step
/// runs them), and give the output and gradients of the same rounded inputs in f32 through the
/// repeated heads, within half precision's rounding of the kernels' products.
#[test]
fn libtorch_takes_grouped_keys_and_values_in_half_precision_as_they_are() {
    use burn::tensor::{DType, FloatDType};
    let device = test_device().autodiff();
    let name = format!("{device:?}");
    if !name.contains("LibTorch") {
        println!("skipping: grouped keys and values reach torch's kernels on libtorch only, not {device:?}");
        return;
    }
    let (h, h_kv, t, dh, scale) = (6, 2, 24, 16, 0.25f32);
    let mask = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
    let data: Vec<TensorData> = [(h, dh), (h_kv, dh), (h_kv, dh), (h, dh)]
        .iter()
        .map(|&(heads, d)| Tensor::<4>::random([1, heads, t, d], Distribution::Normal(0.0, 1.0), &device).to_data())
        .collect();
    let mut ran = 0;
    for (dtype, kind, tol) in [(DType::BF16, FloatDType::BF16, 3e-2), (DType::F16, FloatDType::F16, 4e-3)] {
        if !test_device().supports_dtype(dtype) {
            eprintln!("{device:?} does not compute in {dtype:?}");
            continue;
        }
        // The inputs rounded to the dtype once; the f32 run takes the same rounded values.
        let rounded: Vec<TensorData> = data.iter().map(|d| Tensor::<4>::from_data(d.clone(), &device).cast(kind).cast(FloatDType::F32).to_data()).collect();
        let run = |kind: FloatDType| {
            let [q, k, v] = std::array::from_fn(|i| Tensor::<4>::from_data(rounded[i].clone(), &device).cast(kind).require_grad());
            let dout = Tensor::<4>::from_data(rounded[3].clone(), &device).cast(kind);
            let before = odpo_kernels::grouped_attention_kernels();
            let y = odpo_kernels::masked_attention(q.clone(), k.clone(), v.clone(), mask.clone(), scale).expect("the extension");
            let grouped = odpo_kernels::grouped_attention_kernels() - before;
            let grads = (y.clone() * dout).sum().backward();
            let g = |x: &Tensor<4>| vec(x.grad(&grads).expect("a gradient").cast(FloatDType::F32));
            ((vec(y.inner().cast(FloatDType::F32)), g(&q), g(&k), g(&v)), grouped)
        };
        let (half, grouped) = run(kind);
        let (full, _) = run(FloatDType::F32);
        assert_eq!(grouped, 1, "{dtype:?} attention with grouped keys and values on {device:?}: forward passes whose kernel took them as they are");
        let [q, k, v] = std::array::from_fn(|i| Tensor::<4>::from_data(rounded[i].clone(), &test_device()).cast(kind));
        let before = odpo_kernels::grouped_attention_kernels();
        odpo_kernels::masked_attention(q, k, v, Tensor::<4, Bool>::from_data(mask.to_data(), &test_device()), scale).expect("the extension");
        assert_eq!(odpo_kernels::grouped_attention_kernels() - before, 1, "untracked {dtype:?} attention with grouped keys and values on {device:?}");
        for (what, a, b) in [("out", &half.0, &full.0), ("dq", &half.1, &full.1), ("dk", &half.2, &full.2), ("dv", &half.3, &full.3)] {
            let largest = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            eprintln!("{dtype:?} {what} on {device:?}: {worst} from f32, {:.4} of the largest entry {largest}", worst / largest);
            assert!(worst <= tol * largest, "{dtype:?} {what} on {device:?}: {worst} from f32 against a largest entry of {largest}");
        }
        ran += 1;
    }
    assert!(ran > 0, "{device:?} computes in neither bf16 nor f16");
}
