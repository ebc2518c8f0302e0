//! Fused log-softmax + gather with its own backward pass, as a burn backend extension.
//!
//! Written with burn tensor operations, `log softmax(logits)[target]` materialises the shifted
//! logits and their exponentials (`[N, V]` each), keeps the exponentials for the backward pass,
//! and its backward writes three more `[N, V]` tensors (the softmax term, the scattered one-hot,
//! their sum). Over SmolLM2's 49,152-token vocabulary one such tensor is 150 MB per 768 tokens,
//! and each fresh one costs the kernel's page clearing as well as the pass itself. Here the
//! forward pass reads each row once for its log-sum-exp and keeps only the logits, in their own
//! dtype (the f32 copy a half-precision model's log-softmax needs lives only within each pass);
//! the backward pass writes the gradient `g · (onehot − softmax)` over the logits in place.

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
use burn::tensor::{DType, FloatDType, Int, Shape, Slice, Tensor};

/// The fused log-softmax + gather. Backends whose CPU memory the kernels reach (flex, libtorch on
/// the CPU) run the loops of `softmax.rs`; the default bodies are the same formulas in burn
/// backend operations, which run anywhere (the cubecl backends, libtorch on CUDA).
#[backend_extension(Autodiff, Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Cube: cfg(feature = "cube"))]
pub trait TokenLogProbsBackend: Backend {
    /// `log softmax(logits)[n, targets[n]]` `[N]` for `logits` `[N, V]` and `targets` `[N]`.
    fn token_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::token_logprobs_forward(logits, targets).0
    }

    /// The log-probabilities and the log-sum-exp of each row, each `[N]`.
    fn token_logprobs_forward(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let rows = run_rows(rows_cols::<Self>(&logits).1);
        composed_forward_in_runs::<Self>(logits, targets, rows)
    }

    /// The gradient with respect to `logits` of `Σ grad[n] · logprob[n]`:
    /// `grad[n] · ([v = targets[n]] − e^(logits[n, v] − lse[n]))`.
    fn token_logprobs_backward(logits: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let rows = run_rows(rows_cols::<Self>(&logits).1);
        composed_backward_in_runs::<Self>(logits, lse, targets, grad, rows)
    }
}

/// Rows of f32 logits over `vocab` entries in one run of the operation-by-operation paths: at most
/// 256 MiB of f32 temporaries at a time, whatever the number of rows (Llama-3.2-1B's 8,192 rows of
/// a step of 8 pairs × 512 tokens would be 4.2 GB each in one).
fn run_rows(vocab: usize) -> usize {
    ((256usize << 20) / (4 * vocab.max(1))).max(1)
}

/// Rows `start..start + len` of a `[N, V]` tensor.
fn rows_slice(start: usize, len: usize) -> [Slice; 2] {
    [Slice { start: start as isize, end: Some((start + len) as isize), step: 1 }, Slice { start: 0, end: None, step: 1 }]
}

/// [`composed_forward`] over `rows` rows at a time, each run's temporaries freed before the next.
fn composed_forward_in_runs<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>, rows: usize) -> (FloatTensor<B>, FloatTensor<B>) {
    let n = rows_cols::<B>(&logits).0;
    if n <= rows {
        return composed_forward::<B>(logits, targets);
    }
    let (lp, lse): (Vec<_>, Vec<_>) = (0..n)
        .step_by(rows)
        .map(|s| {
            let len = rows.min(n - s);
            let t = B::int_slice(targets.clone(), &rows_slice(s, len)[..1]);
            composed_forward::<B>(B::float_slice(logits.clone(), &rows_slice(s, len)), t)
        })
        .unzip();
    (B::float_cat(lp, 0), B::float_cat(lse, 0))
}

