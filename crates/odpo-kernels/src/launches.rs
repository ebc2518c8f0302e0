//! Which kernels a piece of work launches on the cubecl backends, how often, and (on request) how
//! long each ran on the device.
//!
//! A step that waits on the host issuing kernels (a small model on a large GPU) costs about its
//! launches times the host's cost per launch, so the launch count is the figure to bring down, and
//! it is the same on every device the backend compiles for: counted on Mesa's lavapipe or on the
//! stand-in CUDA driver of `scripts/cuda-ptx-check.sh`, it is what an H200 would launch. Built on
//! cubecl's launch observer, which sees every launch of the process on the thread that issues it.
//! On libtorch's CUDA the same list comes from CUPTI's activity records (`cupti.rs`), as
//! torch.profiler takes PyTorch's.

use burn::backend::DispatchDevice;
use burn::tensor::Device;

/// Whether `device` runs on a cubecl backend (wgpu, Vulkan, Metal, CUDA), whose launches a
/// [`kernel_census`] sees. flex and libtorch launch nothing it can see.
pub fn launches_kernels(device: &Device) -> bool {
    fn cube(device: &DispatchDevice) -> bool {
        match device {
            #[cfg(feature = "cube")]
            DispatchDevice::Cube(_) => true,
            DispatchDevice::Autodiff(d) => cube(&d.clone().inner()),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    cube(device.as_dispatch())
}

/// One kernel's share of a census.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelLaunches {
    /// The kernel as cubecl names it (its type, generics shortened).
    pub kernel: String,
    /// Launches.
    pub launches: u64,
    /// Seconds on the device, summed over the launches, when the census was timed. Each launch is
    /// timed on its own, the host waiting for it, so the sum is the kernels' own cost and not the
    /// time the work takes when they overlap.
    pub device_seconds: Option<f64>,
}

/// Runs `f` and returns what it launched on the cubecl backends, most launched first (most device
/// time first when `timed`), or `None` when this build has no cubecl backend. Only the launches
/// this thread issues count: cubecl's observer sees the whole process, where other threads may be
/// working (tests run side by side; a step over several devices runs each on a thread of its own,
/// whose launches are not counted). A census inside another takes the launches of its own span.
pub fn kernel_census<R>(timed: bool, f: impl FnOnce() -> R) -> (R, Option<Vec<KernelLaunches>>) {
    #[cfg(feature = "cube")]
    {
        let (out, census) = cube::census(timed, f);
        (out, Some(census))
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = timed;
        (f(), None)
    }
}

/// Whether `device` is a libtorch CUDA device, whose kernels [`cuda_activity_census`] sees.
// burn-tch's device is marked deprecated in burn 0.22.1; it is the libtorch backend's.
#[allow(deprecated)]
pub fn traces_cuda_activity(device: &Device) -> bool {
    fn libtorch_cuda(device: &DispatchDevice) -> bool {
        match device {
            #[cfg(all(feature = "tch", target_os = "linux"))]
            DispatchDevice::LibTorch(burn::backend::libtorch::LibTorchDevice::Cuda(_)) => true,
            DispatchDevice::Autodiff(d) => libtorch_cuda(&d.clone().inner()),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    libtorch_cuda(device.as_dispatch())
}

/// Runs `f` and returns the kernels, copies and fills that ran on libtorch's CUDA devices
/// meanwhile, each with its device time, most device time first: CUPTI's activity records, which
/// torch.profiler reads for PyTorch's census, so the kernels are named alike (demangled) on both
/// sides. The records are the whole process's, whichever thread issued the work, so the process
/// takes one such census at a time (another meanwhile is an error); CUPTI times each kernel where
/// it ran, without serialising them. `f` should end with its work done on the device:
/// the census waits for every CUDA device after it. Errs when CUPTI cannot be loaded (it is
/// `libcupti.so.13` on the library path: PyTorch's CUDA wheels put it in
/// `site-packages/nvidia/cu13/lib`) or refuses the records, and in a build without libtorch on
/// Linux, where no device is one [`traces_cuda_activity`] names.
pub fn cuda_activity_census<R>(f: impl FnOnce() -> R) -> Result<(R, Vec<KernelLaunches>), String> {
    #[cfg(all(feature = "tch", target_os = "linux"))]
    return super::cupti::census(|| {
        let out = f();
        for i in 0..tch::Cuda::device_count() {
            tch::Cuda::synchronize(i);
        }
        out
    });
    #[cfg(not(all(feature = "tch", target_os = "linux")))]
    {
        let _ = f;
        Err("this build has no libtorch on Linux, whose CUDA the census reads through CUPTI".into())
    }
}

#[cfg(feature = "cube")]
mod cube {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Once;

    use burn_cubecl::cubecl::config::{TypeNameFormatLevel, type_name_format};
    use burn_cubecl::cubecl::logging::{Duration, LaunchObservation, LaunchObserver, TimingMethod, TimingRequest};

    use super::KernelLaunches;

    /// A census in progress on one thread.
    #[derive(Default)]
    struct Tally {
        timed: bool,
        kernels: HashMap<&'static str, (u64, f64)>,
    }

    thread_local! {
        /// The census this thread is taking, if any.
        static CURRENT: RefCell<Option<Tally>> = const { RefCell::new(None) };
    }

    /// The process's one observer, installed at the first census and kept: cubecl has one slot,
    /// so censuses on several threads at once (tests side by side) each installing their own
    /// would displace one another. It hands each launch to the census of the thread that issued
    /// it, and times only those.
    struct Router;

    impl LaunchObserver for Router {
        fn launched(&self, kernel: &'static str) {
            CURRENT.with(|c| {
                if let Some(t) = c.borrow_mut().as_mut() {
                    t.kernels.entry(kernel).or_default().0 += 1;
                }
            });
        }

        /// Asked on the launching thread, at the launch and again when its measurement arrives
        /// (within the same launch call): other threads' kernels are neither timed nor made to wait.
        fn timing(&self) -> TimingRequest {
            CURRENT.with(|c| if c.borrow().as_ref().is_some_and(|t| t.timed) { TimingRequest::Resolved } else { TimingRequest::None })
        }

        fn timed(&self, kernel: &'static str, duration: Duration, _method: TimingMethod) {
            CURRENT.with(|c| {
                if let Some(t) = c.borrow_mut().as_mut() {
                    t.kernels.entry(kernel).or_default().1 += duration.as_secs_f64();
                }
            });
        }
    }

    /// Puts back the census this thread was taking before (a census inside another takes the
    /// launches of its own span), also when `f` panics.
    struct Restore(Option<Tally>);

    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = outer);
        }
    }

    pub(super) fn census<R>(timed: bool, f: impl FnOnce() -> R) -> (R, Vec<KernelLaunches>) {
        static INSTALL: Once = Once::new();
        // Installed for the rest of the process: with no census under way a launch costs the
        // router a thread-local read.
        INSTALL.call_once(|| std::mem::forget(LaunchObservation::new(std::sync::Arc::new(Router))));
        let restore = Restore(CURRENT.with(|c| c.replace(Some(Tally { timed, ..Tally::default() }))));
        let out = f();
        let tally = CURRENT.with(|c| c.take()).unwrap_or_default();
        drop(restore);
        let kernels = tally.kernels;
        // Kernels of one type with other generics are one line: what a reader can act on is the
        // operation, and the full names run to hundreds of characters.
        let mut merged: HashMap<String, (u64, f64)> = HashMap::new();
        for (name, (n, secs)) in kernels {
            let e = merged.entry(type_name_format(name, TypeNameFormatLevel::Short)).or_default();
            e.0 += n;
            e.1 += secs;
        }
        let mut list: Vec<KernelLaunches> = merged
            .into_iter()
            .map(|(kernel, (launches, secs))| KernelLaunches { kernel, launches, device_seconds: timed.then_some(secs) })
            .collect();
        list.sort_by(|a, b| {
            let key = |k: &KernelLaunches| (k.device_seconds.unwrap_or(0.0), k.launches);
            key(b).0.total_cmp(&key(a).0).then(key(b).1.cmp(&key(a).1)).then(a.kernel.cmp(&b.kernel))
        });
        (out, list)
    }
}
