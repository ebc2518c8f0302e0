//! The layers the Llama and Gemma families run as one recorded operation each, `odpo_kernels::rotary`,
//! `odpo_kernels::rms_norm` and `odpo_kernels::glu`, on the test device (flex by default; each
//! backend under `cargo xtask conformance`): their outputs and gradients equal the same formulas in
//! burn tensor operations (for RMSNorm, burn's own `RmsNorm`; for the gated units, burn's `silu`,
//! `gelu_approximate` and `gelu`) on the CPU; RMSNorm in half precision is the definition rounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::module::Param;
use burn::nn::RmsNormConfig;
use burn::tensor::{Distribution, Tensor};
use common::test_device;

fn vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn close(name: &str, a: &[f32], b: &[f32], device: &burn::tensor::Device) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{name}: {x} against {y} on {device:?}");
    }
}

/// The launches of each of `kernels` while `f` runs, on a cubecl device (`None` elsewhere).
fn launches_of<R, const N: usize>(kernels: [&str; N], device: &burn::tensor::Device, f: impl FnOnce() -> R) -> (R, Option<[u64; N]>) {
    if !odpo_kernels::launches_kernels(device) {
        return (f(), None);
    }
    let (out, census) = odpo_kernels::kernel_census(false, f);
    let census = census.unwrap_or_default();
    (out, Some(kernels.map(|name| census.iter().filter(|k| k.kernel == name).map(|k| k.launches).sum())))
}

/// The first CPU backend of the build (`cargo xtask conformance` adds flex where no CPU backend is
/// named), else the device.
fn cpu(device: &burn::tensor::Device) -> burn::tensor::Device {
    ["flex", "tch"].iter().find_map(|b| odpo_model::backend::device(b).ok()).map_or_else(|| device.clone(), |d| d.autodiff())
}

/// `odpo_kernels::rotary` on the test device: its output and the gradient of `x` equal the
/// rotate-half formula written in burn tensor operations on the CPU, with angles broadcast over
/// the heads as the models pass them and `x` the heads' view `[B, H, T, Dh]` of `[B, T, H, Dh]`
/// projections. On the cubecl backends each pass is one kernel.
#[test]
fn rotary_values_and_gradients_match_the_tensor_formula() {
    let device = test_device().autodiff();
    let cpu = cpu(&device);
    let (b, h, t, dh) = (2, 3, 5, 8);
    let x = Tensor::<4>::random([b, t, h, dh], Distribution::Normal(0.0, 1.0), &device);
    let angles = Tensor::<4>::random([b, 1, t, dh], Distribution::Uniform(-3.0, 3.0), &device);
    let dy = Tensor::<4>::random([b, h, t, dh], Distribution::Normal(0.0, 1.0), &device);
    let run = |ours: bool| {
        let on = if ours { &device } else { &cpu };
        let leaf = Tensor::<4>::from_data(x.to_data(), on).require_grad();
        let x = leaf.clone().swap_dims(1, 2);
        let a = Tensor::<4>::from_data(angles.to_data(), on);
        let (cos, sin) = (a.clone().cos(), a.sin());
        let y = if ours {
            odpo_kernels::rotary(x.clone(), &cos, &sin).unwrap_or_else(|| panic!("no rotary extension on {device:?}"))
        } else {
            let x1 = x.clone().narrow(3, 0, dh / 2);
            let x2 = x.clone().narrow(3, dh / 2, dh / 2);
            x.clone() * cos + Tensor::cat(vec![x2.neg(), x1], 3) * sin
        };
        let grads = (y.clone() * Tensor::<4>::from_data(dy.to_data(), on)).sum().backward();
        (vec(y.inner()), vec(leaf.grad(&grads).expect("a gradient")))
    };
    let (ours, kernels) = launches_of(["RotaryKernel"], &device, || run(true));
    assert!(kernels.is_none_or(|[n]| n == 2), "{kernels:?} rotary kernels for a forward and a backward pass on {device:?}");
    let formula = run(false);
    close("y", &ours.0, &formula.0, &device);
    close("dx", &ours.1, &formula.1, &device);
}

