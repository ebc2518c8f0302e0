//! The AdamW update on libtorch tensors that the CPU kernel cannot reach (CUDA, half precision):
//! PyTorch's single-tensor `torch.optim.AdamW`, written as in-place torch operations on the
//! parameter and its moments. burn's element-wise operations each allocate a new tensor and pass
//! through burn's bookkeeping, so the same formula as burn operations costs a dozen allocations and
//! host round trips per parameter; on a GPU, where a small model's update waits on the host, that
//! is most of the optimizer's time.

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

/// PyTorch's single-tensor AdamW as in-place torch operations on tensors of one shape, kind and
/// device: on one parameter here, on all of them at once in `flat_adamw`. A gradient buffer the
/// update owns (given up, or the scaled copy) is written over with the denominator, so that at most
/// two temporaries of its size are alive at once. (libtorch rounds a half-precision product with a
/// scalar differently in place and out of place, so the products stay out of place, as PyTorch's.)
pub(crate) fn update(p: &mut tch::Tensor, g: Grad<'_>, m: &mut tch::Tensor, v: &mut tch::Tensor, c: &Coeffs) {
    let g = match (c.scale, g) {
        (Some(s), Grad::Read(g)) => Grad::Owned(g * f64::from(s)),
        (Some(s), Grad::Owned(g)) => Grad::Owned(&g * f64::from(s)),
        (None, g) => g,
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
