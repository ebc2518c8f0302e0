//! The one place that names backends: a `--backend` name to a burn [`Device`].
//!
//! Everything else in the project takes a `&Device`. Which backends exist in a build is decided
//! by Cargo features (`flex`, `wgpu`, `vulkan`, `metal`, `cuda`, `tch`); naming one that was not
//! compiled in is an error that says which feature to enable.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A backend a user can ask for by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// burn's pure-Rust CPU backend (the default).
    Flex,
    /// wgpu on the best adapter it finds (Vulkan, Metal, DX12).
    Wgpu,
    /// wgpu restricted to Vulkan (Mesa's llvmpipe on a machine without a GPU).
    Vulkan,
    /// wgpu restricted to Metal (macOS).
    Metal,
    /// burn's native CUDA backend, device 0.
    Cuda,
    /// libtorch on the CPU.
    Tch,
    /// libtorch on CUDA device 0.
    TchCuda,
}

/// All backend names, in the order `--help` lists them.
pub const BACKEND_NAMES: &[&str] = &["flex", "wgpu", "vulkan", "metal", "cuda", "tch", "tch-cuda"];

/// The backend asked for is unknown or not compiled into this build.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// Not a backend name at all.
    #[error("unknown backend `{0}`; expected one of: flex, wgpu, vulkan, metal, cuda, tch, tch-cuda")]
    Unknown(String),
    /// A device spec (`backend:which`) that does not name a device of that backend.
    #[error("device `{spec}`: {reason}")]
    BadDevice {
        /// The spec as written.
        spec: String,
        /// What was expected.
        reason: String,
    },
    /// A known backend whose Cargo feature is off in this build.
    #[error("backend `{name}` is not compiled into this build; rebuild with `--features {feature}`")]
    NotCompiled {
        /// The backend name.
        name: &'static str,
        /// The Cargo feature that enables it.
        feature: &'static str,
    },
}

impl Backend {
    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Vulkan => "vulkan",
            Self::Metal => "metal",
            Self::Cuda => "cuda",
            Self::Tch => "tch",
            Self::TchCuda => "tch-cuda",
        }
    }

    /// Whether the backend runs on a GPU (wgpu's adapters, CUDA, libtorch's CUDA) rather than the
    /// CPU (flex, libtorch's CPU).
    pub fn is_gpu(self) -> bool {
        !matches!(self, Self::Flex | Self::Tch)
    }

    /// The Cargo feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Vulkan => "vulkan",
            Self::Metal => "metal",
            Self::Cuda => "cuda",
            Self::Tch | Self::TchCuda => "tch",
        }
    }

    /// Whether this build has the backend's feature.
    pub fn compiled(self) -> bool {
        match self {
            Self::Flex => cfg!(feature = "flex"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Vulkan => cfg!(feature = "vulkan"),
            Self::Metal => cfg!(feature = "metal"),
            Self::Cuda => cfg!(feature = "cuda"),
            Self::Tch | Self::TchCuda => cfg!(feature = "tch"),
        }
    }

    /// The backends compiled into this build.
    pub fn available() -> Vec<Backend> {
        BACKEND_NAMES.iter().filter_map(|n| n.parse::<Backend>().ok()).filter(|b| b.compiled()).collect()
    }

    /// The burn device for this backend (without autodiff; call `.autodiff()` to train).
    #[allow(unreachable_code, deprecated)]
    pub fn device(self) -> Result<Device, BackendError> {
        let missing = Err(BackendError::NotCompiled { name: self.name(), feature: self.feature() });
        match self {
            Self::Flex => {
                #[cfg(feature = "flex")]
                return Ok(Device::flex());
                missing
            }
            Self::Wgpu | Self::Vulkan | Self::Metal if self.compiled() => wgpu_device(self, WgpuKind::Default, self.name()),
            Self::Wgpu | Self::Vulkan | Self::Metal => missing,
            Self::Cuda => {
                #[cfg(feature = "cuda")]
                return cuda_device(self, 0);
                missing
            }
            Self::Tch => {
                #[cfg(feature = "tch")]
                return Ok(Device::libtorch());
                missing
            }
            Self::TchCuda => {
                #[cfg(feature = "tch")]
                return cuda_device(self, 0);
                missing
            }
        }
    }
}

