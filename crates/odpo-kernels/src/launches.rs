//! Which kernels a piece of work launches on the cubecl backends, how often, and (on request) how
//! long each ran on the device.
//!
//! A step that waits on the host issuing kernels (a small model on a large GPU) costs about its
//! launches times the host's cost per launch, so the launch count is the figure to bring down, and
//! it is the same on every device the backend compiles for: counted on Mesa's lavapipe or on the
//! stand-in CUDA driver of `scripts/cuda-ptx-check.sh`, it is what an H200 would launch. Built on
//! cubecl's launch observer, which sees every launch of the process on the thread that issues it.

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
/// whose launches are not counted).
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

#[cfg(feature = "cube")]
mod cube {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, PoisonError};

    use burn_cubecl::cubecl::config::{TypeNameFormatLevel, type_name_format};
    use burn_cubecl::cubecl::logging::{Duration, LaunchObservation, LaunchObserver, TimingMethod, TimingRequest};

    use super::KernelLaunches;

    struct Tally {
        timed: bool,
        /// The thread whose launches count.
        thread: std::thread::ThreadId,
        kernels: Mutex<HashMap<&'static str, (u64, f64)>>,
    }

    impl Tally {
        fn ours(&self) -> bool {
            std::thread::current().id() == self.thread
        }
    }

    impl LaunchObserver for Tally {
        fn launched(&self, kernel: &'static str) {
            if !self.ours() {
                return;
            }
            self.kernels.lock().unwrap_or_else(PoisonError::into_inner).entry(kernel).or_default().0 += 1;
        }

        /// Asked on the launching thread, at the launch and again when its measurement arrives:
        /// other threads' kernels are neither timed nor made to wait.
        fn timing(&self) -> TimingRequest {
            if self.timed && self.ours() { TimingRequest::Resolved } else { TimingRequest::None }
        }

        fn timed(&self, kernel: &'static str, duration: Duration, _method: TimingMethod) {
            if !self.ours() {
                return;
            }
            self.kernels.lock().unwrap_or_else(PoisonError::into_inner).entry(kernel).or_default().1 += duration.as_secs_f64();
        }
    }

    pub(super) fn census<R>(timed: bool, f: impl FnOnce() -> R) -> (R, Vec<KernelLaunches>) {
        let tally = Arc::new(Tally { timed, thread: std::thread::current().id(), kernels: Mutex::default() });
        let out = {
            let _watching = LaunchObservation::new(tally.clone());
            f()
        };
        let kernels = std::mem::take(&mut *tally.kernels.lock().unwrap_or_else(PoisonError::into_inner));
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
