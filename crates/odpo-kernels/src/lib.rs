//! Fused kernels for the two memory-bound ends of a training step: the log-probabilities of the
//! target tokens over a large vocabulary ([`token_logprobs`], a log-softmax + gather with its own
//! backward pass, as a burn backend extension), the product with a frozen quantised weight whose
//! backward pass keeps the weight quantised ([`dequantized_matmul`]), attention whose backward pass
//! recomputes its weights instead of keeping them ([`masked_attention`]; on flex one loop over the
//! heads split over the CPU's threads, over blocks of query rows that skip the keys a causal mask
//! hides), the rotary position embedding, RMSNorm and the gated MLP unit (SwiGLU, GeGLU) each as
//! one recorded operation ([`rotary`], [`rms_norm`], [`glu`]; on flex, one loop per pass split over
//! the CPU's threads), a LoRA projection's frozen product plus its low-rank update as one recorded
//! operation, so that gradient checkpointing holds the sum rather than both terms ([`scaled_sum`]),
//! the token embedding lookup whose backward pass on flex touches only the
//! rows the batch used ([`embedding`]), the models' products with
//! f32 operands kept in f32 where burn's GPU matmul would round them to TF32, and on flex written
//! into one allocation ([`matmul`], [`linear`]; [`matmul_nt`] for a tied LM head, whose gradient
//! it writes in the embedding's own layout; the cubek routine of their bf16 and f16 products on the
//! cubecl backends by name, [`MatmulRoutine`]), and the update path: the cast of a mixed-precision
//! step's weights whose gradients stay in half precision for the optimizer to widen ([`compute_cast`]),
//! the AdamW step in one pass over
//! a parameter, its gradient and its two moments ([`adamw`]), the same over all parameters at once
//! on libtorch devices ([`FlatAdamW`], PyTorch's multi-tensor update), and the sum of squares of a
//! gradient without a squared temporary ([`cpu_sum_squares`]; on the cubecl backends, all gradients'
//! with one kernel each and one read, [`SquareSums`]). [`max_buffer_bytes`] says how large one
//! buffer of a device may be, for callers that split what would not fit; [`kernel_census`] which
//! kernels a piece of work launches on the cubecl backends, and for how long; [`KernelPaths`]
//! which of this crate's own paths it took.
//!
//! burn's element-wise operations write one tensor per operation, so an AdamW update written with
//! them makes a dozen passes over every parameter-sized buffer; PyTorch's single-tensor AdamW makes
//! about seven, in place. On the CPU the update is bound by memory traffic, so [`adamw`] reads each
//! of the four buffers once and writes three, in place, in Rust (split over rayon's threads). It does
//! so where it can reach the memory: f32 tensors of the flex backend or of libtorch on the CPU that
//! are contiguous and not shared with another tensor. Other unshared libtorch tensors (CUDA, half
//! precision) take PyTorch's fused AdamW kernel, the one kernel `torch.optim.AdamW(fused=True)`
//! runs (`fused_adamw_calls` counts it), or where that is out of reach PyTorch's own sequence of
//! in-place torch operations. On the cubecl backends it is one kernel per parameter, in place
//! ([`kernel_census`] sees it as `AdamwKernel`), or within an optimizer step ([`FlatAdamW`]) one
//! for four parameters (`Adamw4Kernel`). Anywhere else (shared or strided tensors) it runs the same
//! formula as burn tensor operations.
//!
//! This crate names backends, as `odpo-model`'s `backend` module does; the trainer calls it through
//! backend-free functions of `Tensor`s.
#![deny(missing_docs)]

#[cfg(feature = "cube")]
mod adamw_cube;
#[cfg(feature = "tch")]
mod adamw_libtorch;
mod attention;
mod cpu;
// Calls CUPTI's C functions and reads its records: foreign memory, so unsafe.
#[cfg(all(feature = "tch", target_os = "linux"))]
#[allow(unsafe_code)]
mod cupti;
mod embedding;
mod flat_adamw;
mod glu;
mod launches;
mod limits;
#[cfg(feature = "cube")]
mod masked_softmax;
mod matmul;
mod matmul_routine;
mod paths;
mod precision;
mod quantized;
mod retro;
mod rms_norm;
mod rotary;
mod rows;
mod scaled_sum;
// The log-softmax loops run on CPU memory, which only flex and libtorch hand out.
#[cfg(any(feature = "flex", feature = "tch"))]
mod softmax;
mod square_sums;
mod token_logprobs;

