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

fn float_mut(kind: &mut DispatchTensorKind) -> Option<&mut TchTensor> {
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
    let DispatchTensorKind::LibTorch(BackendTensor::Float(g)) = g else {
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
    update(&mut p.tensor, g, &mut m.tensor, &mut v.tensor, c);
    true
}

/// PyTorch's single-tensor AdamW as in-place torch operations on tensors of one shape, kind and
/// device: on one parameter here, on all of them at once in `flat_adamw`.
pub(crate) fn update(p: &mut tch::Tensor, g: &tch::Tensor, m: &mut tch::Tensor, v: &mut tch::Tensor, c: &Coeffs) {
    let scaled;
    let g = match c.scale {
        Some(s) => {
            scaled = g * f64::from(s);
            &scaled
        }
        None => g,
    };
    if let Some(d) = c.decay {
        *p *= f64::from(d);
    }
    let _ = m.lerp_(g, f64::from(c.w1));
    *v *= f64::from(c.b2);
    // torch's `addcmul_` and `addcdiv_` as tch binds them have no `value`: it goes into a factor.
    let _ = v.addcmul_(&(g * f64::from(c.w2)), g);
    let mut denom = v.sqrt();
    denom /= f64::from(c.bc2_sqrt);
    denom += f64::from(c.eps);
    let _ = p.addcdiv_(&(&*m * f64::from(c.neg_step_size)), &denom);
}

/// [`update`] on a gradient the caller gives up (all parameters' gradients gathered into one
/// buffer): the same operations in the same form, so the same values to the bit, with the
/// denominator written over the gradient and each temporary dropped once used, so that at most two
/// buffers of the gradient's size are alive at once beside it. (libtorch rounds a half-precision
/// product with a scalar differently in place and out of place, so the products stay out of place.)
pub(crate) fn update_owned(p: &mut tch::Tensor, g: tch::Tensor, m: &mut tch::Tensor, v: &mut tch::Tensor, c: &Coeffs) {
    let g = match c.scale {
        Some(s) => &g * f64::from(s),
        None => g,
    };
    if let Some(d) = c.decay {
        *p *= f64::from(d);
    }
    let _ = m.lerp_(&g, f64::from(c.w1));
    *v *= f64::from(c.b2);
    let _ = v.addcmul_(&(&g * f64::from(c.w2)), &g);
    let mut denom = g;
    denom.copy_(v);
    let _ = denom.sqrt_();
    denom /= f64::from(c.bc2_sqrt);
    denom += f64::from(c.eps);
    let _ = p.addcdiv_(&(&*m * f64::from(c.neg_step_size)), &denom);
}
