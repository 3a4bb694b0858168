//! CUDA forward pass of NSA for Hopper (sm_90a), 16-bit inputs with f32 accumulation.
//!
//! The 16-bit element type is a choice, [`Elem`]: bf16 (the default) or f16, baked into every
//! kernel (`-DELEM_F16`, part of the kernel cache key). Q/K/V are uploaded in that type: f32
//! inputs are rounded to it once (round to nearest even, [`Elem::bits`]); `half::bf16` /
//! `half::f16` inputs ([`HostElem`]) are copied bit for bit when they are the chosen type. There
//! is no tf32 or f32 tensor-core path: an f32 caller gets the chosen 16-bit type's precision
//! (SPEC.md's 5e-3 tolerance). Gates and `phi` weights stay f32, outputs are f32.
//!
//! Kernels live in `kernels/*.cu`, one family per file (see `module.rs`), compiled by NVRTC at
//! first use with the shapes baked in. The pipeline of one forward call (SPEC.md):
//!
//! 1. `compress_mean`   phi = mean: compressed K/V per sequence (bf16); phi = linear / mlp:
//!    `phi_gemm` (one or two gathered f32 GEMMs per KV head, weights via
//!    [`DeviceInputs::set_phi`]).
//! 2. `cmp_attn`        compressed attention (writes `g_cmp * o_cmp` and the row log-sum-exp).
//! 3. `cmp_topn`        Q Kcmp^T again -> p_cmp, the Eq. 9 selection scores (tensor cores), the
//!    group sum, forced blocks and the streaming top-n (writes `sel_idx`).
//! 4. `sel_attn`        attention over the selected blocks (adds `g_slc * o_slc`); for G < 16
//!    the block-outer path instead (`sel_block.rs`: inverse index, per-block partials, merge).
//! 5. `win_attn`        sliding window (adds `g_win * o_win`): the gated sum is complete.
//!
//! Every tensor offset inside the kernels is 64-bit; token counts must fit in `i32`. No atomics:
//! the same inputs give bitwise-identical outputs. Timings and what limits each kernel:
//! `bench/NOTES-cuda.md`.

pub mod backward;
pub mod bench;
pub mod decode;
mod module;
mod overlap;
mod sel_block;

pub use crate::elem::{Elem, HostElem};
pub use module::{compile, default_mt, Compiled, Family, Shape};

use crate::config::{NsaConfig, PhiKind};
use crate::error::{NsaError, Result};
use crate::inputs::{NsaInputs, NsaOutput, PhiParams, PhiWeights};
use cudarc::driver::{self, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Largest head dimension the kernels take (registers hold a 16 x dv accumulator per warp).
pub const MAX_HEAD_DIM: usize = 256;
/// Largest `n` (the running top list is one warp wide).
pub const MAX_SEL_COUNT: usize = 32;
/// Largest group size (one CTA holds the G heads of a position in its 64 or 128 rows).
pub const MAX_GROUP: usize = 64;

pub(crate) fn driver_err(e: driver::DriverError) -> NsaError {
    use cudarc::driver::sys::cudaError_enum as E;
    match e.0 {
        E::CUDA_ERROR_OUT_OF_MEMORY => NsaError::OutOfMemory(format!("{e:?}")),
        E::CUDA_ERROR_NO_DEVICE | E::CUDA_ERROR_NOT_INITIALIZED | E::CUDA_ERROR_INVALID_DEVICE => {
            NsaError::CudaUnavailable(format!("{e:?}"))
        }
        _ => NsaError::Cuda(format!("{e:?}")),
    }
}

/// A null device pointer for the optional pointer arguments of the kernels.
const NULL_PTR: u64 = 0;

/// Family, kernel name and compile options of a loaded kernel.
type FunctionKey = (Family, String, Vec<String>);
/// Family and compile options of a loaded module (one CUBIN holds all of a family's kernels).
type ModuleKey = (Family, Vec<String>);

/// The modules and kernels loaded so far.
#[derive(Default)]
struct Loaded {
    modules: HashMap<ModuleKey, Arc<driver::CudaModule>>,
    /// Each kernel with the dynamic shared memory limit raised for it so far.
    functions: HashMap<FunctionKey, (CudaFunction, usize)>,
}

/// A GPU, its stream and the kernels compiled for it so far.
pub struct CudaContext {
    ctx: Arc<driver::CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    max_smem: usize,
    loaded: Mutex<Loaded>,
}

impl CudaContext {
    /// Opens device `ordinal`. Fails with `CudaUnavailable` when there is no driver library,
    /// no such device, or no NVRTC library.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { driver::sys::is_culib_present() } {
            return Err(NsaError::CudaUnavailable(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(NsaError::CudaUnavailable(
                "the NVRTC library (libnvrtc) was not found".into(),
            ));
        }
        let n = driver::CudaContext::device_count().map_err(driver_err)?;
        if ordinal >= n.max(0) as usize {
            return Err(NsaError::CudaUnavailable(format!(
                "no CUDA device {ordinal} ({n} present)"
            )));
        }
        let ctx = driver::CudaContext::new(ordinal).map_err(driver_err)?;
        // SAFETY: before any buffer exists. The library orders its work itself: everything runs
        // on `stream` except the overlapped forward's second stream (overlap.rs), which waits
        // on events for what it reads and is joined back before the forward returns; no buffer
        // is freed while that stream may still use it.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(driver_err)?;
        if major < 8 {
            return Err(NsaError::Unsupported(format!(
                "compute capability {major}.{minor}: the kernels need sm_80 or newer (bf16 mma.sync)"
            )));
        }
        // sm_90a unlocks Hopper-only instructions; the kernels need nothing newer than sm_80 today.
        let arch = if major == 9 && minor == 0 {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        let max_smem = ctx
            .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver_err)? as usize;
        let stream = ctx.default_stream();
        Ok(CudaContext {
            ctx,
            stream,
            arch,
            max_smem,
            loaded: Mutex::new(Loaded::default()),
        })
    }

    /// A second stream at the device's highest priority (the overlapped forward and backward:
    /// its CTAs take SM slots ahead of the context stream's as they free up).
    pub(crate) fn high_priority_stream(&self) -> Result<Arc<CudaStream>> {
        let (_, greatest) =
            cudarc::driver::result::stream::get_priority_range().map_err(driver_err)?;
        self.ctx
            .new_stream_with_priority(greatest)
            .map_err(driver_err)
    }

    /// The NVRTC architecture the kernels are compiled for (e.g. `sm_90a`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The device's name.
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(driver_err)
    }

    fn function(&self, family: Family, shape: &Shape, smem: usize) -> Result<CudaFunction> {
        self.named_function(family, family.kernel(), shape, smem)
    }

    /// Kernel `name` of `family` compiled for `shape` (the family's module compiled and loaded on
    /// first use, once for all its kernels), with its dynamic shared memory limit raised to at
    /// least `smem` bytes.
    fn named_function(
        &self,
        family: Family,
        name: &str,
        shape: &Shape,
        smem: usize,
    ) -> Result<CudaFunction> {
        let opts = module::options(shape, &self.arch);
        let key = (family, name.to_string(), opts.clone());
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| NsaError::Cuda("kernel cache poisoned".into()))?;
        if let Some((f, limit)) = loaded.functions.get_mut(&key) {
            if smem > *limit {
                raise_smem_limit(f, smem)?;
                *limit = smem;
            }
            return Ok(f.clone());
        }
        // a family's kernels share one module: compiled and loaded once
        let module = match loaded.modules.get(&(family, opts.clone())) {
            Some(m) => m.clone(),
            None => {
                let compiled = module::compile(family, shape, &self.arch, &[])?;
                let m = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
                    .map_err(driver_err)?;
                loaded.modules.insert((family, opts), m.clone());
                m
            }
        };
        let f = module.load_function(name).map_err(driver_err)?;
        if smem > 0 {
            raise_smem_limit(&f, smem)?;
        }
        loaded.functions.insert(key, (f.clone(), smem));
        Ok(f)
    }
}

