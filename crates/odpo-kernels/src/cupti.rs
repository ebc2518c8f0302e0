//! The kernels, copies and fills a piece of work runs on libtorch's CUDA, with each one's device
//! time, from CUPTI's activity records: the records torch.profiler reads for PyTorch's own census
//! (`bench/pytorch/step.py --kernels`), so the two lists name the same kernels alike.
//!
//! CUPTI is loaded at the first census, from `ODPO_CUPTI` (a path) or the library path
//! (`libcupti.so.13`, which PyTorch's CUDA wheels install under `site-packages/nvidia/cu13/lib`,
//! then `.so.12`, then `libcupti.so`); nothing links it. Only the few fields read here are taken
//! from the records, at offsets that have held from `CUpti_ActivityKernel4` (CUDA 10) to
//! `CUpti_ActivityKernel13` (CUPTI 13.5), checked against the headers of CUPTI 13.0.85 and 13.5.25:
//! `start` at 16, `end` at 24, the kernel's `name` at 104, a copy's `copyKind`, `srcKind` and
//! `dstKind` at 4, 5 and 6, a fill's `memoryKind` at 50. Kernels, copies and fills are named as
//! torch.profiler names them: the kernel's symbol demangled, `Memcpy DtoD (Device -> Device)`,
//! `Memset (Device)`. The tests run the census through a stand-in CUPTI
//! (`scripts/cupti-stand-in/libcupti.c`), which needs no GPU.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use super::KernelLaunches;

const KIND_MEMCPY: u32 = 1;
const KIND_MEMSET: u32 = 2;
const KIND_KERNEL: u32 = 3;
const KIND_CONCURRENT_KERNEL: u32 = 10;
/// What the census records: kernels (without serialising them), copies and fills.
const KINDS: [u32; 3] = [KIND_CONCURRENT_KERNEL, KIND_MEMCPY, KIND_MEMSET];
const SUCCESS: c_int = 0;
const FLUSH_FORCED: u32 = 1;
/// Each buffer handed to CUPTI: about 40,000 kernel records.
const BUFFER_BYTES: usize = 8 << 20;

/// A buffer's layout: CUPTI wants records aligned to 8 bytes.
#[repr(C, align(8))]
struct Buffer([u8; BUFFER_BYTES]);

type Request = extern "C" fn(*mut *mut u8, *mut usize, *mut usize);
type Complete = extern "C" fn(*mut c_void, u32, *mut u8, usize, usize);

/// The CUPTI functions the census calls.
struct Cupti {
    register: unsafe extern "C" fn(Request, Complete) -> c_int,
    enable: unsafe extern "C" fn(u32) -> c_int,
    disable: unsafe extern "C" fn(u32) -> c_int,
    flush_all: unsafe extern "C" fn(u32) -> c_int,
    next_record: unsafe extern "C" fn(*mut u8, usize, *mut *mut u8) -> c_int,
    dropped: unsafe extern "C" fn(*mut c_void, u32, *mut usize) -> c_int,
    result_string: unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int,
    /// Kept open for the process: CUPTI calls back into it while work runs.
    _lib: libloading::Library,
}

/// What the records delivered so far hold, while a census is under way (`None` otherwise: records
/// of work outside a census are dropped), and the CUPTI that delivers them.
struct Tally {
    cupti: &'static Cupti,
    kernels: HashMap<String, (u64, f64)>,
    dropped: usize,
}

