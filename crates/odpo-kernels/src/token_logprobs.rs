//! Fused log-softmax + gather with its own backward pass, as a burn backend extension.
//!
//! Written with burn tensor operations, `log softmax(logits)[target]` materialises the shifted
//! logits and their exponentials (`[N, V]` each), keeps the exponentials for the backward pass,
//! and its backward writes three more `[N, V]` tensors (the softmax term, the scattered one-hot,
//! their sum). Over SmolLM2's 49,152-token vocabulary one such tensor is 150 MB per 768 tokens,
//! and each fresh one costs the kernel's page clearing as well as the pass itself. Here the
//! forward pass reads each row once for its log-sum-exp and keeps only the logits; the backward
//! pass writes the gradient `g · (onehot − softmax)` over the logits in place.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
#[cfg(any(feature = "flex", feature = "tch"))]
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IndexingUpdateOp, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Int, Shape, Tensor};

/// The fused log-softmax + gather. Backends whose CPU memory the kernels reach (flex, libtorch on
/// the CPU) run [`crate::softmax`]'s loops; the default bodies are the same formulas in burn
/// backend operations, which run anywhere (the cubecl backends, libtorch on CUDA).
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait TokenLogProbsBackend: Backend {
    /// `log softmax(logits)[n, targets[n]]` `[N]` for `logits` `[N, V]` and `targets` `[N]`.
    fn token_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::token_logprobs_forward(logits, targets).0
    }

    /// The log-probabilities and the log-sum-exp of each row, each `[N]`.
    fn token_logprobs_forward(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_forward::<Self>(logits, targets)
    }

    /// The gradient with respect to `logits` of `Σ grad[n] · logprob[n]`:
    /// `grad[n] · ([v = targets[n]] − e^(logits[n, v] − lse[n]))`.
    fn token_logprobs_backward(logits: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_backward::<Self>(logits, lse, targets, grad)
    }
}

fn rows_cols<B: Backend>(logits: &FloatTensor<B>) -> (usize, usize) {
    let shape = logits.shape();
    (shape[0], shape[1])
}

/// The forward pass in backend operations (max-shifted log-sum-exp, then a gather).
fn composed_forward<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let (n, v) = rows_cols::<B>(&logits);
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits.clone(), B::float_expand(max.clone(), Shape::new([n, v])));
    let lse = B::float_add(B::float_log(B::float_sum_dim(B::float_exp(shifted), 1)), max);
    let picked = B::float_gather(1, logits, B::int_reshape(targets, Shape::new([n, 1])));
    let lp = B::float_sub(picked, lse.clone());
    (B::float_reshape(lp, Shape::new([n])), B::float_reshape(lse, Shape::new([n])))
}

/// The backward pass in backend operations.
fn composed_backward<B: Backend>(logits: FloatTensor<B>, lse: FloatTensor<B>, targets: IntTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let (n, v) = rows_cols::<B>(&logits);
    let g = B::float_reshape(grad, Shape::new([n, 1]));
    let lse = B::float_expand(B::float_reshape(lse, Shape::new([n, 1])), Shape::new([n, v]));
    let softmax = B::float_exp(B::float_sub(logits, lse));
    let out = B::float_mul(softmax, B::float_expand(B::float_neg(g.clone()), Shape::new([n, v])));
    B::float_scatter(1, out, B::int_reshape(targets, Shape::new([n, 1])), g, IndexingUpdateOp::Add)
}