/// [`composed_backward`] over `rows` rows at a time, each run's gradient written over its rows of
/// the logits, which autodiff kept for this pass alone (copied once first if something else holds
/// them), so that no other `[N, V]` tensor lives beside them longer than a run.
fn composed_backward_in_runs<B: Backend>(logits: FloatTensor<B>, lse: FloatTensor<B>, targets: IntTensor<B>, grad: FloatTensor<B>, rows: usize) -> FloatTensor<B> {
    let n = rows_cols::<B>(&logits).0;
    if n <= rows {
        return composed_backward::<B>(logits, lse, targets, grad);
    }
    let mut out = logits;
    for s in (0..n).step_by(rows) {
        let at = rows_slice(s, rows.min(n - s));
        let part = composed_backward::<B>(B::float_slice(out.clone(), &at), B::float_slice(lse.clone(), &at[..1]), B::int_slice(targets.clone(), &at[..1]), B::float_slice(grad.clone(), &at[..1]));
        out = B::float_slice_assign(out, &at, part);
    }
    out
}

fn rows_cols<B: Backend>(logits: &FloatTensor<B>) -> (usize, usize) {
    let shape = logits.shape();
    (shape[0], shape[1])
}

/// The logits in f32: log-probabilities summed over a completion need it, whatever the model's
/// dtype. Inside the operation, so that what autodiff keeps is the logits in the model's dtype
/// (half the bytes of f32 in bf16) and the f32 copy lives only while a pass reads it.
fn widened<B: Backend>(logits: FloatTensor<B>) -> FloatTensor<B> {
    if logits.dtype() == DType::F32 { logits } else { B::float_cast(logits, FloatDType::F32) }
}

/// The forward pass in backend operations (max-shifted log-sum-exp, then a gather).
fn composed_forward<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let logits = widened::<B>(logits);
    let (n, v) = rows_cols::<B>(&logits);
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits.clone(), B::float_expand(max.clone(), Shape::new([n, v])));
    let lse = B::float_add(B::float_log(B::float_sum_dim(B::float_exp(shifted), 1)), max);
    let picked = B::float_gather(1, logits, B::int_reshape(targets, Shape::new([n, 1])));
    let lp = B::float_sub(picked, lse.clone());
    (B::float_reshape(lp, Shape::new([n])), B::float_reshape(lse, Shape::new([n])))
}

/// The backward pass in backend operations, in f32, the gradient cast to the logits' dtype.
fn composed_backward<B: Backend>(logits: FloatTensor<B>, lse: FloatTensor<B>, targets: IntTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let dtype = logits.dtype();
    let logits = widened::<B>(logits);
    let (n, v) = rows_cols::<B>(&logits);
    let g = B::float_reshape(grad, Shape::new([n, 1]));
    let lse = B::float_expand(B::float_reshape(lse, Shape::new([n, 1])), Shape::new([n, v]));
    let softmax = B::float_exp(B::float_sub(logits, lse));
    let out = B::float_mul(softmax, B::float_expand(B::float_neg(g.clone()), Shape::new([n, v])));
    let out = B::float_scatter(1, out, B::int_reshape(targets, Shape::new([n, 1])), g, IndexingUpdateOp::Add);
    if dtype == DType::F32 { out } else { B::float_cast(out, FloatDType::from(dtype)) }
}

/// What the CPU kernel's backward pass wrote.
#[cfg(any(feature = "flex", feature = "tch"))]
enum Written<T> {
    /// The gradient, over the logits' own buffer.
    InPlace,
    /// The gradient, in a new buffer (the logits were shared or strided).
    Copy(T),
}

