//! The AdamW update on libtorch tensors that the CPU kernel cannot reach (CUDA, half precision):
//! PyTorch's fused AdamW kernel, `torch._fused_adamw_` (what `torch.optim.AdamW(fused=True)` runs,
//! transformers' default optimizer), one kernel that reads the parameter, its gradient and its two
//! moments once and writes the three in place. tch 0.22 binds no `_fused_` or `_foreach_`
//! operation, so the kernel is reached through a TorchScript function embedded in the crate
//! (`assets/fused_adamw.pt`, written by `assets/make_fused_adamw.py`). Where that module does not
//! load or the kernel refuses the tensors (a libtorch without it, a device it does not cover), the
//! update is PyTorch's single-tensor AdamW as in-place torch operations. burn's element-wise
//! operations each allocate a new tensor and pass through burn's bookkeeping, so the same formula
//! as burn operations costs a dozen allocations and host round trips per parameter; on a GPU,
//! where a small model's update waits on the host, that is most of the optimizer's time.

// burn-tch is marked deprecated upstream; it is still the libtorch backend of burn 0.22.
#![allow(deprecated)]

use burn::backend::libtorch::TchTensor;
use burn::backend::{BackendTensor, DispatchTensorKind};

use crate::Coeffs;

/// The libtorch float tensor of a dispatch tensor, if it is one.
pub(crate) fn float(kind: &DispatchTensorKind) -> Option<&TchTensor> {
    match kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(t)) => Some(t),
        _ => None,
    }
}

pub(crate) fn float_mut(kind: &mut DispatchTensorKind) -> Option<&mut TchTensor> {
    match kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(t)) => Some(t),
        _ => None,
    }
}

/// The update in place; false (nothing written) unless the parameter and its moments are libtorch
/// tensors that nothing else holds, of one shape, kind and device with the gradient.
pub(crate) fn adamw(p: &mut DispatchTensorKind, g: &DispatchTensorKind, m: &mut DispatchTensorKind, v: &mut DispatchTensorKind, c: &Coeffs) -> bool {
    let (Some(p), Some(m), Some(v)) = (float_mut(p), float_mut(m), float_mut(v)) else {
        return false;
    };
    let Some(g) = float(g) else {
        return false;
    };
    // `can_mut`: burn-tch's own test for writing in place (no other tensor holds the buffer, no
    // broadcast stride). Checked with the shapes, kinds and devices before anything is written, so
    // that the operations below cannot fail halfway.
    let g = &g.tensor;
    let fits = |t: &TchTensor| t.can_mut() && t.tensor.size() == g.size() && t.tensor.kind() == g.kind() && t.tensor.device() == g.device();
    if !(fits(p) && fits(m) && fits(v)) {
        return false;
    }
    update(&mut p.tensor, Grad::Read(g), &mut m.tensor, &mut v.tensor, c);
    true
}

/// The gradient an update reads: borrowed, or given up by the caller, whose buffer then holds the
/// denominator (all parameters' gradients gathered into one, in `flat_adamw`).
pub(crate) enum Grad<'a> {
    /// Only read.
    Read(&'a tch::Tensor),
    /// Free to overwrite.
    Owned(tch::Tensor),
}

