//! The optimizer with PyTorch's hyper-parameters written out, and PyTorch's global-norm gradient
//! clipping (burn's `GradientClippingConfig::Norm` clips each tensor on its own, which is not what
//! `torch.nn.utils.clip_grad_norm_` does).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer, RmsPropConfig};
use burn::backend::DispatchTensor;
use burn::tensor::{Device, FloatDType, Tensor};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{OptimConfig, OptimizerKind};

/// The run's optimizer: burn's [`ModuleOptimizer`] (its state is what checkpoints hold) and, for
/// AdamW, the handle through which a step's clipping coefficient reaches the update.
pub struct Optim {
    module: ModuleOptimizer,
    grad_scale: Option<GradScale>,
    /// AdamW's hyper-parameters, for the update that runs on all parameters at once.
    adamw: Option<TorchAdamW>,
    /// Multi-tensor steps since burn's per-parameter states last counted a step: their moments are
    /// the buffers' (updated in place), their step counts this far behind ([`Optim::record`]).
    lag: usize,
}

impl Optim {
    /// One update of `model` with `grads` multiplied by `grad_scale` (the clipping coefficient of
    /// [`clip_coefficient`]; 1 leaves them as they are). AdamW folds the factor into its one-pass
    /// update; RMSprop gets the gradients scaled first, as `clip_grad_norm_` leaves them.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, grads: GradientsParams, grad_scale: f64) -> M {
        self.step_to_half(lr, model, grads, grad_scale, None).0
    }

    /// [`Self::step`] that also gives the updated weights cast to `half`, where AdamW's update
    /// wrote them (the cubecl kernel, or one cast of the multi-tensor update's buffer): one entry
    /// per float parameter of `model`, in visiting order (`None` for one without a gradient, or
    /// whose update wrote no cast), for `odpo_model::HalfWeights`. `None` when nothing was written.
    pub fn step_to_half<M: Module>(&mut self, lr: f64, model: M, grads: GradientsParams, grad_scale: f64, half: Option<FloatDType>) -> (M, Option<Vec<Option<DispatchTensor>>>) {
        let with_grad = half.map(|_| params_with_grads(&model, &grads));
        let model = self.update(lr, model, grads, grad_scale, half);
        let halves = self.grad_scale.as_ref().map(|h| h.flat().halves()).unwrap_or_default();
        let weights = with_grad.and_then(|with_grad| {
            let mut halves = halves.into_iter();
            let weights: Vec<_> = with_grad.into_iter().map(|g| if g { halves.next().flatten() } else { None }).collect();
            (halves.next().is_none() && weights.iter().any(Option::is_some)).then_some(weights)
        });
        (model, weights)
    }

    fn update<M: Module>(&mut self, lr: f64, model: M, grads: GradientsParams, grad_scale: f64, half: Option<FloatDType>) -> M {
        match &self.grad_scale {
            Some(handle) => {
                handle.set(grad_scale);
                let scalars = self.adamw.as_ref().map(|a| a.scalars(lr, 0));
                if let Some(s) = scalars.filter(|_| handle.flat().enabled()) {
                    let entries = flat_entries(&model, &grads);
                    let mut flat = handle.flat();
                    flat.begin_to_half(&entries, &s, half);
                    if flat.updated() {
                        // The buffers hold the step's update, and the weights are their views.
                        // burn's per-parameter pass would only count a step in each state: that
                        // waits until something reads the states.
                        flat.finish();
                        handle.count(entries.len(), true);
                        self.lag += 1;
                        return model;
                    }
                }
                if let Some(s) = scalars.filter(|_| !handle.flat().enabled()) {
                    // Per parameter: the casts come from each update.
                    handle.flat().begin_to_half(&[], &s, half);
                }
                if self.lag > 0 {
                    self.module = self.record(&model);
                    self.lag = 0;
                }
                let model = self.module.step(lr, model, grads);
                handle.flat().finish();
                model
            }
            None => {
                // burn's RMSprop takes gradients of the parameters' dtype.
                let grads = widen_grads(&model, grads);
                let grads = if grad_scale == 1.0 { grads } else { scale_grads(&model, grads, grad_scale) };
                self.module.step(lr, model, grads)
            }
        }
    }

    /// The global L2 norm of the gradients, as [`global_norm`]; with AdamW on libtorch devices that
    /// the CPU kernel cannot reach, gathered into the buffer of the multi-tensor update, where the
    /// norm is one operation. Give [`step`](Self::step) the same gradients.
    pub fn grad_norm<M: Module>(&mut self, model: &M, grads: &GradientsParams) -> f64 {
        if let Some(handle) = self.grad_scale.as_ref().filter(|h| self.adamw.is_some() && h.flat().enabled())
            && let Some(norm) = handle.flat().gather(&flat_entries(model, grads))
        {
            return norm;
        }
        global_norm(model, grads)
    }

    /// Steps whose AdamW update ran on all parameters at once (the multi-tensor update).
    pub fn multi_tensor_steps(&self) -> usize {
        self.grad_scale.as_ref().map_or(0, |h| h.flat().flat_steps())
    }

    /// Parameter updates so far that ran in place (the one-pass CPU kernel, in-place libtorch
    /// operations, or the multi-tensor update), and all of them (AdamW only;
    /// RMSprop gives (0, 0)). The first step's updates cannot: the weights are still shared with
    /// the reference model.
    pub fn fused_updates(&self) -> (usize, usize) {
        self.grad_scale.as_ref().map_or((0, 0), |h| (h.0.in_place.load(Ordering::Relaxed), h.0.updates.load(Ordering::Relaxed)))
    }

    /// burn's optimizer with every state up to date, whose record a checkpoint saves. After
    /// multi-tensor steps the states' moments are already the buffers'; their step counts are
    /// advanced here, on a copy (a pass over `model`'s parameters that changes nothing else).
    pub fn record<M: Module>(&self, model: &M) -> ModuleOptimizer {
        let mut module = self.module.clone();
        if let (Some(h), true) = (&self.grad_scale, self.lag > 0) {
            struct Values(GradientsParams);
            impl ModuleVisitor for Values {
                fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                    self.0.register(param.id, param.val().inner());
                }
            }
            // Every parameter's own value stands for its gradient: the pass only needs one per
            // parameter to visit it, and `TorchAdamW` counting steps reads none.
            let mut values = Values(GradientsParams::new());
            model.visit(&mut values);
            h.0.counting.store(self.lag, Ordering::Relaxed);
            let _ = module.step(0.0, model.clone(), values.0);
            h.0.counting.store(0, Ordering::Relaxed);
        }
        module
    }

    /// The same optimizer with the state of a saved record (`optim.bpk`). burn materialises the
    /// state on `Device::default()` (`BURN_DEVICE`, else the build's first backend in burn's order)
    /// and moves it to each parameter's device at the next step; the `odpo` binary makes that
    /// default the host's, so that a build with several backends never starts one the run does not use.
    pub fn load(self, path: &std::path::Path) -> Result<Self, String> {
        let module = self.module.load(path).map_err(|e| e.to_string())?;
        if let Some(h) = &self.grad_scale {
            // The buffers hold the moments the loaded state replaces.
            h.flat().reset();
        }
        Ok(Self { module, lag: 0, ..self })
    }
}