/// The CPU kernels on one backend's primitives: how to reach the f32 rows and i64 targets, and
/// how to make a tensor from a vector. `None` (nothing computed) when a buffer is out of reach.
#[cfg(any(feature = "flex", feature = "tch"))]
macro_rules! cpu_backend {
    ($backend:ty, $module:ident) => {
        impl TokenLogProbsBackend for $backend {
            fn token_logprobs_forward(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
                let (n, v) = rows_cols::<Self>(&logits);
                let device = logits.device();
                let fused = crate::cpu::$module::ints(&targets)
                    .and_then(|t| crate::cpu::$module::with_rows(&logits, |x| crate::softmax::forward(x, v, &t)));
                match fused {
                    Some((lp, lse)) => {
                        count(&FORWARD);
                        let make = |x: Vec<f32>| Self::float_from_data(burn::tensor::TensorData::new(x, [n]), &device);
                        (make(lp), make(lse))
                    }
                    None => composed_forward::<Self>(logits, targets),
                }
            }

            fn token_logprobs_backward(mut logits: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
                use crate::cpu::$module::{ints, slice_mut, with_rows};
                let (n, v) = rows_cols::<Self>(&logits);
                let small = (ints(&targets), with_rows(&lse, <[f32]>::to_vec), with_rows(&grad, <[f32]>::to_vec));
                let (Some(t), Some(l), Some(g)) = small else {
                    return composed_backward::<Self>(logits, lse, targets, grad);
                };
                // The logits are kept for this pass alone, so their buffer usually takes the gradient.
                if let Some(x) = slice_mut(&mut logits) {
                    crate::softmax::backward(None, x, v, &t, &l, &g);
                    count(&BACKWARD_IN_PLACE);
                    return logits;
                }
                let mut out = Self::float_empty(Shape::new([n, v]), &logits.device(), burn::tensor::FloatDType::F32);
                let written = match slice_mut(&mut out) {
                    Some(o) => with_rows(&logits, |x| crate::softmax::backward(Some(x), o, v, &t, &l, &g)).is_some(),
                    None => false,
                };
                if written {
                    count(&BACKWARD_COPY);
                    out
                } else {
                    composed_backward::<Self>(logits, lse, targets, grad)
                }
            }
        }
    };
}

#[cfg(feature = "flex")]
cpu_backend!(burn::backend::Flex, flex);
#[cfg(feature = "tch")]
cpu_backend!(burn::backend::LibTorch, tch);

/// The cubecl backends (wgpu, Vulkan, Metal, CUDA): the default bodies, in backend operations. Under
/// autodiff that keeps the logits and the log-sum-exps, where the tensor operations of
/// [`token_logprobs_tensor_ops`] keep an `[N, V]` tensor of exponentials besides (4.2 GB for the
/// 8,192 rows of a Llama-3.2-1B step of 8 pairs × 512 tokens) and record eight operations.
#[cfg(feature = "cube")]
impl TokenLogProbsBackend for burn::backend::Cube {}

/// Autodiff: the forward pass of the inner backend, recorded with its own backward step, which
/// keeps the logits and the log-sum-exps (not the `[N, V]` exponentials) for the backward pass.
impl<B: Backend + TokenLogProbsBackend, C: CheckpointStrategy> TokenLogProbsBackend for Autodiff<B, C> {
    fn token_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct TokenLogProbs;

        impl<B: Backend + TokenLogProbsBackend> Backward<B, 1> for TokenLogProbs {
            type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let (logits, lse, targets) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| B::token_logprobs_backward(logits, lse, targets, grad));
            }
        }

        match TokenLogProbs.prepare::<C>([logits.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let logits = logits.into_primitive();
                let (lp, lse) = B::token_logprobs_forward(logits.clone(), targets.clone());
                prep.finish((logits, lse, targets), lp)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_logprobs(logits.into_primitive(), targets)),
        }
    }
}

/// Where the extension runs: every backend.
const REACH: crate::Reach = crate::Reach { flex: true, libtorch: true, cube: true };

/// Calls of each kernel path, for tests that check the kernels ran.
static FORWARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static BACKWARD_IN_PLACE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static BACKWARD_COPY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(any(feature = "flex", feature = "tch"))]
fn count(c: &std::sync::atomic::AtomicUsize) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How often the CPU kernels ran in this process: forward passes, backward passes in place, and
/// backward passes into a new buffer (the logits were shared or strided).
pub fn token_logprob_kernel_calls() -> (usize, usize, usize) {
    let load = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed);
    (load(&FORWARD), load(&BACKWARD_IN_PLACE), load(&BACKWARD_COPY))
}

