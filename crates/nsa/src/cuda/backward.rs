//! CUDA backward pass of NSA: gradients of `sum(o * d_o)` for q, each branch's K/V (the
//! compressed branch's back through phi to the raw `k_cmp`/`v_cmp`), the three gates and the
//! parameters of phi = linear / mlp. bf16 operands on the tensor cores (mma.sync m16n8k16), f32
//! accumulation, f32 gradients.
//!
//! Two modes ([`BwdMode`]) for each branch's softmax statistics:
//! - [`BwdMode::SavedStats`], the default of [`backward`], `nsa::backward(Device::Cuda)`, `nsa
//!   backward --device cuda` and the benchmarks: the forward saves each branch's output o_b
//!   (bf16) and lse ([`DeviceInputs::enable_saving`]); `bwd_gate_dot` writes `dg_b = do . o_b`
//!   (which also serves as Delta) and the row-major kernels skip their statistics pass;
//! - [`BwdMode::Recompute`] ([`backward_recompute`], `--recompute` in the benchmarks), the
//!   low-memory mode: nothing saved (3 x N x HQ x dv bf16 less), the row-major kernels recompute
//!   o_b and the lse first (about 1.4x the backward time at 64k).
//!
//! Per branch b, FlashAttention-2 style (kernels/bwd_common.cu has the algebra):
//! - a row-major kernel (after the statistics: saved or recomputed) accumulates dQ over the
//!   branch's keys (dQ is summed over the branches in a fixed order: compressed `=`, window
//!   `+=`, selection `+=`);
//! - a key-major kernel walks, for each 64-key tile, the rows that see it and writes dK, dV.
//!
//! The compressed branch's dK/dV go back through phi: mean (`cmp_mean_bwd`) or linear / mlp
//! (`phi` module, kernels/phi_bwd.cu: deterministic f32 GEMMs, parameter gradients in `dphi`).
//!
//! The selection branch's dQ in the saved-statistics mode at G < 16 is block-outer
//! (`sel_block::SelBlockDq`, kernels/sel_block_bwd.cu: the forward's chunked inverse index, one
//! CTA per selection-block segment, partial dQ rows per (t, head, rank) merged in rank order),
//! since the position-major `sel_bwd_dq` reads every selected K/V block for only the rows of
//! its `min(32, 64 / G)` positions that chose it.
//!
//! The selection branch's key-major pass goes through an inverse index built on the GPU
//! (kernels/sel_bwd.cu): per (KV head, selection block) the ascending list of tokens that chose
//! it, cut into fixed segments; lists of one segment write their block's dK/dV, longer lists write
//! partial sums reduced in segment order. No floating-point atomics anywhere: the gradients are
//! bitwise identical run after run.
//!
//! Extra device memory beyond inputs, outputs and gradients is O(T): the bf16 copy of do, three
//! lse rows `[N, HQ]`, the compressed dK/dV `[N/d, HKV, dk+dv]`, the index (`N*HKV*n` entries
//! plus 256 chunk counters per (head, block)) and the partial sums of long lists; for phi =
//! linear / mlp the `dZ` scratch (`[HKV, N/d, l*D]` f32) and the parameter gradients.

pub mod bench;
mod kernels;
mod phi;
mod plan;
mod sel_fused;
mod stages;

pub use kernels::{compile_bwd, BwdCompiled, BwdFamily};

use super::sel_block::{self, SelBlockDq};
use super::{driver_err, forward_device, module, CudaContext, DeviceInputs, Elem, HostElem};
use crate::config::{NsaConfig, PhiKind};
use crate::error::{NsaError, Result};
use crate::inputs::{NsaGrads, NsaInputs, PhiParams};
use cudarc::driver::{self, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use kernels::BwdKernels;
use sel_fused::SelFusedDq;

/// How the saved-statistics backward computes the selection branch's dQ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SelDqPath {
    /// The default: [`SelDqPath::Fused`] where it is built; elsewhere (dk 192, l' > 64, sm_80,
    /// the recompute mode) block-outer (`selb_bwd_dq`) for G < 16 and position-major
    /// (`sel_bwd_dq`) at G >= 16. `NSA_SEL_DQ_PATH=rows|block` picks one of those instead.
    #[default]
    Auto,
    /// Position-major `sel_bwd_dq` at every G.
    Rows,
    /// Block-outer `selb_bwd_dq` + `selb_dq_merge` at every G.
    Block,
    /// dQ partials written by the dK/dV pass itself (`sel_bwd_dkdv_dq`, no second walk over
    /// the selected blocks), merged in rank order; saved-statistics mode, sm_90a, dk and dv in
    /// {64, 128}, l' <= 64, n <= 32 (`cuda/backward/sel_fused.rs`). 64k, HQ 64, H100: backward
    /// 93.0 -> 89.4 ms at G = 16, 121.8 -> 119.1 at G = 1; +4 GiB peak at G = 16.
    Fused,
}

impl SelDqPath {
    /// The path `NSA_SEL_DQ_PATH` names (`rows`, `block` or `fused`), else [`SelDqPath::Auto`].
    pub fn from_env() -> Self {
        match std::env::var("NSA_SEL_DQ_PATH").ok().as_deref() {
            Some("rows") => SelDqPath::Rows,
            Some("block") => SelDqPath::Block,
            Some("fused") => SelDqPath::Fused,
            _ => SelDqPath::Auto,
        }
    }
}

/// Tokens of one inverse-index segment: `max(64, 16384 / G)` (16k query rows per CTA).
fn segment_positions(g: usize) -> usize {
    (16384 / g).max(64)
}

/// Dynamic shared memory (bytes) of the three kernel shapes (mirrors the `.cu` layouts).
#[derive(Debug, Clone, Copy)]
struct BwdSmem {
    /// cmp_bwd_dq / win_bwd_dq: 64 rows of q and do, one K/V tile.
    rows64: usize,
    /// cmp_bwd_dq_saved / win_bwd_dq_saved: `rows64`, or on wgmma its swizzled layout (larger
    /// at dk 192 only).
    rows64_saved: usize,
    /// sel_bwd_dq
    rows_sel: usize,
    sel_threads: usize,
    /// key-major kernels: mma.sync `BW_KV_SMEM` (K/V tile, two buffers of 32 rows of q and do),
    /// on sm_90a with dk in {64, 128, 192} and dv in {64, 128} the wgmma `BW_WG_KV_SMEM`
    /// (unpadded swizzled tiles, buffers of [`wg_kv_rows`] rows). The selection's.
    kv: usize,
    /// The compressed and window key-major kernels: `kv` with one K/V tile per key warpgroup
    /// (`BW_WG_KV_SMEM_KW`).
    kv_km: usize,
    /// Their keys per CTA (`BW_KM_KEYS`: 64 per key warpgroup) and threads (128 per warpgroup).
    km_keys: usize,
}