static TALLY: Mutex<Option<Tally>> = Mutex::new(None);
/// One census at a time: CUPTI's activity switches are the process's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The process's CUPTI, loaded at the first census: `ODPO_CUPTI` (a path) when set, else the
/// library path's `libcupti.so.13`, `.so.12` or `libcupti.so`.
fn load() -> Result<&'static Cupti, String> {
    static CUPTI: OnceLock<Result<Cupti, String>> = OnceLock::new();
    CUPTI
        .get_or_init(|| match std::env::var_os("ODPO_CUPTI") {
            Some(path) => open(&[path]).map_err(|e| format!("{e} (from ODPO_CUPTI)")),
            None => open(&["libcupti.so.13", "libcupti.so.12", "libcupti.so"].map(std::ffi::OsString::from)).map_err(|e| {
                format!("{e}; PyTorch's CUDA wheels install it under site-packages/nvidia/cu13/lib: add that folder to LD_LIBRARY_PATH, or name the file in ODPO_CUPTI")
            }),
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The first of `names` that loads, its functions, and its records' callbacks registered.
fn open(names: &[std::ffi::OsString]) -> Result<Cupti, String> {
    // SAFETY: loading CUPTI runs no initialiser that could conflict with this process's state;
    // libtorch may have loaded the same library already (the same handle then).
    let lib = names.iter().find_map(|n| unsafe { libloading::Library::new(n) }.ok()).ok_or_else(|| {
        let tried: Vec<_> = names.iter().map(|n| n.to_string_lossy()).collect();
        format!("CUPTI could not be loaded (tried {})", tried.join(", "))
    })?;
    // SAFETY: each symbol is CUPTI's function of that name, with the C signature declared in its
    // cupti_activity.h / cupti_result.h.
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes()).map_err(|e| format!("CUPTI has no {}: {e}", $name))?
            };
        }
        let cupti = Cupti {
            register: sym!("cuptiActivityRegisterCallbacks"),
            enable: sym!("cuptiActivityEnable"),
            disable: sym!("cuptiActivityDisable"),
            flush_all: sym!("cuptiActivityFlushAll"),
            next_record: sym!("cuptiActivityGetNextRecord"),
            dropped: sym!("cuptiActivityGetNumDroppedRecords"),
            result_string: sym!("cuptiGetResultString"),
            _lib: lib,
        };
        cupti.check((cupti.register)(requested, completed), "cuptiActivityRegisterCallbacks")?;
        Ok(cupti)
    }
}

impl Cupti {
    fn check(&self, code: c_int, call: &str) -> Result<(), String> {
        if code == SUCCESS {
            return Ok(());
        }
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: CUPTI writes a pointer to a static string, or leaves it null.
        let said = unsafe { (self.result_string)(code, &mut text) == SUCCESS && !text.is_null() };
        // SAFETY: a non-null answer is a NUL-terminated static string.
        let why = if said { unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned() } else { format!("error {code}") };
        Err(format!("{call}: {why}"))
    }
}

/// CUPTI asks for a buffer to write records into.
extern "C" fn requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
    // SAFETY: the layout has a non-zero size; CUPTI hands the buffer back to `completed`.
    let b = unsafe { std::alloc::alloc(std::alloc::Layout::new::<Buffer>()) };
    // SAFETY: CUPTI passes valid out-pointers. A null buffer (allocation failed) with size 0 tells
    // CUPTI to drop records rather than write.
    unsafe {
        *buffer = b;
        *size = if b.is_null() { 0 } else { BUFFER_BYTES };
        *max_records = 0;
    }
}

/// CUPTI hands back a buffer of `valid` bytes of records.
extern "C" fn completed(context: *mut c_void, stream: u32, buffer: *mut u8, _size: usize, valid: usize) {
    if buffer.is_null() {
        return;
    }
    let mut tally = TALLY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tally.as_mut() {
        let cupti = t.cupti;
        let mut record: *mut u8 = std::ptr::null_mut();
        // SAFETY: `buffer` holds `valid` bytes of records that CUPTI wrote; it walks them and
        // answers CUPTI_ERROR_MAX_LIMIT_REACHED after the last.
        while unsafe { (cupti.next_record)(buffer, valid, &mut record) } == SUCCESS {
            // SAFETY: a record CUPTI returned, laid out as its kind's struct (module docs).
            if let Some((name, seconds)) = unsafe { read(record) } {
                let e = t.kernels.entry(name).or_default();
                e.0 += 1;
                e.1 += seconds;
            }
        }
        let mut n = 0usize;
        // SAFETY: the context and stream CUPTI passed for this buffer.
        if unsafe { (cupti.dropped)(context, stream, &mut n) } == SUCCESS {
            t.dropped += n;
        }
    }
    drop(tally);
    // SAFETY: allocated by `requested` with the same layout.
    unsafe { std::alloc::dealloc(buffer, std::alloc::Layout::new::<Buffer>()) };
}