/// For each float parameter of `model` in visiting order, whether it has a gradient (the
/// optimizer updates those, in this order).
fn params_with_grads<M: Module>(model: &M, grads: &GradientsParams) -> Vec<bool> {
    struct Has<'a>(&'a GradientsParams, Vec<bool>);
    impl ModuleVisitor for Has<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.1.push(self.0.get::<D>(param.id).is_some());
        }
    }
    let mut v = Has(grads, Vec::new());
    model.visit(&mut v);
    v.1
}

/// The parameters with gradients, in the order the optimizer visits them, for the multi-tensor update.
fn flat_entries<M: Module>(model: &M, grads: &GradientsParams) -> Vec<odpo_kernels::FlatEntry> {
    struct Entries<'a> {
        grads: &'a GradientsParams,
        out: Vec<odpo_kernels::FlatEntry>,
    }
    impl ModuleVisitor for Entries<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.push((param.val().inner().into_dispatch(), g.into_dispatch()));
            }
        }
    }
    let mut v = Entries { grads, out: Vec::new() };
    model.visit(&mut v);
    v.out
}

/// What [`Optim`] shares with the [`TorchAdamW`] inside its `ModuleOptimizer` (which only receives a
/// learning rate per step): the factor a step's gradients are multiplied by, how many parameter
/// updates ran in place, and the multi-tensor update's buffers.
#[derive(Clone, Debug)]
pub struct GradScale(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// The clipping coefficient of the current step, as f64 bits.
    scale: AtomicU64,
    /// Parameter updates that ran in place, and all of them.
    in_place: AtomicUsize,
    updates: AtomicUsize,
    /// Steps each state is to count without an update ([`Optim::record`]); 0 outside that pass.
    counting: AtomicUsize,
    flat: Mutex<odpo_kernels::FlatAdamW>,
}