impl BwdSmem {
    fn km_threads(&self) -> usize {
        2 * self.km_keys
    }
}

/// Rows per step of the key-major wgmma kernels (`BW_WG_RT` in kernels/bwd_wgmma.cu): 64, or 32
/// at dk = 192 (registers: the dK accumulator alone is 96 f32 per thread there).
fn wg_kv_rows(dk: usize) -> usize {
    if dk == 192 {
        32
    } else {
        64
    }
}

/// Which backward kernels run on wgmma (kernels/bwd_wgmma.cu: `BW_WG`, `BW_WG_DQ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WgPaths {
    /// The key-major dK/dV kernels (cmp_bwd_dkdv, win_bwd_dkdv, sel_bwd_dkdv).
    kv: bool,
    /// The saved-statistics row-major dQ kernels (cmp_bwd_dq_saved, win_bwd_dq_saved).
    dq: bool,
    /// The compressed and window key-major kernels may run two key warpgroups per CTA
    /// (`BW_KM_KW`: not switched off by `-DBW_KM_ONE_WG`, `-DBWD_NO_WGMMA` or `-DBW_WG_RT=32`);
    /// they do where `kv` runs 64-row steps (dk 64 / 128, see `smem_of`).
    km_two: bool,
    /// At dk 192: the dQ kernels keep one K/V tile buffer (the default), not two (`-DBW_WG_DQ_2BUF`).
    dq_one_buffer: bool,
}

/// Whether the backward's wgmma kernels are compiled in for `arch` and these head dimensions:
/// sm_90a, dk in {64, 128, 192}, dv in {64, 128}. At dk 64 / 128 `-DBWD_NO_WGMMA` only shrinks
/// what they use (the footprints stay); at dk 192 the host mirrors the A/B switches
/// `-DBW_WG_NO_192` (every kernel back on mma.sync, the pre-v16 footprints), `-DBWD_NO_WGMMA`
/// (the same), `-DBW_WG_NO_192_DQ` (only the dQ kernels back on mma.sync) and `-DBW_WG_DQ_2BUF`
/// (the dQ kernels with two K/V buffers: one CTA per SM; the default is one buffer).
fn wgmma_kernels(arch: &str, dk: usize, dv: usize) -> WgPaths {
    let dims = matches!(dk, 64 | 128 | 192) && matches!(dv, 64 | 128);
    let kv = arch == "sm_90a"
        && dims
        && (dk != 192
            || !(module::define_set("-DBW_WG_NO_192") || module::define_set("-DBWD_NO_WGMMA")));
    let dq = kv && (dk != 192 || !module::define_set("-DBW_WG_NO_192_DQ"));
    WgPaths {
        kv,
        dq,
        km_two: !module::define_set("-DBW_KM_ONE_WG")
            && !module::define_set("-DBWD_NO_WGMMA")
            && module::define_value("BW_WG_RT").is_none_or(|r| r == 64),
        dq_one_buffer: !module::define_set("-DBW_WG_DQ_2BUF"),
    }
}

fn smem_of(dk: usize, dv: usize, g: usize, nsel: usize, sel_l: usize, wg: WgPaths) -> BwdSmem {
    let (qs, ks, vs, ds) = (dk + 8, dk + 8, dv + 8, dv + 8);
    let kvt = plan::KT * (ks + vs) * 2;
    // BW_QSTAGES: the compressed / window row-major kernels double-buffer their K/V tiles when
    // dk + dv <= 256; the selection kernel (BS_P positions, BS_STAGES buffers) by the same rule
    // in its packed layout (G < 16 by default; plan::sel_one_warp, sel_positions, sel_stages)
    let stages = if dk + dv <= 256 { 2 } else { 1 };
    let p = plan::sel_positions(g);
    let sel_rows = (p * g).div_ceil(16) * 16;
    let rows64 = plan::BQ_ROWS * (qs + ds) * 2 + stages * kvt;
    let kv = if wg.kv {
        // 1 KB of alignment slack, the unpadded swizzled K/V tile and two row buffers
        1024 + plan::KT * (dk + dv) * 2 + 2 * wg_kv_rows(dk) * ((dk + dv) * 2 + 16)
    } else {
        kvt + 2 * (32 * (qs + ds) * 2 + 32 * 16)
    };
    // two key warpgroups (bwd_wgmma.cu's BW_KM_KW) on the wgmma path at 64-row steps
    let km_wgs = if wg.km_two && wg.kv && wg_kv_rows(dk) == 64 {
        2
    } else {
        1
    };
    BwdSmem {
        rows64,
        // the wgmma dQ pass: 1 KB of alignment slack, the swizzled Q / dO rows and two swizzled
        // K/V tiles (more than the padded layout only at dk + dv > 256, i.e. dk 192), one tile
        // at dk 192 unless `-DBW_WG_DQ_2BUF` (`BW_WG_DQ_STAGES`)
        rows64_saved: if wg.dq {
            let stages = if dk == 192 && wg.dq_one_buffer { 1 } else { 2 };
            rows64.max(1024 + (plan::BQ_ROWS + stages * plan::KT) * (dk + dv) * 2)
        } else {
            rows64
        },
        rows_sel: sel_dq_smem(dk, dv, g, nsel, sel_l, p, plan::sel_stages(g, dk, dv)),
        sel_threads: sel_rows * 2,
        kv,
        kv_km: kv + (km_wgs - 1) * plan::KT * (dk + dv) * 2,
        km_keys: km_wgs * plan::KT,
    }
}

/// Dynamic shared memory of `sel_bwd_dq` (kernels/sel_bwd.cu) with `p` positions per CTA and
/// `stages` K/V tiles: q / do of the CTA's rows (padded to warps of 16), the tiles, the
/// positions' block lists and the list of their union's key tiles (`BS_MAX_TILES` entries of
/// first key, length, mask; and its count).
fn sel_dq_smem(
    dk: usize,
    dv: usize,
    g: usize,
    nsel: usize,
    sel_l: usize,
    p: usize,
    stages: usize,
) -> usize {
    let rows = (p * g).div_ceil(16) * 16;
    let max_tiles = p * nsel * sel_l.div_ceil(plan::KT);
    rows * (dk + 8 + dv + 8) * 2
        + stages * plan::KT * (dk + 8 + dv + 8) * 2
        + p * nsel * 4
        + (3 * max_tiles + 1) * 4
}

