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
            Self::Wgpu => {
                #[cfg(feature = "wgpu")]
                return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
                missing
            }
            Self::Vulkan => {
                #[cfg(feature = "vulkan")]
                return Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice));
                missing
            }
            Self::Metal => {
                #[cfg(feature = "metal")]
                return Ok(Device::metal(burn::tensor::DeviceKind::DefaultDevice));
                missing
            }
            Self::Cuda => {
                #[cfg(feature = "cuda")]
                return Ok(Device::cuda(0));
                missing
            }
            Self::Tch => {
                #[cfg(feature = "tch")]
                return Ok(Device::libtorch());
                missing
            }
            Self::TchCuda => {
                #[cfg(feature = "tch")]
                return Ok(Device::libtorch_cuda(0));
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

/// Parses a backend name and returns its device: the function the command line calls.
pub fn device(name: &str) -> Result<Device, BackendError> {
    name.parse::<Backend>()?.device()
}

#[cfg(test)]
mod tests {
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

    #[cfg(feature = "flex")]
    #[test]
    fn flex_is_available() {
        assert!(Backend::available().contains(&Backend::Flex));
        assert!(device("flex").is_ok());
    }
}