pub use attention::{KeptAttention, MaskedAttentionBackend, causal_attention_kernels, fused_attention_backward_calls, fused_attention_forward_reruns, grouped_attention_kernels, masked_attention, masked_attention_calls};
pub use embedding::{EmbeddingBackend, embedding};
pub use flat_adamw::{FlatAdamW, FlatEntry, FlatMode};
pub use glu::{Gate, GluBackend, KeptGlu, glu};
pub use launches::{KernelLaunches, cuda_activity_census, kernel_census, launches_kernels, traces_cuda_activity};
pub use limits::max_buffer_bytes;
pub use matmul::{ExactMatmulBackend, exact_matmul_calls, linear, matmul, matmul_nt};
pub use matmul_routine::{MATMUL_ROUTINES, MatmulRoutine, Product, RoutineCalls, matmul_routine, matmul_routine_calls, record_products, set_matmul_routine, with_matmul_routine};
pub use paths::KernelPaths;
pub use precision::{ComputeCastBackend, compute_cast, compute_copy};
pub use quantized::{QuantizedMatmulBackend, dequantized_matmul, dequantized_matmul_calls, holds_quantized};
pub use rms_norm::{KeptRmsNorm, RmsNormBackend, rms_norm};
pub use rotary::{RotaryBackend, rotary};
pub use rows::{RowsBackend, reshape_rows};
pub use scaled_sum::{ScaledSumBackend, scaled_sum};
pub use square_sums::SquareSums;
pub use token_logprobs::{TokenLogProbsBackend, token_logprob_kernel_calls, token_logprobs, token_logprobs_tensor_ops};
#[cfg(feature = "tch")]
pub use adamw_libtorch::fused_adamw_calls;
#[cfg(feature = "tch")]
pub use token_logprobs::token_logprob_torch_calls;

use burn::backend::DispatchTensorKind;
use burn::tensor::Tensor;

/// The launch of an element-wise kernel with one unit per element on the cubecl backends: its cube
/// count and size for `units` units, and the address width the tensors need.
#[cfg(feature = "cube")]
pub(crate) fn elementwise_launch(units: usize, tensors: &[&burn_cubecl::tensor::CubeTensor]) -> (burn_cubecl::cubecl::prelude::CubeCount, burn_cubecl::cubecl::prelude::CubeDim, burn_cubecl::cubecl::prelude::AddressType) {
    use burn_cubecl::cubecl::prelude::CubeDim;
    let client = &tensors[0].client;
    let dim = CubeDim::new(client, units);
    let count = burn_cubecl::cubecl::calculate_cube_count_elemwise(client, units, dim);
    let address = tensors.iter().map(|t| t.required_address_type()).max().unwrap_or_default();
    (count, dim, address)
}

/// A new tensor on `like`'s device, of its shape and dtype, for an element-wise kernel to write:
/// contiguous, without the padding cubecl gives the rows it allocates (576 elements take 640).
/// burn copies a padded tensor whenever its leading dimensions are merged (the models' linear
/// layers view `[B, T, D]` as `[B·T, D]`, forward and backward); a contiguous one it views.
#[cfg(feature = "cube")]
pub(crate) fn elementwise_output(like: &burn_cubecl::tensor::CubeTensor) -> burn_cubecl::tensor::CubeTensor {
    use burn::backend::TensorMetadata;
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), like.shape(), like.dtype)
}

