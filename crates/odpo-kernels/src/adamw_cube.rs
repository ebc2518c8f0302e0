//! [`crate::adamw`] on the cubecl backends (CUDA, Vulkan, wgpu, Metal): one kernel per parameter
//! that reads the gradient and updates the parameter and both moments in place, where the same
//! formula as burn tensor operations launches twelve kernels and allocates a buffer for each;
//! within an optimizer step ([`crate::FlatAdamW`]) one kernel for four parameters ([`Batch`]).
//! On a GPU whose step waits on the host issuing kernels, the launches are what the update costs.
//! Computed in f32 whatever the tensors' dtype, as PyTorch's fused AdamW computes half-precision
//! parameters; the gradient may be half precision where the parameter is f32 (a mixed-precision
//! step's, [`crate::compute_cast`]).

use burn::backend::DispatchTensorKind;
use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
// The `cube` macro's expansion names the `cubecl` crate.
use burn_cubecl::cubecl;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::std::tensor::layout::linear::{LinearView, LinearViewMut};

use crate::Coeffs;

/// Element `i`'s update: the CPU kernel's arithmetic (`cpu::adamw`), in f32. Writes the moments
/// and returns the parameter's new value, for the kernel to write.
#[cube]
#[allow(clippy::too_many_arguments)]
fn update<F: Float, G: Float>(
    i: usize,
    p: &mut LinearViewMut<'_, F>,
    g: &LinearView<'_, G>,
    m: &mut LinearViewMut<'_, F>,
    v: &mut LinearViewMut<'_, F>,
    c: &Scalars,
) -> F {
    let gi = f32::cast_from(g.read(i)) * c.scale;
    let mi = f32::cast_from(m.read(i));
    let vi = f32::cast_from(v.read(i));
    // PyTorch's lerp for a weight below 0.5, and addcmul's `self + value·t1·t2`.
    let m1 = mi + c.w1 * (gi - mi);
    let v1 = vi * c.b2 + c.w2 * gi * gi;
    let denom = v1.sqrt() / c.bc2_sqrt + c.eps;
    m.write(i, F::cast_from(m1));
    v.write(i, F::cast_from(v1));
    F::cast_from(f32::cast_from(p.read(i)) * c.decay + c.neg_step_size * m1 / denom)
}

/// The step's scalars, as the kernels take them.
#[derive(CubeLaunch, CubeType)]
struct Scalars {
    decay: f32,
    scale: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

/// One element per unit. Each tensor is read through its own layout (cubecl pads the rows it
/// allocates: a `[49152, 576]` f32 tensor takes rows of 640), and the gradient may be of another
/// dtype than the parameter: a mixed-precision step hands it on in half precision
/// ([`crate::compute_cast`]), which the load widens to f32 exactly.
#[cube(launch_unchecked, address_type = "dynamic")]
fn adamw_kernel<F: Float, G: Float>(
    mut p: LinearViewMut<'_, F>,
    g: LinearView<'_, G>,
    mut m: LinearViewMut<'_, F>,
    mut v: LinearViewMut<'_, F>,
    n: usize,
    c: &Scalars,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let i = ABSOLUTE_POS;
    if i >= n {
        terminate!();
    }
    let p1 = update::<F, G>(i, &mut p, &g, &mut m, &mut v, c);
    p.write(i, p1);
}

/// [`adamw_kernel`] that also writes the new parameter cast to `H` into `h` (the half-precision
/// weights of the next mixed-precision step, which would otherwise be cast from the parameter in
/// a kernel of their own): the same conversion as that cast's, of the same value.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw_half_kernel<F: Float, G: Float, H: Float>(
    mut p: LinearViewMut<'_, F>,
    g: LinearView<'_, G>,
    mut m: LinearViewMut<'_, F>,
    mut v: LinearViewMut<'_, F>,
    mut h: LinearViewMut<'_, H>,
    n: usize,
    c: &Scalars,
    #[define(F, G, H)] _dtypes: [ElemType; 3],
) {
    let i = ABSOLUTE_POS;
    if i >= n {
        terminate!();
    }
    let p1 = update::<F, G>(i, &mut p, &g, &mut m, &mut v, c);
    p.write(i, p1);
    h.write(i, H::cast_from(p1));
}

/// A grid-stride pass of element updates over `n` elements (the kernels for four parameters give
/// each parameter one row of the grid).
#[cube]
fn update_all<F: Float, G: Float>(p: &mut LinearViewMut<'_, F>, g: &LinearView<'_, G>, m: &mut LinearViewMut<'_, F>, v: &mut LinearViewMut<'_, F>, n: usize, c: &Scalars) {
    let mut i = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let stride = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
    while i < n {
        let p1 = update::<F, G>(i, p, g, m, v, c);
        p.write(i, p1);
        i += stride;
    }
}