/// Milliseconds per backward kernel (CUDA events); `sel_index` is the inverse-index build
/// (count, scans, fill and the read-back of its size), `sel_dkdv` includes the partial reduction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BwdTimes {
    pub cmp_dq: f32,
    pub cmp_dkdv: f32,
    /// phi backward: mean, or linear / mlp (`phi_bwd.cu`).
    pub cmp_mean: f32,
    pub win_dq: f32,
    pub win_dkdv: f32,
    pub sel_index: f32,
    pub sel_dq: f32,
    pub sel_dkdv: f32,
    pub total: f32,
}

/// Gradients, scratch and work lists of one batch layout, resident on the GPU.
pub struct DeviceBackward {
    kernels: BwdKernels,
    smem: BwdSmem,
    n_tokens: usize,
    hq: usize,
    hkv: usize,
    dk_dim: usize,
    dv_dim: usize,
    nsel: usize,
    nseq: usize,
    nb: usize,
    nchunks: usize,
    chunk_len: usize,
    seg_len: usize,
    rows64: CudaSlice<i32>,
    n_rows64: usize,
    rows_sel: CudaSlice<i32>,
    n_rows_sel: usize,
    cmp_kv: CudaSlice<i32>,
    n_cmp_kv: usize,
    cmp_reduce: CudaSlice<i32>,
    n_cmp_reduce: usize,
    /// Partial sums of the compressed key tiles cut into chunks `[slots, HKV, 64, dk|dv]`.
    pkc: CudaSlice<f32>,
    pvc: CudaSlice<f32>,
    win_kv: CudaSlice<i32>,
    n_win_kv: usize,
    seqs: CudaSlice<i32>,
    blocks: CudaSlice<i32>,
    /// 16-bit copy (the inputs' element type) of the upstream gradient `[N, HQ, dv]`.
    d_o: CudaSlice<u16>,
    /// The element type of the inputs and kernels.
    elem: Elem,
    /// `[N, HQ, dk]`
    pub dq: CudaSlice<f32>,
    /// dK per branch (compressed, selected, window), `[N, HKV, dk]`.
    pub dk: [CudaSlice<f32>; 3],
    /// dV per branch, `[N, HKV, dv]`.
    pub dv: [CudaSlice<f32>; 3],
    /// gate gradients per branch, `[N, HQ]`.
    pub dg: [CudaSlice<f32>; 3],
    lse: [CudaSlice<f32>; 3],
    dkc: CudaSlice<f32>,
    dvc: CudaSlice<f32>,
    cnt: CudaSlice<i32>,
    total: CudaSlice<i32>,
    base: CudaSlice<i32>,
    seg_base: CudaSlice<i32>,
    pslot_base: CudaSlice<i32>,
    summary: CudaSlice<i32>,
    list: CudaSlice<i32>,
    /// The rank of each list entry's block in its token's selection (fused path only: one entry
    /// otherwise), written by `sel_index_fill` next to `list`.
    list_rank: CudaSlice<i32>,
    pk: CudaSlice<f32>,
    pv: CudaSlice<f32>,
    pslot_cap: usize,
    /// phi = linear / mlp: gradients and scratch (None for mean).
    phi: Option<phi::PhiBwd>,
    /// `cu_seqlens` of the batch (the block-outer selection dQ's chunk plan).
    cu: Vec<usize>,
    /// Whether the saved-statistics backward takes the block-outer selection dQ
    /// ([`sel_block::dq_enabled`]: G < 16 by default).
    selb_dq_on: bool,
    /// Its chunk plan, index and partial buffers (allocated on the first such backward).
    selb_dq: Option<SelBlockDq>,
    /// Whether the saved-statistics backward takes the fused selection pass ([`SelDqPath::Fused`]).
    fused_on: bool,
    /// Whether this configuration has the fused kernel ([`sel_fused::available`]).
    fused_ok: bool,
    /// Its partial buffers (allocated on the first such backward).
    fused: Option<SelFusedDq>,
    /// The inputs' kernel shape (families loaded later: [`DeviceBackward::set_sel_dq_path`]).
    shape: module::Shape,
    /// The overlapped backward's second stream and events ([`DeviceBackward::set_overlap`]).
    overlap: Option<stages::Overlap>,
    /// Segments and partial slots of the last run's inverse index.
    pub last_segments: usize,
    pub last_partial_slots: usize,
}

fn alloc<T: driver::DeviceRepr>(ctx: &CudaContext, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every buffer is written (upload, memset or a kernel) before it is read.
    unsafe { ctx.stream.alloc::<T>(len.max(1)) }.map_err(driver_err)
}

fn upload_i32(ctx: &CudaContext, v: &[i32]) -> Result<CudaSlice<i32>> {
    let v = if v.is_empty() { vec![0; 4] } else { v.to_vec() };
    ctx.stream.clone_htod(&v).map_err(driver_err)
}