impl Default for GradScale {
    fn default() -> Self {
        Self::new(odpo_kernels::FlatMode::Auto)
    }
}

impl GradScale {
    fn new(multi_tensor: odpo_kernels::FlatMode) -> Self {
        Self(Arc::new(Shared {
            scale: AtomicU64::new(1f64.to_bits()),
            in_place: AtomicUsize::new(0),
            updates: AtomicUsize::new(0),
            counting: AtomicUsize::new(0),
            flat: Mutex::new(odpo_kernels::FlatAdamW::new(multi_tensor)),
        }))
    }

    fn flat(&self) -> MutexGuard<'_, odpo_kernels::FlatAdamW> {
        // A panic inside an update leaves nothing half-written that the next step relies on: it
        // checks the buffers against the parameters before using them.
        self.0.flat.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, v: f64) {
        self.0.scale.store(v.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.scale.load(Ordering::Relaxed))
    }

    /// `n` parameter updates, in place or not.
    fn count(&self, n: usize, in_place: bool) {
        self.0.in_place.fetch_add(if in_place { n } else { 0 }, Ordering::Relaxed);
        self.0.updates.fetch_add(n, Ordering::Relaxed);
    }
}

/// Builds the optimizer. Every hyper-parameter is set explicitly, with PyTorch's defaults where the
/// config leaves one out (AdamW: betas (0.9, 0.999), eps 1e-8, weight decay 0.01; RMSprop: alpha 0.99,
/// eps 1e-8, momentum 0, weight decay 0, not centred). No burn-side clipping: see [`clip_coefficient`].
pub fn build(cfg: &OptimConfig) -> Optim {
    match cfg.optimizer {
        OptimizerKind::Adamw => {
            let [beta_1, beta_2] = cfg.betas.unwrap_or([0.9, 0.999]);
            let grad_scale = GradScale::new(match cfg.foreach {
                None => odpo_kernels::FlatMode::Auto,
                Some(true) => odpo_kernels::FlatMode::Always,
                Some(false) => odpo_kernels::FlatMode::Off,
            });
            let adamw = TorchAdamW { beta_1, beta_2, eps: cfg.eps, weight_decay: cfg.weight_decay.unwrap_or(0.01), grad_scale: grad_scale.clone() };
            Optim { module: ModuleOptimizer::from(adamw.clone()), grad_scale: Some(grad_scale), adamw: Some(adamw), lag: 0 }
        }
        OptimizerKind::Rmsprop => {
            let rmsprop = RmsPropConfig::new()
                .with_alpha(cfg.alpha.unwrap_or(0.99) as f32)
                .with_momentum(cfg.momentum.unwrap_or(0.0) as f32)
                .with_epsilon(cfg.eps as f32)
                .with_centered(cfg.centered.unwrap_or(false))
                .with_weight_decay(cfg.weight_decay.filter(|&w| w > 0.0).map(|w| WeightDecayConfig::new(w as f32)))
                .init();
            Optim { module: rmsprop, grad_scale: None, adamw: None, lag: 0 }
        }
    }
}

