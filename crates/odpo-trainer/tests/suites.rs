//! The twelve conformance suites in one test binary: what `cargo xtask conformance` builds and runs on
//! each backend, and what the GPU check carries to a machine without a Rust toolchain (one binary
//! links burn, LLVM and libtorch once, where twelve would each link them).
//!
//! Each suite is its own test file in its own crate, where `cargo test` runs it on the build's
//! default backend; here they are modules. `ODPO_TEST_DEVICE` (a device spec as `--backend` takes
//! it) picks the device and `ODPO_REPO` the checkout the fixtures are read from. Built only with
//! the `suites` feature, so that `cargo test --workspace` does not run every suite twice.

#[path = "../../odpo-model/tests/parity.rs"]
mod parity;

#[path = "../../odpo-model/tests/parity_neo.rs"]
mod parity_neo;

#[path = "../../odpo-model/tests/attention.rs"]
mod attention;

#[path = "../../odpo-model/tests/fused_layers.rs"]
mod fused_layers;

#[path = "../../odpo-model/tests/exact_matmul.rs"]
mod exact_matmul;

#[path = "../../odpo-model/tests/devices.rs"]
mod devices;

#[path = "../../odpo-loss/tests/pytorch_parity.rs"]
mod pytorch_parity;

#[path = "../../odpo-loss/tests/gradients.rs"]
mod gradients;

#[path = "conformance.rs"]
mod conformance;

#[path = "shared_prompt.rs"]
mod shared_prompt;

#[path = "data_parallel.rs"]
mod data_parallel;

#[path = "mixed_precision.rs"]
mod mixed_precision;