/// The gradients with respect to `leaves` of `Σ out ⊙ dout`, where `out` carries torch's autograd
/// record of an operation over them: the operation's backward pass applied to `dout`, as torch's
/// autograd runs it (its fused backward kernels). tch binds no output gradient for
/// `torch.autograd.grad` (it seeds the root with ones), so a product with `dout` hands the record
/// `dout`: where both are contiguous and of one dtype (RMSNorm's), the dot product of the two, one
/// read of each, whose backward writes `dout` as `out`'s gradient (8 bytes moved an element of half
/// precision in all, in two kernels); elsewhere (the attention's output, laid out as torch's kernels
/// write it) the element-wise product summed in f32, which writes the product first (12 bytes,
/// three kernels) but needs no views to line the two up, each an operation on the host. Only the
/// record is read, not the value, so a half-precision dot that overflows changes nothing. `None`
/// where torch refuses.
#[cfg(feature = "tch")]
pub(crate) fn torch_vjp<const N: usize>(out: &tch::Tensor, dout: &tch::Tensor, leaves: [&tch::Tensor; N]) -> Option<[tch::Tensor; N]> {
    let total = tch::with_grad(|| match dot_alike(out, dout) {
        Some(dot) => {
            VJP_PRODUCTS[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(dot)
        }
        None => {
            VJP_PRODUCTS[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out.f_mul(dout).and_then(|p| p.f_sum(tch::Kind::Float))
        }
    })
    .ok()?;
    tch::Tensor::f_run_backward(&[&total], &leaves, false, false).ok()?.try_into().ok()
}

/// A leaf of torch's autograd over `x`'s memory, sharing burn's count of its holders, so that burn
/// writes over neither while a record of torch's holds the leaf.
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
pub(crate) fn torch_leaf(x: &burn::backend::libtorch::TchTensor) -> burn::backend::libtorch::TchTensor {
    burn::backend::libtorch::TchTensor::from_existing(x.tensor.detach().set_requires_grad(true), x.storage.clone())
}

/// The output of a recorded operation as the model reads it: without the record (burn's
/// operations on it must record nothing in torch), sharing the output's memory, so that burn writes
/// over neither.
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
pub(crate) fn torch_shown(out: &burn::backend::libtorch::TchTensor) -> burn::backend::libtorch::TchTensor {
    burn::backend::libtorch::TchTensor::from_existing(out.tensor.detach(), out.storage.clone())
}

/// Whether an autodiff operation's forward pass may keep more than its inputs for its backward
/// pass: not under gradient checkpointing, which computes memory-bound operations again rather
/// than keep what they make.
pub(crate) fn keeps_more<C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>() -> bool {
    std::any::TypeId::of::<C>() == std::any::TypeId::of::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>()
}

/// [`torch_vjp`]'s products with `dout`: dot products, and products summed.
#[cfg(feature = "tch")]
static VJP_PRODUCTS: [std::sync::atomic::AtomicUsize; 2] = [std::sync::atomic::AtomicUsize::new(0), std::sync::atomic::AtomicUsize::new(0)];

/// How many of [`torch_vjp`]'s products with `dout` were one dot product, and how many a product
/// summed, in this process.
#[cfg(feature = "tch")]
pub(crate) fn torch_vjp_products() -> [usize; 2] {
    VJP_PRODUCTS.each_ref().map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
}

/// `Σ out ⊙ dout` as one dot product over the flattened tensors, where both are contiguous and of
/// one dtype; `None` elsewhere or where torch refuses (cuBLAS's dot takes at most 2³¹ − 1
/// elements).
#[cfg(feature = "tch")]
fn dot_alike(out: &tch::Tensor, dout: &tch::Tensor) -> Option<tch::Tensor> {
    if out.kind() != dout.kind() || out.size() != dout.size() || !out.is_contiguous() || !dout.is_contiguous() {
        return None;
    }
    out.f_flatten(0, -1).ok()?.f_dot(&dout.f_flatten(0, -1).ok()?).ok()
}

/// Whether a libtorch tensor on `device` keeps, from a tracked forward pass, what its backward pass
/// would otherwise compute again (the gated unit's activation, torch's record of its RMSNorm): on
/// CUDA, where the bytes saved are the time and memory is less scarce. Unit tests can ask for it on
/// the CPU ([`keep_on_the_cpu`]) to check those paths through autodiff here.
#[cfg(feature = "tch")]
pub(crate) fn keeps_for_backward(device: tch::Device) -> bool {
    #[cfg(test)]
    if KEEP_ON_THE_CPU.with(std::cell::Cell::get) {
        return true;
    }
    device.is_cuda()
}

#[cfg(all(test, feature = "tch"))]
thread_local! {
    static KEEP_ON_THE_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with libtorch's CPU tensors keeping what CUDA's keep for the backward pass, on this thread.
#[cfg(all(test, feature = "tch"))]
pub(crate) fn keep_on_the_cpu<T>(f: impl FnOnce() -> T) -> T {
    KEEP_ON_THE_CPU.with(|k| k.set(true));
    let out = f();
    KEEP_ON_THE_CPU.with(|k| k.set(false));
    out
}

/// Sums and maxima across a cube of units, for the kernels that reduce rows (RMSNorm, sums of
/// squares, the attention's softmax), and the launch of one cube per row.
#[cfg(feature = "cube")]
mod reduce {
    // The `cube` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// One cube per row of `d` elements, at most 65,535 cubes (the grid's width on every backend;
    /// the kernels take the rows beyond in turn), of a power of two from 32 to 256 units, about a
    /// quarter of the row: the cube count, its size, and the units per cube (the kernels' `block`).
    pub(crate) fn row_launch(rows: usize, d: usize) -> (CubeCount, CubeDim, usize) {
        let block = (d / 4).next_power_of_two().clamp(32, 256);
        (CubeCount::Static(rows.min(65_535) as u32, 1, 1), CubeDim::new_1d(block as u32), block)
    }

    /// [`cube_sums`] with the maximum in place of the sum, over one array.
    #[cube]
    pub(crate) fn cube_max(maxes: &mut Shared<[f32]>) {
        cube_fold(maxes, 1usize, true);
    }

    /// Adds the cube's values `sums[a·n + u]` (`n` units, a power of two; `u` the unit) into
    /// `sums[a·n]`, for each of `arrays` arrays, halving the active units each round. Every unit
    /// of the cube calls it, after writing its values; the cube meets before each round and after
    /// the last, so every unit can then read the totals.
    #[cube]
    pub(crate) fn cube_sums(sums: &mut Shared<[f32]>, #[comptime] arrays: usize) {
        cube_fold(sums, arrays, false);
    }

    /// The tree behind [`cube_sums`] and [`cube_max`]: each round folds the upper half of the
    /// active units' values into the lower, by `max` when `take_max`, else by `+`.
    #[cube]
    fn cube_fold(values: &mut Shared<[f32]>, #[comptime] arrays: usize, #[comptime] take_max: bool) {
        let t = UNIT_POS_X as usize;
        let n = CUBE_DIM_X as usize;
        sync_cube();
        let mut half = n / 2;
        while half > 0 {
            if t < half {
                #[unroll]
                for a in 0..arrays {
                    let x = values[a * n + t];
                    let y = values[a * n + t + half];
                    if take_max {
                        values[a * n + t] = max(x, y);
                    } else {
                        values[a * n + t] = x + y;
                    }
                }
            }
            sync_cube();
            half /= 2;
        }
    }
}

/// The backends that one of this crate's backend extensions has a body for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reach {
    /// flex.
    pub flex: bool,
    /// libtorch (CPU or CUDA).
    pub libtorch: bool,
    /// The cubecl backends (wgpu, Vulkan, Metal, CUDA), with the `cube` feature.
    pub cube: bool,
}

/// Whether a tensor lives, under any autodiff, on a backend that runs an extension of the given
/// reach.
fn extended(kind: &DispatchTensorKind, reach: Reach) -> bool {
    match kind {
        #[cfg(feature = "flex")]
        DispatchTensorKind::Flex(_) => reach.flex,
        #[cfg(feature = "tch")]
        DispatchTensorKind::LibTorch(_) => reach.libtorch,
        #[cfg(feature = "cube")]
        DispatchTensorKind::Cube(_) => reach.cube,
        DispatchTensorKind::Autodiff(inner) => extended(inner, reach),
        #[allow(unreachable_patterns)]
        _ => {
            let _ = (reach.flex, reach.libtorch, reach.cube);
            false
        }
    }
}

/// The scalars of one AdamW update (PyTorch's `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β₁.
    pub beta_1: f64,
    /// β₂.
    pub beta_2: f64,
    /// ε, added to the bias-corrected √v.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// The step count t ≥ 1, this update included (bias corrections `1 − βᵗ`).
    pub step: i32,
    /// Factor the gradient is multiplied by before the update (global-norm clipping's coefficient;
    /// 1 leaves it as it is).
    pub grad_scale: f64,
}

/// The scalars of the per-element update, rounded to f32 as PyTorch rounds them for f32 tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coeffs {
    /// `1 − lr·λ`, applied when λ ≠ 0.
    pub decay: Option<f32>,
    /// The clipping coefficient, applied when ≠ 1.
    pub scale: Option<f32>,
    /// `1 − β₁` (the lerp weight).
    pub w1: f32,
    pub b2: f32,
    /// `1 − β₂`.
    pub w2: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `−lr / (1 − β₁ᵗ)`.
    pub neg_step_size: f32,
    /// The step's own scalars, for kernels that take them as they are (libtorch's fused AdamW).
    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    pub step: AdamWStep,
}