/// AdamW as PyTorch's single-tensor `torch.optim.AdamW` computes it: `m ← β₁m + (1−β₁)g`,
/// `v ← β₂v + (1−β₂)g²`, `p ← p(1 − lr·λ) − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`, with the
/// gradient first multiplied by the step's clipping coefficient.
///
/// The update is [`odpo_kernels::adamw`]: one pass over the parameter, its gradient and the two
/// moments, in place, where the tensors' memory is reachable on the CPU (flex, libtorch on the
/// CPU); on other libtorch tensors (CUDA, half precision) the multi-tensor update of
/// [`odpo_kernels::FlatAdamW`] over all parameters at once (`optim.foreach`), or in-place torch
/// operations per parameter; burn tensor operations elsewhere. burn's `AdamW` state type is kept,
/// so checkpoints are unchanged.
#[derive(Clone, Debug)]
pub struct TorchAdamW {
    /// β₁.
    pub beta_1: f64,
    /// β₂.
    pub beta_2: f64,
    /// ε, added to the bias-corrected √v.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// The clipping coefficient of the current step (and the count of fused updates).
    pub grad_scale: GradScale,
}

impl TorchAdamW {
    /// The scalars of update number `time` (counted from 1) at learning rate `lr`.
    fn scalars(&self, lr: LearningRate, time: usize) -> odpo_kernels::AdamWStep {
        odpo_kernels::AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: i32::try_from(time).unwrap_or(i32::MAX),
            grad_scale: self.grad_scale.get(),
        }
    }
}

impl Optimizer for TorchAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        let counting = self.grad_scale.0.counting.load(Ordering::Relaxed);
        if counting > 0 {
            // `Optim::record`: the steps ran on the buffers; only the count moves.
            return (
                tensor,
                state.map(|mut s| {
                    s.momentum.time += counting;
                    s
                }),
            );
        }
        let (moments, time) = match state {
            Some(s) => (Some((s.momentum.moment_1, s.momentum.moment_2)), s.momentum.time + 1),
            None => (None, 1),
        };
        // The moments in the parameter's dtype, as PyTorch's `load_state_dict` casts them: burn's
        // record brings half-precision moments back from a checkpoint as f32.
        let dtype = tensor.dtype();
        let moments = moments.map(|(m, v)| if m.dtype() == dtype && v.dtype() == dtype { (m, v) } else { (m.cast(dtype), v.cast(dtype)) });
        // The multi-tensor update hands back its views (the update ran on all parameters at
        // once), or runs `odpo_kernels::adamw` on this one.
        let out = self.grad_scale.flat().step_param(tensor, grad, moments, &self.scalars(lr, time));
        self.grad_scale.count(1, out.fused);
        (out.param, Some(AdamWState::new(AdaptiveMomentumState::new(time, out.moment_1, out.moment_2))))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// The global L2 norm of all gradients, √(Σ_p ‖g_p‖²), as one host read. Gradients in CPU memory
/// are summed in place ([`odpo_kernels::cpu_sum_squares`]), those of the cubecl backends by one
/// kernel each ([`odpo_kernels::SquareSums`]), the others on their device in tensor operations.
pub fn global_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        host: f64,
        kernel: odpo_kernels::SquareSums,
        device: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                if let Some(sq) = odpo_kernels::cpu_sum_squares(&g) {
                    self.host += sq;
                    return;
                }
                let Err(g) = self.kernel.take(g) else {
                    return;
                };
                // A half-precision gradient (a mixed-precision step's) in f32, which its sum needs.
                let g = if matches!(g.dtype(), burn::tensor::DType::F16 | burn::tensor::DType::BF16) { g.cast(burn::tensor::FloatDType::F32) } else { g };
                let sq = g.square().sum();
                self.device = Some(match self.device.take() {
                    Some(s) => s + sq,
                    None => sq,
                });
            }
        }
    }
    let mut v = Norm { grads, host: 0.0, kernel: odpo_kernels::SquareSums::new(), device: None };
    model.visit(&mut v);
    (v.host + v.kernel.total() + v.device.map(|s| s.into_scalar::<f64>()).unwrap_or(0.0)).sqrt()
}