/// AdamW on tensors of one shape, kind and device: on one parameter here, on all of them at once in
/// `flat_adamw`. libtorch's fused kernel where it runs; else PyTorch's single-tensor AdamW as
/// in-place torch operations, where a gradient buffer the
/// update owns (given up, or the scaled copy) is written over with the denominator, so that at most
/// two temporaries of its size are alive at once. (libtorch rounds a half-precision product with a
/// scalar differently in place and out of place, so the products stay out of place, as PyTorch's.)
pub(crate) fn update(p: &mut tch::Tensor, g: Grad<'_>, m: &mut tch::Tensor, v: &mut tch::Tensor, c: &Coeffs) {
    // The clipping coefficient multiplies the gradient first, as `clip_grad_norm_` leaves the
    // gradients for PyTorch's optimizer.
    let g = match (c.scale, g) {
        (Some(s), Grad::Read(g)) => Grad::Owned(g * f64::from(s)),
        (Some(s), Grad::Owned(g)) => Grad::Owned(&g * f64::from(s)),
        (None, g) => g,
    };
    let g = match fused_update(p, g, m, v, c) {
        Ok(()) => return,
        Err(g) => g,
    };
    let gr = match &g {
        Grad::Read(g) => *g,
        Grad::Owned(g) => g,
    };
    if let Some(d) = c.decay {
        *p *= f64::from(d);
    }
    let _ = m.lerp_(gr, f64::from(c.w1));
    *v *= f64::from(c.b2);
    let _ = v.addcmul_(&(gr * f64::from(c.w2)), gr);
    let mut denom = match g {
        Grad::Owned(mut g) => {
            g.copy_(v);
            let _ = g.sqrt_();
            g
        }
        Grad::Read(_) => v.sqrt(),
    };
    denom /= f64::from(c.bc2_sqrt);
    denom += f64::from(c.eps);
    let _ = p.addcdiv_(&(&*m * f64::from(c.neg_step_size)), &denom);
}

/// The embedded TorchScript function that calls `torch._fused_adamw_`, loaded once; `None` where it
/// does not load or the kernel failed once (then every update takes the in-place operations).
fn fused_module() -> Option<&'static tch::CModule> {
    static MODULE: std::sync::OnceLock<Option<tch::CModule>> = std::sync::OnceLock::new();
    if FUSED_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    MODULE
        .get_or_init(|| match tch::CModule::load_data(&mut &include_bytes!("../assets/fused_adamw.pt")[..]) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("libtorch's fused AdamW kernel is out of reach ({e}); AdamW runs as in-place torch operations");
                None
            }
        })
        .as_ref()
}

static FUSED_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static FUSED_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many updates ran libtorch's fused AdamW kernel in this process (each call of it: one
/// parameter, or all of them at once in the multi-tensor update).
pub fn fused_adamw_calls() -> usize {
    FUSED_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The update as one call of `torch._fused_adamw_` on the gradient, clipped already; the gradient
/// handed back when the kernel is out of reach. The kernel checks its inputs before it writes, so a
/// refusal leaves the tensors as they were.
fn fused_update<'a>(p: &mut tch::Tensor, g: Grad<'a>, m: &mut tch::Tensor, v: &mut tch::Tensor, c: &Coeffs) -> Result<(), Grad<'a>> {
    use tch::IValue;
    // The kernel takes dense tensors: a strided parameter or moment (a state made after a
    // transposed gradient) takes the in-place operations for this update alone.
    let Some(module) = fused_module().filter(|_| p.is_contiguous() && m.is_contiguous() && v.is_contiguous()) else {
        return Err(g);
    };
    // `contiguous` copies only a strided gradient (a tied embedding's transpose).
    let grad = match &g {
        Grad::Read(g) => g.contiguous(),
        Grad::Owned(g) => g.contiguous(),
    };
    let s = &c.step;
    // The step count as the kernel reads it: an f32 scalar on the parameter's device.
    let step = tch::Tensor::scalar_tensor(f64::from(s.step.max(1)), (tch::Kind::Float, p.device()));
    let one = |t: &tch::Tensor| IValue::TensorList(vec![t.shallow_clone()]);
    let args = [one(p), IValue::TensorList(vec![grad]), one(m), one(v), IValue::TensorList(vec![step]), IValue::Double(s.lr), IValue::Double(s.beta_1), IValue::Double(s.beta_2), IValue::Double(s.weight_decay), IValue::Double(s.eps)];
    match module.forward_is(&args) {
        Ok(_) => {
            FUSED_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            FUSED_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("libtorch's fused AdamW kernel refused an update ({e}); AdamW runs as in-place torch operations from here on");
            Err(g)
        }
    }
}