/// Lets kernel `f` use up to `bytes` of dynamic shared memory (past the default 48 KB).
pub(crate) fn raise_smem_limit(f: &CudaFunction, bytes: usize) -> Result<()> {
    f.set_attribute(
        driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(driver_err)
}

/// Threads and dynamic shared memory of each kernel for a shape (mirrors the `.cu` layouts).
#[derive(Debug, Clone, Copy)]
struct Footprint {
    cmp_smem: usize,
    topn_smem: usize,
    sel_smem: usize,
    sel_threads: usize,
    sel_positions: usize,
    win_smem: usize,
    positions_64: usize,
}

/// `cmp_attn` double-buffers its K/V tiles unless built with `-DCMP_SINGLE_BUFFER`
/// (an experiment switch through `NSA_CUDA_DEFINES`).
fn cmp_double_buffered() -> bool {
    !module::define_set("-DCMP_SINGLE_BUFFER")
}

/// `cmp_attn` runs on wgmma (cmp_attn.cu's `CMP_USE_WGMMA`): sm_90a, dk a multiple of 64 up to
/// 256, dv 64 or 128, unless `-DCMP_NO_WGMMA` or `-DCMP_SINGLE_BUFFER`.
fn cmp_uses_wgmma(shape: &Shape, arch: &str) -> bool {
    let off = module::define_set("-DCMP_NO_WGMMA") || module::define_set("-DCMP_SINGLE_BUFFER");
    arch == "sm_90a"
        && !off
        && shape.dk.is_multiple_of(64)
        && shape.dk <= 256
        && (shape.dv == 64 || shape.dv == 128)
}

/// K/V chunk stages of `sel_attn` (`SEL_STAGES` in sel_attn.cu): one when dk + dv > 256 unless
/// `-DSEL_2STAGE`, else two.
fn sel_stages(shape: &Shape) -> usize {
    if shape.dk + shape.dv > 256 && !module::define_set("-DSEL_2STAGE") {
        1
    } else {
        2
    }
}

/// K/V stages of the forward's wgmma loops (`FWD_WG_STAGES` in wgmma.cu): one when dk + dv > 256
/// (two CTAs per SM at dk 192), unless `-DFWD_WG_2STAGE`, else two.
fn fwd_wg_stages(shape: &Shape) -> usize {
    if shape.dk + shape.dv > 256 && !module::define_set("-DFWD_WG_2STAGE") {
        1
    } else {
        2
    }
}

/// `win_attn` runs on wgmma (win_attn.cu's `WIN_USE_WGMMA`): sm_90a, dk a multiple of 64 up to
/// 256, dv 64 or 128, unless `NSA_CUDA_DEFINES` holds `-DCMP_NO_WGMMA` or `-DWIN_NO_WGMMA`. The
/// kernel traps when launched with less shared memory than its layout needs.
fn win_uses_wgmma(shape: &Shape, arch: &str) -> bool {
    let off = module::define_set("-DCMP_NO_WGMMA") || module::define_set("-DWIN_NO_WGMMA");
    arch == "sm_90a"
        && !off
        && shape.dk.is_multiple_of(64)
        && shape.dk <= 256
        && (shape.dv == 64 || shape.dv == 128)
}

fn footprint(shape: &Shape, arch: &str) -> Footprint {
    let g = shape.hq / shape.hkv;
    let (qs, ks, vs) = (shape.dk + 8, shape.dk + 8, shape.dv + 8);
    // MT_WIDE in common.cu: m16 row tiles per warp
    let mt = shape.mt;
    let rows = 64 * mt;
    let p_rows = rows / g;
    // P_SEL in sel_attn.cu (SEL_FWD_ROWS rows per CTA, 64 unless `-DSEL_FWD_ROWS=N`)
    let sel_rows = module::define_value("SEL_FWD_ROWS").unwrap_or(64);
    let p_sel = if g >= sel_rows {
        1
    } else {
        (sel_rows / g).min(32)
    };
    let sel_warps = (p_sel * g).div_ceil(16);
    let tiles = |rows: usize| (rows * qs + 64 * ks + 64 * vs) * 2;
    // JSPAN / JW in cmp_attn.cu: selection blocks one tile of 64 compressed blocks touches
    let jspan = (63 * shape.cmp_d + shape.cmp_l - 1) / shape.sel_l + 2;
    let jw = jspan.div_ceil(8) * 8;
    let max_chunks = p_sel * shape.nsel * shape.sel_l.div_ceil(32);
    // LANE_MERGE / RING / TOP_STRIDE in cmp_attn.cu: the score ring and the top lists of cmp_topn
    let per_tile = (64 * shape.cmp_d).div_ceil(shape.sel_l) + 1;
    let lane_min = module::define_value("TOPN_LANE_MIN").unwrap_or(16);
    let lane_merge = p_rows >= lane_min && !module::define_set("-DTOPN_WARP_MERGE");
    // the per-row block scores: transposed [JW][rows + 4] with the lane merge (DST_STRIDE),
    // else [rows][JW + 4] (DS_STRIDE)
    let ds_floats = if lane_merge {
        jw * (rows + 4)
    } else {
        rows * (jw + 4)
    };
    let (ring, top_stride) = if lane_merge {
        ((jspan + per_tile).div_ceil(16) * 16, shape.nsel + 1)
    } else {
        (128, 32)
    };
    Footprint {
        // two K/V stages in `cmp_attn` (see cmp_double_buffered) unless its wgmma loop keeps
        // one (then it fits the padded single-stage footprint: 1 KB of alignment slack is less
        // than the padding of the rows)
        cmp_smem: if cmp_double_buffered()
            && !(cmp_uses_wgmma(shape, arch) && fwd_wg_stages(shape) == 1)
        {
            tiles(rows) + 64 * (ks + vs) * 2
        } else {
            tiles(rows)
        },
        topn_smem: (rows * qs + 64 * ks) * 2
            + ds_floats * 4
            + p_rows * (ring + 1) * 4
            + p_rows * top_stride * 8
            + jw * (64 + 8) * 2,
        // Q rows, SEL_STAGES stages of 32 K/V keys, the index lists and the chunk list
        // (sel_attn.cu)
        sel_smem: (sel_warps * 16 * qs + sel_stages(shape) * 32 * (ks + vs)) * 2
            + p_sel * shape.nsel * 4
            + 3 * max_chunks * 4
            + 16,
        sel_threads: sel_warps * 32,
        sel_positions: p_sel,
        // wgmma: 1 KB alignment slack, the swizzled Q tile, FWD_WG_STAGES unpadded K/V stages
        // (WIN_WG_SMEM)
        win_smem: if win_uses_wgmma(shape, arch) {
            1024 + (rows * shape.dk + fwd_wg_stages(shape) * 64 * (shape.dk + shape.dv)) * 2
        } else {
            tiles(rows)
        },
        positions_64: p_rows,
    }
}

/// The experiment switches set in the environment (`NAME=value`, empty when none): kernel
/// defines and path / overlap choices that change what the GPU runs. The benchmarks write them
/// into their records, so a number measured under a switch is never read as the default's.
pub fn experiment_switches() -> Vec<String> {
    [
        "NSA_CUDA_DEFINES",
        "NSA_SEL_PATH",
        "NSA_SEL_DQ_PATH",
        "NSA_SEL_PARTIAL_MB",
        "NSA_FWD_OVERLAP",
        "NSA_BWD_OVERLAP",
    ]
    .iter()
    .filter_map(|k| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| format!("{k}={v}"))
    })
    .collect()
}