/// [`update_all`] that also writes each new parameter's cast to `H` into `h`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn update_all_half<F: Float, G: Float, H: Float>(
    p: &mut LinearViewMut<'_, F>,
    g: &LinearView<'_, G>,
    m: &mut LinearViewMut<'_, F>,
    v: &mut LinearViewMut<'_, F>,
    h: &mut LinearViewMut<'_, H>,
    n: usize,
    c: &Scalars,
) {
    let mut i = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let stride = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
    while i < n {
        let p1 = update::<F, G>(i, p, g, m, v, c);
        p.write(i, p1);
        h.write(i, H::cast_from(p1));
        i += stride;
    }
}

/// [`adamw_half_kernel`] for four parameters at once, one per row of the grid (`ns` their sizes),
/// with one step's scalars: a model's update in a quarter of the launches.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw4_half_kernel<F: Float, G: Float, H: Float>(
    mut p0: LinearViewMut<'_, F>,
    g0: LinearView<'_, G>,
    mut m0: LinearViewMut<'_, F>,
    mut v0: LinearViewMut<'_, F>,
    mut h0: LinearViewMut<'_, H>,
    mut p1: LinearViewMut<'_, F>,
    g1: LinearView<'_, G>,
    mut m1: LinearViewMut<'_, F>,
    mut v1: LinearViewMut<'_, F>,
    mut h1: LinearViewMut<'_, H>,
    mut p2: LinearViewMut<'_, F>,
    g2: LinearView<'_, G>,
    mut m2: LinearViewMut<'_, F>,
    mut v2: LinearViewMut<'_, F>,
    mut h2: LinearViewMut<'_, H>,
    mut p3: LinearViewMut<'_, F>,
    g3: LinearView<'_, G>,
    mut m3: LinearViewMut<'_, F>,
    mut v3: LinearViewMut<'_, F>,
    mut h3: LinearViewMut<'_, H>,
    ns: Sequence<usize>,
    c: &Scalars,
    #[define(F, G, H)] _dtypes: [ElemType; 3],
) {
    let y = CUBE_POS_Y as usize;
    if y == 0 {
        update_all_half::<F, G, H>(&mut p0, &g0, &mut m0, &mut v0, &mut h0, ns[0], c);
    } else if y == 1 {
        update_all_half::<F, G, H>(&mut p1, &g1, &mut m1, &mut v1, &mut h1, ns[1], c);
    } else if y == 2 {
        update_all_half::<F, G, H>(&mut p2, &g2, &mut m2, &mut v2, &mut h2, ns[2], c);
    } else {
        update_all_half::<F, G, H>(&mut p3, &g3, &mut m3, &mut v3, &mut h3, ns[3], c);
    }
}

/// [`adamw_kernel`] for four parameters at once, as [`adamw4_half_kernel`] without the casts.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw4_kernel<F: Float, G: Float>(
    mut p0: LinearViewMut<'_, F>,
    g0: LinearView<'_, G>,
    mut m0: LinearViewMut<'_, F>,
    mut v0: LinearViewMut<'_, F>,
    mut p1: LinearViewMut<'_, F>,
    g1: LinearView<'_, G>,
    mut m1: LinearViewMut<'_, F>,
    mut v1: LinearViewMut<'_, F>,
    mut p2: LinearViewMut<'_, F>,
    g2: LinearView<'_, G>,
    mut m2: LinearViewMut<'_, F>,
    mut v2: LinearViewMut<'_, F>,
    mut p3: LinearViewMut<'_, F>,
    g3: LinearView<'_, G>,
    mut m3: LinearViewMut<'_, F>,
    mut v3: LinearViewMut<'_, F>,
    ns: Sequence<usize>,
    c: &Scalars,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let y = CUBE_POS_Y as usize;
    if y == 0 {
        update_all::<F, G>(&mut p0, &g0, &mut m0, &mut v0, ns[0], c);
    } else if y == 1 {
        update_all::<F, G>(&mut p1, &g1, &mut m1, &mut v1, ns[1], c);
    } else if y == 2 {
        update_all::<F, G>(&mut p2, &g2, &mut m2, &mut v2, ns[2], c);
    } else {
        update_all::<F, G>(&mut p3, &g3, &mut m3, &mut v3, ns[3], c);
    }
}