/// `odpo_kernels::rms_norm` on the test device: its output and the gradients of `x` and `γ` equal
/// burn's `RmsNorm` on the CPU, for rows of very different scales: short rows, rows of SmolLM2's
/// width (576, not a power of two, longer than a cube of units), a strided `x` (the transpose
/// of its layout in memory), and enough rows for the cubecl backends to sum `dγ` over runs of 64
/// rows first (256 rows, and 201, whose last 9 are a run of their own). On the cubecl backends
/// each pass is one kernel.
#[test]
fn rms_norm_values_and_gradients_match_burns_rms_norm() {
    let device = test_device().autodiff();
    let cpu = cpu(&device);
    for (b, t, d, strided) in [(2, 5, 24, false), (3, 7, 576, false), (2, 9, 40, true), (4, 64, 40, false), (3, 67, 24, false)] {
        let eps = 1e-5;
        let x = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device) * Tensor::<3>::random([b, t, 1], Distribution::Uniform(0.01, 30.0), &device);
        let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), &device);
        let dy = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let on = if ours { &device } else { &cpu };
            // The strided case lays `x` out as `[b, d, t]` and reads it through its transpose.
            let leaf = if strided { Tensor::<3>::from_data(x.clone().swap_dims(1, 2).to_data(), on) } else { Tensor::<3>::from_data(x.to_data(), on) }.require_grad();
            let x = if strided { leaf.clone().swap_dims(1, 2) } else { leaf.clone() };
            let mut norm = RmsNormConfig::new(d).with_epsilon(eps).init(on);
            norm.gamma = Param::from_tensor(Tensor::<1>::from_data(gamma.to_data(), on));
            let y = if ours {
                odpo_kernels::rms_norm(x.clone(), norm.gamma.val(), eps).unwrap_or_else(|| panic!("no rms_norm extension on {device:?}"))
            } else {
                norm.forward(x.clone())
            };
            let grads = (y.clone() * Tensor::<3>::from_data(dy.to_data(), on)).sum().backward();
            let dx = leaf.grad(&grads).expect("a gradient of x");
            let dx = if strided { dx.swap_dims(1, 2) } else { dx };
            (vec(y.inner()), vec(dx), vec(norm.gamma.val().grad(&grads).expect("a gradient of gamma")))
        };
        let (ours, kernels) = launches_of(["RmsNormKernel", "RmsNormBackwardKernel"], &device, || run(true));
        assert!(kernels.is_none_or(|k| k == [1, 1]), "[{b}, {t}, {d}]: {kernels:?} RMSNorm kernels (forward, backward) on {device:?}");
        let burns = run(false);
        let case = format!("[{b}, {t}, {d}]{}", if strided { " strided" } else { "" });
        close(&format!("{case} y"), &ours.0, &burns.0, &device);
        close(&format!("{case} dx"), &ours.1, &burns.1, &device);
        // `dγ` sums a column over every row, in another order on each side: f32 rounding grows with
        // the terms, not with the sum, which cancels (a column that sums to 0.47 from 201 terms of
        // order 1 differed by 1e-5). It is measured against the gradient's largest entry, as the
        // half-precision test below measures it.
        let scale = burns.2.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let scaled = |v: &[f32]| v.iter().map(|x| x / scale).collect::<Vec<_>>();
        close(&format!("{case} dgamma (over its largest entry, {scale})"), &scaled(&ours.2), &scaled(&burns.2), &device);
    }
}