/// The shape limits plus `phi = mean`: what [`DeviceInputs::random`] (the benchmarks' inputs,
/// which carry no phi weights) supports. The forward, backward and decode take any phi
/// ([`check_shapes`] + the phi weights); every refusal is a typed `Unsupported`.
pub fn check_supported(cfg: &NsaConfig, dk: usize, dv: usize) -> Result<()> {
    check_shapes(cfg, dk, dv)?;
    if cfg.phi != PhiKind::Mean {
        return Err(NsaError::Unsupported(format!(
            "random device inputs carry no phi weights: phi = mean only, got {:?}",
            cfg.phi
        )));
    }
    Ok(())
}

/// The shape limits of the forward kernels (any `phi`).
pub fn check_shapes(cfg: &NsaConfig, dk: usize, dv: usize) -> Result<()> {
    cfg.validate()?;
    cfg.validate_dims(dk, dv)?;
    for (name, d) in [("dk", dk), ("dv", dv)] {
        if d % 16 != 0 || d > MAX_HEAD_DIM {
            return Err(NsaError::Unsupported(format!(
                "CUDA kernels need {name} to be a multiple of 16 and at most {MAX_HEAD_DIM}, got {d}"
            )));
        }
    }
    if cfg.sel_count > MAX_SEL_COUNT {
        return Err(NsaError::Unsupported(format!(
            "CUDA kernels select at most {MAX_SEL_COUNT} blocks, got n = {}",
            cfg.sel_count
        )));
    }
    if cfg.group_size() > MAX_GROUP {
        return Err(NsaError::Unsupported(format!(
            "CUDA kernels need a group size G <= {MAX_GROUP}, got {}",
            cfg.group_size()
        )));
    }
    Ok(())
}

/// The kernels' compile-time shape for `cfg` with head dims `dk`/`dv`, in bf16 (the key of the
/// NVRTC cache; `with_elem` for f16): what the forward, backward and decode compile for.
pub fn shape_of(cfg: &NsaConfig, dk: usize, dv: usize) -> Shape {
    Shape {
        dk,
        dv,
        hq: cfg.heads,
        hkv: cfg.kv_heads,
        cmp_l: cfg.cmp_block,
        cmp_d: cfg.cmp_stride,
        sel_l: cfg.sel_block,
        nsel: cfg.sel_count,
        ninit: cfg.init_blocks,
        nlocal: cfg.local_blocks,
        win: cfg.window,
        scale: cfg.softmax_scale(dk),
        mt: module::default_mt(dv),
        elem: Elem::Bf16,
    }
}

/// The work lists of one batch layout (device copies), built once per upload.
struct Plan {
    /// `(src token, dst compressed index)` per compressed token.
    compress: CudaSlice<i32>,
    n_compress: usize,
    n_cmp_total: usize,
    /// `(seq start, seq len, t0, cmp start)` per row tile (compressed and window kernels).
    tiles64: CudaSlice<i32>,
    n_tiles64: usize,
    /// `(seq start, seq len, t0, 0)` per selection CTA.
    tiles_sel: CudaSlice<i32>,
    n_tiles_sel: usize,
    /// Host copies of `tiles64` and `tiles_sel` (the overlapped forward's chunk plan).
    tiles64_host: Vec<i32>,
    tiles_sel_host: Vec<i32>,
}

fn build_plan(ctx: &CudaContext, cfg: &NsaConfig, cu: &[usize], fp: &Footprint) -> Result<Plan> {
    let (l, d) = (cfg.cmp_block, cfg.cmp_stride);
    let mut compress = Vec::new();
    let mut tiles64 = Vec::new();
    let mut tiles_sel = Vec::new();
    let mut cstart = 0usize;
    for w in cu.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        let ncmp = crate::blocks::cmp_blocks_in(len, l, d);
        for i in 0..ncmp {
            compress.extend([(start + i * d) as i32, (cstart + i) as i32]);
        }
        // longest rows first: the causal work of a tile grows with t0, so the heavy CTAs start
        // early and the light ones fill the tail
        for t0 in (0..len).step_by(fp.positions_64).rev() {
            tiles64.extend([start as i32, len as i32, t0 as i32, cstart as i32]);
        }
        for t0 in (0..len).step_by(fp.sel_positions) {
            tiles_sel.extend([start as i32, len as i32, t0 as i32, 0]);
        }
        cstart += ncmp;
    }
    let up = |v: &Vec<i32>| -> Result<CudaSlice<i32>> {
        let v = if v.is_empty() { vec![0; 4] } else { v.clone() };
        ctx.stream.clone_htod(&v).map_err(driver_err)
    };
    Ok(Plan {
        n_compress: compress.len() / 2,
        compress: up(&compress)?,
        n_cmp_total: cstart,
        n_tiles64: tiles64.len() / 4,
        tiles64: up(&tiles64)?,
        n_tiles_sel: tiles_sel.len() / 4,
        tiles_sel: up(&tiles_sel)?,
        tiles64_host: tiles64,
        tiles_sel_host: tiles_sel,
    })
}

