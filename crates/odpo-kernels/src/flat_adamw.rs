//! AdamW over every parameter at once, as PyTorch's multi-tensor (`foreach`) AdamW runs it on CUDA:
//! the parameters and both moments live in one buffer each, the step's gradients are gathered into
//! one more, and the update is the same dozen in-place torch operations run once on the whole
//! buffer instead of once per parameter. On a GPU a small model's update waits on the host issuing
//! operations: SmolLM2-135M has 272 parameters, so the per-parameter update is about 2,700 torch
//! calls and the global gradient norm 800 more; here both are about fifteen.
//!
//! The first update of a run (or after a resume) is the per-parameter one; its results are copied
//! into the buffers, and the parameters and moments it hands back are views of them. From the next
//! step on, as long as every parameter with a gradient is still the view it was given, the update
//! runs on the buffers, and the per-parameter pass may be skipped ([`FlatAdamW::updated`]): it
//! would only hand each view back. Anything else (another
//! set of parameters, tensors loaded from a checkpoint) drops the buffers and takes the
//! per-parameter path again, which rebuilds them.
//!
//! It applies to libtorch tensors that the one-pass CPU kernel cannot reach (CUDA, half precision),
//! or with [`FlatMode::Always`] to any libtorch float tensors, all of one kind on one device;
//! elsewhere every call falls through to [`crate::adamw`], except that on the cubecl backends
//! (unless [`FlatMode::Off`]) the kernel's launches are staged four parameters to one
//! ([`FlatAdamW::finish`] runs what is left).

use burn::backend::DispatchTensor;
use burn::tensor::Tensor;

use crate::{AdamWOutput, AdamWStep};

/// A parameter with a gradient this step, as the optimizer visits them: the parameter (its tensor
/// without autodiff, `Tensor::inner`) and its gradient.
pub type FlatEntry = (DispatchTensor, DispatchTensor);

/// Where the buffers are built (`optim.foreach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlatMode {
    /// Never: each parameter on its own (on the cubecl backends, one launch each).
    Off,
    /// On libtorch tensors the one-pass CPU kernel cannot reach: CUDA, half precision.
    Auto,
    /// On every libtorch float tensor, f32 on the CPU included.
    Always,
}

/// What the per-parameter pass of the current step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "tch"), allow(dead_code))]
enum Phase {
    /// The per-parameter update, nothing else.
    Off,
    /// The buffers are updated; each call hands its views back.
    Updated,
    /// The per-parameter update, its results copied into new buffers.
    Building,
}

/// The multi-tensor AdamW state of one optimizer: the buffers, and where the current step is.
/// Calls go in the order [`gather`](Self::gather) (optional, for the gradient norm), [`begin`](Self::begin),
/// one [`step_param`](Self::step_param) per parameter in visiting order, [`finish`](Self::finish).
pub struct FlatAdamW {
    mode: FlatMode,
    phase: Phase,
    cursor: usize,
    /// The half precision the step's updated parameters are also wanted in ([`Self::begin_to_half`]).
    half: Option<burn::tensor::FloatDType>,
    /// Those casts, one per parameter in visiting order (`None` where the update did not write one).
    halves: Vec<Option<DispatchTensor>>,
    /// The cubecl kernels' launches, four parameters to one (unless [`FlatMode::Off`]).
    #[cfg(feature = "cube")]
    batch: crate::adamw_cube::Batch,
    /// Updates that ran on the buffers, each counted once per step.
    flat_steps: usize,
    #[cfg(feature = "tch")]
    imp: libtorch::State,
}

impl std::fmt::Debug for FlatAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatAdamW").field("mode", &self.mode).field("phase", &self.phase).field("flat_steps", &self.flat_steps).finish()
    }
}

impl FlatAdamW {
    /// A state that builds its buffers where `mode` says.
    pub fn new(mode: FlatMode) -> Self {
        Self {
            mode,
            phase: Phase::Off,
            cursor: 0,
            half: None,
            halves: Vec::new(),
            #[cfg(feature = "cube")]
            batch: Default::default(),
            flat_steps: 0,
            #[cfg(feature = "tch")]
            imp: libtorch::State::default(),
        }
    }

    /// Whether the buffers may be built: asked for, and libtorch in the build.
    pub fn enabled(&self) -> bool {
        self.mode != FlatMode::Off && cfg!(feature = "tch")
    }