/// The CPU kernels on one backend's primitives: how to reach the f32 rows and i64 targets, and
/// how to make a tensor from a vector. `None` (nothing computed) when a buffer is out of reach.
#[cfg(any(feature = "flex", feature = "tch"))]
macro_rules! cpu_kernels {
    ($backend:ty, $module:ident) => {
        /// [`crate::softmax::forward`] on f32 logits the CPU reaches: the log-probabilities and the log-sum-exps.
        fn kernel_forward(logits: &FloatTensor<$backend>, targets: &IntTensor<$backend>) -> Option<(FloatTensor<$backend>, FloatTensor<$backend>)> {
            let (n, v) = rows_cols::<$backend>(logits);
            let t = crate::cpu::$module::ints(targets)?;
            let (lp, lse) = crate::cpu::$module::with_rows(logits, |x| crate::softmax::forward(x, v, &t))?;
            count(&FORWARD);
            let device = logits.device();
            let make = |x: Vec<f32>| <$backend>::float_from_data(burn::tensor::TensorData::new(x, [n]), &device);
            Some((make(lp), make(lse)))
        }

        /// [`crate::softmax::backward`] on f32 logits the CPU reaches, over their buffer where nothing else holds it.
        fn kernel_backward(logits: &mut FloatTensor<$backend>, lse: &FloatTensor<$backend>, targets: &IntTensor<$backend>, grad: &FloatTensor<$backend>) -> Option<Written<FloatTensor<$backend>>> {
            use crate::cpu::$module::{ints, slice_mut, with_rows};
            let (n, v) = rows_cols::<$backend>(logits);
            let (t, l, g) = (ints(targets)?, with_rows(lse, <[f32]>::to_vec)?, with_rows(grad, <[f32]>::to_vec)?);
            // The logits are kept for this pass alone, so their buffer usually takes the gradient.
            if let Some(x) = slice_mut(logits) {
                crate::softmax::backward(None, x, v, &t, &l, &g);
                count(&BACKWARD_IN_PLACE);
                return Some(Written::InPlace);
            }
            let mut out = <$backend>::float_empty(Shape::new([n, v]), &logits.device(), FloatDType::F32);
            let o = slice_mut(&mut out)?;
            with_rows(logits, |x| crate::softmax::backward(Some(x), o, v, &t, &l, &g))?;
            count(&BACKWARD_COPY);
            Some(Written::Copy(out))
        }
    };
}

/// flex: the CPU kernels, on the logits widened to f32 first.
#[cfg(feature = "flex")]
mod flex_impl {
    use super::*;
    use burn::backend::Flex;

    cpu_kernels!(Flex, flex);

    impl TokenLogProbsBackend for Flex {
        fn token_logprobs_forward(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let logits = widened::<Self>(logits);
            kernel_forward(&logits, &targets).unwrap_or_else(|| {
                let rows = run_rows(rows_cols::<Self>(&logits).1);
                composed_forward_in_runs::<Self>(logits, targets, rows)
            })
        }

        fn token_logprobs_backward(logits: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            let dtype = logits.dtype();
            // A widened copy is this pass's own, so the kernel writes over it.
            let mut x = widened::<Self>(logits);
            let out = match kernel_backward(&mut x, &lse, &targets, &grad) {
                Some(Written::InPlace) => x,
                Some(Written::Copy(out)) => out,
                None => {
                    let rows = run_rows(rows_cols::<Self>(&x).1);
                    composed_backward_in_runs::<Self>(x, lse, targets, grad, rows)
                }
            };
            if dtype == DType::F32 { out } else { Self::float_cast(out, FloatDType::from(dtype)) }
        }
    }
}

/// libtorch: the CPU kernels on f32 CPU tensors; anything else (CUDA, half precision) runs
/// [`torch_forward`] and [`torch_backward`].
#[cfg(feature = "tch")]
mod tch_impl {
    use super::*;
    use burn::backend::LibTorch;

    cpu_kernels!(LibTorch, tch);

    impl TokenLogProbsBackend for LibTorch {
        fn token_logprobs_forward(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
            kernel_forward(&logits, &targets).unwrap_or_else(|| torch_forward(&logits, &targets, run_rows(rows_cols::<Self>(&logits).1) as i64))
        }

        fn token_logprobs_backward(mut logits: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            match kernel_backward(&mut logits, &lse, &targets, &grad) {
                Some(Written::InPlace) => logits,
                Some(Written::Copy(out)) => out,
                None => {
                    let rows = run_rows(rows_cols::<Self>(&logits).1) as i64;
                    torch_backward(logits, &lse, &targets, &grad, rows)
                }
            }
        }
    }
}

