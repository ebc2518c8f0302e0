//! The routine that multiplies bf16 and f16 operands on the cubecl backends.
//!
//! burn-cubecl 0.22.1 without its `autotune` feature (left off: docs/backends.md) multiplies every
//! product through cubek-matmul 0.3.1's `Auto`, the single-buffered cyclic routine on cmma
//! (`wmma`) tiles. On an H200 a Llama-3.2-1B step on that routine reached 7.1% of the card's
//! measured matmul peak, against PyTorch's 42.9% (docs/performance.md), and most of that step is
//! products. The routines burn's autotune chooses among for tensor cores (double buffering, warp
//! specialisation, TMA loads, `mma` tiles) are here by name: a run takes one with
//! `odpo --matmul NAME` or `train.matmul`, and `odpo bench --matmul-routines` times each on the
//! products of a real step. A routine that refuses a product (a device without its instruction, a
//! layout it does not load) leaves that product to burn's routine, and says so once in the log.
//! f32 products keep their own path ([`crate::matmul`]); flex and libtorch have no such choice.
//! On `cuda` built with LLVM (the default), cubecl offers no TMA, asynchronous copies or barriers:
//! the `specialized_cyclic_*` and `*_tma_*` routines refuse every product there; built with
//! `cuda-nvrtc` they take them (docs/backends.md, "Matmul routines").

use std::cell::{Cell, RefCell};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::DType;

/// The routines by name. `auto` is burn's own choice; the others are cubek's strategies under the
/// names its `Display` gives them (without the `matmul_` prefix), with the arguments burn's
/// autotune tries: `_rows` for the multi-row simple routine, `_specialized` for double buffering
/// with a loading plane, `ordered_double` with 8 rows of 2 per plane and `k` in two parts.
pub const MATMUL_ROUTINES: &[&str] = &[
    "auto",
    "simple_cyclic_mma",
    "simple_cyclic_cmma_rows",
    "simple_cyclic_mma_rows",
    "double_cyclic_cmma",
    "double_cyclic_mma",
    "double_cyclic_cmma_specialized",
    "double_cyclic_mma_specialized",
    "ordered_double_cmma",
    "ordered_double_mma",
    "specialized_cyclic_cmma",
    "specialized_cyclic_mma",
    "simple_tma_cmma",
    "simple_tma_mma",
    "specialized_tma_cmma",
    "specialized_tma_mma",
];

/// One of [`MATMUL_ROUTINES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MatmulRoutine(u8);

impl MatmulRoutine {
    /// burn's own routine (cubek's `Auto`).
    pub const AUTO: Self = Self(0);

    /// Every routine, `auto` first.
    pub fn all() -> impl Iterator<Item = Self> {
        (0..MATMUL_ROUTINES.len() as u8).map(Self)
    }

    /// Its name in [`MATMUL_ROUTINES`].
    pub fn name(self) -> &'static str {
        MATMUL_ROUTINES[self.0 as usize]
    }

    /// cubek's strategy for it.
    #[cfg(feature = "cube")]
    pub(crate) fn strategy(self) -> cubek::matmul::strategy::Strategy {
        use cubek::matmul::multi_level::Strategy as S;
        use cubek::matmul::multi_level::routines::batch::double_buffering::DoubleBufferingArgs;
        use cubek::matmul::multi_level::routines::batch::ordered_double_buffering::OrderedSelectionArgs;
        use cubek::matmul::multi_level::routines::batch::simple::SimpleArgs;
        use cubek::matmul::routine::BlueprintStrategy::Inferred;
        // The tile kind in these arguments is overwritten by the strategy's own (`Cmma` / `Mma`).
        let rows = || Inferred(SimpleArgs { multi_rows: true, ..Default::default() });
        let specialized = || Inferred(DoubleBufferingArgs { specialized: true, ..Default::default() });
        let ordered = || Inferred(OrderedSelectionArgs { partition_k: Some(2), row_count: Some(8), rows_per_plane: Some(2), ..Default::default() });
        let s = match self.name() {
            "auto" => return cubek::matmul::strategy::Strategy::Auto,
            "simple_cyclic_mma" => S::SimpleCyclicMma(Default::default()),
            "simple_cyclic_cmma_rows" => S::SimpleCyclicCmma(rows()),
            "simple_cyclic_mma_rows" => S::SimpleCyclicMma(rows()),
            "double_cyclic_cmma" => S::DoubleCyclicCmma(Default::default()),
            "double_cyclic_mma" => S::DoubleCyclicMma(Default::default()),
            "double_cyclic_cmma_specialized" => S::DoubleCyclicCmma(specialized()),
            "double_cyclic_mma_specialized" => S::DoubleCyclicMma(specialized()),
            "ordered_double_cmma" => S::OrderedDoubleCmma(ordered()),
            "ordered_double_mma" => S::OrderedDoubleMma(ordered()),
            "specialized_cyclic_cmma" => S::SpecializedCyclicCmma(Default::default()),
            "specialized_cyclic_mma" => S::SpecializedCyclicMma(Default::default()),
            "simple_tma_cmma" => S::SimpleTmaCmma(Default::default()),
            "simple_tma_mma" => S::SimpleTmaMma(Default::default()),
            "specialized_tma_cmma" => S::SpecializedTmaCmma(Default::default()),
            "specialized_tma_mma" => S::SpecializedTmaMma(Default::default()),
            other => unreachable!("routine `{other}` has no strategy"),
        };
        s.into()
    }
}

