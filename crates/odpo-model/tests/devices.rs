//! Device specs that name CUDA hardware the machine lacks are refused with an error that says what
//! is missing, rather than a panic inside burn's CUDA runtime or libtorch. In builds with `cuda` or
//! `tch` (the conformance binary has both); elsewhere the backend's missing feature is named.
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
