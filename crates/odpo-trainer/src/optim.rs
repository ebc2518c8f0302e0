//! The optimizer with PyTorch's hyper-parameters written out, and PyTorch's global-norm gradient
//! clipping (burn's `GradientClippingConfig::Norm` clips each tensor on its own, which is not what
//! `torch.nn.utils.clip_grad_norm_` does).

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, RmsPropConfig};
use burn::tensor::Tensor;

use crate::config::{OptimConfig, OptimizerKind};

/// Builds the optimizer. Every hyper-parameter is set explicitly, with PyTorch's defaults where the
/// config leaves one out (AdamW: betas (0.9, 0.999), eps 1e-8, weight decay 0.01; RMSprop: alpha 0.99,
/// eps 1e-8, momentum 0, weight decay 0, not centred). No burn-side clipping: see [`clip_global_norm`].
pub fn build(cfg: &OptimConfig) -> ModuleOptimizer {
    match cfg.optimizer {
        OptimizerKind::Adamw => {
            let [b1, b2] = cfg.betas.unwrap_or([0.9, 0.999]);
            AdamWConfig::new()
                .with_beta_1(b1 as f32)
                .with_beta_2(b2 as f32)
                .with_epsilon(cfg.eps as f32)
                .with_weight_decay(cfg.weight_decay.unwrap_or(0.01) as f32)
                .init()
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
        found: Option<String>,
    }
    impl ModuleVisitor for Find<'_> {
        fn visit_float_with_path<const D: usize>(&mut self, path: &[String], id: ParamId, _t: &Tensor<D>) {
            if self.found.is_some() {
                return;
            }
            if let Some(g) = self.grads.get::<D>(id) {
                let bad = g.clone().is_nan().any().into_scalar::<bool>() || g.abs().max().into_scalar::<f64>().is_infinite();
                if bad {
                    self.found = Some(path.join("."));
                }
            }
        }
    }
    let mut v = Find { grads, found: None };
    model.visit(&mut v);
    v.found
}