impl Coeffs {
    /// Whether the two update elements alike (the same scalars).
    #[cfg_attr(not(feature = "cube"), allow(dead_code))]
    pub(crate) fn same_update(&self, other: &Coeffs) -> bool {
        let key = |c: &Coeffs| (c.decay.map(f32::to_bits), c.scale.map(f32::to_bits), [c.w1, c.b2, c.w2, c.bc2_sqrt, c.eps, c.neg_step_size].map(f32::to_bits));
        key(self) == key(other)
    }
}

impl AdamWStep {
    pub(crate) fn coeffs(&self) -> Coeffs {
        let t = self.step.max(1);
        let (bc1, bc2) = (1.0 - self.beta_1.powi(t), 1.0 - self.beta_2.powi(t));
        Coeffs {
            decay: (self.weight_decay != 0.0).then_some((1.0 - self.lr * self.weight_decay) as f32),
            scale: (self.grad_scale != 1.0).then_some(self.grad_scale as f32),
            w1: (1.0 - self.beta_1) as f32,
            b2: self.beta_2 as f32,
            w2: (1.0 - self.beta_2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
            neg_step_size: (-self.lr / bc1) as f32,
            step: *self,
        }
    }
}

/// A parameter and its moments after [`adamw`].
#[derive(Debug)]
pub struct AdamWOutput<const D: usize> {
    /// The updated parameter.
    pub param: Tensor<D>,
    /// The first moment m.
    pub moment_1: Tensor<D>,
    /// The second moment v.
    pub moment_2: Tensor<D>,
    /// Whether the update ran in place: the one-pass CPU kernel, in-place libtorch operations or
    /// the cubecl kernel (false: burn tensor operations did).
    pub fused: bool,
    /// The updated parameter cast to the half precision [`adamw_to_half`] asked for, where the
    /// update wrote it (the cubecl kernel); `None` elsewhere.
    pub half: Option<Tensor<D>>,
}

/// One AdamW step, as PyTorch's single-tensor `torch.optim.AdamW` computes it for f32 tensors:
///
/// ```text
/// g ← s·g                       (s: grad_scale, when ≠ 1)
/// p ← p·(1 − lr·λ)              (when λ ≠ 0)
/// m ← m + (1 − β₁)(g − m)       (lerp)
/// v ← β₂v + (1 − β₂)·g·g
/// p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
/// ```
///
/// `moments` is `None` at the first step (m = v = 0). The parameter and the moments are updated in
/// place when the fused kernel can run (see the crate docs); the gradient is only read (a strided
/// one, such as a tied embedding's transposed gradient, through a contiguous copy). It may be of a
/// half-precision dtype where the parameter is f32 (a mixed-precision step's, [`compute_cast`]):
/// the cubecl kernel widens it as it loads it, the other paths cast it to f32 first.
pub fn adamw<const D: usize>(param: Tensor<D>, grad: Tensor<D>, moments: Option<(Tensor<D>, Tensor<D>)>, s: &AdamWStep) -> AdamWOutput<D> {
    adamw_to_half(param, grad, moments, s, None)
}

/// [`adamw`] that also gives the updated parameter cast to `half` (bf16 or f16;
/// [`AdamWOutput::half`]) where the cubecl kernel ran, written by the update itself: the weights of
/// the next mixed-precision step, which would otherwise take a cast kernel each.
pub fn adamw_to_half<const D: usize>(param: Tensor<D>, grad: Tensor<D>, moments: Option<(Tensor<D>, Tensor<D>)>, s: &AdamWStep, half: Option<burn::tensor::FloatDType>) -> AdamWOutput<D> {
    adamw_staged(
        param,
        grad,
        moments,
        s,
        half,
        #[cfg(feature = "cube")]
        None,
    )
}

/// [`adamw_to_half`], the cubecl kernel's launch staged in `batch` to run with other parameters'
/// (the update is in place once the batch is flushed).
pub(crate) fn adamw_staged<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    s: &AdamWStep,
    half: Option<burn::tensor::FloatDType>,
    #[cfg(feature = "cube")] batch: Option<&mut adamw_cube::Batch>,
) -> AdamWOutput<D> {
    let half = half.map(burn::tensor::DType::from);
    let c = s.coeffs();
    #[cfg(feature = "cube")]
    let new_moments = moments.is_none();
    let (m, v) = moments.unwrap_or_else(|| (param.zeros_like(), param.zeros_like()));
    let (dtype, g_dtype) = (param.dtype(), grad.dtype());
    let (mut p, g, mut m, mut v) = (param.into_dispatch(), grad.into_dispatch(), m.into_dispatch(), v.into_dispatch());
    // The cubecl kernel reads a gradient of any float dtype; the others take the parameter's.
    #[cfg(feature = "cube")]
    let staged = match batch {
        Some(batch) => batch.stage([&p.kind, &g.kind, &m.kind, &v.kind], new_moments, &c, half),
        None => adamw_cube::adamw([&p.kind, &g.kind, &m.kind, &v.kind], new_moments, &c, half),
    };
    #[cfg(feature = "cube")]
    let (fused, half) = match staged {
        Some(h) => (true, h.map(|h| burn::backend::DispatchTensor { kind: DispatchTensorKind::Cube(burn::backend::BackendTensor::Float(h)), autodiff: p.autodiff })),
        None => (false, None),
    };
    #[cfg(not(feature = "cube"))]
    let (fused, half) = (false, half.and(None::<burn::backend::DispatchTensor>));
    // A mixed-precision step's half-precision gradient ([`compute_cast`]), cast exactly to f32.
    let g = if fused || g_dtype == dtype { g } else { Tensor::<D>::from_dispatch(g).cast(dtype).into_dispatch() };
    let fused = fused || cpu::adamw(&mut p.kind, &g.kind, &mut m.kind, &mut v.kind, &c);
    #[cfg(feature = "tch")]
    let fused = fused || adamw_libtorch::adamw(&mut p.kind, &g.kind, &mut m.kind, &mut v.kind, &c);
    let (p, g, m, v) = (Tensor::from_dispatch(p), Tensor::from_dispatch(g), Tensor::from_dispatch(m), Tensor::from_dispatch(v));
    if fused {
        return AdamWOutput { param: p, moment_1: m, moment_2: v, fused, half: half.map(Tensor::from_dispatch) };
    }
    adamw_tensor_ops(p, g, (m, v), s)
}