    /// Steps whose update ran on the buffers.
    pub fn flat_steps(&self) -> usize {
        self.flat_steps
    }

    /// Forgets the buffers (the optimizer's state was replaced, as by loading a checkpoint).
    pub fn reset(&mut self) {
        self.phase = Phase::Off;
        #[cfg(feature = "tch")]
        {
            self.imp = libtorch::State::default();
        }
    }

    /// Gathers this step's gradients into one buffer when every parameter is still the view it was
    /// given, and returns their global L2 norm √(Σ‖g‖²) (one host read); `None` otherwise.
    pub fn gather(&mut self, entries: &[FlatEntry]) -> Option<f64> {
        if !self.enabled() {
            return None;
        }
        #[cfg(feature = "tch")]
        {
            self.imp.gather(entries)
        }
        #[cfg(not(feature = "tch"))]
        {
            let _ = entries;
            None
        }
    }

    /// Starts a step: the update on the buffers (gathering first unless [`gather`](Self::gather)
    /// did), or else the plan of the buffers the per-parameter pass fills. `s.step` is ignored: the
    /// buffers keep their own count.
    pub fn begin(&mut self, entries: &[FlatEntry], s: &AdamWStep) {
        self.begin_to_half(entries, s, None);
    }

    /// [`Self::begin`] for a step whose updated parameters are also wanted cast to `half` (the
    /// weights of the next mixed-precision step), where the update can write them: the cubecl
    /// kernel per parameter, or one cast of the parameters' buffer on libtorch. [`Self::halves`]
    /// hands them over after the step.
    pub fn begin_to_half(&mut self, entries: &[FlatEntry], s: &AdamWStep, half: Option<burn::tensor::FloatDType>) {
        self.cursor = 0;
        self.phase = Phase::Off;
        self.half = half;
        self.halves.clear();
        if !self.enabled() {
            return;
        }
        #[cfg(feature = "tch")]
        {
            if !self.imp.gathered_for(entries) {
                let _ = self.imp.gather(entries);
            }
            if self.imp.update(s) {
                self.phase = Phase::Updated;
                self.flat_steps += 1;
                if let Some(half) = half {
                    self.halves = self.imp.halves(entries, half);
                }
            } else if self.imp.plan(entries, self.mode == FlatMode::Always) {
                self.phase = Phase::Building;
            }
        }
        #[cfg(not(feature = "tch"))]
        {
            let _ = (entries, s);
        }
    }

    /// One parameter's update, in the order [`begin`](Self::begin) was given them: hands back the
    /// updated views, or runs [`crate::adamw`] (and, while building, copies its results into the
    /// buffers and hands back views of them).
    pub fn step_param<const D: usize>(&mut self, param: Tensor<D>, grad: Tensor<D>, moments: Option<(Tensor<D>, Tensor<D>)>, s: &AdamWStep) -> AdamWOutput<D> {
        #[cfg_attr(not(feature = "tch"), allow(unused_variables))]
        let at = self.cursor;
        self.cursor += 1;
        let out = match self.phase {
            Phase::Off => self.per_parameter(param, grad, moments, s),
            #[cfg(feature = "tch")]
            // The buffers hold the update, and the parameter and its moments are their views
            // (the caller may skip this pass: [`Self::updated`]; `begin` took their casts).
            Phase::Updated => {
                return match moments {
                    Some((m, v)) => AdamWOutput { param, moment_1: m, moment_2: v, fused: true, half: None },
                    None => crate::adamw(param, grad, None, s),
                };
            }
            #[cfg(feature = "tch")]
            Phase::Building => {
                let out = crate::adamw_to_half(param, grad, moments, s, self.half);
                self.imp.adopt(at, out, s.step)
            }
            #[cfg(not(feature = "tch"))]
            _ => self.per_parameter(param, grad, moments, s),
        };
        if self.half.is_some() {
            self.halves.push(out.half.clone().map(Tensor::into_dispatch));
        }
        out
    }