/// Every gradient in its parameter's dtype: a mixed-precision step's half-precision gradients
/// (`CausalLm::with_compute_precision`) cast exactly to f32, for sums that must not round to half
/// precision (over micro-batches or devices) and optimizers that take one dtype.
pub fn widen_grads<M: Module>(model: &M, grads: GradientsParams) -> GradientsParams {
    struct Widen(GradientsParams);
    impl ModuleVisitor for Widen {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dtype = param.val().dtype();
            if let Some(g) = self.0.get::<D>(param.id).filter(|g| g.dtype() != dtype)
                && let burn::tensor::DType::F64 | burn::tensor::DType::F32 | burn::tensor::DType::F16 | burn::tensor::DType::BF16 = dtype
            {
                self.0.register(param.id, g.cast(dtype));
            }
        }
    }
    let mut v = Widen(grads);
    model.visit(&mut v);
    v.0
}

/// `clip_grad_norm_`'s factor for gradients of global norm `norm`: `max_norm / (norm + 1e-6)` when
/// that is below 1, else 1 (no clipping).
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) => (max / (norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// Scales every gradient by `max_norm / (norm + 1e-6)` when that is below 1, as `clip_grad_norm_`
/// (for loops that step a burn optimizer of their own; [`Optim::step`] takes the coefficient).
pub fn clip_global_norm<M: Module>(model: &M, grads: GradientsParams, norm: f64, max_norm: f64) -> GradientsParams {
    let coef = clip_coefficient(norm, Some(max_norm));
    if coef >= 1.0 {
        return grads;
    }
    scale_grads(model, grads, coef)
}

/// Every gradient multiplied by `coef`.
fn scale_grads<M: Module>(model: &M, grads: GradientsParams, coef: f64) -> GradientsParams {
    struct Scale {
        grads: GradientsParams,
        coef: f64,
    }
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.coef));
            }
        }
    }
    let mut v = Scale { grads, coef };
    model.visit(&mut v);
    v.grads
}

