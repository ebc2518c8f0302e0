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

/// Every matmul routine (`odpo_kernels::MATMUL_ROUTINES`) on bf16 operands (f16 where the device
/// has no bf16) in the layouts a step multiplies (`x·W`, `dy·Wᵀ`, `xᵀ·dy`, batched heads) and
/// through the backward pass: the f64 product within the half type's rounding of the output. The
/// operands are multiples of 1/8 below 2, exact in both types, so the products are exact before the
/// output is rounded. On the cubecl backends each routine multiplies what it takes and leaves the
/// rest to burn's routine (counted and printed); elsewhere the routine changes nothing.
#[test]
fn every_matmul_routine_multiplies_half_operands_to_their_rounding() {
    use burn::tensor::DType;
    let device = test_device().autodiff();
    let Some(dtype) = [DType::BF16, DType::F16].into_iter().find(|d| device.supports_dtype(*d)) else {
        eprintln!("{device:?} has neither bf16 nor f16: skipped");
        return;
    };
    let eighths = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 5 + seed * 11) % 31) as f32 / 8.0 - 1.875).collect() };
    // Within the output's rounding (bf16 keeps 8 significant bits) of the largest entry. Every
    // routine runs before the test fails, so that one run names each routine that is wrong.
    let failures = std::cell::RefCell::new(Vec::new());
    let near = |name: &str, got: &[f32], want: &[f64]| {
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        if let Some((i, (g, w))) = got.iter().zip(want).enumerate().find(|(_, (g, w))| (f64::from(**g) - **w).abs() > scale / 128.0 || !g.is_finite()) {
            failures.borrow_mut().push(format!("{name}[{i}]: {g} against {w} (largest entry {scale})"));
        }
    };
    let half = |v: &[f32], shape: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &device).cast(dtype);
    let (m, k, n) = (72, 136, 56);
    let (a, b, g) = (eighths(m * k, 1), eighths(k * n, 2), eighths(m * n, 3));
    for routine in odpo_kernels::MatmulRoutine::all() {
        let before = odpo_kernels::matmul_routine_calls();
        odpo_kernels::with_matmul_routine(routine, || {
            let name = |form: &str| format!("{routine}: {form}");
            let lhs = half(&a, [m, k]).require_grad();
            let rhs = half(&b, [k, n]).require_grad();
            let y = odpo_kernels::matmul(lhs.clone(), rhs.clone());
            let grads = (y.clone() * half(&g, [m, n])).sum().backward();
            near(&name("x·W"), &values(y.inner()), &product(&a, &b, m, k, n));
            near(&name("dy·Wᵀ"), &values(lhs.grad(&grads).unwrap()), &product(&g, &transpose(&b, k, n), m, n, k));
            near(&name("xᵀ·dy"), &values(rhs.grad(&grads).unwrap()), &product(&transpose(&a, m, k), &g, k, m, n));
            // Two batches of heads: `[2, m, k]` by `[2, k, n]`, the second operand a transposed view.
            let (a2, b2) = (eighths(2 * m * k, 4), eighths(2 * n * k, 5));
            let lhs = Tensor::<3>::from_data(TensorData::new(a2.clone(), [2, m, k]), &device).cast(dtype);
            let rhs = Tensor::<3>::from_data(TensorData::new(b2.clone(), [2, n, k]), &device).cast(dtype).swap_dims(1, 2);
            let got = values(odpo_kernels::matmul(lhs, rhs));
            for h in 0..2 {
                let want = product(&a2[h * m * k..(h + 1) * m * k], &transpose(&b2[h * n * k..(h + 1) * n * k], n, k), m, k, n);
                near(&name(&format!("head {h} q·kᵀ")), &got[h * m * n..(h + 1) * m * n], &want);
            }
        });
        let after = odpo_kernels::matmul_routine_calls();
        eprintln!("{device:?} {dtype:?} {routine}: ran {} products, refused {}", after.ran - before.ran, after.refused - before.refused);
    }
    let failures = failures.into_inner();
    assert!(failures.is_empty(), "{} products off:\n{}", failures.len(), failures.join("\n"));
}
