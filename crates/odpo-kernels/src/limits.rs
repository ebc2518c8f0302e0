//! What one buffer of a device can hold.

use burn::backend::DispatchDevice;
use burn::tensor::Device;

/// The most bytes the backend allocates in one buffer on `device`, where that limit sits below the
/// device's memory: cubecl's largest page (on wgpu, the smaller of the adapter's buffer and
/// storage-binding limits: 128 MiB on Mesa's lavapipe; on CUDA, a quarter of the memory). A larger
/// tensor fails there with cubecl's `BufferTooBig` however much memory is free, so callers that
/// make one vocabulary-wide tensor per token split it (`odpo_model::logprobs`). `None` on flex and
/// libtorch, which allocate as much as memory holds.
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    dispatch_limit(device.as_dispatch())
}

fn dispatch_limit(device: &DispatchDevice) -> Option<u64> {
    match device {
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(d) => Some(d.client().properties().memory.max_page_size),
        DispatchDevice::Autodiff(d) => dispatch_limit(&d.clone().inner()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
