//! A model's linear layer: `y = x·W + b` over a dense or block-quantised base weight, with an
//! optional low-rank adapter ([`Adapter`]; attached, merged and saved by [`crate::lora`]). Every
//! model family builds its projections from it.

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::{DType, Tensor};
use odpo_kernels::linear;

/// A linear layer `y = x·W + b` (`W` stored `[in, out]`) with an optional low-rank adapter.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[in, out]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapter, when one is attached.
    pub lora: Option<Adapter>,
    /// With a block-quantised Q4_1 weight: the offset of each block of 32 inputs, `[in/32, out]`
    /// (see [`crate::quantized`]).
    pub offset: Option<Param<Tensor<2>>>,
}

/// The trainable low-rank update of one [`Linear`].
#[derive(Module, Debug)]
pub struct Adapter {
    /// `[in, r]` (PEFT's `lora_A.weight` transposed).
    pub a: Param<Tensor<2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` transposed).
    pub b: Param<Tensor<2>>,
    /// `α / r` (or `α / √r` with rsLoRA).
    pub scale: f64,
    /// Dropout on the adapter's input (active only while training on an autodiff device).
    pub dropout: Dropout,
}

impl Adapter {
    /// `dropout(x)·A·B` for rows `x` `[N, in]`: the update before its scale.
    pub(crate) fn low_rank(&self, x: Tensor<2>) -> Tensor<2> {
        odpo_kernels::matmul(odpo_kernels::matmul(self.dropout.forward(x), self.a.val()), self.b.val())
    }

    /// `s·A·B` `[in, out]`: what the adapter adds to the weight.
    pub(crate) fn delta(&self) -> Tensor<2> {
        odpo_kernels::matmul(self.a.val(), self.b.val()).mul_scalar(self.scale)
    }
}

impl Linear {
    /// A plain linear layer (no adapter).
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self { weight: Param::from_tensor(weight), bias: bias.map(Param::from_tensor), lora: None, offset: None }
    }

    /// Whether the weight is block-quantised (a frozen quantised base). Read through the
    /// parameter, not a clone of it: cloning a flex quantised tensor copies its scales.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight.dtype(), DType::QFloat(_))
    }

    /// `x·W + b`, plus the adapter's `s · dropout(x)·A·B` when one is attached.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let Some(ad) = &self.lora else {
            if !self.is_quantized() {
                return linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()));
            }
            let dims = x.dims();
            return rows_as(self.base_rows(rows_of(x)), dims);
        };
        let dims = x.dims();
        let x = rows_of(x);
        let low = ad.low_rank(x.clone());
        // The products and their sum over rows, viewed as `x`'s shape once, the sum one recorded
        // operation: gradient checkpointing then holds the sum where a later operation reads it,
        // not both terms and each product's view as well.
        rows_as(odpo_kernels::scaled_sum(self.base_rows(x), low, ad.scale), dims)
    }

    /// `x·W + b` for rows `x` `[N, in]`, without the adapter. A quantised weight goes through the
    /// product whose backward pass keeps it quantised, with Q4_1's block offsets added as
    /// `blocksum(x)·O`.
    fn base_rows(&self, x: Tensor<2>) -> Tensor<2> {
        let [d_in, _] = self.weight.dims();
        let [rows, _] = x.dims();
        let mut y = if self.is_quantized() { odpo_kernels::dequantized_matmul(x.clone(), &self.weight) } else { odpo_kernels::matmul(x.clone(), self.weight.val()) };
        if let Some(o) = &self.offset {
            let blocks = d_in / crate::quantized::BLOCK;
            y = y + odpo_kernels::matmul(x.reshape([rows, blocks, crate::quantized::BLOCK]).sum_dim(2).reshape([rows, blocks]), o.val());
        }
        match &self.bias {
            Some(b) => y + b.val().unsqueeze_dim(0),
            None => y,
        }
    }

    /// `W` as a float tensor `[in, out]`: a quantised weight dequantised, with its offsets (a new
    /// leaf, outside any graph).
    pub fn float_weight(&self) -> Tensor<2> {
        let w = self.weight.val();
        if !self.is_quantized() {
            return w;
        }
        let w = w.dequantize();
        match &self.offset {
            None => w,
            Some(o) => {
                let [blocks, d_out] = o.dims();
                let block = crate::quantized::BLOCK;
                (w + o.val().unsqueeze_dim::<3>(1).expand([blocks, block, d_out]).reshape([blocks * block, d_out])).detach()
            }
        }
    }

    /// `W + s·A·B` (or `W` without an adapter), detached from any graph.
    pub fn merged_weight(&self) -> Tensor<2> {
        let w = self.float_weight();
        match &self.lora {
            None => w,
            Some(ad) => (w + ad.delta()).detach(),
        }
    }

    /// Folds the adapter, if any, into the weight (`W + s·A·B`) and removes it.
    pub(crate) fn merge_lora(&mut self) {
        if let Some(ad) = self.lora.take() {
            self.fold(ad.delta());
        }
    }

    /// Adds `delta` `[in, out]` to the weight, which becomes a float weight outside any graph,
    /// frozen (a merged adapter).
    pub(crate) fn fold(&mut self, delta: Tensor<2>) {
        let w = self.float_weight();
        self.weight = Param::from_tensor((w.clone() + delta.cast(w.dtype())).detach()).set_require_grad(false);
        self.offset = None;
    }

    /// The float type adapters of this layer take: the weight's, or f32 over a quantised one.
    pub(crate) fn adapter_dtype(&self) -> DType {
        match self.weight.dtype() {
            DType::QFloat(_) => DType::F32,
            d => d,
        }
    }
}

/// `x` `[.., in]` as rows `[N, in]`.
fn rows_of<const D: usize>(x: Tensor<D>) -> Tensor<2> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    odpo_kernels::reshape_rows(x, [rows, dims[D - 1]])
}

/// Rows `y` `[N, out]` as `[.., out]` after the leading dimensions of `like`.
fn rows_as<const D: usize>(y: Tensor<2>, like: [usize; D]) -> Tensor<D> {
    let mut out = like;
    out[D - 1] = y.dims()[1];
    odpo_kernels::reshape_rows(y, out)
}

/// One projection of a model under its HF module name (`model.layers.0.self_attn.q_proj`).
pub(crate) type Projection<'a> = (String, &'a mut Linear);