impl DeviceBackward {
    /// Allocates gradients and scratch for the inputs `x` (uploaded with `cu_seqlens`; for phi
    /// = linear / mlp with its weights set, [`DeviceInputs::set_phi`]), compiles and loads the
    /// kernels.
    pub fn new(ctx: &CudaContext, x: &DeviceInputs, cu_seqlens: &[usize]) -> Result<Self> {
        let cfg = &x.cfg;
        let n = x.n_tokens;
        if cu_seqlens.first() != Some(&0) || cu_seqlens.last() != Some(&n) {
            return Err(NsaError::BadSeqLens(format!(
                "cu_seqlens {cu_seqlens:?} do not describe the {n} uploaded tokens"
            )));
        }
        let shape = &x.shape;
        let (hq, hkv, dk, dv, nsel) = (shape.hq, shape.hkv, shape.dk, shape.dv, shape.nsel);
        let g = hq / hkv;
        let entries = n * hkv * nsel;
        if entries >= i32::MAX as usize || n * hq >= i32::MAX as usize {
            return Err(NsaError::IndexOverflow {
                what: "selection index entries",
                value: entries as u128,
                limit: 31,
            });
        }
        let wg = wgmma_kernels(&ctx.arch, dk, dv);
        let smem = smem_of(dk, dv, g, nsel, shape.sel_l, wg);
        let need = smem.rows64_saved.max(smem.rows_sel).max(smem.kv_km);
        if need > ctx.max_smem {
            return Err(NsaError::Unsupported(format!(
                "backward kernels need {need} bytes of shared memory per block, the device offers {}",
                ctx.max_smem
            )));
        }
        let fused_ok = sel_fused::available(wg.kv, dk, dv, shape.sel_l, nsel)
            && sel_fused::smem(dk, dv) <= ctx.max_smem;
        // the fused selection pass is the default where it is built (`NSA_SEL_DQ_PATH=rows|block`
        // picks another path; where it is not built the others run, and only
        // set_sel_dq_path(Fused) is an error)
        let fused_on =
            fused_ok && matches!(SelDqPath::from_env(), SelDqPath::Auto | SelDqPath::Fused);
        let selb_dq_on = sel_block::dq_enabled(shape, ctx.max_smem);
        let kernels = BwdKernels::load(
            ctx,
            shape,
            &bwd_smem_limits(shape, smem),
            selb_dq_on || fused_on,
        )?;
        let p = plan::build(cfg, cu_seqlens, smem.km_keys);
        let nb = p.n_blocks;
        let chunk_len = n.div_ceil(256).max(64);
        let nchunks = n.div_ceil(chunk_len).max(1);
        let npairs = hkv * nb;
        let f = |len: usize| alloc::<f32>(ctx, len);
        let i = |len: usize| alloc::<i32>(ctx, len);
        Ok(DeviceBackward {
            kernels,
            smem,
            elem: shape.elem,
            n_tokens: n,
            hq,
            hkv,
            dk_dim: dk,
            dv_dim: dv,
            nsel,
            nseq: cu_seqlens.len() - 1,
            nb,
            nchunks,
            chunk_len,
            seg_len: segment_positions(g),
            n_rows64: p.rows64.len() / 4,
            rows64: upload_i32(ctx, &p.rows64)?,
            n_rows_sel: p.rows_sel.len() / 4,
            rows_sel: upload_i32(ctx, &p.rows_sel)?,
            n_cmp_kv: p.cmp_kv.len() / 8,
            cmp_kv: upload_i32(ctx, &p.cmp_kv)?,
            n_cmp_reduce: p.cmp_reduce.len() / 4,
            cmp_reduce: upload_i32(ctx, &p.cmp_reduce)?,
            pkc: f(p.cmp_slots * hkv * smem.km_keys * dk)?,
            pvc: f(p.cmp_slots * hkv * smem.km_keys * dv)?,
            n_win_kv: p.win_kv.len() / 4,
            win_kv: upload_i32(ctx, &p.win_kv)?,
            seqs: upload_i32(ctx, &p.seqs)?,
            blocks: upload_i32(ctx, &p.blocks)?,
            d_o: alloc::<u16>(ctx, n * hq * dv)?,
            dq: f(n * hq * dk)?,
            dk: [f(n * hkv * dk)?, f(n * hkv * dk)?, f(n * hkv * dk)?],
            dv: [f(n * hkv * dv)?, f(n * hkv * dv)?, f(n * hkv * dv)?],
            dg: [f(n * hq)?, f(n * hq)?, f(n * hq)?],
            lse: [f(n * hq)?, f(n * hq)?, f(n * hq)?],
            dkc: f(p.n_cmp * hkv * dk)?,
            dvc: f(p.n_cmp * hkv * dv)?,
            cnt: i(nchunks * npairs)?,
            total: i(npairs)?,
            base: i(npairs)?,
            seg_base: i(npairs + 1)?,
            pslot_base: i(npairs)?,
            summary: i(4)?,
            list: i(entries)?,
            list_rank: i(if fused_on { entries } else { 1 })?,
            pk: f(1)?,
            pv: f(1)?,
            pslot_cap: 0,
            phi: match cfg.phi {
                PhiKind::Mean => None,
                _ => Some(phi::PhiBwd::new(ctx, x)?),
            },
            last_segments: 0,
            last_partial_slots: 0,
            cu: cu_seqlens.to_vec(),
            selb_dq_on,
            selb_dq: None,
            fused_on,
            fused_ok,
            fused: None,
            shape: shape.clone(),
            overlap: if overlap_from_env() {
                Some(stages::Overlap::new(ctx)?)
            } else {
                None
            },
        })
    }

    /// Makes later backwards overlap the selection branch's kernels (a second stream) with
    /// the compressed and window ones (`on`, the default), or run every kernel in order on one
    /// stream (`false`; per-kernel times need it). The gradients are the same bits either way.
    /// H100, 64k, with the fused selection pass: 89.4 -> 83.2 ms at G = 16 (NOTES-cuda-bwd.md
    /// v18). `NSA_BWD_OVERLAP=0` turns it off for every [`DeviceBackward`].
    pub fn set_overlap(&mut self, ctx: &CudaContext, on: bool) -> Result<()> {
        self.overlap = match (on, self.overlap.take()) {
            (true, Some(ov)) => Some(ov),
            (true, None) => Some(stages::Overlap::new(ctx)?),
            (false, _) => None,
        };
        Ok(())
    }

    /// Chooses how the saved-statistics backward computes the selection dQ (the recompute mode
    /// always runs `sel_bwd_dq`, whose statistics pass the dK/dV pass reads); loads the kernels
    /// it needs. [`SelDqPath::Fused`] on a configuration without the fused kernel, or
    /// [`SelDqPath::Block`] where the block-outer kernel does not fit, is an
    /// [`NsaError::Unsupported`].
    pub fn set_sel_dq_path(&mut self, ctx: &CudaContext, path: SelDqPath) -> Result<()> {
        let shape = self.shape.clone();
        let block_fits = sel_block::dq_fits(&shape, ctx.max_smem);
        let (block, fused) = match path {
            SelDqPath::Auto if self.fused_ok => (false, true),
            SelDqPath::Auto => (sel_block::dq_enabled(&shape, ctx.max_smem), false),
            SelDqPath::Rows => (false, false),
            SelDqPath::Block if block_fits => (true, false),
            SelDqPath::Block => {
                return Err(NsaError::Unsupported(format!(
                    "the block-outer selection dQ does not fit this shape (l' {}, n {}, {} bytes of shared memory)",
                    shape.sel_l,
                    shape.nsel,
                    sel_block::dq_smem(&shape)
                )))
            }
            SelDqPath::Fused if self.fused_ok => (false, true),
            SelDqPath::Fused => return Err(fused_unsupported(&ctx.arch, &shape)),
        };
        if block || fused {
            let limits = bwd_smem_limits(&shape, self.smem);
            self.kernels
                .ensure(ctx, &shape, BwdFamily::SelBlock, &limits)?;
        }
        self.selb_dq_on = block;
        self.fused_on = fused;
        Ok(())
    }