/// The dotted path of the first parameter whose gradient holds a NaN or infinity (host reads, one per
/// parameter: only called once the global norm came out non-finite).
pub fn first_nonfinite_grad<M: Module>(model: &M, grads: &GradientsParams) -> Option<String> {
    struct Find<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        found: Option<String>,
    }
    impl ModuleVisitor for Find<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.found.is_some() {
                return;
            }
            if let Some(g) = self.grads.get::<D>(param.id) {
                let bad = g.clone().is_nan().any().into_scalar::<bool>() || g.abs().max().into_scalar::<f64>().is_infinite();
                if bad {
                    self.found = Some(self.path.join("."));
                }
            }
        }
    }
    let mut v = Find { grads, path: Vec::new(), found: None };
    model.visit(&mut v);
    v.found
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};

    use super::*;

    #[derive(Module, Debug)]
    struct Two {
        a: Param<Tensor<1>>,
        b: Param<Tensor<1>>,
    }

    fn device() -> Device {
        Device::default().autodiff()
    }

    fn two(a: [f32; 2], b: [f32; 1]) -> Two {
        let d = device();
        Two { a: Param::from_tensor(Tensor::from_floats(a, &d)), b: Param::from_tensor(Tensor::from_floats(b, &d)) }
    }

    /// Gradients equal to `ga` and `gb`: the loss is Σ a·ga + Σ b·gb.
    fn grads(m: &Two, ga: [f32; 2], gb: [f32; 1]) -> GradientsParams {
        let d = device();
        let loss = (m.a.val() * Tensor::from_floats(ga, &d)).sum() + (m.b.val() * Tensor::from_floats(gb, &d)).sum();
        GradientsParams::from_grads(loss.backward(), m)
    }

    fn values(m: &Two) -> Vec<f32> {
        let mut v = m.a.val().try_to_vec_as::<f32>().unwrap_or_default();
        v.extend(m.b.val().try_to_vec_as::<f32>().unwrap_or_default());
        v
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 2e-6, "got {got:?}, want {want:?}");
        }
    }

    fn cfg(optimizer: OptimizerKind, lr: f64) -> OptimConfig {
        OptimConfig { optimizer, lr, ..OptimConfig::default() }
    }

    #[test]
    fn adamw_steps_like_pytorch() {
        // torch.optim.AdamW([p], lr=0.1) with its defaults (betas 0.9/0.999, eps 1e-8, weight_decay 0.01),
        // constant gradients [0.5, 0.1 | 2.0]: two steps, worked by hand from PyTorch's update rule.
        let mut optim = build(&cfg(OptimizerKind::Adamw, 0.1));
        let mut m = two([1.0, -2.0], [3.0]);
        for _ in 0..2 {
            let g = grads(&m, [0.5, 0.1], [2.0]);
            m = optim.step(0.1, m, g, 1.0);
        }
        let after = |p: f64| ((p * 0.999 - 0.1) * 0.999) - 0.1;
        assert_close(&values(&m), &[after(1.0), after(-2.0), after(3.0)]);
    }

    #[test]
    fn rmsprop_steps_like_pytorch() {
        // torch.optim.RMSprop([p], lr=0.01): alpha 0.99, eps 1e-8, momentum 0 (burn's default momentum is 0.9).
        let mut optim = build(&cfg(OptimizerKind::Rmsprop, 0.01));
        let mut m = two([1.0, -2.0], [3.0]);
        for _ in 0..2 {
            let g = grads(&m, [0.5, -0.1], [2.0]);
            m = optim.step(0.01, m, g, 1.0);
        }
        // Step 1: v = 0.01 g², update = lr·g/√v = 0.1·sign(g). Step 2: v = 0.0199 g², update = 0.01/√0.0199·sign(g).
        let u = 0.1 + 0.01 / 0.0199f64.sqrt();
        assert_close(&values(&m), &[1.0 - u, -2.0 + u, 3.0 - u]);
    }

    #[test]
    fn the_clipping_coefficient_folded_into_the_update_equals_clipped_gradients() {
        for kind in [OptimizerKind::Adamw, OptimizerKind::Rmsprop] {
            let (mut folded, mut clipped) = (build(&cfg(kind, 0.1)), build(&cfg(kind, 0.1)));
            let (mut a, mut b) = (two([1.0, -2.0], [3.0]), two([1.0, -2.0], [3.0]));
            for k in 0..3 {
                let ga = grads(&a, [3.0, 4.0 + k as f32], [12.0]);
                let norm = global_norm(&a, &ga);
                let coef = clip_coefficient(norm, Some(2.0));
                assert!(coef < 0.2);
                a = folded.step(0.1, a, ga, coef);
                let gb = clip_global_norm(&b, grads(&b, [3.0, 4.0 + k as f32], [12.0]), norm, 2.0);
                b = clipped.step(0.1, b, gb, 1.0);
            }
            let (va, vb) = (values(&a), values(&b));
            assert_close(&va, &vb.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
            assert!((va[0] - 1.0).abs() > 1e-3, "{kind:?} did not move: {va:?}");
        }
        assert_eq!(clip_coefficient(5.0, Some(10.0)), 1.0);
        assert_eq!(clip_coefficient(5.0, None), 1.0);
    }

    #[test]
    fn clipping_scales_by_the_global_norm() {
        let m = two([0.0, 0.0], [0.0]);
        let g = grads(&m, [3.0, 4.0], [12.0]);
        let norm = global_norm(&m, &g);
        assert!((norm - 13.0).abs() < 1e-6);
        let g = clip_global_norm(&m, g, norm, 6.5);
        let coef = 6.5 / (13.0 + 1e-6);
        let a = g.get::<1>(m.a.id).map(|t| t.try_to_vec_as::<f32>().unwrap_or_default()).unwrap_or_default();
        let b = g.get::<1>(m.b.id).map(|t| t.try_to_vec_as::<f32>().unwrap_or_default()).unwrap_or_default();
        // Per-tensor clipping (burn's) would leave [3, 4] alone and cut 12 to 6.5.
        assert_close(&[a, b].concat(), &[3.0 * coef, 4.0 * coef, 12.0 * coef]);
        let unchanged = clip_global_norm(&m, grads(&m, [3.0, 4.0], [12.0]), 13.0, 20.0);
        assert_eq!(global_norm(&m, &unchanged), 13.0);
        assert_eq!(first_nonfinite_grad(&m, &grads(&m, [1.0, f32::NAN], [0.0])), Some("a".to_string()));
        assert_eq!(first_nonfinite_grad(&m, &unchanged), None);
    }
}
