//! Device specs that name hardware the machine lacks (a CUDA device, a wgpu adapter) are refused
//! with an error that says what is missing, rather than a panic inside burn's runtimes or libtorch.
//! In builds with `cuda`, `tch`, `wgpu` or `vulkan` (the conformance binary has several); elsewhere
//! the backend's missing feature is named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use odpo_model::backend::{Backend, device};

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