/// Inputs, scratch and outputs of one batch layout, resident on the GPU: upload once, run
/// [`forward_device`] many times (benchmarks), read back with [`DeviceInputs::download`].
pub struct DeviceInputs {
    cfg: NsaConfig,
    shape: Shape,
    fp: Footprint,
    n_tokens: usize,
    plan: Plan,
    q: CudaSlice<u16>,
    k: [CudaSlice<u16>; 3],
    v: [CudaSlice<u16>; 3],
    gates: [CudaSlice<f32>; 3],
    kc: CudaSlice<u16>,
    vc: CudaSlice<u16>,
    /// `[N, HQ]` log-sum-exp (log2 domain) of the compressed attention
    lse: CudaSlice<f32>,
    /// `[N, HKV, n]`
    pub sel_idx: CudaSlice<i32>,
    /// `[N, HQ, dv]`
    pub out: CudaSlice<f32>,
    /// `phi` weights when `cfg.phi` is linear or mlp ([`DeviceInputs::set_phi`]).
    phi: Option<DevicePhi>,
    /// Branch outputs and lse saved for the backward (`DeviceInputs::enable_saving`).
    saved: Option<backward::SavedStats>,
    /// Block-outer selection path (small G): batch layout and its work buffers.
    selb: sel_block::SelBlock,
    /// The overlapped forward's stream and chunk plan ([`DeviceInputs::set_overlap`]).
    overlap: Option<overlap::Overlap>,
}

/// `phi` weights (linear / mlp) on the device, f32, in the layout of [`PhiWeights`]:
/// `[pe, w]` or `[pe, w1, b1, w2, b2]` for K and for V, plus the MLP's hidden buffer.
struct DevicePhi {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    hidden: usize,
    /// `[HKV, n_cmp, hidden]` (MLP only)
    hbuf: CudaSlice<f32>,
}

/// f32 -> bf16 bits, round to nearest even (the rounding the tests apply to the reference inputs).
/// [`Elem::bits_of`] does the same for either element type.
pub fn to_bf16_bits(x: &[f32]) -> Vec<u16> {
    Elem::Bf16.bits_of(x)
}

impl DeviceInputs {
    /// Validates the inputs, converts them to 16 bits and uploads them: `f32` inputs to bf16,
    /// `half::bf16` / `half::f16` inputs in their own type, bit for bit ([`HostElem`]).
    pub fn upload<T: HostElem>(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        x: &NsaInputs<T>,
    ) -> Result<Self> {
        Self::upload_as(ctx, cfg, x, T::NATIVE.unwrap_or_default())
    }

    /// [`DeviceInputs::upload`] with the kernels' element type `elem`: f32 inputs are rounded to
    /// it (to nearest even), 16-bit inputs of another type are widened and rounded once.
    pub fn upload_as<T: HostElem>(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        x: &NsaInputs<T>,
        elem: Elem,
    ) -> Result<Self> {
        x.validate(cfg)?;
        check_shapes(cfg, x.dk, x.dv)?;
        let mut dev = Self::allocate(ctx, cfg, &x.cu_seqlens, x.dk, x.dv, elem)?;
        let s = &ctx.stream;
        let bf = |v: &Vec<T>, dst: &mut CudaSlice<u16>| {
            s.memcpy_htod(&elem.bits_of(v), dst).map_err(driver_err)
        };
        bf(&x.q, &mut dev.q)?;
        for (br, (k, v)) in [
            (&x.k_cmp, &x.v_cmp),
            (&x.k_slc, &x.v_slc),
            (&x.k_win, &x.v_win),
        ]
        .into_iter()
        .enumerate()
        {
            bf(k, &mut dev.k[br])?;
            bf(v, &mut dev.v[br])?;
        }
        for (br, g) in [&x.g_cmp, &x.g_slc, &x.g_win].into_iter().enumerate() {
            let g: Vec<f32> = g.iter().map(|&v| v.to_f32()).collect();
            s.memcpy_htod(&g, &mut dev.gates[br]).map_err(driver_err)?;
        }
        Ok(dev)
    }

    /// The 16-bit element type the inputs were uploaded in (and the kernels compute in).
    pub fn elem(&self) -> Elem {
        self.shape.elem
    }

    /// Allocates every buffer of a batch layout (contents undefined) and uploads the plan.
    fn allocate(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        cu_seqlens: &[usize],
        dk: usize,
        dv: usize,
        elem: Elem,
    ) -> Result<Self> {
        let n = *cu_seqlens.last().unwrap_or(&0);
        if n >= i32::MAX as usize / 2 {
            return Err(NsaError::IndexOverflow {
                what: "tokens",
                value: n as u128,
                limit: 31,
            });
        }
        let shape = shape_of(cfg, dk, dv).with_elem(elem);
        let fp = footprint(&shape, &ctx.arch);
        let need = fp
            .cmp_smem
            .max(fp.topn_smem)
            .max(fp.sel_smem)
            .max(fp.win_smem);
        if need > ctx.max_smem {
            return Err(NsaError::Unsupported(format!(
                "kernels need {need} bytes of shared memory per block, the device offers {}",
                ctx.max_smem
            )));
        }
        let plan = build_plan(ctx, cfg, cu_seqlens, &fp)?;
        let s = &ctx.stream;
        let (hq, hkv) = (cfg.heads, cfg.kv_heads);
        let ncmp = plan.n_cmp_total.max(1);
        let bf = |len: usize| -> Result<CudaSlice<u16>> {
            // SAFETY: every buffer is written (upload, fill or a kernel) before it is read.
            unsafe { s.alloc::<u16>(len) }.map_err(driver_err)
        };
        let f = |len: usize| -> Result<CudaSlice<f32>> {
            // SAFETY: as above.
            unsafe { s.alloc::<f32>(len) }.map_err(driver_err)
        };
        let mut x = DeviceInputs {
            cfg: cfg.clone(),
            shape,
            fp,
            n_tokens: n,
            plan,
            q: bf(n * hq * dk)?,
            k: [bf(n * hkv * dk)?, bf(n * hkv * dk)?, bf(n * hkv * dk)?],
            v: [bf(n * hkv * dv)?, bf(n * hkv * dv)?, bf(n * hkv * dv)?],
            gates: [f(n * hq)?, f(n * hq)?, f(n * hq)?],
            kc: bf(ncmp * hkv * dk)?,
            vc: bf(ncmp * hkv * dv)?,
            lse: f(n * hq)?,
            // SAFETY: as above.
            sel_idx: unsafe { s.alloc::<i32>(n * hkv * cfg.sel_count) }.map_err(driver_err)?,
            out: f(n * hq * dv)?,
            phi: None,
            saved: None,
            selb: sel_block::SelBlock::new(cu_seqlens),
            overlap: None,
        };
        let chunks = overlap::chunks_from_env();
        if chunks > 0 {
            x.set_overlap(ctx, chunks)?;
        }
        Ok(x)
    }

    /// Makes every later [`forward_device`] pipeline its kernels over `chunks` chunks of row
    /// tiles on two streams (`cuda/overlap.rs`; opt-in, no gain measured on the H100); 0
    /// turns it off. Only with the position-major selected attention: where the block-outer
    /// path runs (G < 16 by default) the forward stays sequential.
    pub fn set_overlap(&mut self, ctx: &CudaContext, chunks: usize) -> Result<()> {
        self.overlap = if chunks == 0 {
            None
        } else {
            Some(overlap::Overlap::new(
                ctx,
                &self.plan.tiles64_host,
                &self.plan.tiles_sel_host,
                self.fp.positions_64,
                self.fp.sel_positions,
                chunks,
            )?)
        };
        Ok(())
    }