/// The forward pass as torch operations, for libtorch tensors the CPU kernel does not reach (CUDA,
/// half precision), over `rows` rows at a time, and the picked entries.
///
/// Half-precision logits: each row's largest logit, then `Σ exp(x − max)` in f32, the subtraction
/// reading the half-precision part as it is into an f32 buffer (on CUDA torch's element-wise
/// kernels cast as they load and store) and the exponential taken there in place: four passes, 20
/// bytes moved an element, where widening to an f32 copy for torch's `log_softmax` moves 24 (its
/// kernel reads a row three times: the maximum, the sum, the output); five kernels a run where
/// that took eight, the logarithm and the picked entries once over all rows. f32 logits need no
/// copy for torch's `log_softmax` (20 bytes an element, where the four passes would move 24).
#[cfg(feature = "tch")]
fn torch_forward(logits: &burn::backend::libtorch::TchTensor, targets: &burn::backend::libtorch::TchTensor, rows: i64) -> (burn::backend::libtorch::TchTensor, burn::backend::libtorch::TchTensor) {
    use burn::backend::libtorch::TchTensor;
    let (x, t) = (&logits.tensor, targets.tensor.unsqueeze(1));
    let [n, v] = x.size()[..] else { unreachable!("the logits are [N, V]") };
    // At least one run, so that no rows give empty results rather than nothing to join.
    let runs = (0..n.max(1)).step_by(rows as usize).map(|s| (s, rows.min(n - s)));
    let joined = |mut parts: Vec<tch::Tensor>| if parts.len() == 1 { parts.remove(0) } else { tch::Tensor::cat(&parts, 0) };
    let (lp, lse) = if x.kind() != tch::Kind::Float {
        // Each run's maximum and sum of exponentials; the logarithm, the picked entries and
        // their difference once over all rows, so that a run costs five kernels.
        let buffer = tch::Tensor::empty([rows.min(n), v], (tch::Kind::Float, x.device()));
        let (maxes, sums): (Vec<_>, Vec<_>) = runs
            .map(|(s, len)| {
                let xs = x.narrow(0, s, len);
                let max = xs.amax(1, true).to_kind(tch::Kind::Float);
                let mut e = xs.sub_out(&buffer.narrow(0, 0, len), &max);
                let _ = e.exp_();
                (max, e.sum_dim_intlist(1, true, tch::Kind::Float))
            })
            .unzip();
        let mut lse = joined(sums);
        let _ = lse.log_();
        lse += joined(maxes);
        (x.gather(1, &t, false).to_kind(tch::Kind::Float) - &lse, lse)
    } else {
        // The log-sum-exp is `x − log_softmax(x)` at each row's largest logit, where both terms
        // are about the size of the result, so it is as exact as the f32 result can be.
        let (lp, lse): (Vec<_>, Vec<_>) = runs
            .map(|(s, len)| {
                let xs = x.narrow(0, s, len);
                let at = tch::Tensor::cat(&[t.narrow(0, s, len), xs.argmax(1, true)], 1);
                let ls = xs.log_softmax(1, tch::Kind::Float).gather(1, &at, false);
                let lse = xs.gather(1, &at.narrow(1, 1, 1), false) - ls.narrow(1, 1, 1);
                (ls.narrow(1, 0, 1), lse)
            })
            .unzip();
        (joined(lp), joined(lse))
    };
    count(&TORCH_FORWARD);
    (TchTensor::new(lp.squeeze_dim(1)), TchTensor::new(lse.squeeze_dim(1)))
}

