//! The optimizer with PyTorch's hyper-parameters written out, and PyTorch's global-norm gradient
//! clipping (burn's `GradientClippingConfig::Norm` clips each tensor on its own, which is not what
//! `torch.nn.utils.clip_grad_norm_` does).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer, RmsPropConfig};
use burn::tensor::Device;
use burn::tensor::Tensor;

use crate::config::{OptimConfig, OptimizerKind};

/// Builds the optimizer. Every hyper-parameter is set explicitly, with PyTorch's defaults where the
/// config leaves one out (AdamW: betas (0.9, 0.999), eps 1e-8, weight decay 0.01; RMSprop: alpha 0.99,
/// eps 1e-8, momentum 0, weight decay 0, not centred). No burn-side clipping: see [`clip_global_norm`].
pub fn build(cfg: &OptimConfig) -> ModuleOptimizer {
    match cfg.optimizer {
        OptimizerKind::Adamw => {
            let [beta_1, beta_2] = cfg.betas.unwrap_or([0.9, 0.999]);
            ModuleOptimizer::from(TorchAdamW { beta_1, beta_2, eps: cfg.eps, weight_decay: cfg.weight_decay.unwrap_or(0.01) })
        }
        OptimizerKind::Rmsprop => RmsPropConfig::new()
            .with_alpha(cfg.alpha.unwrap_or(0.99) as f32)
            .with_momentum(cfg.momentum.unwrap_or(0.0) as f32)
            .with_epsilon(cfg.eps as f32)
            .with_centered(cfg.centered.unwrap_or(false))
            .with_weight_decay(cfg.weight_decay.filter(|&w| w > 0.0).map(|w| WeightDecayConfig::new(w as f32)))
            .init(),
    }
}

/// AdamW as PyTorch's single-tensor `torch.optim.AdamW` computes it: `m ← β₁m + (1−β₁)g`,
/// `v ← β₂v + (1−β₂)g²`, `p ← p(1 − lr·λ) − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`.
///
/// The same update as burn's `AdamW` (whose state type it keeps, so checkpoints are unchanged) in
/// fewer full-size operations, each applied to a tensor it owns, which backends that reuse an owned
/// buffer (libtorch, flex) run in place: burn's version clones the moments for the bias
/// correction and allocates about twice as many parameter-sized tensors per step.
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
}

impl Optimizer for TorchAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        let (b1, b2) = (self.beta_1, self.beta_2);
        let (m, v, time) = match state {
            Some(s) => {
                let s = s.momentum;
                let m = s.moment_1.mul_scalar(b1).add(grad.clone().mul_scalar(1.0 - b1));
                (m, s.moment_2.mul_scalar(b2).add(grad.square().mul_scalar(1.0 - b2)), s.time + 1)
            }
            None => (grad.clone().mul_scalar(1.0 - b1), grad.square().mul_scalar(1.0 - b2), 1),
        };
        let t = i32::try_from(time).unwrap_or(i32::MAX);
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let denom = v.clone().sqrt().mul_scalar(1.0 / bc2.sqrt()).add_scalar(self.eps);
        let update = m.clone().div(denom).mul_scalar(lr / bc1);
        let tensor = if self.weight_decay > 0.0 { tensor.mul_scalar(1.0 - lr * self.weight_decay) } else { tensor };
        (tensor.sub(update), Some(AdamWState::new(AdaptiveMomentumState::new(time, m, v))))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// The global L2 norm of all gradients, √(Σ_p ‖g_p‖²), as one host read.
pub fn global_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let sq = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(s) => s + sq,
                    None => sq,
                });
            }
        }
    }
    let mut v = Norm { grads, sum: None };
    model.visit(&mut v);
    v.sum.map(|s| s.into_scalar::<f64>().sqrt()).unwrap_or(0.0)
}

/// Scales every gradient by `max_norm / (norm + 1e-6)` when that is below 1, as `clip_grad_norm_`.
pub fn clip_global_norm<M: Module>(model: &M, grads: GradientsParams, norm: f64, max_norm: f64) -> GradientsParams {
    let coef = max_norm / (norm + 1e-6);
    if coef >= 1.0 {
        return grads;
    }
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
            m = optim.step(0.1, m, g);
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
            m = optim.step(0.01, m, g);
        }
        // Step 1: v = 0.01 g², update = lr·g/√v = 0.1·sign(g). Step 2: v = 0.0199 g², update = 0.01/√0.0199·sign(g).
        let u = 0.1 + 0.01 / 0.0199f64.sqrt();
        assert_close(&values(&m), &[1.0 - u, -2.0 + u, 3.0 - u]);
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