    /// Random inputs generated on the device (benchmarks: no host copy of the activations):
    /// q, k, v ~ N(0, 1) in bf16, gates ~ U(0, 1); with `shared_kv` the branches' K/V are
    /// equal (separate buffers with the same content).
    pub fn random(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        seqlens: &[usize],
        dk: usize,
        dv: usize,
        shared_kv: bool,
        seed: u64,
    ) -> Result<Self> {
        Self::random_as(ctx, cfg, seqlens, dk, dv, shared_kv, seed, Elem::Bf16)
    }

    /// [`DeviceInputs::random`] in element type `elem` (the fill kernel rounds to it).
    #[allow(clippy::too_many_arguments)]
    pub fn random_as(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        seqlens: &[usize],
        dk: usize,
        dv: usize,
        shared_kv: bool,
        seed: u64,
        elem: Elem,
    ) -> Result<Self> {
        check_supported(cfg, dk, dv)?;
        let mut cu = vec![0usize];
        for &l in seqlens {
            cu.push(cu.last().unwrap() + l);
        }
        crate::inputs::validate_cu_seqlens(&cu, *cu.last().unwrap())?;
        let n = *cu.last().unwrap();
        let mut dev = Self::allocate(ctx, cfg, &cu, dk, dv, elem)?;
        let shape = dev.shape.clone();
        let f_norm = ctx.named_function(Family::Fill, "fill_normal_bf16", &shape, 0)?;
        let f_unif = ctx.named_function(Family::Fill, "fill_uniform_f32", &shape, 0)?;
        let s = &ctx.stream;
        let cfg_launch = LaunchConfig {
            grid_dim: (4096, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut tag = 0u64;
        let mut next_seed = || {
            tag += 1;
            seed ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        };
        let sq = next_seed();
        let (sk, sv) = (next_seed(), next_seed());
        let fill_bf = |buf: &mut CudaSlice<u16>, sd: u64| -> Result<()> {
            let len = buf.len() as i64;
            let mut b = s.launch_builder(&f_norm);
            b.arg(buf).arg(&len).arg(&sd);
            // SAFETY: matches `fill_normal_bf16`; the grid-stride loop covers `len` elements.
            unsafe { b.launch(cfg_launch) }
                .map(|_| ())
                .map_err(driver_err)
        };
        fill_bf(&mut dev.q, sq)?;
        for br in 0..3 {
            let (kseed, vseed) = if shared_kv || br == 0 {
                (sk, sv)
            } else {
                (next_seed(), next_seed())
            };
            fill_bf(&mut dev.k[br], kseed)?;
            fill_bf(&mut dev.v[br], vseed)?;
        }
        for br in 0..3 {
            let sd = next_seed();
            let len = dev.gates[br].len() as i64;
            let mut b = s.launch_builder(&f_unif);
            b.arg(&mut dev.gates[br]).arg(&len).arg(&sd);
            // SAFETY: matches `fill_uniform_f32`.
            unsafe { b.launch(cfg_launch) }.map_err(driver_err)?;
        }
        s.synchronize().map_err(driver_err)?;
        debug_assert_eq!(dev.n_tokens, n);
        Ok(dev)
    }

    /// Uploads the `phi` weights (needed when `cfg.phi` is linear or mlp; a no-op for mean).
    pub fn set_phi(&mut self, ctx: &CudaContext, phi: &PhiParams<f32>) -> Result<()> {
        phi.validate(&self.cfg, self.shape.dk, self.shape.dv)?;
        let up = |w: &PhiWeights<f32>| -> Result<Vec<CudaSlice<f32>>> {
            let parts: Vec<&Vec<f32>> = match w {
                PhiWeights::Mean => vec![],
                PhiWeights::Linear { pe, w } => vec![pe, w],
                PhiWeights::Mlp { pe, w1, b1, w2, b2 } => vec![pe, w1, b1, w2, b2],
            };
            parts
                .into_iter()
                .map(|p| ctx.stream.clone_htod(p).map_err(driver_err))
                .collect()
        };
        self.phi = match self.cfg.phi {
            PhiKind::Mean => None,
            _ => {
                let hidden = phi.hidden;
                let len = (self.cfg.kv_heads * self.plan.n_cmp_total * hidden).max(1);
                Some(DevicePhi {
                    k: up(&phi.k)?,
                    v: up(&phi.v)?,
                    hidden,
                    // SAFETY: written by the first MLP layer before the second reads it.
                    hbuf: unsafe { ctx.stream.alloc::<f32>(len) }.map_err(driver_err)?,
                })
            }
        };
        Ok(())
    }

    /// Fills the outputs with NaN (tests: every element must be written by the kernels).
    pub fn poison_outputs(&mut self, ctx: &CudaContext) -> Result<()> {
        let nan = vec![f32::NAN; self.out.len()];
        ctx.stream
            .memcpy_htod(&nan, &mut self.out)
            .map_err(driver_err)?;
        let bad = vec![i32::MIN; self.sel_idx.len()];
        ctx.stream
            .memcpy_htod(&bad, &mut self.sel_idx)
            .map_err(driver_err)
    }

    /// Copies the outputs back.
    pub fn download(&self, ctx: &CudaContext) -> Result<NsaOutput<f32>> {
        let o = ctx.stream.clone_dtoh(&self.out).map_err(driver_err)?;
        let sel_idx = ctx.stream.clone_dtoh(&self.sel_idx).map_err(driver_err)?;
        ctx.stream.synchronize().map_err(driver_err)?;
        Ok(NsaOutput { o, sel_idx })
    }

    /// Number of tokens of the batch.
    pub fn num_tokens(&self) -> usize {
        self.n_tokens
    }

    /// The configuration the inputs were uploaded for.
    pub fn config(&self) -> &NsaConfig {
        &self.cfg
    }
}

/// Milliseconds spent in each kernel of one forward call (CUDA events).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelTimes {
    pub compress: f32,
    pub cmp: f32,
    pub topn: f32,
    pub selected: f32,
    pub window: f32,
    pub total: f32,
}

/// One `phi` (linear: one GEMM; mlp: two) from raw `src` `[N, HKV, d]` into the compressed
/// `dst` `[n_cmp, HKV, d]` (16-bit element type), see `kernels/phi.cu`.
#[allow(clippy::too_many_arguments)]
fn run_phi(
    ctx: &CudaContext,
    f: &CudaFunction,
    shape: &Shape,
    src: &CudaSlice<u16>,
    w: &[CudaSlice<f32>],
    hidden: usize,
    hbuf: &mut CudaSlice<f32>,
    items: &CudaSlice<i32>,
    m: usize,
    d: usize,
    dst: &mut CudaSlice<u16>,
) -> Result<()> {
    let l = shape.cmp_l;
    let null = 0u64;
    let grid = |n: usize| -> Result<(u32, u32, u32)> {
        let gy = m.div_ceil(64);
        if gy > 65535 {
            return Err(NsaError::Unsupported(format!(
                "phi GEMM over {m} compressed tokens (at most {} per call)",
                65535 * 64
            )));
        }
        Ok((n.div_ceil(64) as u32, gy as u32, shape.hkv as u32))
    };
    let cfg = |n: usize| -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: grid(n)?,
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    };
    let (mi, di, lkd) = (m as i32, d as i32, (l * d) as i32);
    let (one, zero) = (1i32, 0i32);
    match w.len() {
        2 => {
            // linear: dst = flatten(x + pe) @ w
            let (n, kd) = (d as i32, lkd);
            let mut b = ctx.stream.launch_builder(f);
            b.arg(src)
                .arg(&w[0])
                .arg(&null)
                .arg(items)
                .arg(&mi)
                .arg(&n)
                .arg(&kd)
                .arg(&di);
            b.arg(&one)
                .arg(&w[1])
                .arg(&null)
                .arg(&zero)
                .arg(&null)
                .arg(dst);
            // SAFETY: matches `phi_gemm`; null pointers are the unused operands.
            unsafe { b.launch(cfg(d)?) }.map_err(driver_err)?;
        }
        5 => {
            // mlp: h = silu(flatten(x + pe) @ w1 + b1); dst = h @ w2 + b2
            let (h, kd) = (hidden as i32, lkd);
            let mut b = ctx.stream.launch_builder(f);
            b.arg(src)
                .arg(&w[0])
                .arg(&null)
                .arg(items)
                .arg(&mi)
                .arg(&h)
                .arg(&kd)
                .arg(&di);
            b.arg(&one)
                .arg(&w[1])
                .arg(&w[2])
                .arg(&one)
                .arg(&mut *hbuf)
                .arg(&null);
            // SAFETY: as above.
            unsafe { b.launch(cfg(hidden)?) }.map_err(driver_err)?;
            let n = d as i32;
            let mut b = ctx.stream.launch_builder(f);
            b.arg(src)
                .arg(&null)
                .arg(&*hbuf)
                .arg(items)
                .arg(&mi)
                .arg(&n)
                .arg(&h)
                .arg(&di);
            b.arg(&zero)
                .arg(&w[3])
                .arg(&w[4])
                .arg(&zero)
                .arg(&null)
                .arg(dst);
            // SAFETY: as above.
            unsafe { b.launch(cfg(d)?) }.map_err(driver_err)?;
        }
        k => {
            return Err(NsaError::Cuda(format!("phi weights: {k} tensors")));
        }
    }
    Ok(())
}