    /// Uploads the upstream gradient `[N, HQ, dv]` (rounded to the inputs' element type).
    pub fn upload_do(&mut self, ctx: &CudaContext, d_o: &[f32]) -> Result<()> {
        let want = self.n_tokens * self.hq * self.dv_dim;
        if d_o.len() != want {
            return Err(NsaError::ShapeMismatch {
                name: "d_o".into(),
                expected: vec![self.n_tokens, self.hq, self.dv_dim],
                got: vec![d_o.len()],
            });
        }
        ctx.stream
            .memcpy_htod(&self.elem.bits_of(d_o), &mut self.d_o)
            .map_err(driver_err)
    }

    /// Random upstream gradient ~ N(0, 1) in bf16, generated on the device (benchmarks).
    pub fn random_do(&mut self, ctx: &CudaContext, x: &DeviceInputs, seed: u64) -> Result<()> {
        let f = ctx.named_function(super::Family::Fill, "fill_normal_bf16", &x.shape, 0)?;
        let len = self.d_o.len() as i64;
        let mut b = ctx.stream.launch_builder(&f);
        b.arg(&mut self.d_o).arg(&len).arg(&seed);
        // SAFETY: matches `fill_normal_bf16`; the grid-stride loop covers `len` elements.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (4096, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(|_| ())
        .map_err(driver_err)
    }

    /// Fills every gradient with NaN (tests: each element must be written by the kernels).
    pub fn poison(&mut self, ctx: &CudaContext) -> Result<()> {
        let s = &ctx.stream;
        let put = |buf: &mut CudaSlice<f32>| -> Result<()> {
            let nan = vec![f32::NAN; buf.len()];
            s.memcpy_htod(&nan, buf).map_err(driver_err)
        };
        put(&mut self.dq)?;
        for b in 0..3 {
            put(&mut self.dk[b])?;
            put(&mut self.dv[b])?;
            put(&mut self.dg[b])?;
            put(&mut self.lse[b])?;
        }
        if let Some(p) = &mut self.phi {
            for b in p.grads_mut() {
                put(b)?;
            }
        }
        put(&mut self.dkc)?;
        put(&mut self.dvc)
    }

    /// Copies the gradients back (`dphi`: the phi parameter gradients, `Mean` for phi = mean).
    pub fn download(&self, ctx: &CudaContext) -> Result<NsaGrads<f32>> {
        let s = &ctx.stream;
        let get = |b: &CudaSlice<f32>, len: usize| -> Result<Vec<f32>> {
            let mut v = s.clone_dtoh(b).map_err(driver_err)?;
            v.truncate(len);
            Ok(v)
        };
        let (n, hq, hkv) = (self.n_tokens, self.hq, self.hkv);
        let (kl, vl) = (n * hkv * self.dk_dim, n * hkv * self.dv_dim);
        let g = NsaGrads {
            dq: get(&self.dq, n * hq * self.dk_dim)?,
            dk_cmp: get(&self.dk[0], kl)?,
            dv_cmp: get(&self.dv[0], vl)?,
            dk_slc: get(&self.dk[1], kl)?,
            dv_slc: get(&self.dv[1], vl)?,
            dk_win: get(&self.dk[2], kl)?,
            dv_win: get(&self.dv[2], vl)?,
            dg_cmp: get(&self.dg[0], n * hq)?,
            dg_slc: get(&self.dg[1], n * hq)?,
            dg_win: get(&self.dg[2], n * hq)?,
            dphi: match &self.phi {
                Some(p) => p.download(ctx)?,
                None => PhiParams::mean(),
            },
        };
        s.synchronize().map_err(driver_err)?;
        Ok(g)
    }

    /// Bytes of device memory this object holds (gradients, scratch, index, partials).
    pub fn device_bytes(&self) -> usize {
        let f = |b: &CudaSlice<f32>| b.len() * 4;
        let i = |b: &CudaSlice<i32>| b.len() * 4;
        self.d_o.len() * 2
            + f(&self.dq)
            + self.dk.iter().map(f).sum::<usize>()
            + self.dv.iter().map(f).sum::<usize>()
            + self.dg.iter().map(f).sum::<usize>()
            + self.lse.iter().map(f).sum::<usize>()
            + f(&self.dkc)
            + f(&self.dvc)
            + f(&self.pk)
            + f(&self.pv)
            + f(&self.pkc)
            + f(&self.pvc)
            + self.phi.as_ref().map_or(0, |p| p.device_bytes())
            + self.sel_dq_partial_bytes()
            + [
                &self.cnt,
                &self.total,
                &self.base,
                &self.seg_base,
                &self.pslot_base,
                &self.list,
            ]
            .into_iter()
            .map(i)
            .sum::<usize>()
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        self.kernels.get(name).cloned()
    }

    /// Bytes of the block-outer selection dQ's index and partial buffers (0 before its first
    /// backward or when the backward uses `sel_bwd_dq`).
    pub fn sel_dq_partial_bytes(&self) -> usize {
        self.selb_dq.as_ref().map_or(0, |d| d.part_bytes)
            + self.fused.as_ref().map_or(0, |d| d.part_bytes)
    }
}

/// Whether the backward overlaps its selection stages: the default; `NSA_BWD_OVERLAP=0` runs
/// every stage in order on one stream.
fn overlap_from_env() -> bool {
    std::env::var("NSA_BWD_OVERLAP").map_or(true, |v| v != "0")
}

/// The dynamic shared memory each backward kernel needs above the default 48 KB.
fn bwd_smem_limits(shape: &module::Shape, smem: BwdSmem) -> Vec<(&'static str, usize)> {
    vec![
        ("selb_bwd_dq", sel_block::dq_smem(shape)),
        ("cmp_bwd_dq", smem.rows64),
        ("cmp_bwd_dq_saved", smem.rows64_saved),
        ("win_bwd_dq", smem.rows64),
        ("win_bwd_dq_saved", smem.rows64_saved),
        ("sel_bwd_dq", smem.rows_sel),
        ("sel_bwd_dq_saved", smem.rows_sel),
        ("cmp_bwd_dkdv", smem.kv_km),
        ("win_bwd_dkdv", smem.kv_km),
        ("sel_bwd_dkdv", smem.kv),
        ("sel_bwd_dkdv_dq", sel_fused::smem(shape.dk, shape.dv)),
    ]
}