/// The backward pass as torch operations, `rows` rows at a time: `(exp(x − lse) − onehot) · (−g)`
/// in f32, written in the logits' dtype. The gradient takes the logits' own buffer when nothing else
/// holds it, so that the pass needs no `[N, V]` tensor beyond the one autodiff kept (the composed
/// form writes four).
#[cfg(feature = "tch")]
fn torch_backward(logits: burn::backend::libtorch::TchTensor, lse: &burn::backend::libtorch::TchTensor, targets: &burn::backend::libtorch::TchTensor, grad: &burn::backend::libtorch::TchTensor, rows: i64) -> burn::backend::libtorch::TchTensor {
    let cuda = logits.tensor.device().is_cuda();
    torch_backward_casting(logits, lse, targets, grad, rows, cuda)
}

/// [`torch_backward`], with half-precision parts widened by the kernels as they load and store
/// (`in_kernel`) or through an f32 copy of each part. f32 parts are worked in place either way.
///
/// On CUDA torch's element-wise kernels cast mixed dtypes as they load and store, so the
/// subtraction reads the half-precision part as it is into an f32 buffer and the product writes it
/// rounded: three passes, 20 bytes moved an element, where the copy, the subtraction, the
/// exponential, the product and the rounding back are five and 36 (the `[N, V]` of a Llama-3.2-1B
/// step of 8 pairs × 512 tokens is 2.1 GB of bf16). torch's CPU kernels copy mixed-dtype operands to
/// their common dtype first, so there the copy is made once, explicitly.
#[cfg(feature = "tch")]
fn torch_backward_casting(logits: burn::backend::libtorch::TchTensor, lse: &burn::backend::libtorch::TchTensor, targets: &burn::backend::libtorch::TchTensor, grad: &burn::backend::libtorch::TchTensor, rows: i64, in_kernel: bool) -> burn::backend::libtorch::TchTensor {
    use burn::backend::libtorch::TchTensor;
    // `can_mut`: nothing else holds the buffer and no stride broadcasts, so it can take the gradient.
    let own = logits.can_mut();
    let out = if own { logits.tensor.shallow_clone() } else { logits.tensor.copy() };
    drop(logits);
    let (t, lse) = (targets.tensor.unsqueeze(1), lse.tensor.unsqueeze(1));
    let g = grad.tensor.to_kind(tch::Kind::Float).neg().unsqueeze(1);
    let [n, v] = out.size()[..] else { unreachable!("the logits are [N, V]") };
    let half = out.kind() != tch::Kind::Float;
    let f32 = (tch::Kind::Float, out.device());
    let buffer = (half && in_kernel).then(|| tch::Tensor::empty([rows.min(n), v], f32));
    let minus_one = tch::Tensor::full([rows.min(n), 1], -1.0, f32);
    for s in (0..n).step_by(rows as usize) {
        let len = rows.min(n - s);
        let (mut o, lse, g) = (out.narrow(0, s, len), lse.narrow(0, s, len), g.narrow(0, s, len));
        let mut d = match &buffer {
            Some(b) => o.sub_out(&b.narrow(0, 0, len), &lse),
            None => {
                // f32 logits: `to_kind` hands back the part itself, and the operations below write it.
                let mut d = o.to_kind(tch::Kind::Float);
                d -= &lse;
                d
            }
        };
        let _ = d.exp_();
        let _ = d.scatter_add_(1, &t.narrow(0, s, len), &minus_one.narrow(0, 0, len));
        if buffer.is_some() {
            let _ = d.mul_out(&o, &g);
        } else {
            d *= &g;
            if half {
                o.copy_(&d);
            }
        }
    }
    count(if own { &TORCH_BACKWARD_IN_PLACE } else { &TORCH_BACKWARD_COPY });
    TchTensor::new(out)
}

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
#[cfg(feature = "tch")]
static TORCH_FORWARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
#[cfg(feature = "tch")]
static TORCH_BACKWARD_IN_PLACE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
#[cfg(feature = "tch")]
static TORCH_BACKWARD_COPY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

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

/// How often the torch operations ran for libtorch tensors the CPU kernels do not reach (CUDA,
/// half precision), counted as [`token_logprob_kernel_calls`] counts.
#[cfg(feature = "tch")]
pub fn token_logprob_torch_calls() -> (usize, usize, usize) {
    let load = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed);
    (load(&TORCH_FORWARD), load(&TORCH_BACKWARD_IN_PLACE), load(&TORCH_BACKWARD_COPY))
}

