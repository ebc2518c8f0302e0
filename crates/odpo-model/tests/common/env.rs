//! The settings every test suite reads from the environment: where the checkout is (`ODPO_REPO`),
//! where the shared material is (`ODPO_SHARED`, and `ODPO_REQUIRE_SHARED=1` in CI), and which device
//! to run on (`ODPO_TEST_DEVICE`), and where scratch files go (`TMPDIR`, [`scratch`]). One file,
//! included by each crate's test helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::Device;

/// The checkout the fixtures are read from: `ODPO_REPO` when the test binary runs away from the
/// checkout it was built in (the GPU check carries it to another machine), else that checkout.
pub fn repo_root() -> PathBuf {
    std::env::var_os("ODPO_REPO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

/// The device the suites run on: `ODPO_TEST_DEVICE` (a device spec as `--backend` takes it, e.g.
/// `tch-cuda` or `cuda:0`), else the build's default device (`BURN_DEVICE` picks among burn's own).
pub fn test_device() -> Device {
    match std::env::var("ODPO_TEST_DEVICE") {
        Ok(spec) => odpo_model::backend::device(&spec).unwrap_or_else(|e| panic!("ODPO_TEST_DEVICE={spec}: {e}")),
        Err(_) => Device::default(),
    }
}

/// The shared material folder: `$ODPO_SHARED`, else `../shared` beside the repository. `None`
/// (with a message) when it is missing, unless `ODPO_REQUIRE_SHARED=1`, then a panic: CI must
/// not skip these tests silently.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ODPO_SHARED").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared"));
    found_or_skip(dir, "the shared folder (set ODPO_SHARED)")
}

/// `rel` inside the shared folder ([`shared_dir`]), when it is there. A missing folder or file is a
/// skip (said plainly), or a panic under `ODPO_REQUIRE_SHARED=1`.
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    found_or_skip(shared_dir()?.join(rel), "a file of the shared folder")
}

/// `path` when it exists; else a skip that says what is missing, or a panic in CI.
fn found_or_skip(path: PathBuf, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var("ODPO_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("ODPO_REQUIRE_SHARED=1 but {what} is missing at {}", path.display());
    }
    eprintln!("skipping: {what} not found at {}", path.display());
    None
}

/// A fresh folder for one test's files under the system's temporary folder (`TMPDIR`), named
/// `odpo-<name>-<random>` and removed with everything in it when the guard drops, whether the test
/// passes or panics. `ODPO_KEEP_TEST_DIRS=1` keeps it to look at afterwards (its path is printed).
pub fn scratch(name: &str) -> Scratch {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("odpo-{name}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a scratch folder in {}: {e}", std::env::temp_dir().display()));
    if std::env::var("ODPO_KEEP_TEST_DIRS").as_deref() == Ok("1") {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Scratch(dir)
}

/// A scratch folder ([`scratch`]); it derefs to its path.
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}