/// The forward's attention kernels of one shape.
struct FwdKernels<'a> {
    cmp: &'a CudaFunction,
    topn: &'a CudaFunction,
    sel: &'a CudaFunction,
    win: &'a CudaFunction,
}

/// `cmp_attn` over the row tiles `tiles` (indices into `plan.tiles64`) on stream `s`.
fn launch_cmp(
    s: &CudaStream,
    k: &FwdKernels,
    x: &mut DeviceInputs,
    tiles: Range<usize>,
) -> Result<()> {
    let cfg = tile_grid(tiles.len(), x.shape.hkv, x.fp.cmp_smem, 128);
    let list = x
        .plan
        .tiles64
        .slice(tiles.start * 4..tiles.end.max(tiles.start + 1) * 4);
    let mut b = s.launch_builder(k.cmp);
    b.arg(&x.q)
        .arg(&x.kc)
        .arg(&x.vc)
        .arg(&x.gates[0])
        .arg(&list)
        .arg(&mut x.out)
        .arg(&mut x.lse);
    match x.saved.as_mut() {
        Some(sv) => b.arg(&mut sv.o[0]),
        None => b.arg(&NULL_PTR),
    };
    // SAFETY: matches `cmp_attn`; one CTA per (tile, KV head).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err)
}

/// `cmp_topn` over the row tiles `tiles` on stream `s`.
fn launch_topn(
    s: &CudaStream,
    k: &FwdKernels,
    x: &mut DeviceInputs,
    tiles: Range<usize>,
) -> Result<()> {
    let cfg = tile_grid(tiles.len(), x.shape.hkv, x.fp.topn_smem, 128);
    let list = x
        .plan
        .tiles64
        .slice(tiles.start * 4..tiles.end.max(tiles.start + 1) * 4);
    let mut b = s.launch_builder(k.topn);
    b.arg(&x.q)
        .arg(&x.kc)
        .arg(&x.lse)
        .arg(&list)
        .arg(&mut x.sel_idx);
    // SAFETY: matches `cmp_topn`; the same tiles as `cmp_attn`.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err)
}

/// Position-major `sel_attn` over the items `items` of `plan.tiles_sel`, or with `Some(list)`
/// of that (reordered) list, on stream `s`.
fn launch_sel(
    s: &CudaStream,
    k: &FwdKernels,
    x: &mut DeviceInputs,
    reordered: Option<&CudaSlice<i32>>,
    items: Range<usize>,
) -> Result<()> {
    let cfg = tile_grid(items.len(), x.shape.hkv, x.fp.sel_smem, x.fp.sel_threads);
    let r = items.start * 4..items.end.max(items.start + 1) * 4;
    let list = match reordered {
        Some(l) => l.slice(r),
        None => x.plan.tiles_sel.slice(r),
    };
    let mut b = s.launch_builder(k.sel);
    b.arg(&x.q)
        .arg(&x.k[1])
        .arg(&x.v[1])
        .arg(&x.gates[1])
        .arg(&list)
        .arg(&x.sel_idx)
        .arg(&mut x.out);
    match x.saved.as_mut() {
        Some(sv) => b.arg(&mut sv.lse[0]).arg(&mut sv.o[1]),
        None => b.arg(&NULL_PTR).arg(&NULL_PTR),
    };
    // SAFETY: matches `sel_attn`.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err)
}

/// `win_attn` over the row tiles `tiles` on stream `s` (completes the gated sum of its rows).
fn launch_win(
    s: &CudaStream,
    k: &FwdKernels,
    x: &mut DeviceInputs,
    tiles: Range<usize>,
) -> Result<()> {
    let cfg = tile_grid(tiles.len(), x.shape.hkv, x.fp.win_smem, 128);
    let list = x
        .plan
        .tiles64
        .slice(tiles.start * 4..tiles.end.max(tiles.start + 1) * 4);
    let mut b = s.launch_builder(k.win);
    b.arg(&x.q)
        .arg(&x.k[2])
        .arg(&x.v[2])
        .arg(&x.gates[2])
        .arg(&list)
        .arg(&mut x.out);
    match x.saved.as_mut() {
        Some(sv) => b.arg(&mut sv.lse[1]).arg(&mut sv.o[2]),
        None => b.arg(&NULL_PTR).arg(&NULL_PTR),
    };
    // SAFETY: matches `win_attn`.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err)
}