impl fmt::Display for MatmulRoutine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MatmulRoutine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim().strip_prefix("matmul_").unwrap_or(s.trim());
        MATMUL_ROUTINES
            .iter()
            .position(|r| *r == name)
            .map(|i| Self(i as u8))
            .ok_or_else(|| format!("unknown matmul routine `{s}`; expected one of: {}", MATMUL_ROUTINES.join(", ")))
    }
}

/// Written and read as its name, as `train.matmul` takes it.
impl serde::Serialize for MatmulRoutine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Read as a unit variant whose name is the routine's, so that a config's list of values is
/// [`MATMUL_ROUTINES`].
impl<'de> serde::Deserialize<'de> for MatmulRoutine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> serde::de::Visitor<'de> for Name {
            type Value = MatmulRoutine;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a matmul routine, one of: {}", MATMUL_ROUTINES.join(", "))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<MatmulRoutine, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_enum<A: serde::de::EnumAccess<'de>>(self, a: A) -> Result<MatmulRoutine, A::Error> {
                use serde::de::{Error, VariantAccess};
                let (name, variant) = a.variant::<String>()?;
                variant.unit_variant()?;
                name.parse().map_err(A::Error::custom)
            }
        }
        d.deserialize_enum("MatmulRoutine", MATMUL_ROUTINES, Name)
    }
}

/// The process's routine ([`set_matmul_routine`]).
static PROCESS: AtomicU8 = AtomicU8::new(0);
/// The routines whose refusal has been logged, one bit each.
#[cfg(feature = "cube")]
static WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// [`with_matmul_routine`]'s routine on this thread, over the process's.
    static THREAD: Cell<Option<MatmulRoutine>> = const { Cell::new(None) };
    /// Half-precision products on this thread that the chosen routine ran, and that it refused.
    static CALLS: Cell<RoutineCalls> = const { Cell::new(RoutineCalls { ran: 0, refused: 0 }) };
    /// The products [`record_products`] collects on this thread.
    static RECORD: RefCell<Option<Vec<Product>>> = const { RefCell::new(None) };
}

/// Sets the routine of every half-precision product of the process on the cubecl backends.
pub fn set_matmul_routine(routine: MatmulRoutine) {
    PROCESS.store(routine.0, Ordering::Relaxed);
}

/// The routine in force on this thread.
pub fn matmul_routine() -> MatmulRoutine {
    THREAD.with(Cell::get).unwrap_or(MatmulRoutine(PROCESS.load(Ordering::Relaxed)))
}

/// Runs `f` with `routine` for this thread's products (backward passes included when they run on
/// this thread, as burn's autodiff does), then restores what was in force.
pub fn with_matmul_routine<T>(routine: MatmulRoutine, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<MatmulRoutine>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(Some(routine))));
    f()
}

/// How many half-precision products the chosen routine ran on this thread, and how many it
/// refused (those ran burn's routine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutineCalls {
    /// Products the routine multiplied.
    pub ran: usize,
    /// Products it refused.
    pub refused: usize,
}

/// This thread's [`RoutineCalls`] so far.
pub fn matmul_routine_calls() -> RoutineCalls {
    CALLS.with(Cell::get)
}

#[cfg_attr(not(feature = "cube"), allow(dead_code))]
pub(crate) fn count(ran: bool) {
    CALLS.with(|c| {
        let mut v = c.get();
        if ran {
            v.ran += 1;
        } else {
            v.refused += 1;
        }
        c.set(v);
    });
}