    /// One parameter's own update ([`crate::adamw_to_half`]); on the cubecl backends staged to
    /// share a launch with the next parameters', unless [`FlatMode::Off`].
    fn per_parameter<const D: usize>(&mut self, param: Tensor<D>, grad: Tensor<D>, moments: Option<(Tensor<D>, Tensor<D>)>, s: &AdamWStep) -> AdamWOutput<D> {
        #[cfg(feature = "cube")]
        if self.mode != FlatMode::Off {
            return crate::adamw_staged(param, grad, moments, s, self.half, Some(&mut self.batch));
        }
        crate::adamw_to_half(param, grad, moments, s, self.half)
    }

    /// The casts of this step's updated parameters that [`Self::begin_to_half`] asked for, one per
    /// parameter in visiting order (`None` where the update wrote none); empty when none was asked.
    pub fn halves(&mut self) -> Vec<Option<DispatchTensor>> {
        std::mem::take(&mut self.halves)
    }

    /// Whether [`begin`](Self::begin) ran this step's update on the buffers. The per-parameter pass
    /// may then be skipped: it would only hand each parameter its views back.
    pub fn updated(&self) -> bool {
        self.phase == Phase::Updated
    }

    /// Ends a step: the cubecl kernels' staged updates run, and a build that saw every planned
    /// parameter becomes the buffers of the next steps.
    pub fn finish(&mut self) {
        #[cfg(feature = "cube")]
        self.batch.flush();
        #[cfg(feature = "tch")]
        if self.phase == Phase::Building {
            self.imp.built(self.cursor);
        }
        self.phase = Phase::Off;
        self.cursor = 0;
        self.half = None;
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
mod libtorch {
    use burn::backend::libtorch::TchTensor;
    use burn::tensor::Tensor;
    use tch::{Device as TchDevice, Kind};

    use super::{DispatchTensor, FlatEntry};
    use crate::adamw_libtorch::{Grad, float, float_mut};
    use crate::{AdamWOutput, AdamWStep};

    /// Each parameter starts at a multiple of this many elements: 256 bytes or more, the alignment
    /// the CUDA kernels and PyTorch's allocator give every tensor.
    const ALIGN: i64 = 128;

    /// Where one parameter lives in the buffers.
    struct Slot {
        offset: i64,
        shape: Vec<i64>,
        numel: i64,
        /// Zeros standing for the padding after it in the gathered gradients.
        pad: Option<tch::Tensor>,
        /// The parameter view's address (a parameter is still its view when its data is here).
        ptr: usize,
        /// The step count of the moments adopted while building.
        adopted: Option<i32>,
    }

    /// One buffer of the parameters or a moment, whole, with burn-tch's record of its storage that
    /// every view shares (so burn never writes one of them in place: their storage is shared).
    struct Buffer(TchTensor);

    impl Buffer {
        fn zeros(len: i64, kind: Kind, device: TchDevice) -> Result<Self, tch::TchError> {
            Ok(Self(TchTensor::new(tch::Tensor::f_zeros([len], (kind, device))?)))
        }

        fn view(&self, slot: &Slot) -> Result<TchTensor, tch::TchError> {
            let v = self.0.tensor.f_narrow(0, slot.offset, slot.numel)?.f_view_(slot.shape.as_slice())?;
            Ok(TchTensor::partial(v, self.0.storage.clone()))
        }
    }

    struct Buffers {
        kind: Kind,
        device: TchDevice,
        p: Buffer,
        m: Buffer,
        v: Buffer,
        slots: Vec<Slot>,
        /// The step count of the last update.
        t: i32,
    }

    #[derive(Default)]
    pub(super) struct State {
        /// The buffers of the last steps, or the ones being built this step.
        bufs: Option<Buffers>,
        /// This step's gathered gradients, and the addresses of the gradients they were gathered from.
        grad: Option<(tch::Tensor, Vec<usize>)>,
    }

    /// The libtorch tensors of an entry, when it is a float parameter and gradient of one size and
    /// device, and one kind (or an f32 parameter's half-precision gradient, [`crate::compute_cast`],
    /// which the gathering widens); unless `all`, not f32 on the CPU either (the one-pass CPU kernel
    /// takes those).
    fn applies(entry: &FlatEntry, all: bool) -> Option<(&tch::Tensor, &tch::Tensor)> {
        let (p, g) = (&float(&entry.0.kind)?.tensor, &float(&entry.1.kind)?.tensor);
        let kinds = p.kind() == g.kind() || (p.kind() == Kind::Float && matches!(g.kind(), Kind::Half | Kind::BFloat16));
        let fits = p.size() == g.size() && kinds && p.device() == g.device();
        let reachable_by_cpu_kernel = p.device() == TchDevice::Cpu && p.kind() == Kind::Float;
        (fits && (all || !reachable_by_cpu_kernel) && matches!(p.kind(), Kind::Float | Kind::Half | Kind::BFloat16)).then_some((p, g))
    }

    impl State {
        /// Whether the gathered gradients are these entries' (a gather whose step never ran is not).
        pub(super) fn gathered_for(&self, entries: &[FlatEntry]) -> bool {
            self.grad.as_ref().is_some_and(|(_, ptrs)| ptrs.len() == entries.len() && entries.iter().zip(ptrs).all(|(e, &p)| float(&e.1.kind).is_some_and(|g| g.tensor.data_ptr() as usize == p)))
        }

        /// Whether the entries are exactly the buffers' views, in order.
        fn matches(&self, entries: &[FlatEntry]) -> bool {
            let Some(b) = &self.bufs else { return false };
            entries.len() == b.slots.len()
                && entries.iter().zip(&b.slots).all(|(e, s)| {
                    applies(e, true).is_some_and(|(p, g)| p.kind() == b.kind && p.device() == b.device && p.data_ptr() as usize == s.ptr && p.size() == s.shape && g.size() == s.shape)
                })
        }

        pub(super) fn gather(&mut self, entries: &[FlatEntry]) -> Option<f64> {
            self.grad = None;
            if !self.matches(entries) {
                // The parameters are no longer the views: the buffers hold nothing they use.
                self.bufs = None;
                return None;
            }
            let b = self.bufs.as_ref()?;
            let gather = || -> Result<(tch::Tensor, f64), tch::TchError> {
                let mut parts = Vec::with_capacity(2 * b.slots.len());
                for (e, s) in entries.iter().zip(&b.slots) {
                    let Some((_, g)) = applies(e, true) else { return Err(tch::TchError::Kind("not a libtorch gradient".into())) };
                    // `reshape` copies only a strided gradient (a tied embedding's transpose).
                    parts.push(g.f_reshape([-1])?);
                    if let Some(pad) = &s.pad {
                        parts.push(pad.shallow_clone());
                    }
                }
                // `cat` promotes half-precision gradients to the buffers' f32 as it copies them.
                let flat = tch::Tensor::f_cat(&parts, 0)?;
                let flat = if flat.kind() == b.kind { flat } else { flat.f_to_kind(b.kind)? };
                let norm = flat.f_norm_scalaropt_dtype(2, Kind::Float)?.f_double_value(&[])?;
                Ok((flat, norm))
            };
            match gather() {
                Ok((flat, norm)) => {
                    let ptrs = entries.iter().filter_map(|e| float(&e.1.kind).map(|g| g.tensor.data_ptr() as usize)).collect();
                    self.grad = Some((flat, ptrs));
                    Some(norm)
                }
                Err(e) => {
                    tracing::warn!("multi-tensor AdamW: gathering the gradients failed ({e}); updating each parameter on its own");
                    self.bufs = None;
                    None
                }
            }
        }

        /// The update on the buffers with this step's gathered gradients.
        pub(super) fn update(&mut self, s: &AdamWStep) -> bool {
            let (Some((g, _)), Some(b)) = (self.grad.take(), self.bufs.as_mut()) else { return false };
            b.t = b.t.saturating_add(1);
            let c = AdamWStep { step: b.t, ..*s }.coeffs();
            crate::adamw_libtorch::update(&mut b.p.0.tensor, Grad::Owned(g), &mut b.m.0.tensor, &mut b.v.0.tensor, &c);
            true
        }

        /// The parameters after an update cast to `half` in one operation, as views of that cast,
        /// one per entry (the entries are the buffers' views, in order: `update` ran).
        pub(super) fn halves(&self, entries: &[FlatEntry], half: burn::tensor::FloatDType) -> Vec<Option<DispatchTensor>> {
            let kind = match half {
                burn::tensor::FloatDType::BF16 => Kind::BFloat16,
                burn::tensor::FloatDType::F16 => Kind::Half,
                _ => return Vec::new(),
            };
            let Some(b) = self.bufs.as_ref().filter(|b| b.kind != kind && b.slots.len() == entries.len()) else { return Vec::new() };
            let Ok(cast) = b.p.0.tensor.f_to_kind(kind) else { return Vec::new() };
            let cast = Buffer(TchTensor::new(cast));
            entries
                .iter()
                .zip(&b.slots)
                .map(|(e, slot)| {
                    let view = cast.view(slot).ok()?;
                    Some(DispatchTensor { kind: burn::backend::DispatchTensorKind::LibTorch(burn::backend::BackendTensor::Float(view)), autodiff: e.0.autodiff })
                })
                .collect()
        }

        /// Plans new buffers for the entries, to be filled by this step's per-parameter pass.
        pub(super) fn plan(&mut self, entries: &[FlatEntry], all: bool) -> bool {
            self.bufs = None;
            let Some((p0, _)) = entries.first().and_then(|e| applies(e, all)) else { return false };
            let (kind, device) = (p0.kind(), p0.device());
            let mut slots = Vec::with_capacity(entries.len());
            let mut offset = 0i64;
            for e in entries {
                let Some((p, _)) = applies(e, all) else { return false };
                if p.kind() != kind || p.device() != device {
                    return false;
                }
                let numel = p.numel() as i64;
                let padded = (numel + ALIGN - 1) / ALIGN * ALIGN;
                let pad = match padded > numel {
                    true => match tch::Tensor::f_zeros([padded - numel], (kind, device)) {
                        Ok(z) => Some(z),
                        Err(_) => return false,
                    },
                    false => None,
                };
                slots.push(Slot { offset, shape: p.size(), numel, pad, ptr: 0, adopted: None });
                offset += padded;
            }
            let alloc = || -> Result<[Buffer; 3], tch::TchError> { Ok([Buffer::zeros(offset, kind, device)?, Buffer::zeros(offset, kind, device)?, Buffer::zeros(offset, kind, device)?]) };
            match alloc() {
                Ok([p, m, v]) => {
                    self.bufs = Some(Buffers { kind, device, p, m, v, slots, t: 0 });
                    true
                }
                Err(e) => {
                    tracing::warn!("multi-tensor AdamW: no room for the buffers ({e}); updating each parameter on its own");
                    false
                }
            }
        }

        /// Copies a per-parameter update's results into slot `at` and hands back views of them.
        pub(super) fn adopt<const D: usize>(&mut self, at: usize, out: AdamWOutput<D>, t: i32) -> AdamWOutput<D> {
            let Some(b) = self.bufs.as_mut() else { return out };
            let (mut p, mut m, mut v) = (out.param.into_dispatch(), out.moment_1.into_dispatch(), out.moment_2.into_dispatch());
            let copied = (|| -> Option<()> {
                let slot = b.slots.get_mut(at)?;
                for (buf, t) in [(&b.p, &mut p), (&b.m, &mut m), (&b.v, &mut v)] {
                    let src = float_mut(&mut t.kind)?;
                    if src.tensor.size() != slot.shape || src.tensor.kind() != b.kind || src.tensor.device() != b.device {
                        return None;
                    }
                    let mut view = buf.view(slot).ok()?;
                    view.tensor.f_copy_(&src.tensor).ok()?;
                    *src = view;
                }
                slot.ptr = float(&p.kind)?.tensor.data_ptr() as usize;
                slot.adopted = Some(t);
                Some(())
            })();
            if copied.is_none() {
                // Not what was planned: the buffers will not be used (`built` sees the slot unfilled).
                b.slots.clear();
            }
            AdamWOutput { param: Tensor::from_dispatch(p), moment_1: Tensor::from_dispatch(m), moment_2: Tensor::from_dispatch(v), fused: out.fused, half: out.half }
        }

        /// The build is kept when `visited` parameters filled every slot, all at one step count.
        pub(super) fn built(&mut self, visited: usize) {
            let Some(b) = self.bufs.as_mut() else { return };
            let t = b.slots.first().and_then(|s| s.adopted);
            let complete = !b.slots.is_empty() && visited == b.slots.len() && b.slots.iter().all(|s| s.adopted.is_some() && s.adopted == t);
            match (complete, t) {
                (true, Some(t)) => b.t = t,
                _ => self.bufs = None,
            }
        }
    }
}