/// [`adamw`]'s formula as burn tensor operations, each on a tensor it owns (backends that reuse an
/// owned buffer run them in place): what runs where the fused kernel cannot, and what the kernel is
/// measured against (`examples/bench_adamw.rs`).
pub fn adamw_tensor_ops<const D: usize>(p: Tensor<D>, g: Tensor<D>, (m, v): (Tensor<D>, Tensor<D>), s: &AdamWStep) -> AdamWOutput<D> {
    let c = s.coeffs();
    let g = match c.scale {
        Some(k) => g.mul_scalar(k),
        None => g,
    };
    let m = m.clone() + (g.clone() - m).mul_scalar(c.w1);
    let v = v.mul_scalar(c.b2) + g.square().mul_scalar(c.w2);
    let denom = v.clone().sqrt().div_scalar(c.bc2_sqrt).add_scalar(c.eps);
    let p = match c.decay {
        Some(d) => p.mul_scalar(d),
        None => p,
    };
    let p = p + m.clone().mul_scalar(c.neg_step_size).div(denom);
    AdamWOutput { param: p, moment_1: m, moment_2: v, fused: false, half: None }
}

/// `Σ x²` of a tensor as an f64 read on the host, when the tensor's memory is reachable on the CPU
/// (an f32 flex or libtorch CPU tensor whose elements fill one span of its buffer: contiguous, or
/// transposed): one read, no squared temporary, accumulated in f64. `None` elsewhere; the caller
/// then uses `x.square().sum()`.
pub fn cpu_sum_squares<const D: usize>(x: &Tensor<D>) -> Option<f64> {
    let d = x.clone().into_dispatch();
    cpu::sum_squares(&d.kind)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;

    fn step(t: i32, wd: f64, scale: f64) -> AdamWStep {
        AdamWStep { lr: 0.1, beta_1: 0.9, beta_2: 0.999, eps: 1e-8, weight_decay: wd, step: t, grad_scale: scale }
    }

    fn vec(t: Tensor<1>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
    }

    /// PyTorch's update worked in f64 for one element.
    fn want(p: f64, g: f64, m: f64, v: f64, s: &AdamWStep) -> (f64, f64, f64) {
        let g = g * s.grad_scale;
        let p = p * (1.0 - s.lr * s.weight_decay);
        let m = m + (1.0 - s.beta_1) * (g - m);
        let v = s.beta_2 * v + (1.0 - s.beta_2) * g * g;
        let t = s.step;
        let denom = v.sqrt() / (1.0 - s.beta_2.powi(t)).sqrt() + s.eps;
        (p - s.lr / (1.0 - s.beta_1.powi(t)) * m / denom, m, v)
    }

    #[test]
    fn fused_and_tensor_ops_agree_with_the_formula() {
        let d = Device::default();
        let n = 50_000; // over several rayon chunks
        let p0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let g0: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 10.0).collect();
        let m0: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 100.0).collect();
        let v0: Vec<f32> = (0..n).map(|i| (i % 11) as f32 / 50.0).collect();
        let t = |x: &[f32]| Tensor::<1>::from_data(TensorData::new(x.to_vec(), [x.len()]), &d);
        for s in [step(1, 0.0, 1.0), step(3, 0.01, 0.25)] {
            let first = s.step == 1;
            let moments = (!first).then(|| (t(&m0), t(&v0)));
            let out = adamw(t(&p0), t(&g0), moments, &s);
            // Shared inputs cannot be written in place: the same update through tensor operations.
            let (sp, sm, sv) = (t(&p0), t(&m0), t(&v0));
            let shared = adamw(sp.clone(), t(&g0), (!first).then(|| (sm.clone(), sv.clone())), &s);
            assert!(!shared.fused);
            assert_eq!(vec(sp), p0, "a shared parameter was written");
            let (p, m, v) = (vec(out.param), vec(out.moment_1), vec(out.moment_2));
            let (q, mm, vv) = (vec(shared.param), vec(shared.moment_1), vec(shared.moment_2));
            for i in 0..n {
                let (m_in, v_in) = if first { (0.0, 0.0) } else { (m0[i] as f64, v0[i] as f64) };
                let (wp, wm, wv) = want(p0[i] as f64, g0[i] as f64, m_in, v_in, &s);
                for (name, got, w) in [("p", p[i], wp), ("m", m[i], wm), ("v", v[i], wv), ("p ops", q[i], wp), ("m ops", mm[i], wm), ("v ops", vv[i], wv)] {
                    assert!((got as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "{name}[{i}] at step {}: {got} against {w}", s.step);
                }
            }
            if cpu::reachable(&d) {
                assert!(out.fused, "the fused kernel did not run on {d:?}");
            }
        }
    }

    #[test]
    fn a_transposed_gradient_is_read_in_row_order() {
        let d = Device::default();
        let (rows, cols) = (300, 170);
        let n = rows * cols;
        let g: Vec<f32> = (0..n).map(|i| ((i * 31 % 89) as f32 - 44.0) / 20.0).collect();
        let p: Vec<f32> = (0..n).map(|i| (i % 7) as f32 / 7.0).collect();
        let t2 = |x: &[f32], r: usize, c: usize| Tensor::<2>::from_data(TensorData::new(x.to_vec(), [r, c]), &d);
        // The gradient of a [rows, cols] parameter as the transpose of a [cols, rows] buffer.
        let gt = t2(&g, cols, rows).transpose();
        let s = step(2, 0.0, 1.0);
        let m = t2(&vec![0.0; n], rows, cols);
        let out = adamw(t2(&p, rows, cols), gt.clone(), Some((m.clone(), m.clone().add_scalar(0.0))), &s);
        let want = adamw_tensor_ops(t2(&p, rows, cols), gt.clone(), (m.clone(), m.add_scalar(0.0)), &s);
        let flat = |t: Tensor<2>| vec(t.reshape([n]));
        for (a, b) in flat(out.param).iter().zip(flat(want.param)) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} against {b}");
        }
        let want_sq: f64 = g.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
        if let Some(sq) = cpu_sum_squares(&gt) {
            assert!((sq - want_sq).abs() <= 1e-9 * want_sq);
        }
        if cpu::reachable(&d) {
            assert!(cpu_sum_squares(&gt).is_some(), "a transposed gradient fell back on {d:?}");
            assert!(cpu_sum_squares(&t2(&g, cols, rows).narrow(1, 0, 10)).is_none(), "a strided slice is not one span");
        }
    }

    #[test]
    fn sum_of_squares() {
        let d = Device::default();
        let x: Vec<f32> = (0..70_000).map(|i| ((i % 17) as f32 - 8.0) / 3.0).collect();
        let want: f64 = x.iter().map(|&a| (a as f64) * (a as f64)).sum();
        let t = Tensor::<2>::from_data(TensorData::new(x, [700, 100]), &d);
        match cpu_sum_squares(&t) {
            Some(got) => assert!((got - want).abs() <= 1e-9 * want, "{got} against {want}"),
            None => assert!(!cpu::reachable(&d), "no fused sum on {d:?}"),
        }
    }
}