/// One CTA per (work item, KV head).
fn tile_grid(items: usize, hkv: usize, smem: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items as u32, hkv as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// Steps 2-5 of the forward pipelined over `ov`'s chunks (overlap.rs): stream A (`ctx.stream`)
/// runs each chunk's compressed attention and top-n and records its event; stream B waits for
/// it and runs the chunk's selected attention, then the window attention of the tiles no later
/// selection touches; A waits for B's last kernel.
fn run_overlapped(
    ctx: &CudaContext,
    k: &FwdKernels,
    x: &mut DeviceInputs,
    ov: &overlap::Overlap,
) -> Result<()> {
    let (a, b) = (&ctx.stream, &ov.stream);
    for (c, ch) in ov.chunks.iter().enumerate() {
        if !ch.tiles.is_empty() {
            launch_cmp(a, k, x, ch.tiles.clone())?;
            launch_topn(a, k, x, ch.tiles.clone())?;
        }
        ov.ready[c].record(a).map_err(driver_err)?;
        b.wait(&ov.ready[c]).map_err(driver_err)?;
        if !ch.sel.is_empty() {
            launch_sel(b, k, x, Some(&ov.tiles_sel), ch.sel.clone())?;
        }
        if !ch.win.is_empty() {
            launch_win(b, k, x, ch.win.clone())?;
        }
    }
    ov.done.record(b).map_err(driver_err)?;
    a.wait(&ov.done).map_err(driver_err)
}

/// Runs the forward pass on device-resident inputs; with `times`, records events around each
/// kernel and waits for them.
pub fn forward_device(
    ctx: &CudaContext,
    x: &mut DeviceInputs,
    times: Option<&mut KernelTimes>,
) -> Result<()> {
    let shape = &x.shape;
    let fp = x.fp;
    let f_compress = ctx.function(Family::Compress, shape, 0)?;
    let f_cmp = ctx.function(Family::CmpAttn, shape, fp.cmp_smem)?;
    let f_topn = ctx.named_function(Family::CmpAttn, "cmp_topn", shape, fp.topn_smem)?;
    let f_sel = ctx.function(Family::SelAttn, shape, fp.sel_smem)?;
    let f_win = ctx.function(Family::WinAttn, shape, fp.win_smem)?;
    let s = &ctx.stream;
    let events = if times.is_some() {
        let mk = || {
            ctx.ctx
                .new_event(Some(driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver_err)
        };
        Some([mk()?, mk()?, mk()?, mk()?, mk()?, mk()?])
    } else {
        None
    };
    let rec = |i: usize| -> Result<()> {
        if let Some(ev) = &events {
            ev[i].record(s).map_err(driver_err)?;
        }
        Ok(())
    };
    rec(0)?;
    // 1. phi: mean, or the linear / mlp GEMMs
    if x.plan.n_compress > 0 && x.cfg.phi != PhiKind::Mean {
        let ph = x
            .phi
            .as_mut()
            .ok_or_else(|| NsaError::MissingTensor("phi weights (DeviceInputs::set_phi)".into()))?;
        let f_phi = ctx.function(Family::Phi, shape, 0)?;
        let m = x.plan.n_compress;
        for (src, w, dst, d) in [
            (&x.k[0], &ph.k, &mut x.kc, shape.dk),
            (&x.v[0], &ph.v, &mut x.vc, shape.dv),
        ] {
            run_phi(
                ctx,
                &f_phi,
                shape,
                src,
                w,
                ph.hidden,
                &mut ph.hbuf,
                &x.plan.compress,
                m,
                d,
                dst,
            )?;
        }
    } else if x.plan.n_compress > 0 {
        let per = x.plan.n_compress * shape.hkv * (shape.dk + shape.dv) / 8;
        let threads = 256u32;
        let blocks = per.div_ceil(threads as usize) as u32;
        let n_items = x.plan.n_compress as i32;
        let mut b = s.launch_builder(&f_compress);
        b.arg(&x.k[0])
            .arg(&x.v[0])
            .arg(&x.plan.compress)
            .arg(&n_items)
            .arg(&mut x.kc)
            .arg(&mut x.vc);
        // SAFETY: argument list matches `compress_mean`; the grid covers exactly the items.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver_err)?;
    }
    rec(1)?;
    let blockwise = sel_block::enabled(shape, ctx.max_smem);
    let ov = x.overlap.is_some() && !blockwise;
    let k = FwdKernels {
        cmp: &f_cmp,
        topn: &f_topn,
        sel: &f_sel,
        win: &f_win,
    };
    if ov {
        // pipelined over chunks on two streams (overlap.rs): per-kernel times are not separable
        let ovl = x.overlap.take().expect("checked");
        let done = run_overlapped(ctx, &k, x, &ovl);
        x.overlap = Some(ovl);
        done?;
        for i in 2..5 {
            rec(i)?;
        }
    } else {
        let all = 0..x.plan.n_tiles64;
        // 2. compressed attention + selection
        launch_cmp(s, &k, x, all.clone())?;
        rec(2)?;
        // 3. selection scores + top-n
        launch_topn(s, &k, x, all.clone())?;
        rec(3)?;
        // 4. selected attention: block-outer for small G (sel_block.rs), else position-major
        if blockwise {
            sel_block::run(ctx, x)?;
        } else {
            launch_sel(s, &k, x, None, 0..x.plan.n_tiles_sel)?;
        }
        rec(4)?;
        // 5. sliding window, completing the gated sum
        launch_win(s, &k, x, all)?;
    }
    rec(5)?;
    if let (Some(t), Some(ev)) = (times, &events) {
        let el = |a: usize, b: usize| ev[a].elapsed_ms(&ev[b]).map_err(driver_err);
        *t = KernelTimes {
            compress: el(0, 1)?,
            cmp: el(1, 2)?,
            topn: el(2, 3)?,
            selected: el(3, 4)?,
            window: el(4, 5)?,
            total: el(0, 5)?,
        };
    }
    Ok(())
}

/// Full forward pass: upload (f32 inputs rounded to bf16; bf16 / f16 inputs in their own type),
/// run, download. `phi` must match `cfg.phi`.
pub fn forward<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    forward_as(ctx, cfg, x, phi, T::NATIVE.unwrap_or_default())
}

/// [`forward`] computing in the element type `elem` (inputs rounded to it once).
pub fn forward_as<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    elem: Elem,
) -> Result<NsaOutput<f32>> {
    phi.validate(cfg, x.dk, x.dv)?;
    let mut dev = DeviceInputs::upload_as(ctx, cfg, x, elem)?;
    dev.set_phi(ctx, phi)?;
    dev.poison_outputs(ctx)?;
    forward_device(ctx, &mut dev, None)?;
    dev.download(ctx)
}

/// Host-side logic of the CUDA path that needs no GPU (these run in CI with `--features cuda`;
/// the kernels themselves are checked by `tests/cuda_*.rs` on a GPU machine).
#[cfg(test)]
mod tests {
    use super::*;