/// A float tensor the kernel can read as it lies in memory.
fn readable(t: &CubeTensor) -> bool {
    !t.meta.is_tiled() && matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// One it can also write in place: no other holder of its buffer, no element at two places.
fn writable(t: &CubeTensor) -> bool {
    readable(t) && t.can_mut() && t.is_nonoverlapping()
}

/// The four as cubecl tensors, when the kernel takes them: one shape on one device, the parameter
/// and moments of one dtype and writable (see [`writable`]), the gradient of any float dtype.
/// `new_moments`: the moments were made for this update (the first step's zeros), so nothing else
/// holds them, though cubecl may not know it yet. A new tensor's buffer is also held by the
/// allocation it queued for the device thread until that thread runs it (`can_mut` is false till
/// then, which under load can be after this check); the allocation runs before the update in the
/// queue.
fn taken([p, g, m, v]: [&DispatchTensorKind; 4], new_moments: bool) -> Option<[&CubeTensor; 4]> {
    use burn::backend::BackendTensor::Float;
    let (DispatchTensorKind::Cube(Float(p)), DispatchTensorKind::Cube(Float(g)), DispatchTensorKind::Cube(Float(m)), DispatchTensorKind::Cube(Float(v))) = (p, g, m, v) else {
        return None;
    };
    let like = |t: &CubeTensor| t.meta.shape() == p.meta.shape() && t.device == p.device;
    let moment = |t: &CubeTensor| if new_moments { readable(t) && t.is_nonoverlapping() } else { writable(t) };
    let takes = p.meta.num_elements() > 0 && writable(p) && moment(m) && moment(v) && readable(g) && m.dtype == p.dtype && v.dtype == p.dtype && [g, m, v].into_iter().all(like);
    takes.then_some([p, g, m, v])
}

/// A new tensor for the parameter's cast to `half` (bf16 or f16, other than the parameter's).
fn half_output(p: &CubeTensor, half: Option<DType>) -> Option<CubeTensor> {
    let half = half.filter(|&d| matches!(d, DType::F16 | DType::BF16) && d != p.dtype)?;
    Some(burn_cubecl::ops::numeric::empty_device_contiguous_dtype(p.client.clone(), p.device.clone(), p.meta.shape().clone(), half))
}

fn scalars(c: &Coeffs) -> ScalarsLaunch {
    ScalarsLaunch::new(c.decay.unwrap_or(1.0), c.scale.unwrap_or(1.0), c.w1, c.b2, c.w2, c.bc2_sqrt, c.eps, c.neg_step_size)
}

/// One parameter's update: [`adamw_kernel`], or [`adamw_half_kernel`] with `h`.
fn launch_one(s: &Staged) {
    let Staged { p, g, m, v, h, c } = s;
    let n = p.meta.num_elements();
    let client = p.client.clone();
    let mut tensors = vec![p, g, m, v];
    tensors.extend(h.as_ref());
    let (cube_count, cube_dim, address) = crate::elementwise_launch(n, &tensors);
    let (pv, gv, mv, vv) = (p.clone().into_linear_view(), g.clone().into_linear_view(), m.clone().into_linear_view(), v.clone().into_linear_view());
    let (pd, gd) = (dtype_to_storage_type(p.dtype), dtype_to_storage_type(g.dtype));
    // SAFETY: each unit reads and writes element `i < n` of each tensor, through its layout, and
    // no element of those it writes lies at two places or in a buffer another tensor holds (`h`
    // is new).
    #[allow(unsafe_code)]
    unsafe {
        match h {
            None => adamw_kernel::launch_unchecked(&client, cube_count, cube_dim, address, pv, gv, mv, vv, n, scalars(c), [pd, gd]),
            Some(h) => adamw_half_kernel::launch_unchecked(&client, cube_count, cube_dim, address, pv, gv, mv, vv, h.clone().into_linear_view(), n, scalars(c), [pd, gd, dtype_to_storage_type(h.dtype)]),
        }
    }
}

/// Four parameters' updates of one step in one launch: [`adamw4_kernel`] or [`adamw4_half_kernel`].
fn launch_four(s: &[Staged]) {
    let (first, n_max) = (&s[0], s.iter().map(|s| s.p.meta.num_elements()).max().unwrap_or(0));
    let client = first.p.client.clone();
    let tensors: Vec<&CubeTensor> = s.iter().flat_map(|s| [&s.p, &s.g, &s.m, &s.v].into_iter().chain(s.h.as_ref())).collect();
    let address = tensors.iter().map(|t| t.required_address_type()).max().unwrap_or_default();
    // Each row of the grid strides over its parameter; as many cubes as the largest needs, up
    // to 1,024 (enough to fill a GPU).
    let dim = CubeDim::new_1d(256);
    let count = CubeCount::Static(n_max.div_ceil(256).clamp(1, 1024) as u32, 4, 1);
    let mut ns = SequenceArg::<usize>::new();
    for t in s {
        ns.push(t.p.meta.num_elements());
    }
    let lv = |t: &CubeTensor| t.clone().into_linear_view();
    let (pd, gd) = (dtype_to_storage_type(first.p.dtype), dtype_to_storage_type(first.g.dtype));
    // SAFETY: as in `launch_one`, each row of the grid over its own parameter's `ns[row]`
    // elements; the four parameters (and moments, and casts) are distinct buffers.
    #[allow(unsafe_code)]
    unsafe {
        match &first.h {
            None => adamw4_kernel::launch_unchecked(
                &client, count, dim, address,
                lv(&s[0].p), lv(&s[0].g), lv(&s[0].m), lv(&s[0].v),
                lv(&s[1].p), lv(&s[1].g), lv(&s[1].m), lv(&s[1].v),
                lv(&s[2].p), lv(&s[2].g), lv(&s[2].m), lv(&s[2].v),
                lv(&s[3].p), lv(&s[3].g), lv(&s[3].m), lv(&s[3].v),
                ns, scalars(&first.c), [pd, gd],
            ),
            Some(h0) => {
                let h = |j: usize| lv(s[j].h.as_ref().unwrap_or(h0));
                adamw4_half_kernel::launch_unchecked(
                    &client, count, dim, address,
                    lv(&s[0].p), lv(&s[0].g), lv(&s[0].m), lv(&s[0].v), h(0),
                    lv(&s[1].p), lv(&s[1].g), lv(&s[1].m), lv(&s[1].v), h(1),
                    lv(&s[2].p), lv(&s[2].g), lv(&s[2].m), lv(&s[2].v), h(2),
                    lv(&s[3].p), lv(&s[3].g), lv(&s[3].m), lv(&s[3].v), h(3),
                    ns, scalars(&first.c), [pd, gd, dtype_to_storage_type(h0.dtype)],
                )
            }
        }
    }
}

/// The update in place when the kernel takes the four ([`taken`]); `None` leaves them untouched
/// for the tensor-operation form. With `half`, the new parameter cast to that dtype as well (a
/// new contiguous tensor).
pub(crate) fn adamw(tensors: [&DispatchTensorKind; 4], new_moments: bool, c: &Coeffs, half: Option<DType>) -> Option<Option<CubeTensor>> {
    let [p, g, m, v] = taken(tensors, new_moments)?;
    let staged = Staged { h: half_output(p, half), p: p.clone(), g: g.clone(), m: m.clone(), v: v.clone(), c: *c };
    launch_one(&staged);
    Some(staged.h)
}

/// One parameter's update, staged.
struct Staged {
    p: CubeTensor,
    g: CubeTensor,
    m: CubeTensor,
    v: CubeTensor,
    h: Option<CubeTensor>,
    c: Coeffs,
}

impl Staged {
    /// Whether `other` can share a launch with this one: the same dtypes, device and scalars.
    fn joins(&self, other: &Staged) -> bool {
        let dtypes = |s: &Staged| (s.p.dtype, s.g.dtype, s.h.as_ref().map(|h| h.dtype));
        dtypes(self) == dtypes(other) && self.p.device == other.p.device && self.c.same_update(&other.c)
    }
}

/// The updates of a step's parameters, staged to run four to a launch: [`Batch::stage`] takes each
/// parameter as the optimizer visits it and [`Batch::flush`] runs what is left. The parameter,
/// its moments and its cast are updated in place, so the tensors the optimizer hands on are
/// the updated ones once the batch is flushed; nothing reads them before (the optimizer only
/// collects them). On a device that binds fewer buffers than a launch of four takes, each
/// update runs as it is staged.
#[derive(Default)]
pub(crate) struct Batch {
    staged: Vec<Staged>,
}

impl Batch {
    /// Stages the update when the kernel takes the four ([`taken`]), as [`adamw`]; `None` leaves
    /// them untouched.
    pub(crate) fn stage(&mut self, tensors: [&DispatchTensorKind; 4], new_moments: bool, c: &Coeffs, half: Option<DType>) -> Option<Option<CubeTensor>> {
        let [p, g, m, v] = taken(tensors, new_moments)?;
        let staged = Staged { h: half_output(p, half), p: p.clone(), g: g.clone(), m: m.clone(), v: v.clone(), c: *c };
        let h = staged.h.clone();
        if (p.client.properties().hardware.max_bindings as usize) < 4 * 5 + 2 {
            launch_one(&staged);
            return Some(h);
        }
        if self.staged.first().is_some_and(|first| !first.joins(&staged)) {
            self.flush();
        }
        self.staged.push(staged);
        if self.staged.len() == 4 {
            launch_four(&self.staged);
            self.staged.clear();
        }
        Some(h)
    }

    /// Runs the staged updates.
    pub(crate) fn flush(&mut self) {
        match self.staged.len() {
            4 => launch_four(&self.staged),
            _ => self.staged.iter().for_each(launch_one),
        }
        self.staged.clear();
    }
}