fn fused_unsupported(arch: &str, shape: &module::Shape) -> NsaError {
    NsaError::Unsupported(format!(
        "the fused selection backward needs sm_90a, dk and dv in {{64, 128}}, l' <= 64 and n <= 32 (here {arch}, dk {}, dv {}, l' {}, n {})",
        shape.dk, shape.dv, shape.sel_l, shape.nsel
    ))
}

fn grid(x: usize, y: usize, threads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// What a forward pass saves for the backward (`DeviceInputs::enable_saving`): the row
/// log-sum-exp (log2 domain, +inf for a row that sees nothing) `[N, HQ]` of the selected and
/// window branches (the compressed one's is the forward's own `lse`) and each branch's output
/// o_b before its gate (bf16) `[N, HQ, dv]`, in the order compressed, selected, window. With
/// them the backward skips its statistics pass (dg_b = do . o_b is one elementwise kernel).
pub struct SavedStats {
    /// selected, window
    pub lse: [CudaSlice<f32>; 2],
    /// compressed, selected, window
    pub o: [CudaSlice<u16>; 3],
}

impl DeviceInputs {
    /// Makes every later [`forward_device`] save the branch outputs and lse for the backward
    /// (3 x N x HQ x dv bf16 + 2 x N x HQ f32 more device memory). Idempotent.
    pub fn enable_saving(&mut self, ctx: &CudaContext) -> Result<()> {
        if self.saved.is_none() {
            let (n, hq, dv) = (self.n_tokens, self.shape.hq, self.shape.dv);
            let f = |len| alloc::<f32>(ctx, len);
            let h = |len| alloc::<u16>(ctx, len);
            self.saved = Some(SavedStats {
                lse: [f(n * hq)?, f(n * hq)?],
                o: [h(n * hq * dv)?, h(n * hq * dv)?, h(n * hq * dv)?],
            });
        }
        Ok(())
    }

    /// Whether forwards save the statistics for the backward.
    pub fn saves_stats(&self) -> bool {
        self.saved.is_some()
    }
}

/// Runs the backward kernels. `x` must hold a completed [`forward_device`] (the compressed K/V
/// and `sel_idx`; with [`DeviceInputs::enable_saving`] also the branch outputs and lse, which
/// spare the statistics pass), `b` the upstream gradient. With `times`, records events around
/// each kernel.
pub fn backward_device(
    ctx: &CudaContext,
    x: &DeviceInputs,
    b: &mut DeviceBackward,
    times: Option<&mut BwdTimes>,
) -> Result<()> {
    backward_device_with(ctx, x, b, x.saved.is_some(), times)
}

/// [`backward_device`] using the forward's saved statistics (`use_saved`, which needs
/// [`DeviceInputs::enable_saving`] before the forward) or recomputing them.
pub fn backward_device_with(
    ctx: &CudaContext,
    x: &DeviceInputs,
    b: &mut DeviceBackward,
    use_saved: bool,
    times: Option<&mut BwdTimes>,
) -> Result<()> {
    let saved = if use_saved {
        Some(x.saved.as_ref().ok_or_else(|| {
            NsaError::Unsupported(
                "backward with saved statistics after a forward that saved none".into(),
            )
        })?)
    } else {
        None
    };
    let r = stages::Run { ctx, x, saved };
    let s = &ctx.stream;
    // the selection dQ's partial buffers, allocated on the first backward that needs them,
    // before any stage is queued (the overlapped backward's second stream uses them after
    // waiting for work queued later on the context's stream)
    let fused = saved.is_some() && b.fused_on;
    if fused && b.fused.is_none() {
        b.fused = Some(SelFusedDq::new(
            ctx, b.n_tokens, b.hq, b.hkv, b.dk_dim, b.dv_dim, b.nsel,
        )?);
    }
    if saved.is_some() && !fused && b.selb_dq_on && b.selb_dq.is_none() {
        b.selb_dq = Some(SelBlockDq::new(ctx, &x.shape, &b.cu)?);
    }
    let events = if times.is_some() {
        let mut v = Vec::with_capacity(9);
        for _ in 0..9 {
            v.push(
                ctx.ctx
                    .new_event(Some(driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(driver_err)?,
            );
        }
        Some(v)
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
    if let Some(ov) = b.overlap.take() {
        let done = backward_overlapped(&r, b, &ov);
        b.overlap = Some(ov);
        done?;
        // the stages overlap: only the total is meaningful
        for i in 1..8 {
            rec(i)?;
        }
    } else {
        stages::gate_dots(&r, b, s)?;
        stages::cmp_dq(&r, b, s)?;
        rec(1)?;
        stages::cmp_kv(&r, b, s)?;
        rec(2)?;
        stages::cmp_phi(&r, b, s)?;
        rec(3)?;
        stages::win_dq(&r, b, s)?;
        rec(4)?;
        stages::win_kv(&r, b, s)?;
        rec(5)?;
        let ix = stages::sel_index(&r, b, s)?;
        rec(6)?;
        if !fused {
            stages::sel_dq(&r, b, s)?;
        }
        rec(7)?;
        stages::sel_dkdv(&r, b, s, &ix, None)?;
    }
    rec(8)?;
    if let (Some(t), Some(ev)) = (times, &events) {
        let el = |a: usize, c: usize| ev[a].elapsed_ms(&ev[c]).map_err(driver_err);
        *t = BwdTimes {
            cmp_dq: el(0, 1)?,
            cmp_dkdv: el(1, 2)?,
            cmp_mean: el(2, 3)?,
            win_dq: el(3, 4)?,
            win_dkdv: el(4, 5)?,
            sel_index: el(5, 6)?,
            sel_dq: el(6, 7)?,
            sel_dkdv: el(7, 8)?,
            total: el(0, 8)?,
        };
    }
    Ok(())
}

/// The overlapped backward (the default, [`DeviceBackward::set_overlap`]; bench/NOTES-cuda-bwd.md
/// v18). Stream A (the context's) runs the gate dots, the compressed
/// and window dQ (the `=` then the first `+=` into dq), then their dK / dV and phi; stream B (the
/// device's highest priority) builds the selection index once the gate dots are done, runs the
/// selection dK / dV at once, and its dQ (`+=` into dq) once A's dQ passes are done; A then waits
/// for B. The compute-bound compressed kernels share the SMs with the L2-bound selection ones
/// instead of taking turns. Every buffer is written by one stream, dq in the sequential order:
/// the gradients are bitwise those of the sequential backward.
fn backward_overlapped(
    r: &stages::Run,
    b: &mut DeviceBackward,
    ov: &stages::Overlap,
) -> Result<()> {
    let ctx = r.ctx;
    let (a, sb) = (&ctx.stream, &ov.stream);
    let fused = r.saved.is_some() && b.fused_on;
    // A: everything it runs is queued before the host waits for B's index below
    stages::gate_dots(r, b, a)?;
    ov.gates.record(a).map_err(driver_err)?;
    stages::cmp_dq(r, b, a)?;
    stages::win_dq(r, b, a)?;
    ov.dq.record(a).map_err(driver_err)?;
    stages::cmp_kv(r, b, a)?;
    stages::cmp_phi(r, b, a)?;
    stages::win_kv(r, b, a)?;
    // B
    sb.wait(&ov.gates).map_err(driver_err)?;
    let ix = stages::sel_index(r, b, sb)?;
    if r.saved.is_some() {
        // the dK / dV pass reads only the saved statistics: it starts at once
        stages::sel_dkdv(r, b, sb, &ix, Some(&ov.dq))?;
        if !fused {
            sb.wait(&ov.dq).map_err(driver_err)?;
            stages::sel_dq(r, b, sb)?;
        }
    } else {
        // recompute mode: the dQ pass writes the statistics the dK / dV pass reads
        sb.wait(&ov.dq).map_err(driver_err)?;
        stages::sel_dq(r, b, sb)?;
        stages::sel_dkdv(r, b, sb, &ix, None)?;
    }
    ov.done.record(sb).map_err(driver_err)?;
    a.wait(&ov.done).map_err(driver_err)
}

/// The selection branch's row tensors of the block-outer and fused dQ paths (saved-statistics
/// mode): q, its K / V, do, gate, the forward's lse, dg_slc, sel_idx, and the dq they add into.
fn sel_rows_args<'a>(
    x: &'a DeviceInputs,
    sv: &'a SavedStats,
    d_o: &'a CudaSlice<u16>,
    dg: &'a CudaSlice<f32>,
    dq: &'a mut CudaSlice<f32>,
) -> sel_block::DqArgs<'a> {
    sel_block::DqArgs {
        q: &x.q,
        k: &x.k[1],
        v: &x.v[1],
        d_o,
        gate: &x.gates[1],
        lse: &sv.lse[0],
        dg,
        sel_idx: &x.sel_idx,
        dq,
    }
}

/// How the backward gets each branch's softmax statistics (row log-sum-exp, o_b, dg_b).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BwdMode {
    /// The default: the forward saves each branch's output o_b (bf16) and lse
    /// ([`DeviceInputs::enable_saving`]) and the backward reads them (no statistics pass).
    /// 64k, HQ 64 / HKV 4, D 128 on the H100: backward 141.7 ms, peak 10.7 GiB.
    #[default]
    SavedStats,
    /// Low-memory mode: the forward saves nothing, the backward's row-major kernels recompute
    /// o_b and the lse in an extra pass (3 x N x HQ x dv bf16 less memory: 7.7 GiB peak at 64k,
    /// backward 194 ms).
    Recompute,
}

impl BwdMode {
    /// Whether the forward saves its statistics for the backward.
    pub fn saves_stats(self) -> bool {
        self == BwdMode::SavedStats
    }

    /// A short name for bench notes and records (`saved` or `recompute`).
    pub fn name(self) -> &'static str {
        match self {
            BwdMode::SavedStats => "saved",
            BwdMode::Recompute => "recompute",
        }
    }
}