/// One record's name (kernels as torch.profiler names them, demangled) and device seconds, or
/// `None` for a kind the census does not count.
///
/// # Safety
/// `record` points at a CUPTI activity record.
unsafe fn read(record: *const u8) -> Option<(String, f64)> {
    // SAFETY: every field read lies within its kind's record (module docs).
    unsafe {
        let kind = (record as *const u32).read_unaligned();
        let name = match kind {
            KIND_KERNEL | KIND_CONCURRENT_KERNEL => {
                let name = (record.add(104) as *const *const c_char).read_unaligned();
                if name.is_null() { "(unnamed kernel)".to_string() } else { demangle(CStr::from_ptr(name)) }
            }
            KIND_MEMCPY => format!("Memcpy {} ({} -> {})", copy_kind(*record.add(4)), memory_kind(*record.add(5) as u16), memory_kind(*record.add(6) as u16)),
            KIND_MEMSET => format!("Memset ({})", memory_kind((record.add(50) as *const u16).read_unaligned())),
            // Other kinds (CUPTI may add its own overhead records) may be shorter: nothing more is read.
            _ => return None,
        };
        let start = (record.add(16) as *const u64).read_unaligned();
        let end = (record.add(24) as *const u64).read_unaligned();
        Some((name, end.saturating_sub(start) as f64 * 1e-9))
    }
}

/// CUPTI's `CUpti_ActivityMemcpyKind`, as torch.profiler (Kineto) writes it in a copy's name.
fn copy_kind(kind: u8) -> &'static str {
    match kind {
        1 => "HtoD",
        2 => "DtoH",
        3 => "HtoA",
        4 => "AtoH",
        5 => "AtoA",
        6 => "AtoD",
        7 => "DtoA",
        8 => "DtoD",
        9 => "HtoH",
        10 => "PtoP",
        _ => "<unknown>",
    }
}

/// CUPTI's `CUpti_ActivityMemoryKind`, as torch.profiler writes it in a copy's or fill's name.
fn memory_kind(kind: u16) -> &'static str {
    match kind {
        0 => "Unknown",
        1 => "Pageable",
        2 => "Pinned",
        3 => "Device",
        4 => "Array",
        5 => "Managed",
        6 => "Device Static",
        7 => "Managed Static",
        _ => "Unrecognized",
    }
}

unsafe extern "C" {
    /// The C++ runtime's demangler (libstdc++, which libtorch links), the one torch.profiler uses.
    fn __cxa_demangle(mangled: *const c_char, out: *mut c_char, length: *mut usize, status: *mut c_int) -> *mut c_char;
    fn free(p: *mut c_void);
}

/// A kernel's symbol demangled the way torch.profiler shows it; a C name stays as it is.
fn demangle(symbol: &CStr) -> String {
    let mut status: c_int = -1;
    // SAFETY: a NUL-terminated symbol; with a null output buffer the demangler allocates the
    // result with malloc, freed here.
    unsafe {
        let out = __cxa_demangle(symbol.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), &mut status);
        if status == 0 && !out.is_null() {
            let s = CStr::from_ptr(out).to_string_lossy().into_owned();
            free(out as *mut c_void);
            return s;
        }
    }
    symbol.to_string_lossy().into_owned()
}

/// The records switched on for a census; switched off again, and what is left delivered, by
/// [`Recording::stop`] or, when the work panics, on drop (the tally is then dropped too).
struct Recording {
    cupti: &'static Cupti,
    on: bool,
}