/// A product as the cubecl backends received it: its operands' shapes (`[.., M, K]` and
/// `[.., K, N]`), whether each is the transposed view of a contiguous tensor, and their type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Product {
    /// The left operand's shape, `[.., M, K]`.
    pub lhs: Vec<usize>,
    /// The right operand's shape, `[.., K, N]`.
    pub rhs: Vec<usize>,
    /// The left operand is the transposed view of a contiguous `[.., K, M]`.
    pub lhs_transposed: bool,
    /// The right operand is the transposed view of a contiguous `[.., N, K]`.
    pub rhs_transposed: bool,
    /// Their element type.
    pub dtype: DType,
}

impl Product {
    /// Multiply-adds times two.
    pub fn flops(&self) -> f64 {
        let batch: usize = self.lhs[..self.lhs.len() - 2].iter().product();
        let (m, k, n) = (self.lhs[self.lhs.len() - 2], self.lhs[self.lhs.len() - 1], self.rhs[self.rhs.len() - 1]);
        2.0 * (batch * m * k * n) as f64
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |b: bool| if b { "ᵀ" } else { "" };
        write!(f, "{:?}{} x {:?}{} {:?}", self.lhs, t(self.lhs_transposed), self.rhs, t(self.rhs_transposed), self.dtype)
    }
}

/// Runs `f` and returns the products it sent through [`crate::matmul`] on the cubecl backends of
/// this thread, in order (none elsewhere).
pub fn record_products<T>(f: impl FnOnce() -> T) -> (T, Vec<Product>) {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            RECORD.with(|r| r.borrow_mut().take());
        }
    }
    RECORD.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let stop = Stop;
    let out = f();
    let products = RECORD.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(stop);
    (out, products)
}

#[cfg(feature = "cube")]
pub(crate) fn note_product(lhs: &burn_cubecl::tensor::CubeTensor, rhs: &burn_cubecl::tensor::CubeTensor) {
    RECORD.with(|r| {
        if let Some(list) = r.borrow_mut().as_mut() {
            let layout = |t: &burn_cubecl::tensor::CubeTensor| {
                let shape: Vec<usize> = t.meta.shape().iter().copied().collect();
                let strides: Vec<usize> = t.meta.strides().iter().copied().collect();
                let r = shape.len();
                let transposed = r >= 2 && shape[r - 1] > 1 && shape[r - 2] > 1 && strides[r - 1] != 1 && strides[r - 2] == 1;
                (shape, transposed)
            };
            let dtype = lhs.dtype;
            let ((lhs, lhs_transposed), (rhs, rhs_transposed)) = (layout(lhs), layout(rhs));
            list.push(Product { lhs, rhs, lhs_transposed, rhs_transposed, dtype });
        }
    });
}

/// Notes a refusal: counted on this thread, logged once per routine in the process.
#[cfg(feature = "cube")]
pub(crate) fn refused(routine: MatmulRoutine, lhs: &burn_cubecl::tensor::CubeTensor, rhs: &burn_cubecl::tensor::CubeTensor, err: &cubek::matmul::definition::MatmulSetupError) {
    count(false);
    let bit = 1u64 << routine.0;
    if WARNED.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
        tracing::warn!(
            "matmul routine `{routine}` refused a product ({:?} x {:?}, {:?}): {err:?}; burn's routine multiplies the products it refuses",
            lhs.meta.shape(),
            rhs.meta.shape(),
            lhs.dtype
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for r in MatmulRoutine::all() {
            assert_eq!(r.name().parse::<MatmulRoutine>().unwrap(), r);
            assert_eq!(format!("matmul_{r}").parse::<MatmulRoutine>().unwrap(), r);
        }
        let err = "fastest".parse::<MatmulRoutine>().unwrap_err();
        assert!(err.contains("`fastest`") && err.contains("double_cyclic_mma"), "{err}");
    }

    #[test]
    fn thread_routine_is_restored() {
        let r: MatmulRoutine = "double_cyclic_mma".parse().unwrap();
        assert_eq!(matmul_routine(), MatmulRoutine::AUTO);
        let inner = with_matmul_routine(r, matmul_routine);
        assert_eq!(inner, r);
        assert_eq!(matmul_routine(), MatmulRoutine::AUTO);
        let caught = std::panic::catch_unwind(|| with_matmul_routine(r, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(matmul_routine(), MatmulRoutine::AUTO);
    }
}
