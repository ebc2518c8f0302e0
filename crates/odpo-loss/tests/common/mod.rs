//! Helpers shared by the integration tests: tensors from host vectors and back, on the default device's
//! autodiff form (flex in the default build; the backend of a `--no-default-features --features tch`
//! build, so the same tests check the objectives on that backend).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use burn::tensor::{DType, Device, Tensor, TensorData};
use odpo_loss::PairLogps;

#[path = "../../../odpo-model/tests/common/env.rs"]
mod env;
#[allow(unused_imports)]
pub use env::*;

/// The device every test runs on: the build's default backend, with autodiff.
pub fn device() -> Device {
    test_device().autodiff()
}

/// What kind of device the tests run on; tolerances depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Flex,
    LibTorch,
    /// A cubecl runtime: wgpu (Vulkan, Metal), CUDA.
    Cube,
}

pub fn device_kind() -> Kind {
    let d = format!("{:?}", test_device());
    if d.contains("Flex") {
        Kind::Flex
    } else if d.contains("LibTorch") {
        Kind::LibTorch
    } else {
        Kind::Cube
    }
}

/// An f32 tensor of shape [n].
pub fn t32(v: &[f32], dev: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), (dev, DType::F32))
}

/// An f64 tensor of shape [n].
pub fn t64(v: &[f64], dev: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), (dev, DType::F64))
}

/// Host copy as f64.
pub fn host(t: &Tensor<1>) -> Vec<f64> {
    t.try_to_vec_as::<f64>().expect("read back")
}

/// The one value of a [1] tensor.
pub fn scalar(t: &Tensor<1>) -> f64 {
    host(t)[0]
}

/// Host values of the inputs of one batch (f64; the tensors are built in the dtype the test asks for).
#[derive(Clone, Debug)]
pub struct Host {
    pub policy_chosen: Vec<f64>,
    pub policy_rejected: Vec<f64>,
    pub reference_chosen: Vec<f64>,
    pub reference_rejected: Vec<f64>,
    pub chosen_tokens: Vec<f64>,
    pub rejected_tokens: Vec<f64>,
    pub offset: Option<Vec<f64>>,
    pub weight: Option<Vec<f64>>,
}

/// The names of the four differentiated inputs, in `Host::logps` order.
pub const LOGP_NAMES: [&str; 4] = [
    "policy_chosen",
    "policy_rejected",
    "reference_chosen",
    "reference_rejected",
];

impl Host {
    pub fn logps_mut(&mut self) -> [&mut Vec<f64>; 4] {
        [
            &mut self.policy_chosen,
            &mut self.policy_rejected,
            &mut self.reference_chosen,
            &mut self.reference_rejected,
        ]
    }

    /// Builds `PairLogps`; the four log-prob tensors require gradients and are returned too.
    pub fn build(&self, dev: &Device, dtype: DType) -> (PairLogps, [Tensor<1>; 4]) {
        let mk = |v: &[f64]| -> Tensor<1> {
            match dtype {
                DType::F64 => t64(v, dev),
                _ => t32(&v.iter().map(|&x| x as f32).collect::<Vec<_>>(), dev),
            }
        };
        let leaves = [
            mk(&self.policy_chosen).require_grad(),
            mk(&self.policy_rejected).require_grad(),
            mk(&self.reference_chosen).require_grad(),
            mk(&self.reference_rejected).require_grad(),
        ];
        let mut p = PairLogps::new(
            leaves[0].clone(),
            leaves[1].clone(),
            leaves[2].clone(),
            leaves[3].clone(),
            mk(&self.chosen_tokens),
            mk(&self.rejected_tokens),
        );
        p.offset = self.offset.as_deref().map(mk);
        p.weight = self.weight.as_deref().map(mk);
        (p, leaves)
    }
}