/// `log softmax(logits)[n, targets[n]]` `[N]` in f32 for `logits` `[N, V]` of any float dtype and
/// `targets` `[N]`, differentiable with respect to `logits`.
///
/// The log-softmax is taken in f32 whatever the logits' dtype, and what autodiff keeps for the
/// backward pass is the logits as they come (bf16 logits: half the bytes of their f32 copy) and
/// their log-sum-exps; the gradient comes back in the logits' dtype. On flex and on libtorch's f32
/// CPU tensors it is one read of the logits forward and one in-place pass backward
/// ([`TokenLogProbsBackend`]); on libtorch's other tensors (CUDA, half precision) torch
/// operations each way, in runs of rows, the backward's in place; on the cubecl backends the same
/// computation in backend operations. All match the definition to f32 rounding (the CPU kernel
/// accumulates the sum of exponentials in f64).
///
/// # Panics
/// When a target is not in `0..V` (the fused kernel names the id; tensor operations fail as their
/// backend's gather does).
pub fn token_logprobs(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if !crate::extended(&logits.clone().into_dispatch().kind, REACH) {
        return token_logprobs_tensor_ops(logits.cast(FloatDType::F32), targets);
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
#[allow(clippy::expect_used)]
mod tests {
    use burn::tensor::{Device, Int, Tensor, TensorData};

    use super::*;

    /// The CPU devices this build has (the kernels' targets).
    fn devices() -> Vec<Device> {
        vec![
            #[cfg(feature = "flex")]
            Device::flex(),
            #[cfg(feature = "tch")]
            Device::libtorch(),
        ]
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

    /// Half-precision logits: the log-softmax in f32 of the logits as they are rounded, the
    /// gradient in their dtype, and on libtorch the torch operations (what CUDA runs), the
    /// gradient written over the logits.
    #[test]
    fn half_precision_logits_are_widened_inside() {
        use burn::tensor::FloatDType;
        let (n, v) = (6, 900);
        let t: Vec<i64> = vec![0, 899, 450, 7, 7, 300];
        let w = [1.0f32, -0.5, 2.0, 0.0, 0.75, -1.25];
        for device in devices() {
            let ad = device.clone().autodiff();
            for dtype in [FloatDType::BF16, FloatDType::F16] {
                let xs = Tensor::<2>::from_data(TensorData::new(logits(n, v), [n, v]), &ad).cast(dtype).require_grad();
                // The reference reads the logits after rounding to `dtype`.
                let rounded = vec(xs.clone().inner().cast(FloatDType::F32).reshape([n * v]));
                let (want_lp, want_grad) = want(&rounded, v, &t, &w);
                let before = torch_calls();
                let ts = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &ad);
                let ws = Tensor::<1>::from_data(TensorData::new(w.to_vec(), [n]), &ad);
                let lp = token_logprobs(xs.clone().mul_scalar(1.0), ts);
                assert_eq!(lp.dtype(), burn::tensor::DType::F32, "{device:?} {dtype:?}");
                let grads = (lp.clone() * ws).sum().backward();
                let g = xs.grad(&grads).expect("logits have a gradient");
                assert_eq!(g.dtype(), xs.dtype(), "{device:?}: the gradient comes back in the logits' dtype");
                for (i, (&got, &w)) in vec(lp.inner()).iter().zip(&want_lp).enumerate() {
                    assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "{device:?} {dtype:?} lp[{i}]: {got} vs {w}");
                }
                // One rounding to `dtype` of the f32 gradient: 2^-8 relative in bf16, 2^-11 in f16.
                let tol = if dtype == FloatDType::BF16 { 4e-3 } else { 5e-4 };
                for (i, (&got, &w)) in vec(g.cast(FloatDType::F32).reshape([n * v])).iter().zip(&want_grad).enumerate() {
                    assert!((f64::from(got) - w).abs() <= tol * w.abs() + 1e-7, "{device:?} {dtype:?} grad[{i}]: {got} vs {w}");
                }
                #[cfg(feature = "tch")]
                {
                    let after = torch_calls();
                    if device == Device::libtorch() {
                        assert!(after.0 > before.0 && after.1 > before.1, "{device:?}: the torch path did not run in place ({before:?} → {after:?})");
                    }
                }
                let _ = before;
            }
        }
    }

    /// The torch path's calls (forward, backward in place, backward over a copy); zeros without libtorch.
    fn torch_calls() -> (usize, usize, usize) {
        #[cfg(feature = "tch")]
        return token_logprob_torch_calls();
        #[cfg(not(feature = "tch"))]
        (0, 0, 0)
    }

    /// libtorch's f32 logits the CPU kernel does not reach take the torch path: in place over a
    /// buffer nothing else holds, over a copy of a shared one (left as it was).
    #[cfg(feature = "tch")]
    #[test]
    fn the_torch_path_in_f32_in_place_and_over_a_copy() {
        use burn::backend::libtorch::TchTensor;
        let (n, v) = (4, 500);
        let x = logits(n, v);
        let t: Vec<i64> = vec![1, 499, 250, 0];
        let w = [0.5f32, -1.0, 2.0, 1.0];
        let (want_lp, want_grad) = want(&x, v, &t, &w);
        let make = || TchTensor::new(tch::Tensor::from_slice(&x).reshape([n as i64, v as i64]));
        let targets = TchTensor::new(tch::Tensor::from_slice(&t));
        let grad = TchTensor::new(tch::Tensor::from_slice(&w));
        let (lp, lse) = torch_forward(&make(), &targets, 3);
        let lp: Vec<f32> = Vec::try_from(&lp.tensor).expect("f32 values");
        for (&got, &w) in lp.iter().zip(&want_lp) {
            assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "lp {got} vs {w}");
        }
        let check = |g: TchTensor| {
            let g: Vec<f32> = Vec::try_from(&g.tensor.reshape([-1])).expect("f32 values");
            for (&got, &w) in g.iter().zip(&want_grad) {
                assert!((f64::from(got) - w).abs() <= 1e-6 * w.abs().max(1e-2), "grad {got} vs {w}");
            }
        };
        let before = token_logprob_torch_calls();
        let own = make();
        let ptr = own.tensor.data_ptr() as usize;
        let g = torch_backward(own, &lse, &targets, &grad, 3);
        assert_eq!(g.tensor.data_ptr() as usize, ptr, "an unshared buffer takes the gradient");
        check(g);
        let shared = make();
        let kept = shared.clone();
        check(torch_backward(shared, &lse, &targets, &grad, 4));
        let kept: Vec<f32> = Vec::try_from(&kept.tensor.reshape([-1])).expect("f32 values");
        assert_eq!(kept, x, "shared logits were written");
        let after = token_logprob_torch_calls();
        assert!(after.1 > before.1 && after.2 > before.2, "{before:?} → {after:?}");
    }

    /// The torch path on half-precision logits in runs of rows (a shorter last run), both ways of
    /// widening: the gradient written over an unshared buffer, a shared one left as it was, each
    /// element one rounding of the f32 gradient of the rounded logits.
    #[cfg(feature = "tch")]
    #[test]
    fn the_torch_path_in_half_precision_in_runs() {
        use burn::backend::libtorch::TchTensor;
        let (n, v) = (7, 400);
        let t: Vec<i64> = vec![1, 399, 250, 0, 0, 17, 300];
        let w = [0.5f32, -1.0, 2.0, 1.0, 0.0, -0.25, 3.0];
        let targets = TchTensor::new(tch::Tensor::from_slice(&t));
        let grad = TchTensor::new(tch::Tensor::from_slice(&w));
        for (kind, tol) in [(tch::Kind::BFloat16, 4e-3), (tch::Kind::Half, 5e-4)] {
            let make = || TchTensor::new(tch::Tensor::from_slice(&logits(n, v)).reshape([n as i64, v as i64]).to_kind(kind));
            let rounded: Vec<f32> = Vec::try_from(&make().tensor.to_kind(tch::Kind::Float).reshape([-1])).expect("f32 values");
            let (want_lp, want_grad) = want(&rounded, v, &t, &w);
            // No rows give no values, in f32.
            let none = TchTensor::new(tch::Tensor::zeros([0, v as i64], (kind, tch::Device::Cpu)));
            let (lp, lse) = torch_forward(&none, &TchTensor::new(tch::Tensor::zeros([0], (tch::Kind::Int64, tch::Device::Cpu))), 3);
            assert_eq!((lp.tensor.size(), lse.tensor.size(), lp.tensor.kind()), (vec![0], vec![0], tch::Kind::Float), "{kind:?}: no rows");
            let (lp, lse) = torch_forward(&make(), &targets, 3);
            let lp: Vec<f32> = Vec::try_from(&lp.tensor).expect("f32 values");
            for (&got, &w) in lp.iter().zip(&want_lp) {
                assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "{kind:?} lp {got} vs {w}");
            }
            let check = |g: TchTensor| {
                assert_eq!(g.tensor.kind(), kind, "the gradient comes back in the logits' dtype");
                let g: Vec<f32> = Vec::try_from(&g.tensor.to_kind(tch::Kind::Float).reshape([-1])).expect("f32 values");
                for (i, (&got, &w)) in g.iter().zip(&want_grad).enumerate() {
                    assert!((f64::from(got) - w).abs() <= tol * w.abs() + 1e-7, "{kind:?} grad[{i}]: {got} vs {w}");
                }
            };
            // Widened by the kernels as CUDA does, and through a copy as the CPU does.
            for in_kernel in [true, false] {
                let own = make();
                let ptr = own.tensor.data_ptr() as usize;
                let g = torch_backward_casting(own, &lse, &targets, &grad, 3, in_kernel);
                assert_eq!(g.tensor.data_ptr() as usize, ptr, "{kind:?} {in_kernel}: an unshared buffer takes the gradient");
                check(g);
                let shared = make();
                let kept = shared.clone();
                check(torch_backward_casting(shared, &lse, &targets, &grad, 2, in_kernel));
                let kept: Vec<f32> = Vec::try_from(&kept.tensor.to_kind(tch::Kind::Float).reshape([-1])).expect("f32 values");
                assert_eq!(kept, rounded, "{kind:?} {in_kernel}: shared logits were written");
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
        // In runs of one row, of three (a shorter last run) and all at once.
        for rows in [1, 3, n] {
            let (lp, lse) = composed_forward_in_runs::<burn::backend::Flex>(float(TensorData::new(x.clone(), [n, v]), [n, v]), int(), rows);
            for (&got, &w) in to_vec(lp).iter().zip(&want_lp) {
                assert!((f64::from(got) - w).abs() <= 2e-6 * w.abs().max(1.0), "rows {rows}: lp {got} vs {w}");
            }
            let g = float(TensorData::new(w.to_vec(), [n, 1]), [n, 1]);
            let g = burn::backend::Flex::float_reshape(g, Shape::new([n]));
            // `kept` shares the logits' buffer: the runs must leave it as it was.
            let logits = float(TensorData::new(x.clone(), [n, v]), [n, v]);
            let kept = logits.clone();
            let grad = composed_backward_in_runs::<burn::backend::Flex>(logits, lse, int(), g, rows);
            for (&got, &w) in to_vec(grad).iter().zip(&want_grad) {
                assert!((f64::from(got) - w).abs() <= 1e-6 * w.abs().max(1e-2), "rows {rows}: grad {got} vs {w}");
            }
            assert_eq!(to_vec(kept), x, "rows {rows}: shared logits were written");
        }
    }
}