#[cfg(all(test, feature = "tch"))]
#[allow(clippy::expect_used, deprecated)]
mod tch_tests {
    use tch::{Kind, Tensor};

    use super::{dot_alike, torch_vjp};

    /// `torch_vjp` hands the record `dout` through one dot product where `out` and `dout` are
    /// contiguous and of one dtype, and through the product and sum elsewhere (here a transposed
    /// `out`, as torch's attention kernels lay theirs out); the gradients are `out`'s backward pass
    /// applied to `dout` either way.
    #[test]
    fn the_product_with_dout_is_a_dot_where_both_are_contiguous() {
        for kind in [Kind::Float, Kind::BFloat16] {
            tch::manual_seed(0);
            let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, tch::Device::Cpu)).to_kind(kind).set_requires_grad(true);
            let dout = Tensor::randn([2, 3, 4, 5], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let other = if kind == Kind::Float { Kind::BFloat16 } else { Kind::Float };
            let out = tch::with_grad(|| &x * 3.0);
            assert!(dot_alike(&out, &dout).is_some(), "{kind:?}: both contiguous");
            assert!(dot_alike(&out, &dout.to_kind(other)).is_none(), "{kind:?}: two dtypes");
            let [by_dot] = torch_vjp(&out, &dout, [&x]).expect("a gradient");
            assert!(by_dot.equal(&(&dout * 3.0)), "{kind:?}: the gradient is not 3 · dout");
            // `out` [2, 4, 3, 5] laid out as [2, 3, 4, 5]: a transposed view's product keeps its strides.
            let out = tch::with_grad(|| x.transpose(1, 2) * 3.0);
            let alike = dout.transpose(1, 2);
            assert!(dot_alike(&out, &alike).is_none() && dot_alike(&out, &alike.contiguous()).is_none(), "{kind:?}: a strided output");
            let [by_sum] = torch_vjp(&out, &alike, [&x]).expect("a gradient");
            assert!(by_sum.equal(&(&dout * 3.0)), "{kind:?}: the gradient is not 3 · dout");
        }
    }

    /// What CUDA keeps for the backward pass, kept here on the CPU through autodiff (torch's record
    /// of its RMSNorm, the gated unit's activation): a norm and a gated unit in bf16 give the output
    /// and the gradients of the CPU's own paths, which keep nothing (and normalise by torch calls,
    /// rounded otherwise), within four roundings to bf16; the kept paths ran.
    #[test]
    fn what_cuda_keeps_gives_the_gradients_through_autodiff() {
        use burn::tensor::{Device, Distribution, FloatDType, Tensor};
        let device = Device::libtorch().autodiff();
        let (rows, d) = (6, 32);
        let x = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 3.0), &device).cast(FloatDType::BF16);
        let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), &device).cast(FloatDType::BF16);
        let u = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::BF16);
        let dz = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::BF16);
        let run = || {
            let (x, gamma, u) = (x.clone().require_grad(), gamma.clone().require_grad(), u.clone().require_grad());
            let h = crate::rms_norm(x.clone(), gamma.clone(), 1e-5).expect("the extension");
            let z = crate::glu(h, u.clone(), crate::Gate::Silu).expect("the extension");
            let grads = (z.clone() * dz.clone()).sum().backward();
            let f32s = |t: Tensor<2>| t.cast(FloatDType::F32).into_data().try_to_vec::<f32>().expect("f32");
            let g = |t: &Tensor<2>| f32s(t.grad(&grads).expect("a gradient"));
            (f32s(z.inner()), g(&x), g(&u), f32s(gamma.grad(&grads).expect("a gradient").reshape([1, d])))
        };
        let again = run();
        let (glu_before, norms_before) = (crate::glu::kept_activations(), crate::rms_norm::torch_calls());
        let kept = super::keep_on_the_cpu(run);
        assert!(crate::glu::kept_activations() > glu_before, "the gated unit's backward did not read the kept activation");
        let norms = crate::rms_norm::torch_calls();
        assert!(norms[0] > norms_before[0] && norms[1] > norms_before[1], "torch's RMSNorm did not run both ways: {norms_before:?} → {norms:?}");
        // Four roundings to bf16 of each tensor's largest entry.
        for (name, a, b) in [("z", &kept.0, &again.0), ("dx", &kept.1, &again.1), ("du", &kept.2, &again.2), ("dγ", &kept.3, &again.3)] {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(diff <= 4.0 / 256.0 * scale, "{name}: {diff} apart, largest entry {scale}");
        }
    }
}