/// `log softmax(logits)[n, targets[n]]` `[N]` for f32 `logits` `[N, V]` and `targets` `[N]`,
/// differentiable with respect to `logits`.
///
/// On flex and on libtorch's CPU tensors this is one read of the logits forward and one in-place
/// pass backward ([`TokenLogProbsBackend`]); on the other backends it is the same computation in
/// backend operations, recorded as one operation that keeps only the logits and their
/// log-sum-exps for the backward pass. Both match the definition to f32 rounding: the fused sum
/// of exponentials accumulates in f64.
///
/// # Panics
/// When a target is not in `0..V` (the fused kernel names the id; tensor operations fail as their
/// backend's gather does).
pub fn token_logprobs(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if !crate::extended(&logits.clone().into_dispatch().kind, REACH) {
        return token_logprobs_tensor_ops(logits, targets);
    }
    let out = <Dispatch as TokenLogProbsBackend>::token_logprobs(logits.into_dispatch(), targets.into_dispatch());
    Tensor::from_dispatch(out)
}

/// [`token_logprobs`] as burn tensor operations, whose autodiff keeps the `[N, V]` exponentials.
pub fn token_logprobs_tensor_ops(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [n, v] = logits.dims();
    let picked = logits.clone().gather(1, targets.reshape([n, 1])).reshape([n]);
    // The max is a constant shift for stability; detaching it leaves the gradient unchanged.
    let max = logits.clone().max_dim(1).detach();
    let lse = (logits - max.clone().expand([n, v])).exp().sum_dim(1).log() + max;
    picked - lse.reshape([n])
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int, Tensor, TensorData};

    use super::*;

    /// The CPU devices this build has (the kernels' targets).
    fn devices() -> Vec<Device> {
        let mut d = Vec::new();
        #[cfg(feature = "flex")]
        d.push(Device::flex());
        #[cfg(feature = "tch")]
        d.push(Device::libtorch());
        d
    }

    fn vec(t: Tensor<1>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
    }

    fn logits(n: usize, v: usize) -> Vec<f32> {
        (0..n * v).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 30.0).collect()
    }

    /// Log-probabilities and gradients of `Σ w[n] · logprob[n]`, worked in f64 from the definition.
    fn want(x: &[f32], v: usize, t: &[i64], w: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut lp = Vec::new();
        let mut grad = Vec::new();
        for (r, row) in x.chunks(v).enumerate() {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &a| m.max(f64::from(a)));
            let lse = m + row.iter().map(|&a| (f64::from(a) - m).exp()).sum::<f64>().ln();
            lp.push(f64::from(row[t[r] as usize]) - lse);
            for (c, &a) in row.iter().enumerate() {
                let onehot = if c as i64 == t[r] { 1.0 } else { 0.0 };
                grad.push(f64::from(w[r]) * (onehot - (f64::from(a) - lse).exp()));
            }
        }
        (lp, grad)
    }

    #[test]
    fn values_and_gradients_match_the_definition_fused_and_not() {
        let (n, v) = (7, 1500);
        let x = logits(n, v);
        let t: Vec<i64> = vec![0, 1499, 3, 700, 700, 12, 999];
        let w = [1.0f32, -0.5, 0.0, 2.0, 1.0, 0.25, -1.0];
        let (want_lp, want_grad) = want(&x, v, &t, &w);
        for device in devices() {
            let ad = device.clone().autodiff();
            for fused in [true, false] {
                let before = token_logprob_kernel_calls();
                let xs = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &ad).require_grad();
                let ts = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &ad);
                let ws = Tensor::<1>::from_data(TensorData::new(w.to_vec(), [n]), &ad);
                // The logits go in as the output of an operation, as a model's head hands them over,
                // so that nothing else holds their buffer.
                let head = xs.clone().mul_scalar(1.0);
                let lp = if fused { token_logprobs(head, ts) } else { token_logprobs_tensor_ops(head, ts) };
                let grads = (lp.clone() * ws).sum().backward();
                let g = xs.grad(&grads).expect("logits have a gradient");
                let g: Vec<f32> = g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
                for (i, (&got, &w)) in vec(lp.inner()).iter().zip(&want_lp).enumerate() {
                    assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "{device:?} fused={fused} lp[{i}]: {got} vs {w}");
                }
                for (i, (&got, &w)) in g.iter().zip(&want_grad).enumerate() {
                    assert!((f64::from(got) - w).abs() <= 1e-6 * w.abs().max(1e-2), "{device:?} fused={fused} grad[{i}]: {got} vs {w}");
                }
                let after = token_logprob_kernel_calls();
                if fused {
                    // Forward and an in-place backward ran (other tests may run kernels meanwhile).
                    assert!(after.0 > before.0 && after.1 > before.1, "{device:?}: kernels did not run ({before:?} → {after:?})");
                }
            }
        }
    }

    #[test]
    fn shared_logits_are_not_overwritten() {
        let (n, v) = (3, 257);
        let x = logits(n, v);
        let t: Vec<i64> = vec![1, 2, 256];
        let (_, want_grad) = want(&x, v, &t, &[1.0; 3]);
        for device in devices() {
            let ad = device.clone().autodiff();
            let xs = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &ad).require_grad();
            let ts = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &ad);
            // `kept` shares the logits' buffer, so the gradient must go to a new one.
            let head = xs.clone().mul_scalar(1.0);
            let kept = head.clone();
            let grads = token_logprobs(head, ts).sum().backward();
            let g: Vec<f32> = xs.grad(&grads).expect("gradient").into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            for (&got, &w) in g.iter().zip(&want_grad) {
                assert!((f64::from(got) - w).abs() <= 1e-6 * w.abs().max(1e-2), "{device:?}: {got} vs {w}");
            }
            let kept: Vec<f32> = kept.inner().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            assert_eq!(kept, x, "{device:?}: shared logits were written");
        }
    }

    #[test]
    fn without_autodiff_and_on_strided_logits() {
        let (n, v) = (5, 300);
        let x = logits(n, 2 * v);
        for device in devices() {
            // Every other block of `v` columns: rows that are not contiguous in memory.
            let full = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, 2 * v]), &device);
            let strided = full.narrow(1, v, v);
            let ts = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 3, 299], [n]), &device);
            let dense: Vec<f32> = x.chunks(2 * v).flat_map(|r| r[v..].to_vec()).collect();
            let (want_lp, _) = want(&dense, v, &[0, 1, 2, 3, 299], &[0.0; 5]);
            for (&got, &w) in vec(token_logprobs(strided, ts)).iter().zip(&want_lp) {
                assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "{device:?}: {got} vs {w}");
            }
        }
    }

    /// The default bodies (what GPU backends run) against the definition, on flex primitives.
    #[cfg(feature = "flex")]
    #[test]
    fn composed_backend_operations_match_the_definition() {
        use burn::backend::{BackendTensor, DispatchTensorKind};
        use burn::backend::flex::FlexTensor;
        let (n, v) = (4, 600);
        let x = logits(n, v);
        let t: Vec<i64> = vec![5, 0, 599, 300];
        let w = [1.0f32, -2.0, 0.5, 0.0];
        let (want_lp, want_grad) = want(&x, v, &t, &w);
        let d = Device::flex();
        let float = |data: TensorData, shape: [usize; 2]| match Tensor::<2>::from_data(data, &d).reshape(shape).into_dispatch().kind {
            DispatchTensorKind::Flex(BackendTensor::Float(p)) => p,
            _ => unreachable!("a flex device makes flex tensors"),
        };
        let int = || match Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &d).into_dispatch().kind {
            DispatchTensorKind::Flex(BackendTensor::Int(p)) => p,
            _ => unreachable!("a flex device makes flex tensors"),
        };
        let to_vec = |p: FlexTensor| p.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let (lp, lse) = composed_forward::<burn::backend::Flex>(float(TensorData::new(x.clone(), [n, v]), [n, v]), int());
        for (&got, &w) in to_vec(lp).iter().zip(&want_lp) {
            assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "lp {got} vs {w}");
        }
        let g = float(TensorData::new(w.to_vec(), [n, 1]), [n, 1]);
        let g = burn::backend::Flex::float_reshape(g, Shape::new([n]));
        let grad = composed_backward::<burn::backend::Flex>(float(TensorData::new(x.clone(), [n, v]), [n, v]), lse, int(), g);
        for (&got, &w) in to_vec(grad).iter().zip(&want_grad) {
            assert!((f64::from(got) - w).abs() <= 1e-6 * w.abs().max(1e-2), "grad {got} vs {w}");
        }
    }
}