impl Recording {
    fn stop(&mut self) -> Result<(), String> {
        self.on = false;
        for kind in KINDS {
            // SAFETY: a CUPTI call with a valid kind.
            unsafe { (self.cupti.disable)(kind) };
        }
        // Delivers the buffers not yet handed back, incomplete ones too, into the tally.
        // SAFETY: a CUPTI call.
        self.cupti.check(unsafe { (self.cupti.flush_all)(FLUSH_FORCED) }, "cuptiActivityFlushAll")
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.on {
            let _ = self.stop();
            TALLY.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

pub(super) fn census<R>(f: impl FnOnce() -> R) -> Result<(R, Vec<KernelLaunches>), String> {
    census_with(load()?, f)
}

fn census_with<R>(cupti: &'static Cupti, f: impl FnOnce() -> R) -> Result<(R, Vec<KernelLaunches>), String> {
    // A census inside another (or beside it, on another thread) would take the other's records.
    let _one = match ONE_AT_A_TIME.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return Err("another census of CUDA activity is under way in this process".into()),
    };
    // The kinds are off outside a census, so nothing recorded before this one is pending.
    *TALLY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Tally { cupti, kernels: HashMap::new(), dropped: 0 });
    let mut recording = Recording { cupti, on: true };
    for kind in KINDS {
        // SAFETY: a CUPTI call with a valid kind.
        cupti.check(unsafe { (cupti.enable)(kind) }, "cuptiActivityEnable")?;
    }
    let out = f();
    let stopped = recording.stop();
    let tally = TALLY.lock().unwrap_or_else(|e| e.into_inner()).take();
    stopped?;
    let Some(tally) = tally else {
        return Err("the census's tally was taken by another".into());
    };
    if tally.dropped > 0 {
        tracing::warn!(dropped = tally.dropped, "CUPTI dropped activity records: the census misses some kernels");
    }
    let mut list: Vec<KernelLaunches> =
        tally.kernels.into_iter().map(|(kernel, (launches, secs))| KernelLaunches { kernel, launches, device_seconds: Some(secs) }).collect();
    list.sort_by(|a, b| b.device_seconds.unwrap_or(0.0).total_cmp(&a.device_seconds.unwrap_or(0.0)).then(b.launches.cmp(&a.launches)).then(a.kernel.cmp(&b.kernel)));
    Ok((out, list))
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A kernel record and a copy record as CUPTI 13 lays them out (`CUpti_ActivityKernel10`,
    /// `CUpti_ActivityMemcpy6`), read back.
    #[test]
    fn records_are_read_at_cuptis_offsets() {
        let name = c"_ZN2at6native29vectorized_elementwise_kernelILi4ENS0_11FillFunctorIfEESt5arrayIPcLm1EEEEviT0_T1_";
        let mut kernel = [0u64; 24];
        kernel[0] = KIND_CONCURRENT_KERNEL as u64;
        kernel[2] = 1_000;
        kernel[3] = 3_500;
        kernel[13] = name.as_ptr() as u64;
        let (n, s) = unsafe { read(kernel.as_ptr() as *const u8) }.expect("a kernel record");
        assert_eq!(n, "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)");
        assert!((s - 2.5e-6).abs() < 1e-15);

        let mut copy = [0u64; 8];
        // kind, then copyKind DtoD, srcKind Device, dstKind Pinned in its next three bytes
        copy[0] = KIND_MEMCPY as u64 | (8 << 32) | (3 << 40) | (2 << 48);
        copy[2] = 10;
        copy[3] = 20;
        assert_eq!(unsafe { read(copy.as_ptr() as *const u8) }.expect("a copy record").0, "Memcpy DtoD (Device -> Pinned)");
        copy[0] = KIND_MEMSET as u64;
        copy[6] = 3 << 16; // memoryKind Device, the u16 at byte 50
        assert_eq!(unsafe { read(copy.as_ptr() as *const u8) }.expect("a fill record").0, "Memset (Device)");
        copy[0] = 4; // a driver API record: not counted
        assert!(unsafe { read(copy.as_ptr() as *const u8) }.is_none());
        assert_eq!(demangle(c"copy_kernel_c_name"), "copy_kernel_c_name");
    }

    /// The census through scripts/cupti-stand-in/libcupti.c, built here with the C compiler (`cc`,
    /// or `CC`): loading, the callbacks' buffers over several hand-backs, the tally by name, the
    /// order, and records outside a census left out.
    #[test]
    fn a_census_through_the_stand_in_cupti_tallies_what_ran_in_it() {
        let dir = std::env::temp_dir().join(format!("odpo-cupti-stand-in-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        let so = dir.join("libcupti.so.13");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/cupti-stand-in/libcupti.c");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = std::process::Command::new(&cc).args(["-shared", "-fPIC", "-O1", "-o"]).arg(&so).arg(source).status();
        assert!(built.is_ok_and(|s| s.success()), "{cc} could not build {source}");

        let missing = open(&[dir.join("no-such-libcupti.so").into_os_string()]).err().expect("an error");
        assert!(missing.contains("CUPTI could not be loaded") && missing.contains("no-such-libcupti.so"), "{missing}");
        let cupti: &'static Cupti = Box::leak(Box::new(open(&[so.clone().into_os_string()]).expect("the stand-in loads")));
        assert_eq!(cupti.check(21, "cuptiActivityEnable").expect_err("an error"), "cuptiActivityEnable: CUPTI_ERROR_INVALID_KIND");

        // The stand-in's own entry points: what ran, as CUPTI would see it.
        let lib = unsafe { libloading::Library::new(&so) }.expect("the stand-in again");
        let kernel: unsafe extern "C" fn(*const c_char, u64) = unsafe { *lib.get(b"standin_kernel\0").expect("standin_kernel") };
        let copy: unsafe extern "C" fn(u8, u8, u8, u64) = unsafe { *lib.get(b"standin_copy\0").expect("standin_copy") };
        let fill: unsafe extern "C" fn(u16, u64) = unsafe { *lib.get(b"standin_fill\0").expect("standin_fill") };
        let fail_flush: unsafe extern "C" fn(c_int) = unsafe { *lib.get(b"standin_fail_flush\0").expect("standin_fail_flush") };
        let gemm = c"_Z11gemm_kernelPfS_i";
        let add = c"add_kernel";

        unsafe { kernel(gemm.as_ptr(), 1_000_000) }; // before the census: not counted
        let (out, list) = census_with(cupti, || {
            for _ in 0..9 {
                unsafe { kernel(gemm.as_ptr(), 2_000) };
            }
            unsafe { kernel(add.as_ptr(), 30_000) };
            unsafe { kernel(add.as_ptr(), 10_000) };
            unsafe { copy(8, 3, 3, 500) };
            unsafe { copy(2, 3, 1, 700) };
            unsafe { fill(3, 300) };
            42
        })
        .expect("the census");
        unsafe { kernel(add.as_ptr(), 1_000_000) }; // after it: not counted
        assert_eq!(out, 42);
        let rows: Vec<(&str, u64, f64)> = list.iter().map(|k| (k.kernel.as_str(), k.launches, k.device_seconds.expect("timed"))).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.0).collect();
        assert_eq!(names, ["add_kernel", "gemm_kernel(float*, float*, int)", "Memcpy DtoH (Device -> Pageable)", "Memcpy DtoD (Device -> Device)", "Memset (Device)"]);
        let expect = [(2, 40e-6), (9, 18e-6), (1, 0.7e-6), (1, 0.5e-6), (1, 0.3e-6)];
        for (r, (n, secs)) in rows.iter().zip(expect) {
            assert_eq!(r.1, n, "{}", r.0);
            assert!((r.2 - secs).abs() < 1e-12, "{}: {} s", r.0, r.2);
        }

        // A census inside another is refused; the next census starts from nothing.
        let (inner, _) = census_with(cupti, || census_with(cupti, || ()).map(|_| ()).expect_err("a census inside a census")).expect("the outer census");
        assert!(inner.contains("under way"), "{inner}");
        let ((), again) = census_with(cupti, || unsafe { fill(2, 100) }).expect("a second census");
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].kernel.as_str(), again[0].launches), ("Memset (Pinned)", 1));

        // A flush CUPTI refuses (as without a driver) fails the census rather than returning an
        // empty list; the census after it counts its own work only.
        let refused = census_with(cupti, || unsafe {
            kernel(gemm.as_ptr(), 5_000);
            fail_flush(999);
        })
        .expect_err("a refused flush");
        assert_eq!(refused, "cuptiActivityFlushAll: CUPTI_ERROR_UNKNOWN");
        let ((), after) = census_with(cupti, || unsafe { kernel(add.as_ptr(), 1_000) }).expect("a census after the refusal");
        assert_eq!(after.iter().map(|k| (k.kernel.as_str(), k.launches)).collect::<Vec<_>>(), [("add_kernel", 1)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