/// `odpo_kernels::rms_norm` in each half precision the test device computes in (on libtorch torch's
/// own RMSNorm, on the cubecl backends the kernels above, on flex its loops): the output and the
/// gradients of `x` and `γ` within a few roundings to the dtype of the definition, worked in f64 on
/// the rounded inputs. Each is measured against the largest entry of its row (of the whole
/// gradient for `γ`), as `dx`'s entries are differences that cancel.
#[test]
fn rms_norm_in_half_precision_is_the_definition_rounded() {
    use burn::tensor::{DType, FloatDType};
    let device = test_device().autodiff();
    let (rows, d, eps) = (37, 96, 1e-5);
    let f64s = |t: Tensor<2>| t.into_data().convert::<f64>().try_into_vec::<f64>().unwrap();
    let x = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device) * Tensor::<2>::random([rows, 1], Distribution::Uniform(0.01, 30.0), &device);
    let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), &device);
    let dy = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
    // Four roundings to the dtype, each at most half its spacing: 2^-8 of a value in bf16, 2^-11 in f16.
    for (dtype, kind, tol) in [(DType::BF16, FloatDType::BF16, 4.0 / 256.0), (DType::F16, FloatDType::F16, 4.0 / 2048.0)] {
        if !device.supports_dtype(dtype) {
            eprintln!("{device:?} does not compute in {dtype:?}");
            continue;
        }
        let (xs, gs, dys) = (x.clone().cast(kind).require_grad(), gamma.clone().cast(kind).require_grad(), dy.clone().cast(kind));
        let y = odpo_kernels::rms_norm(xs.clone(), gs.clone(), eps).unwrap_or_else(|| panic!("no rms_norm extension on {device:?}"));
        assert_eq!(y.dtype(), dtype, "{device:?}: y in the inputs' dtype");
        let grads = (y.clone() * dys.clone()).sum().backward();
        let dx = xs.grad(&grads).expect("a gradient of x");
        let dg = gs.grad(&grads).expect("a gradient of gamma");
        assert_eq!((dx.dtype(), dg.dtype()), (dtype, dtype), "{device:?}: gradients in the inputs' dtype");
        let (xv, gv, dyv) = (f64s(xs.inner()), f64s(gs.inner().reshape([1, d])), f64s(dys.inner()));
        let (y, dx, dg) = (f64s(y.inner()), f64s(dx), f64s(dg.reshape([1, d])));
        let (mut want_y, mut want_dx, mut want_dg) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; d]);
        for r in 0..rows {
            let row = &xv[r * d..(r + 1) * d];
            let rms = (row.iter().map(|a| a * a).sum::<f64>() / d as f64 + eps).sqrt();
            let g: Vec<f64> = (0..d).map(|c| dyv[r * d + c] * gv[c]).collect();
            let dot = (0..d).map(|c| g[c] * row[c] / rms).sum::<f64>() / d as f64;
            for c in 0..d {
                want_y[r * d + c] = row[c] / rms * gv[c];
                want_dx[r * d + c] = (g[c] - row[c] / rms * dot) / rms;
                want_dg[c] += dyv[r * d + c] * row[c] / rms;
            }
        }
        let worst = |got: &[f64], want: &[f64], width: usize| {
            got.chunks(width).zip(want.chunks(width)).fold(0.0_f64, |m, (a, b)| {
                let scale = b.iter().fold(0.0_f64, |s, v| s.max(v.abs()));
                a.iter().zip(b).fold(m, |m, (a, b)| m.max((a - b).abs() / (tol * scale).max(1e-30)))
            })
        };
        let (ry, rdx, rdg) = (worst(&y, &want_y, d), worst(&dx, &want_dx, d), worst(&dg, &want_dg, d));
        eprintln!("{device:?} {dtype:?}: y, dx, dγ within {ry:.2}, {rdx:.2}, {rdg:.2} of four roundings");
        assert!(ry <= 1.0 && rdx <= 1.0 && rdg <= 1.0, "{device:?} {dtype:?}: y, dx, dγ at {ry:.2}, {rdx:.2}, {rdg:.2} times four roundings of the definition");
    }
}

