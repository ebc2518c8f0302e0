//! Device specs that name hardware the machine lacks (a CUDA device, a wgpu adapter) are refused
//! with an error that says what is missing, rather than a panic inside burn's runtimes or libtorch;
//! a tensor larger than the device holds is an out-of-memory error that names its size.
//! In builds with `cuda`, `tch`, `wgpu` or `vulkan` (the conformance binary has several); elsewhere
//! the backend's missing feature is named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::Tensor;
use odpo_model::backend::{Backend, device};
use odpo_model::out_of_memory::{OutOfMemory, catch};

#[test]
fn cuda_devices_the_machine_lacks_are_refused_with_the_reason() {
    for (backend, spec) in [(Backend::Cuda, "cuda:4096"), (Backend::TchCuda, "tch-cuda:4096")] {
        let err = device(spec).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{spec} resolved"));
        if !backend.compiled() {
            assert!(err.contains("not compiled into this build"), "{err}");
            continue;
        }
        assert!(err.starts_with(&format!("device `{spec}`: ")), "{err}");
        assert!(err.contains("NVIDIA driver") || err.contains("libtorch sees"), "{err}");
        // Device 0 resolves where there is a GPU and is refused the same way where there is none.
        if let Err(e) = device(backend.name()) {
            let e = e.to_string();
            assert!(e.contains("NVIDIA driver") || e.contains("libtorch sees no CUDA device"), "{e}");
        }
    }
}

#[test]
fn wgpu_adapters_the_machine_lacks_are_refused_with_the_reason() {
    for backend in [Backend::Wgpu, Backend::Vulkan, Backend::Metal] {
        let spec = format!("{}:discrete:4096", backend.name());
        let err = device(&spec).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{spec} resolved"));
        if !backend.compiled() {
            assert!(err.contains("not compiled into this build"), "{err}");
            continue;
        }
        assert!(err.starts_with(&format!("device `{spec}`: ")) && err.contains("no matching"), "{err}");
        // The default adapter, where the machine has one, comes up once and is the same device
        // however often it is asked for.
        if let Ok(first) = device(backend.name()) {
            let x = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &first);
            assert_eq!(x.sum().into_scalar::<f32>(), 6.0);
            assert_eq!(device(backend.name()).ok(), Some(first));
        }
    }
}

#[test]
fn a_tensor_larger_than_the_device_is_an_out_of_memory_error() {
    // burn's CPU backend allocates through Rust's allocator, which ends the process on a failure.
    let spec = std::env::var("ODPO_TEST_DEVICE").unwrap_or_default();
    if spec.is_empty() || spec.starts_with("flex") {
        eprintln!("skipped on flex: a failed CPU allocation ends the process (the test runs on the other backends, `cargo xtask conformance`)");
        return;
    }
    let device = common::test_device();
    // 2^46 f32 = 256 TiB: more than any device, and than a 47-bit address space, holds.
    let bytes = 1u64 << 48;
    let oom = match catch(|| Tensor::<2>::zeros([1 << 23, 1 << 23], &device).try_into_data()) {
        Err(oom) => oom,                                                                        // libtorch: a panic
        Ok(Err(e)) => OutOfMemory::find(&format!("{e:?}")).unwrap_or_else(|| panic!("{spec}: not an allocation failure: {e:?}")), // cubecl: read back
        Ok(Ok(_)) => panic!("{spec}: 256 TiB allocated"),
    };
    eprintln!("{spec}: {oom}");
    // Where the backend gives the size, it is the tensor's (c10 prints it to two decimals).
    if let Some(b) = oom.bytes {
        assert!((b as f64 / bytes as f64 - 1.0).abs() < 0.01, "{spec}: {b} bytes");
    }
    // The failure is the tensor's alone: the device goes on computing.
    let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
    assert_eq!(x.sum().into_scalar::<f32>(), 6.0);
}