/// Full backward pass: upload (bf16), forward (sel_idx, compressed K/V, the branch outputs and
/// lse saved for the backward), backward, download. `phi` must match `cfg.phi` (mean, linear or
/// mlp; the gradients of its parameters come back in `dphi`). [`BwdMode::SavedStats`]; see
/// [`backward_recompute`] for the low-memory mode.
pub fn backward<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    backward_with(ctx, cfg, x, phi, d_o, BwdMode::SavedStats)
}

/// [`backward`] in the opt-in low-memory mode [`BwdMode::Recompute`]: the forward saves no
/// branch outputs, the backward recomputes the statistics (about 1.4x the backward time at 64k,
/// 3 x N x HQ x dv bf16 less device memory).
pub fn backward_recompute<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    backward_with(ctx, cfg, x, phi, d_o, BwdMode::Recompute)
}

/// [`backward`] in the given [`BwdMode`]. The element type follows `T` ([`HostElem`]): f32
/// inputs (and `d_o`) are rounded to bf16, `half::f16` inputs compute in f16 (`d_o` rounded to
/// f16), `half::bf16` in bf16.
pub fn backward_with<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
    mode: BwdMode,
) -> Result<NsaGrads<f32>> {
    backward_run(ctx, cfg, x, phi, d_o, mode, None)
}

/// [`backward_with`] with the selection dQ computed on `sel_dq`
/// ([`DeviceBackward::set_sel_dq_path`]; tests of the paths other than the default).
pub fn backward_with_path<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
    mode: BwdMode,
    sel_dq: SelDqPath,
) -> Result<NsaGrads<f32>> {
    backward_run(ctx, cfg, x, phi, d_o, mode, Some(sel_dq))
}