/// `odpo_kernels::reshape_rows` on the test device, as the linear layers use it (rows merged for
/// the product and split again): values and gradients equal burn's `reshape`. The rows are evenly
/// spaced in memory but not contiguous (here the transpose of a `[D, B·T]` tensor; on CUDA, cubecl's
/// padded rows): on the cubecl backends burn's `reshape` copies them and `reshape_rows` views them,
/// in both passes. Rows that are not evenly spaced (a `[T, B, D]` transpose) are copied, as burn does.
#[test]
fn reshape_rows_matches_reshape_without_copies() {
    let device = test_device().autodiff();
    let (b, t, d) = (2, 5, 576);
    let x = Tensor::<2>::random([d, b * t], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<2>::random([b * t, d], Distribution::Normal(0.0, 1.0), &device);
    let dy = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
    let x = x.to_data();
    let run = |ours: bool, spaced: bool| {
        let leaf = Tensor::<2>::from_data(x.clone(), &device).require_grad();
        // The rows' own view in both runs: on its way back burn's reshape would merge a gradient
        // whose rows CUDA pads (not contiguous), a copy in both runs (on an H200: 1 and 3 copies).
        let h = odpo_kernels::reshape_rows(leaf.clone().mul_scalar(2.0).swap_dims(0, 1), [b, t, d]);
        let (h, lead) = if spaced { (h, [b, t]) } else { (h.swap_dims(0, 1), [t, b]) };
        let rows: Tensor<2> = if ours { odpo_kernels::reshape_rows(h, [b * t, d]) } else { h.reshape([b * t, d]) };
        let z = rows * w.clone();
        let out: Tensor<3> = if ours { odpo_kernels::reshape_rows(z, [lead[0], lead[1], d]) } else { z.reshape([lead[0], lead[1], d]) };
        let grads = (out.clone() * dy.clone().reshape([lead[0], lead[1], d])).sum().backward();
        (out.inner(), leaf.grad(&grads).expect("a gradient of x"))
    };
    // The census covers both passes, not the reads (which copy strided tensors to the host).
    let read = |(y, dx): (Tensor<3>, Tensor<2>)| (vec(y), vec(dx));
    let (ours, copies) = launches_of(["CopyKernel"], &device, || run(true, true));
    let (burns, burn_copies) = launches_of(["CopyKernel"], &device, || run(false, true));
    let (ours, burns) = (read(ours), read(burns));
    assert!(copies.zip(burn_copies).is_none_or(|([n], [m])| n == 0 && m > 0), "copies of evenly spaced rows: {copies:?}, burn's reshape {burn_copies:?}, on {device:?}");
    close("rows", &ours.0, &burns.0, &device);
    close("rows: dx", &ours.1, &burns.1, &device);
    let (ours, burns) = (read(run(true, false)), read(run(false, false)));
    close("transposed", &ours.0, &burns.0, &device);
    close("transposed: dx", &ours.1, &burns.1, &device);
}

/// `odpo_kernels::glu` on the test device, for each gate: its output and the gradients of the
/// gate and the value equal burn's activation times the value on the CPU, over gates from deep in
/// either tail of the sigmoid and of the normal distribution. On the cubecl backends SwiGLU and
/// the tanh GeGLU are one kernel each way.
#[test]
fn gated_units_match_burns_activations() {
    use burn::tensor::activation::{gelu, gelu_approximate, silu};
    use odpo_kernels::Gate;

    let device = test_device().autodiff();
    let cpu = cpu(&device);
    let (b, t, d) = (2, 5, 24);
    let g = Tensor::<3>::random([b, t, d], Distribution::Uniform(-12.0, 12.0), &device);
    let u = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
    let dy = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
    for gate in [Gate::Silu, Gate::GeluTanh, Gate::Gelu] {
        let run = |ours: bool| {
            let on = if ours { &device } else { &cpu };
            let g = Tensor::<3>::from_data(g.to_data(), on).require_grad();
            let u = Tensor::<3>::from_data(u.to_data(), on).require_grad();
            let y = if ours {
                odpo_kernels::glu(g.clone(), u.clone(), gate).unwrap_or_else(|| panic!("no glu extension on {device:?}"))
            } else {
                let a = match gate {
                    Gate::Silu => silu(g.clone()),
                    Gate::GeluTanh => gelu_approximate(g.clone()),
                    Gate::Gelu => gelu(g.clone()),
                };
                a * u.clone()
            };
            let grads = (y.clone() * Tensor::<3>::from_data(dy.to_data(), on)).sum().backward();
            (vec(y.inner()), vec(g.grad(&grads).expect("a gradient of g")), vec(u.grad(&grads).expect("a gradient of u")))
        };
        let (ours, kernels) = launches_of(["GluKernel", "GluBackwardKernel"], &device, || run(true));
        // SwiGLU and the tanh GeGLU run one kernel each way on the cubecl backends; the exact GELU
        // keeps the tensor operations.
        let want = if gate == Gate::Gelu { [0, 0] } else { [1, 1] };
        assert!(kernels.is_none_or(|k| k == want), "{gate:?}: {kernels:?} gated-unit kernels (forward, backward) on {device:?}");
        let burns = run(false);
        close(&format!("{gate:?} y"), &ours.0, &burns.0, &device);
        close(&format!("{gate:?} dg"), &ours.1, &burns.1, &device);
        close(&format!("{gate:?} du"), &ours.2, &burns.2, &device);
    }
}