impl FromStr for Backend {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "flex" => Self::Flex,
            "wgpu" => Self::Wgpu,
            "vulkan" => Self::Vulkan,
            "metal" => Self::Metal,
            "cuda" => Self::Cuda,
            "tch" => Self::Tch,
            "tch-cuda" => Self::TchCuda,
            other => return Err(BackendError::Unknown(other.to_string())),
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `device` keeps its tensors in the host's memory (flex, libtorch's CPU), so that a model
/// and its training state there take the machine's memory; a GPU's memory is its own.
// burn-tch's device is marked deprecated in burn 0.22.1; it is the libtorch backend's.
#[allow(deprecated)]
pub fn in_host_memory(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    fn host(device: &DispatchDevice) -> bool {
        match device {
            #[cfg(feature = "flex")]
            DispatchDevice::Flex(_) => true,
            #[cfg(feature = "tch")]
            DispatchDevice::LibTorch(burn::backend::libtorch::LibTorchDevice::Cpu) => true,
            DispatchDevice::Autodiff(d) => host(&d.clone().inner()),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    host(device.as_dispatch())
}

/// Parses a device spec and returns the device: the function the command line calls.
///
/// A spec is a backend name (its default device, see [`Backend::device`]) or `backend:which`:
/// `cuda:1`, `tch-cuda:1` (the CUDA device of that index), `wgpu:1` / `vulkan:1` / `metal:1` (the
/// discrete GPU of that index), `wgpu:integrated:0`, `wgpu:cpu` (a software adapter such as Mesa's
/// llvmpipe). `flex` and `tch` have one device each (`flex:0` is accepted).
pub fn device(spec: &str) -> Result<Device, BackendError> {
    let (name, which) = match spec.split_once(':') {
        Some((name, which)) => (name, Some(which)),
        None => (spec, None),
    };
    let backend = name.parse::<Backend>()?;
    let Some(which) = which else {
        return backend.device();
    };
    let bad = |reason: &str| BackendError::BadDevice { spec: spec.to_string(), reason: reason.to_string() };
    let index = |s: &str| s.parse::<usize>().map_err(|_| bad("expected a device index after the colon (e.g. `cuda:1`)"));
    match backend {
        Backend::Flex | Backend::Tch => match which {
            "0" => backend.device(),
            _ => Err(bad(&format!("`{name}` has one device; write `{name}` or `{name}:0`"))),
        },
        Backend::Cuda | Backend::TchCuda => {
            let i = index(which)?;
            if !backend.compiled() {
                return backend.device();
            }
            cuda_device(backend, i)
        }
        Backend::Wgpu | Backend::Vulkan | Backend::Metal => {
            let kind = match which.split_once(':') {
                None if which == "cpu" => WgpuKind::Cpu,
                None => WgpuKind::Discrete(index(which)?),
                Some(("discrete", i)) => WgpuKind::Discrete(index(i)?),
                Some(("integrated", i)) => WgpuKind::Integrated(index(i)?),
                Some(("virtual", i)) => WgpuKind::Virtual(index(i)?),
                Some(_) => return Err(bad("expected `N`, `discrete:N`, `integrated:N`, `virtual:N` or `cpu` after the backend name")),
            };
            if !backend.compiled() {
                return backend.device();
            }
            wgpu_device(backend, kind, spec)
        }
    }
}

/// Which wgpu adapter a `wgpu:...` spec names.
#[allow(dead_code)]
enum WgpuKind {
    /// wgpu's choice (a high-performance GPU first).
    Default,
    Discrete(usize),
    Integrated(usize),
    Virtual(usize),
    Cpu,
}

/// CUDA device `index` of `cuda` or `tch-cuda`, once the driver (or libtorch) says it exists: burn
/// panics on its first use of a device the machine does not have.
#[allow(unused_variables, unreachable_code)]
fn cuda_device(backend: Backend, index: usize) -> Result<Device, BackendError> {
    let spec = if index == 0 { backend.name().to_string() } else { format!("{}:{index}", backend.name()) };
    let absent = |reason: String| BackendError::BadDevice { spec: spec.clone(), reason };
    #[cfg(feature = "cuda")]
    if backend == Backend::Cuda {
        let count = cuda_driver_devices().map_err(absent)?;
        if index >= count {
            return Err(absent(format!("the NVIDIA driver sees {count} CUDA device(s) (indices from 0)")));
        }
        #[cfg(feature = "cuda-nvrtc")]
        nvrtc().map_err(absent)?;
        #[cfg(not(feature = "cuda-nvrtc"))]
        {
            let cuda_path = std::env::var_os("CUDA_PATH").map(std::path::PathBuf::from);
            libdevice(cuda_path, &CUDA_ROOTS.map(std::path::Path::new)).map_err(absent)?;
        }
        return Ok(Device::cuda(index));
    }
    #[cfg(feature = "tch")]
    if backend == Backend::TchCuda {
        let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        if count == 0 {
            return Err(absent("libtorch sees no CUDA device (no NVIDIA driver or GPU here, or a CPU-only libtorch)".into()));
        }
        if index >= count {
            return Err(absent(format!("libtorch sees {count} CUDA device(s) (indices from 0)")));
        }
        #[allow(deprecated)]
        return Ok(Device::libtorch_cuda(index));
    }
    backend.device()
}

/// How many CUDA devices the NVIDIA driver sees, or why there is no driver to ask.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn cuda_driver_devices() -> Result<usize, String> {
    // SAFETY: only tries to load the driver library under its usual names, as burn's CUDA runtime
    // does before its first call (a missing library would be a panic inside that runtime).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver: libcuda.so.1 is not on the library path (install the driver, or add its folder to LD_LIBRARY_PATH)".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("the NVIDIA driver did not start: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| format!("the NVIDIA driver could not count its devices: {e:?}"))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// The CUDA toolkit folders cubecl's CUDA compiler looks in for libdevice when `CUDA_PATH` is unset.
#[cfg_attr(any(not(feature = "cuda"), feature = "cuda-nvrtc"), allow(dead_code))]
const CUDA_ROOTS: [&str; 4] = ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda", "/usr"];

/// libdevice (`nvvm/libdevice/libdevice.10.bc`) where cubecl's CUDA compiler will look for it: under
/// `cuda_path` when set, else under the first of `roots` that has `nvvm/libdevice`. Every training
/// step's kernels call math functions NVPTX has no instruction for (`exp`, `log`), which the compiler
/// links from it; without it the first such kernel fails inside the runtime.
#[cfg_attr(any(not(feature = "cuda"), feature = "cuda-nvrtc"), allow(dead_code))]
fn libdevice(cuda_path: Option<std::path::PathBuf>, roots: &[&std::path::Path]) -> Result<std::path::PathBuf, String> {
    let file = |root: &std::path::Path| root.join("nvvm/libdevice/libdevice.10.bc");
    let (found, looked) = match &cuda_path {
        Some(root) => (file(root).is_file().then(|| file(root)), format!("{} (CUDA_PATH)", file(root).display())),
        None => (
            roots.iter().find(|r| r.join("nvvm/libdevice").is_dir()).map(|r| file(r)).filter(|f| f.is_file()),
            format!("nvvm/libdevice/libdevice.10.bc under CUDA_PATH (unset), {}", roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")),
        ),
    };
    found.ok_or_else(|| {
        format!(
            "no libdevice at {looked}: the CUDA kernels' math functions (exp, log, tanh) are linked from it at run time. \
             Set CUDA_PATH to a CUDA toolkit, or to a folder holding nvvm/libdevice/libdevice.10.bc \
             (the triton wheel carries one: triton/backends/nvidia/lib/libdevice.10.bc)"
        )
    })
}

/// The headers the CUDA C++ of cubecl's kernels includes, under `include/` of a toolkit: the half
/// types, `wmma` (`mma.h` includes `crt/mma.h`) and, from CCCL, the `cuda::barrier` of the TMA and
/// warp-specialised routines. PyPI's nvidia-cuda-runtime, nvidia-cuda-crt and nvidia-cuda-cccl
/// install them in this layout (`site-packages/nvidia/cu13`).
#[cfg_attr(not(feature = "cuda-nvrtc"), allow(dead_code))]
const NVRTC_HEADERS: [&str; 3] = ["cuda_bf16.h", "crt/mma.h", "cccl/cuda/barrier"];

/// The include folder of `cuda_path` (where cubecl-cuda looks: `CUDA_PATH`, else /usr/local/cuda,
/// /opt/cuda) when it holds [`NVRTC_HEADERS`], else what is missing and how to get it.
#[cfg_attr(not(feature = "cuda-nvrtc"), allow(dead_code))]
fn nvrtc_headers(cuda_path: Option<std::path::PathBuf>) -> Result<std::path::PathBuf, String> {
    const HOW: &str = "set CUDA_PATH to a CUDA toolkit, or to a folder whose include/ holds them \
                       (pip install nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl: CUDA_PATH=site-packages/nvidia/cu13)";
    let Some(root) = cuda_path else {
        return Err(format!("no CUDA headers: CUDA_PATH is unset and there is no /usr/local/cuda or /opt/cuda; this build compiles its kernels with NVRTC, which needs {}; {HOW}", NVRTC_HEADERS.join(", ")));
    };
    let include = root.join("include");
    let missing: Vec<&str> = NVRTC_HEADERS.iter().copied().filter(|h| !include.join(h).is_file()).collect();
    if missing.is_empty() {
        Ok(include)
    } else {
        Err(format!("{} lacks {}, which the kernels NVRTC compiles include; {HOW}", include.display(), missing.join(", ")))
    }
}

/// With `cuda-nvrtc`, that NVRTC and [`NVRTC_HEADERS`] are there, so that a machine without them
/// hears so here rather than from a panic in the runtime when the first kernel compiles.
#[cfg(feature = "cuda-nvrtc")]
#[allow(unsafe_code)]
fn nvrtc() -> Result<(), String> {
    // SAFETY: loads and unloads the library; cudarc loads it again when it compiles.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("this build compiles its CUDA kernels with NVRTC, and libnvrtc.so is not on the library path: add the folder of \
                    libnvrtc.so.13 and libnvrtc-builtins.so.13.0 to LD_LIBRARY_PATH (pip install nvidia-cuda-nvrtc: site-packages/nvidia/cu13/lib)"
            .into());
    }
    nvrtc_headers(cubecl_cuda::install::cuda_path()).map(|_| ())
}

/// The wgpu device of `backend` on adapter `kind`, its runtime brought up here rather than by the
/// first tensor made on it: burn's lazy start panics when the machine has no such adapter (no
/// Vulkan driver, an index past the last GPU), and here that is an error that says so.
#[allow(unused_variables, unreachable_code)]
fn wgpu_device(backend: Backend, kind: WgpuKind, spec: &str) -> Result<Device, BackendError> {
    #[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal"))]
    {
        use burn::tensor::DeviceKind;
        use burn::tensor::wgpu::{WgpuBackend, WgpuInitError};
        let kind = match kind {
            WgpuKind::Default => DeviceKind::DefaultDevice,
            WgpuKind::Discrete(i) => DeviceKind::DiscreteGpu(i),
            WgpuKind::Integrated(i) => DeviceKind::IntegratedGpu(i),
            WgpuKind::Virtual(i) => DeviceKind::VirtualGpu(i),
            WgpuKind::Cpu => DeviceKind::Cpu,
        };
        let (api, lazy, hint) = match backend {
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => (WgpuBackend::Auto, Device::wgpu(kind.clone()), "wgpu found no matching adapter on any graphics API (a GPU driver, or on a machine without a GPU Mesa's llvmpipe or lavapipe)"),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => (WgpuBackend::Vulkan, Device::vulkan(kind.clone()), "no matching Vulkan adapter: `vulkaninfo --summary` lists what the Vulkan loader finds (a GPU driver's ICD, or on a machine without a GPU Mesa's lavapipe, Debian's mesa-vulkan-drivers); VK_DRIVER_FILES names an ICD file"),
            #[cfg(feature = "metal")]
            Backend::Metal => (WgpuBackend::Metal, Device::metal(kind.clone()), "no matching Metal adapter with native MSL (Metal is macOS's)"),
            _ => return backend.device(),
        };
        // Brought up once per process (a second start would open a second device before failing);
        // a device refused is refused again.
        static UP: std::sync::Mutex<Vec<(String, Option<String>)>> = std::sync::Mutex::new(Vec::new());
        let key = format!("{lazy:?}");
        let mut up = UP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let refused = |reason: String| BackendError::BadDevice { spec: spec.to_string(), reason };
        if let Some((_, refusal)) = up.iter().find(|(k, _)| *k == key) {
            return match refusal {
                Some(reason) => Err(refused(reason.clone())),
                None => Ok(lazy),
            };
        }
        return match Device::wgpu_options().device_kind(kind).graphics_api(api).init_with_setup() {
            Ok((device, setup)) => {
                let refusal = spirv_refusal(&setup.adapter);
                up.push((key, refusal.clone()));
                refusal.map_or(Ok(device), |reason| Err(refused(reason)))
            }
            // Started already, by a tensor made on this device before: it is there.
            Err(WgpuInitError::Registration { .. }) => {
                up.push((key, None));
                Ok(lazy)
            }
            Err(e) => Err(refused(format!("{hint} ({e})"))),
        };
    }
    backend.device()
}

/// Why a build without cubecl-spirv's shared-memory fix must not run on this adapter, if it must not.
/// With the `vulkan` feature, cubecl compiles kernels to SPIR-V on every Vulkan adapter, and
/// cubecl-spirv 0.11.3 writes invalid SPIR-V for shared memory on one without
/// `VK_KHR_workgroup_memory_explicit_layout` (Mesa's lavapipe crashes compiling burn's matmul;
/// docs/backends.md, "Vulkan"). `scripts/cubecl-spirv-patched.sh`'s flags, which `cargo xtask`
/// builds with, apply the fix and set `ODPO_CUBECL_SPIRV_FIX` for the build.
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal"))]
#[allow(unsafe_code, unused_variables)]
fn spirv_refusal(adapter: &burn::tensor::wgpu::wgpu::Adapter) -> Option<String> {
    #[cfg(feature = "vulkan")]
    if option_env!("ODPO_CUBECL_SPIRV_FIX").is_none() {
        use burn::tensor::wgpu::wgpu::hal::api::Vulkan;
        const EXTENSION: &std::ffi::CStr = c"VK_KHR_workgroup_memory_explicit_layout";
        // SAFETY: reads the adapter's list of extensions while the adapter is borrowed; `None` for
        // an adapter of another graphics API.
        let lacks = unsafe { adapter.as_hal::<Vulkan>() }.is_some_and(|hal| !hal.physical_device_capabilities().supports_extension(EXTENSION));
        if lacks {
            return Some(format!(
                "the Vulkan adapter `{}` lacks VK_KHR_workgroup_memory_explicit_layout, and in this build (without the fix to cubecl-spirv 0.11.3's shared memory) \
                 kernels for such a device are invalid SPIR-V that crashes its driver. Build through `cargo xtask`, or with the flags of \
                 `scripts/cubecl-spirv-patched.sh`, which apply the fix (docs/backends.md, \"Vulkan\"); or build with `wgpu` and without `vulkan` (WGSL kernels)",
                adapter.get_info().name
            ));
        }
    }
    None
}

/// The devices of a data-parallel run: `specs` when given (all of one backend), else the default
/// device of `backend`.
pub fn devices(backend: &str, specs: &[String]) -> Result<Vec<Device>, BackendError> {
    if specs.is_empty() {
        return Ok(vec![device(backend)?]);
    }
    let first = specs[0].split(':').next().unwrap_or_default();
    for spec in specs {
        let name = spec.split(':').next().unwrap_or_default();
        if name != first {
            return Err(BackendError::BadDevice {
                spec: spec.clone(),
                reason: format!("every device of a run must be of one backend; the first is `{first}`"),
            });
        }
    }
    specs.iter().map(|s| device(s)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in BACKEND_NAMES {
            assert_eq!(name.parse::<Backend>().map(|b| b.name()), Ok(*name));
        }
    }

    #[test]
    fn unknown_backend_is_named() {
        assert_eq!(
            device("tpu").err().map(|e| e.to_string()),
            Some("unknown backend `tpu`; expected one of: flex, wgpu, vulkan, metal, cuda, tch, tch-cuda".into())
        );
    }

    #[test]
    fn missing_feature_is_named() {
        for b in BACKEND_NAMES.iter().filter_map(|n| n.parse::<Backend>().ok()) {
            if !b.compiled() {
                let msg = b.device().err().map(|e| e.to_string()).unwrap_or_default();
                assert!(msg.contains(&format!("--features {}", b.feature())), "{msg}");
            }
        }
    }

    #[test]
    fn device_specs_are_checked() {
        let msg = |s: &str| device(s).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(msg("flex:1"), "device `flex:1`: `flex` has one device; write `flex` or `flex:0`");
        assert_eq!(msg("cuda:x"), "device `cuda:x`: expected a device index after the colon (e.g. `cuda:1`)");
        assert!(msg("wgpu:gpu:1").contains("expected `N`, `discrete:N`"), "{}", msg("wgpu:gpu:1"));
        assert!(msg("tpu:0").contains("unknown backend `tpu`"));
        let mixed = devices("flex", &["flex".into(), "wgpu:0".into()]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(mixed.contains("every device of a run must be of one backend"), "{mixed}");
    }

    /// libdevice is looked for as cubecl's CUDA compiler looks for it, and its absence is explained.
    #[test]
    fn libdevice_is_found_where_the_cuda_compiler_looks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (toolkit, bare, empty) = (dir.join("toolkit"), dir.join("bare"), dir.join("empty"));
        std::fs::create_dir_all(toolkit.join("nvvm/libdevice")).unwrap();
        std::fs::create_dir_all(bare.join("nvvm/libdevice")).unwrap();
        std::fs::create_dir_all(&empty).unwrap();
        let bc = toolkit.join("nvvm/libdevice/libdevice.10.bc");
        std::fs::write(&bc, b"BC").unwrap();
        // CUDA_PATH decides alone when set.
        assert_eq!(libdevice(Some(toolkit.clone()), &[]), Ok(bc.clone()));
        let err = libdevice(Some(empty.clone()), &[toolkit.as_path()]).unwrap_err();
        assert!(err.starts_with(&format!("no libdevice at {} (CUDA_PATH)", empty.join("nvvm/libdevice/libdevice.10.bc").display())), "{err}");
        // Unset: the first root with nvvm/libdevice, and only that one.
        assert_eq!(libdevice(None, &[empty.as_path(), toolkit.as_path()]), Ok(bc));
        let err = libdevice(None, &[bare.as_path(), toolkit.as_path()]).unwrap_err();
        assert!(err.contains("CUDA_PATH (unset)") && err.contains("Set CUDA_PATH"), "{err}");
    }

    /// The headers NVRTC's kernels include are looked for under CUDA_PATH, and what is missing named.
    #[test]
    fn nvrtc_headers_are_named_when_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cu13");
        std::fs::create_dir_all(root.join("include/crt")).unwrap();
        std::fs::write(root.join("include/cuda_bf16.h"), "").unwrap();
        std::fs::write(root.join("include/crt/mma.h"), "").unwrap();
        let err = nvrtc_headers(Some(root.clone())).unwrap_err();
        assert!(err.starts_with(&format!("{} lacks cccl/cuda/barrier,", root.join("include").display())) && err.contains("nvidia-cuda-cccl"), "{err}");
        std::fs::create_dir_all(root.join("include/cccl/cuda")).unwrap();
        std::fs::write(root.join("include/cccl/cuda/barrier"), "").unwrap();
        assert_eq!(nvrtc_headers(Some(root.clone())), Ok(root.join("include")));
        assert!(nvrtc_headers(None).unwrap_err().contains("CUDA_PATH is unset"));
    }

    #[cfg(feature = "flex")]
    #[test]
    fn flex_is_available() {
        assert!(Backend::available().contains(&Backend::Flex));
        assert!(device("flex").is_ok());
    }
}