/// Upload, forward, backward (the selection dQ on `sel_dq` when given, else as
/// `NSA_SEL_DQ_PATH` and the default say), download.
fn backward_run<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
    mode: BwdMode,
    sel_dq: Option<SelDqPath>,
) -> Result<NsaGrads<f32>> {
    phi.validate(cfg, x.dk, x.dv)?;
    let mut dev = DeviceInputs::upload(ctx, cfg, x)?;
    dev.set_phi(ctx, phi)?;
    let mut b = DeviceBackward::new(ctx, &dev, &x.cu_seqlens)?;
    if let Some(path) = sel_dq {
        b.set_sel_dq_path(ctx, path)?;
    }
    b.upload_do(ctx, d_o)?;
    b.poison(ctx)?;
    if mode.saves_stats() {
        dev.enable_saving(ctx)?;
    }
    forward_device(ctx, &mut dev, None)?;
    backward_device_with(ctx, &dev, &mut b, mode.saves_stats(), None)?;
    b.download(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_dq_smem_fits_hopper_at_every_group_size() {
        // 227 KB: the opt-in per-block limit of sm_90, for both layouts and 1 or 2 K/V tiles
        for (dk, dv) in [(64, 64), (128, 64), (128, 128), (192, 128), (256, 256)] {
            for g in [1, 2, 3, 4, 8, 16, 24, 32, 64] {
                for one_warp in [false, true] {
                    for stages in [1, 2] {
                        let p = plan::sel_positions_of(g, one_warp, 64);
                        let b = sel_dq_smem(dk, dv, g, 16, 64, p, stages);
                        assert!(b <= 232_448, "dk {dk} dv {dv} G {g}: {b} bytes");
                    }
                }
            }
        }
        // dk = dv = 128, G = 16, l' = 64: 4 warps (64 rows of q / do), two K/V tiles and a list
        // of up to 64 tiles = 105.5 KB (two CTAs per SM); the one-warp layout 16 rows, one tile
        // and up to 16 tiles = 43.8 KB
        let p = plan::sel_positions_of(16, false, 64);
        let two = plan::sel_stages_of(128, 128, false, None);
        assert_eq!(sel_dq_smem(128, 128, 16, 16, 64, p, two), 104_704 + 772);
        let p1 = plan::sel_positions_of(16, true, 64);
        let one = plan::sel_stages_of(128, 128, true, None);
        assert_eq!(sel_dq_smem(128, 128, 16, 16, 64, p1, one), 43_584 + 196);
        // smem_of uses the same layout as the kernel build (NSA_CUDA_DEFINES)
        let s = smem_of(128, 128, 16, 16, 64, wgmma_kernels("sm_80", 128, 128));
        let rows = (plan::sel_positions(16) * 16).div_ceil(16) * 16;
        assert_eq!(s.sel_threads, rows * 2);
        assert_eq!(
            s.rows_sel,
            sel_dq_smem(
                128,
                128,
                16,
                16,
                64,
                plan::sel_positions(16),
                plan::sel_stages(16, 128, 128)
            )
        );
    }

    /// Hopper (H100 / H200): shared memory per SM, the most one block may opt into, and what the
    /// driver reserves per resident CTA.
    const SM_SMEM: usize = 228 * 1024;
    const BLOCK_MAX: usize = 227 * 1024;
    const CTA_RESERVED: usize = 1024;

    fn ctas_per_sm(bytes: usize) -> usize {
        SM_SMEM / (bytes + CTA_RESERVED)
    }

    const ALL_ON: WgPaths = WgPaths {
        kv: true,
        dq: true,
        km_two: true,
        dq_one_buffer: false,
    };

    #[test]
    fn wgmma_footprints_fit_hopper_with_two_key_major_ctas_per_sm() {
        for (dk, dv) in [
            (64, 64),
            (64, 128),
            (128, 64),
            (128, 128),
            (192, 64),
            (192, 128),
        ] {
            for g in [1, 4, 16] {
                let s = smem_of(dk, dv, g, 16, 64, ALL_ON);
                for bytes in [s.rows64, s.rows64_saved, s.rows_sel, s.kv] {
                    assert!(bytes <= BLOCK_MAX, "{dk}/{dv} G {g}: {bytes} B per block");
                }
                // the key-major wgmma kernels were sized for two CTAs per SM (v11; 32-row
                // steps at dk 192)
                assert!(ctas_per_sm(s.kv) >= 2, "{dk}/{dv}: key-major {} B", s.kv);
                // the compressed / window ones with two key warpgroups (dk 64 / 128): one CTA
                // of 8 warps, two K/V tiles sharing the row buffers
                if dk == 192 {
                    assert_eq!((s.kv_km, s.km_keys), (s.kv, 64), "{dk}/{dv}");
                } else {
                    assert_eq!(s.km_keys, 128);
                    assert_eq!(s.kv_km, s.kv + 64 * (dk + dv) * 2);
                    assert!(
                        ctas_per_sm(s.kv_km) >= 1 && s.kv_km <= BLOCK_MAX,
                        "{dk}/{dv}: {} B",
                        s.kv_km
                    );
                }
                // the wgmma dQ layout never shrinks the padded mma.sync one it replaces
                assert!(s.rows64_saved >= s.rows64);
            }
        }
    }

    #[test]
    fn dk192_dq_one_buffer_switch_restores_two_ctas_per_sm() {
        let two = smem_of(192, 128, 16, 16, 64, ALL_ON);
        let one = smem_of(
            192,
            128,
            16,
            16,
            64,
            WgPaths {
                dq_one_buffer: true,
                ..ALL_ON
            },
        );
        assert_eq!(ctas_per_sm(two.rows64_saved), 1);
        assert!(ctas_per_sm(one.rows64_saved) >= 2);
        // the switch concerns only dk 192
        let at128 = |dq_one_buffer| {
            smem_of(
                128,
                128,
                16,
                16,
                64,
                WgPaths {
                    dq_one_buffer,
                    ..ALL_ON
                },
            )
            .rows64_saved
        };
        assert_eq!(at128(true), at128(false));
    }

    #[test]
    fn mma_sync_fallback_keeps_its_footprints() {
        let off = WgPaths {
            kv: false,
            dq: false,
            km_two: false,
            dq_one_buffer: false,
        };
        for (dk, dv) in [(128, 128), (192, 128)] {
            let s = smem_of(dk, dv, 16, 16, 64, off);
            assert_eq!(s.rows64_saved, s.rows64);
        }
        // wgmma only on sm_90a and for the head dimensions bwd_wgmma.cu covers
        for (arch, dk, dv) in [
            ("sm_80", 128, 128),
            ("sm_90", 192, 128),
            ("sm_90a", 256, 128),
            ("sm_90a", 192, 96),
        ] {
            assert!(!wgmma_kernels(arch, dk, dv).kv, "{arch} {dk}/{dv}");
            assert!(!wgmma_kernels(arch, dk, dv).dq, "{arch} {dk}/{dv}");
        }
        let at192 = wgmma_kernels("sm_90a", 192, 128);
        let off192 = module::define_set("-DBW_WG_NO_192") || module::define_set("-DBWD_NO_WGMMA");
        assert_eq!(at192.kv, !off192);
        assert_eq!(
            at192.dq,
            !off192 && !module::define_set("-DBW_WG_NO_192_DQ")
        );
    }
}