    fn paper(hq: usize, hkv: usize) -> NsaConfig {
        NsaConfig::builder()
            .heads(hq)
            .kv_heads(hkv)
            .build()
            .unwrap()
    }

    #[test]
    fn shape_limits_are_typed_errors() {
        let cfg = paper(64, 4);
        assert!(check_shapes(&cfg, 128, 128).is_ok());
        assert!(check_shapes(&cfg, 192, 128).is_ok());
        assert!(check_shapes(&cfg, 256, 256).is_ok());
        for (dk, dv) in [(100, 128), (512, 128), (128, 8), (128, 272)] {
            assert!(
                matches!(check_shapes(&cfg, dk, dv), Err(NsaError::Unsupported(_))),
                "dk {dk} dv {dv}"
            );
        }
        let many = NsaConfig::builder().sel_count(40).build().unwrap();
        assert!(matches!(
            check_shapes(&many, 128, 128),
            Err(NsaError::Unsupported(_))
        ));
        let wide = paper(128, 1);
        assert!(matches!(
            check_shapes(&wide, 128, 128),
            Err(NsaError::Unsupported(_))
        ));
        // config errors come first, as everywhere else
        assert!(matches!(
            check_shapes(&paper(64, 4), 0, 128),
            Err(NsaError::ZeroSize("dk"))
        ));
    }

    #[test]
    fn random_inputs_need_mean_phi_other_paths_take_any() {
        let mut cfg = paper(16, 2);
        assert!(check_supported(&cfg, 64, 64).is_ok());
        for phi in [PhiKind::Linear, PhiKind::Mlp] {
            cfg.phi = phi;
            assert!(check_shapes(&cfg, 64, 64).is_ok());
            assert!(matches!(
                check_supported(&cfg, 64, 64),
                Err(NsaError::Unsupported(_))
            ));
        }
    }

    #[test]
    fn shape_constants_are_baked_into_the_options() {
        let cfg = NsaConfig::builder()
            .heads(32)
            .kv_heads(8)
            .cmp_block(48)
            .cmp_stride(16)
            .sel_block(96)
            .sel_count(12)
            .window(300)
            .build()
            .unwrap();
        let shape = shape_of(&cfg, 192, 128);
        let opts = module::options(&shape, "sm_90a");
        for want in [
            "--gpu-architecture=sm_90a",
            "-DDK=192",
            "-DDV=128",
            "-DHQ=32",
            "-DHKV=8",
            "-DG=4",
            "-DCMP_L=48",
            "-DCMP_D=16",
            "-DSEL_L=96",
            "-DNSEL=12",
            "-DWIN=300",
        ] {
            assert!(opts.iter().any(|o| o == want), "missing {want} in {opts:?}");
        }
        // the scale goes in exactly: scale * log2(e) as the bits of an f32
        let bits = ((1.0 / 192f64.sqrt()) * std::f64::consts::LOG2_E) as f32;
        let want = format!("-DSCALE_LOG2=__int_as_float({:#x})", bits.to_bits());
        assert!(opts.contains(&want), "{opts:?}");
        // the disk-cache key follows the source and every option
        let key = module::cache_key(Family::CmpAttn, &opts);
        assert_eq!(key, module::cache_key(Family::CmpAttn, &opts));
        assert_ne!(key, module::cache_key(Family::WinAttn, &opts));
        let other = module::options(&shape_of(&cfg, 128, 128), "sm_90a");
        assert_ne!(key, module::cache_key(Family::CmpAttn, &other));
        let arch = module::options(&shape, "sm_100a");
        assert_ne!(key, module::cache_key(Family::CmpAttn, &arch));
    }

    #[test]
    fn element_type_is_a_define_and_part_of_the_cache_key() {
        let cfg = paper(16, 2);
        let bf = shape_of(&cfg, 128, 128);
        assert_eq!(bf.elem, Elem::Bf16);
        let f16 = bf.clone().with_elem(Elem::F16);
        let ob = module::options(&bf, "sm_90a");
        let of = module::options(&f16, "sm_90a");
        // bf16 (the default) adds no define: its kernels and cache keys are unchanged
        assert!(!ob.iter().any(|o| o.contains("ELEM")), "{ob:?}");
        assert_eq!(of.iter().filter(|o| *o == "-DELEM_F16").count(), 1);
        let rest: Vec<String> = of.iter().filter(|o| *o != "-DELEM_F16").cloned().collect();
        assert_eq!(rest, ob);
        for fam in Family::ALL {
            assert_ne!(
                module::cache_key(fam, &ob),
                module::cache_key(fam, &of),
                "{fam:?}"
            );
        }
    }

    #[test]
    fn f16_upload_bits_are_the_half_encoding() {
        let xs = [
            1.0f32,
            -2.5,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            7e4,
            1e-8,
        ];
        let bits = Elem::F16.bits_of(&xs);
        for (x, b) in xs.iter().zip(&bits) {
            assert_eq!(*b, half::f16::from_f32(*x).to_bits(), "{x}");
        }
        // ties to even, overflow to infinity, tiny values to zero
        assert_eq!(Elem::F16.value(bits[2]), 1.0);
        assert_eq!(Elem::F16.value(bits[3]), 1.0 + 2.0 / 1024.0);
        assert_eq!(Elem::F16.value(bits[4]), f32::INFINITY);
        assert_eq!(Elem::F16.value(bits[5]), 0.0);
        // f16 host data goes up unchanged, f32 data equal to it gives the same bits
        let h: Vec<half::f16> = xs.iter().map(|&x| half::f16::from_f32(x)).collect();
        assert_eq!(Elem::F16.bits_of(&h), bits);
    }

    #[test]
    fn bf16_upload_rounds_to_nearest_even() {
        let xs = [
            1.0f32,
            -2.5,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            3.0e38,
            1e-40,
        ];
        let bits = to_bf16_bits(&xs);
        for (x, b) in xs.iter().zip(bits) {
            assert_eq!(b, half::bf16::from_f32(*x).to_bits(), "{x}");
        }
        // ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
        assert_eq!(
            half::bf16::from_bits(to_bf16_bits(&[1.0 + 1.0 / 256.0])[0]).to_f32(),
            1.0
        );
    }

    #[test]
    fn no_driver_is_a_typed_error_not_a_panic() {
        // On a machine without libcuda (CI) this is CudaUnavailable; on a GPU machine it opens
        // the device. Either way: no panic, and no other error.
        match CudaContext::new(0) {
            Ok(ctx) => assert!(ctx.arch().starts_with("sm_")),
            Err(NsaError::CudaUnavailable(_)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
        let cfg = paper(4, 2);
        let x = NsaInputs::random(&cfg, &[40], 16, 16, true, 1);
        match crate::forward(&crate::Device::Cuda(0), &cfg, &x, &PhiParams::mean()) {
            Ok(out) => assert_eq!(out.o.len(), 40 * 4 * 16),
            Err(NsaError::CudaUnavailable(_)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
