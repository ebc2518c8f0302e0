//! `odpo_kernels::matmul` and `odpo_kernels::linear` on the test device (flex by default; each
//! backend under `cargo xtask conformance`): f32 products and their gradients equal the same
//! products worked in f64 to within f32 rounding. On a device whose own matmul rounds f32 to TF32
//! (burn's CUDA backend) this fails unless the products bypass it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::{Tensor, TensorData};
use common::test_device;

/// `1 + u` with `u` in `[0, 2⁻¹¹)`: f32 holds every one of these exactly, TF32 (10 mantissa bits)
/// rounds all of them to 1, so TF32 products miss by about 5·10⁻⁴ of their size.
fn near_one(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| 1.0 + ((i * 7 + seed * 13) % 997) as f32 * (0.5f32).powi(21)).collect()
}

fn product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            for j in 0..n {
                out[i * n + j] += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
            }
        }
    }
    out
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| a[(i % rows) * cols + i / rows]).collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Every entry within 2·10⁻⁵ of the f64 value, relative: f32 accumulation over these sums of
/// positive terms stays near 10⁻⁶, TF32 misses by 5·10⁻⁴.
fn check(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(*g) - w).abs() / w.abs();
        assert!(err <= 2e-5, "{name}[{i}]: {g} against {w} (relative error {err:.1e}, TF32 rounding is about 5e-4)");
    }
}

#[test]
fn f32_products_and_their_gradients_are_exact_to_f32_rounding() {
    let device = test_device().autodiff();
    let (m, k, n) = (33, 256, 40);
    let (a, b, g) = (near_one(m * k, 1), near_one(k * n, 2), near_one(m * n, 3));
    let before = odpo_kernels::exact_matmul_calls();
    let lhs = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device).require_grad();
    let rhs = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device).require_grad();
    let y = odpo_kernels::matmul(lhs.clone(), rhs.clone());
    let grads = (y.clone() * Tensor::<2>::from_data(TensorData::new(g.clone(), [m, n]), &device)).sum().backward();
    check("lhs·rhs", &values(y.inner()), &product(&a, &b, m, k, n));
    check("d lhs = g·rhsᵀ", &values(lhs.grad(&grads).unwrap()), &product(&g, &transpose(&b, k, n), m, n, k));
    check("d rhs = lhsᵀ·g", &values(rhs.grad(&grads).unwrap()), &product(&transpose(&a, m, k), &g, k, m, n));

    // The linear layers' form: `[2, 3, in]` rows through an `[in, out]` weight and a bias.
    let x = near_one(6 * k, 4);
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25).collect();
    let out = odpo_kernels::linear(
        Tensor::<3>::from_data(TensorData::new(x.clone(), [2, 3, k]), &device),
        Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device),
        Some(Tensor::<1>::from_data(TensorData::new(bias.clone(), [n]), &device)),
    );
    assert_eq!(out.dims(), [2, 3, n]);
    let want: Vec<f64> = product(&x, &b, 6, k, n).iter().enumerate().map(|(i, v)| v + f64::from(bias[i % n])).collect();
    check("linear", &values(out), &want);
    eprintln!("{device:?}: {} products bypassed a TF32 matmul", odpo_kernels::exact_matmul_calls() - before);
}

/// The tied LM head's form, `lhs · rhsᵀ` (`odpo_kernels::matmul_nt`), whose backward pass writes
/// `rhs`'s gradient as `gᵀ · lhs` in `rhs`'s own layout: the product and both gradients.
#[test]
fn the_tied_head_form_and_its_gradients_are_exact_to_f32_rounding() {
    let device = test_device().autodiff();
    let (m, k, n) = (33, 256, 40);
    let (a, e, g) = (near_one(m * k, 7), near_one(n * k, 8), near_one(m * n, 9));
    let lhs = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device).require_grad();
    let rhs = Tensor::<2>::from_data(TensorData::new(e.clone(), [n, k]), &device).require_grad();
    let y = odpo_kernels::matmul_nt(lhs.clone(), rhs.clone());
    let grads = (y.clone() * Tensor::<2>::from_data(TensorData::new(g.clone(), [m, n]), &device)).sum().backward();
    check("lhs·rhsᵀ", &values(y.inner()), &product(&a, &transpose(&e, n, k), m, k, n));
    check("d lhs = g·rhs", &values(lhs.grad(&grads).unwrap()), &product(&g, &e, m, n, k));
    check("d rhs = gᵀ·lhs", &values(rhs.grad(&grads).unwrap()), &product(&transpose(&g, m, n), &a, n, m, k));
}

/// Operands that are views of other tensors (narrowed, so starting inside their buffer with a row
/// stride wider than a row, and transposed), in a product large enough that the CPU splits it
/// over threads: the f64 product of the values the views show.
#[test]
fn products_of_views_are_exact_to_f32_rounding() {
    let device = test_device();
    let (m, k, n) = (200, 210, 190);
    let base = near_one(230 * 250, 5);
    let lhs = Tensor::<2>::from_data(TensorData::new(base, [230, 250]), &device).narrow(0, 7, m).narrow(1, 11, k);
    let rhs = Tensor::<2>::from_data(TensorData::new(near_one(n * k, 6), [n, k]), &device).transpose();
    let (a, b) = (values(lhs.clone()), values(rhs.clone()));
    check("view·viewᵀ", &values(odpo_kernels::matmul(lhs, rhs)), &product(&a, &b, m, k, n));
}
