//! Decoding on the GPU over a paged KV cache (SPEC.md, "Decoding"), flash-decoding style.
//!
//! # The cache
//!
//! [`GpuDecodeCache`] holds one layer's decoding state for a batch of sequences, the way serving
//! engines do: fixed-size pages of [`PAGE`] tokens taken from a shared pool, and a page table per
//! sequence.
//!
//! - raw K/V of the **selection** and **window** branches: four pools sharing one page table
//!   (position `p` of sequence `b` is slot `p % PAGE` of page `table[b][p / PAGE]`);
//! - **compressed** K/V: two pools with their own page table (position = compressed-token index);
//! - a per-sequence **ring** of the last `l` raw compression-branch tokens.
//!
//! A page is head-major (`[HKV, PAGE, D]`), so the keys one KV group reads are contiguous runs.
//! When a token completes a compression block (`t >= l-1` and `(t+1-l) % d == 0`) one compressed
//! key and value are computed from the last `l` raw tokens (ring and new rows) and appended; the
//! cache is never re-compressed. `phi = mean` is computed by the write kernel itself; for
//! `phi = linear | mlp` the write kernel copies the block's `l` raw tokens to a staging slot,
//! the forward's `phi_gemm` (kernels/phi.cu, gather mode; weights from
//! [`GpuDecodeCache::set_phi`]) maps them to bf16 outputs, and `decode_phi_put` copies those to
//! the compressed pages.
//! A sequence beyond `max_len`, or a pool with no free page, is `NsaError::CacheFull`.
//!
//! # A step
//!
//! Every step is five launches with no host synchronisation (capturable in a CUDA graph; the
//! sequence positions live on the device and the write kernel advances them; a learned `phi`
//! adds its GEMMs and `decode_phi_put`, launched over all `B` sequences: the write kernel marks
//! on the device which sequences completed a block, and the others' rows are skipped):
//! `decode_write` (append + compress), `decode_attn_cw` (split-K over compressed tokens with the
//! Eq. 9 partial scores), `decode_topn`, `decode_sel` (split-K over the selected blocks and the
//! window), `decode_combine` (merge the splits, apply the gates). When a group has few
//! compressed splits (large batches) the top-n runs inside `decode_attn_cw` (the last split of
//! each (row, group) to finish does it) and a step is four launches. See
//! `kernels/decode_attn.cu`.
//!
//! # Prefill
//!
//! [`prefill`] appends a chunk of tokens to each of several sequences in one call. Rows of
//! sequences that were empty come from the blocked forward ([`super::forward`]); rows of
//! sequences that already hold tokens (chunked prefill) run through the decode kernels, one row
//! per token (correct at any length, but row-wise: a long second chunk costs as many decode
//! rows). The chunk's K/V are written by the same `decode_write` kernel.

pub mod bench;

use super::{check_shapes, driver_err, shape_of, CudaContext, Elem, Family, HostElem, Shape};
use crate::blocks;
use crate::config::{NsaConfig, PhiKind};
use crate::error::{NsaError, Result};
use crate::inputs::{NsaInputs, NsaOutput, PhiParams, PhiWeights};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Tokens per page (raw and compressed pools); also the key tile of the kernels.
pub const PAGE: usize = 64;
/// Most rows one launch of the attention kernels takes (chunked prefill loops over this).
const MAX_ROWS: usize = 1024;
/// Most rows one launch of the write kernels takes.
const WRITE_ROWS: usize = 8192;
/// Most compressed tokens one prefill write launch makes with a learned `phi` (staging slots:
/// `l` raw tokens each).
const PHI_STAGE_ROWS: usize = 256;
/// Padding of each row of the compressed kernel's logits buffer (`DEC_LPAD` in decode_attn.cu).
const LOGITS_PAD: usize = 8;
/// Upper bound of the attention kernels' static shared memory (reductions, page numbers,
/// alignment of the dynamic part).
const STATIC_SMEM: usize = 4096;
/// Dynamic shared memory the small kernels may use without raising their limit.
const SMALL_SMEM: usize = 48 * 1024;

/// K/V pipeline depth of the attention kernels: `DEC_STAGES` in decode_attn.cu (2 unless an
/// experiment sets `-DDEC_STAGES=N` through `NSA_CUDA_DEFINES`).
fn stages() -> usize {
    super::module::define_value("DEC_STAGES").unwrap_or(2)
}

/// Page tables of one pool kind: host copy, free list and device copy `[B, maxp]`.
struct PageTable {
    rows: Vec<Vec<i32>>,
    free: Vec<i32>,
    n_pages: usize,
    maxp: usize,
    dev: CudaSlice<i32>,
    dirty: bool,
}

impl PageTable {
    fn new(stream: &Arc<CudaStream>, batch: usize, n_pages: usize, maxp: usize) -> Result<Self> {
        Ok(PageTable {
            rows: vec![Vec::new(); batch],
            // lowest page first
            free: (0..n_pages as i32).rev().collect(),
            n_pages,
            maxp,
            dev: stream
                .alloc_zeros::<i32>(batch * maxp.max(1))
                .map_err(driver_err)?,
            dirty: false,
        })
    }

    /// Makes sequence `b` hold at least `positions` positions.
    fn ensure(&mut self, b: usize, positions: usize) -> Result<()> {
        let need = positions.div_ceil(PAGE);
        if need > self.maxp {
            return Err(NsaError::CacheFull {
                capacity: self.maxp * PAGE,
                needed: positions,
            });
        }
        let have = self.rows[b].len();
        if need > have && need - have > self.free.len() {
            let used: usize = self.rows.iter().map(Vec::len).sum();
            return Err(NsaError::CacheFull {
                capacity: self.n_pages * PAGE,
                needed: (used + need - have) * PAGE,
            });
        }
        while self.rows[b].len() < need {
            let p = self.free.pop().expect("checked above");
            self.rows[b].push(p);
            self.dirty = true;
        }
        Ok(())
    }

    /// Returns the pages of sequence `b` to the pool.
    fn release(&mut self, b: usize) {
        let pages = std::mem::take(&mut self.rows[b]);
        self.dirty |= !pages.is_empty();
        self.free.extend(pages.into_iter().rev());
    }

    fn sync(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut flat = vec![0i32; self.rows.len() * self.maxp.max(1)];
        for (b, r) in self.rows.iter().enumerate() {
            flat[b * self.maxp..b * self.maxp + r.len()].copy_from_slice(r);
        }
        stream
            .memcpy_htod(&flat, &mut self.dev)
            .map_err(driver_err)?;
        self.dirty = false;
        Ok(())
    }
}

/// How the keys of each branch are split across CTAs (flash-decoding), chosen per launch so that
/// a batch of one still fills the GPU while a large batch keeps its partials small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splits {
    /// compressed splits and compressed tokens per split (a multiple of [`PAGE`])
    pub sc: usize,
    pub cc: usize,
    /// window splits and window tokens per split
    pub sw: usize,
    pub cw: usize,
    /// selected splits and selected blocks per split
    pub ss: usize,
    pub spb: usize,
    /// selection-block slots of one compressed split's partial scores
    pub uj: usize,
    /// the top-n runs inside the compressed launch (its last CTA per (row, group)) instead of
    /// a launch of its own
    pub fuse_topn: bool,
}

impl Splits {
    /// Partial slots per (row, group).
    pub fn ns(&self) -> usize {
        self.sc + self.sw + self.ss
    }

    /// Dynamic shared memory of `decode_topn`: (m, l) and weights per (split, head), and the
    /// head-summed partial scores per (split, block slot).
    fn topn_smem(&self, g: usize) -> usize {
        self.sc * g * 12 + self.sc * self.uj * 4
    }
}

/// Device buffers of one launch's rows: new tokens, descriptors, partials, outputs.
struct Work {
    rows: usize,
    /// `(b, t, chunk start, chunk end)` per written row
    wdesc: CudaSlice<i32>,
    /// `(b, t, source row, 0)` per attention row
    adesc: CudaSlice<i32>,
    q: CudaSlice<u16>,
    /// k_cmp, k_slc, k_win
    k: [CudaSlice<u16>; 3],
    v: [CudaSlice<u16>; 3],
    gates: [CudaSlice<f32>; 3],
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    part_u: CudaSlice<f32>,
    /// `[rows, HQ, dv]`
    out: CudaSlice<f32>,
    /// `[rows, HKV, n]`
    sel: CudaSlice<i32>,
    /// `[rows, HKV]` finished compressed splits (fused top-n; every launch leaves it zero)
    done: CudaSlice<i32>,
}

/// `phi` = linear / mlp weights on the device, f32, in the layout of [`PhiWeights`] (`[pe, w]`
/// or `[pe, w1, b1, w2, b2]`), and the host values they hold.
struct DecodePhi {
    host: PhiParams<f32>,
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
}

/// Staging of the compressed tokens a learned `phi` makes in one launch (`cap` slots).
struct PhiStage {
    cap: usize,
    /// `[cap * l, HKV, dk]`, `[cap * l, HKV, dv]`: the `l` raw tokens of each completed block
    raw_k: CudaSlice<u16>,
    raw_v: CudaSlice<u16>,
    /// `[cap, HKV, dk]`, `[cap, HKV, dv]`: the `phi` outputs
    out_k: CudaSlice<u16>,
    out_v: CudaSlice<u16>,
    /// `(m * l, m or -1)` per slot: the gather items of `phi_gemm`
    items: CudaSlice<i32>,
    /// `(sequence, compressed position or -1)` per slot
    pdst: CudaSlice<i32>,
    /// staging slot of each written row (prefill), -1 where the row completes no block
    slot: CudaSlice<i32>,
    /// `[HKV, cap, hidden]` hidden activations of the MLP
    hbuf: CudaSlice<f32>,
}

/// The staging plan of one prefill write launch with a learned `phi`, for its rows `(b, t)`:
/// the slot of each row (-1 where `t` completes no compression block), and per slot the
/// `phi_gemm` gather item `(m * l, m)` and the destination `(b, compressed index)`. Exactly the
/// blocks whose last token is among the rows are made: old blocks are never re-compressed.
fn phi_stage_plan(rows: &[(usize, usize)], l: usize, d: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut slots = Vec::with_capacity(rows.len());
    let (mut items, mut pdst) = (Vec::new(), Vec::new());
    for &(b, t) in rows {
        if completes_block(t, l, d) {
            let m = items.len() / 2;
            slots.push(m as i32);
            items.extend([(m * l) as i32, m as i32]);
            pdst.extend([b as i32, ((t + 1 - l) / d) as i32]);
        } else {
            slots.push(-1);
        }
    }
    (slots, items, pdst)
}

/// Splits the written rows (positions `ts`) into launches of at most [`WRITE_ROWS`] rows and,
/// with a learned `phi` (`Some((l, d))`), at most [`PHI_STAGE_ROWS`] completed blocks.
fn write_launches(ts: &[usize], learned: Option<(usize, usize)>) -> Vec<std::ops::Range<usize>> {
    let mut launches = Vec::new();
    let (mut start, mut made) = (0, 0);
    for (i, &t) in ts.iter().enumerate() {
        let c = learned.is_some_and(|(l, d)| completes_block(t, l, d));
        if i - start == WRITE_ROWS || (c && made == PHI_STAGE_ROWS) {
            launches.push(start..i);
            (start, made) = (i, 0);
        }
        made += c as usize;
    }
    if start < ts.len() {
        launches.push(start..ts.len());
    }
    launches
}

/// Whether token `t` is the last token of a compression block (SPEC.md: block `i` covers
/// `[i*d, i*d + l)`).
fn completes_block(t: usize, l: usize, d: usize) -> bool {
    t + 1 >= l && (t + 1 - l).is_multiple_of(d)
}

/// One `phi` (linear: one `phi_gemm`; mlp: two) over `m` staged blocks of `l` raw tokens of head
/// dim `d` on `stream` (the launches of the forward's `run_phi`, on any stream so that a step
/// can be captured in a graph).
struct PhiGemm<'a> {
    f: &'a cudarc::driver::CudaFunction,
    hkv: usize,
    l: usize,
    m: usize,
    d: usize,
    hidden: usize,
}

impl PhiGemm<'_> {
    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<u16>,
        w: &[CudaSlice<f32>],
        hbuf: &mut CudaSlice<f32>,
        items: &CudaSlice<i32>,
        dst: &mut CudaSlice<u16>,
    ) -> Result<()> {
        let (m, d, hidden) = (self.m, self.d, self.hidden);
        let gy = m.div_ceil(64);
        if gy > 65535 {
            return Err(NsaError::Unsupported(format!(
                "phi GEMM over {m} compressed tokens (at most {} per call)",
                65535 * 64
            )));
        }
        let cfg = |n: usize| LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, gy as u32, self.hkv as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;
        let (mi, di, lkd) = (m as i32, d as i32, (self.l * d) as i32);
        let (one, zero) = (1i32, 0i32);
        match w {
            [pe, w] => {
                // linear: dst = flatten(x + pe) @ w
                let mut b = stream.launch_builder(self.f);
                b.arg(src).arg(pe).arg(&null).arg(items);
                b.arg(&mi).arg(&di).arg(&lkd).arg(&di).arg(&one);
                b.arg(w).arg(&null).arg(&zero).arg(&null).arg(dst);
                // SAFETY: matches `phi_gemm`; null pointers are the unused operands; `src` holds
                // m * l staged tokens, `dst` m outputs (items[i] = (i * l, i or -1)).
                unsafe { b.launch(cfg(d)) }.map_err(driver_err)?;
            }
            [pe, w1, b1, w2, b2] => {
                // mlp: h = silu(flatten(x + pe) @ w1 + b1); dst = h @ w2 + b2
                let h = hidden as i32;
                let mut b = stream.launch_builder(self.f);
                b.arg(src).arg(pe).arg(&null).arg(items);
                b.arg(&mi).arg(&h).arg(&lkd).arg(&di).arg(&one);
                b.arg(w1).arg(b1).arg(&one).arg(&mut *hbuf).arg(&null);
                // SAFETY: as above; `hbuf` holds [HKV, m, hidden] (launch_phi checked).
                unsafe { b.launch(cfg(hidden)) }.map_err(driver_err)?;
                let mut b = stream.launch_builder(self.f);
                b.arg(src).arg(&null).arg(&*hbuf).arg(items);
                b.arg(&mi).arg(&di).arg(&h).arg(&di).arg(&zero);
                b.arg(w2).arg(b2).arg(&zero).arg(&null).arg(dst);
                // SAFETY: as above.
                unsafe { b.launch(cfg(d)) }.map_err(driver_err)?;
            }
            _ => return Err(NsaError::Cuda(format!("phi weights: {} tensors", w.len()))),
        }
        Ok(())
    }
}

fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    len: usize,
) -> Result<()> {
    if buf.len() < len {
        *buf = stream.alloc_zeros::<T>(len).map_err(driver_err)?;
    }
    Ok(())
}

/// The decoding state of one layer for a batch of sequences, on the GPU (paged).
pub struct GpuDecodeCache {
    cfg: NsaConfig,
    shape: Shape,
    dk: usize,
    dv: usize,
    batch: usize,
    max_len: usize,
    raw: PageTable,
    cmp: PageTable,
    /// `[pages, HKV, PAGE, D]` pools: selection K/V, window K/V, compressed K/V
    k_slc: CudaSlice<u16>,
    v_slc: CudaSlice<u16>,
    k_win: CudaSlice<u16>,
    v_win: CudaSlice<u16>,
    k_cmp: CudaSlice<u16>,
    v_cmp: CudaSlice<u16>,
    /// `[B, l, HKV, D]`
    ring_k: CudaSlice<u16>,
    ring_v: CudaSlice<u16>,
    lens: Vec<usize>,
    /// `[B]` positions on the device (advanced by the step's write kernel)
    lens_dev: CudaSlice<i32>,
    work: Work,
    /// learned `phi` weights ([`GpuDecodeCache::set_phi`]; `None` for mean or until set)
    phi: Option<DecodePhi>,
    stage: PhiStage,
    sms: usize,
    cc_cap: usize,
    attn_smem_max: usize,
    poison: bool,
    /// events recorded around each kernel of a step (benchmarks), see [`Self::kernel_times`]
    marks: Option<Vec<cudarc::driver::CudaEvent>>,
}

impl GpuDecodeCache {
    /// An empty cache for `batch` sequences of at most `max_len` tokens each, with a shared pool
    /// of `pool_tokens` raw tokens (rounded up to pages). Fails with `Unsupported` for shapes the
    /// kernels do not take (see [`check_shapes`]) and `OutOfMemory` when the pools do not fit.
    /// With `phi = linear | mlp` the weights come from [`GpuDecodeCache::set_phi`] (which
    /// [`prefill`] and [`step`] call with theirs).
    /// K/V are kept in bf16 ([`GpuDecodeCache::new_in`] chooses the element type).
    pub fn new(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        batch: usize,
        dk: usize,
        dv: usize,
        max_len: usize,
        pool_tokens: usize,
    ) -> Result<Self> {
        Self::new_in(ctx, cfg, batch, dk, dv, max_len, pool_tokens, Elem::Bf16)
    }

    /// [`GpuDecodeCache::new`] keeping K/V (and computing) in the 16-bit type `elem`: the
    /// f32 rows of [`prefill`] / [`step`] are rounded to it (to nearest even).
    #[allow(clippy::too_many_arguments)]
    pub fn new_in(
        ctx: &CudaContext,
        cfg: &NsaConfig,
        batch: usize,
        dk: usize,
        dv: usize,
        max_len: usize,
        pool_tokens: usize,
        elem: Elem,
    ) -> Result<Self> {
        check_shapes(cfg, dk, dv)?;
        if batch == 0 {
            return Err(NsaError::ZeroSize("decode batch"));
        }
        if max_len == 0 || pool_tokens == 0 {
            return Err(NsaError::ZeroSize("decode cache capacity"));
        }
        if max_len >= i32::MAX as usize / 2 || batch * max_len.div_ceil(PAGE) >= i32::MAX as usize {
            return Err(NsaError::IndexOverflow {
                what: "decode cache positions",
                value: max_len as u128,
                limit: 31,
            });
        }
        let shape = shape_of(cfg, dk, dv).with_elem(elem);
        let s = &ctx.stream;
        let (hkv, l, d) = (cfg.kv_heads, cfg.cmp_block, cfg.cmp_stride);
        let raw_pages = pool_tokens.div_ceil(PAGE);
        // sum_b ceil(ncmp_b / PAGE) <= raw_pages / d + B, since ncmp_b <= len_b / d
        let cmp_pages = raw_pages.div_ceil(d) + batch;
        let maxp_raw = max_len.div_ceil(PAGE);
        let maxp_cmp = blocks::cmp_blocks_in(max_len, l, d).div_ceil(PAGE).max(1);
        let g = cfg.group_size();
        let qrows = g.div_ceil(16) * 16;
        // K/V tile rows: unpadded (swizzled) when both head dims are multiples of 64, else +8
        let pad = if dk.is_multiple_of(64) && dv.is_multiple_of(64) {
            0
        } else {
            8
        };
        let base = (qrows * (dk + 8) + stages() * 64 * (dk + dv + 2 * pad)) * 2;
        let max_smem = ctx.max_smem;
        let ls_row = |cc: usize| (cc + LOGITS_PAD) * 4;
        if base + g * ls_row(64) + STATIC_SMEM > max_smem {
            return Err(NsaError::Unsupported(format!(
                "decode kernels need {} bytes of shared memory, the device offers {max_smem}",
                base + g * ls_row(64)
            )));
        }
        // compressed tokens per split: their logits ([G, cc] f32) stay in shared memory
        // at most 512 (measured: two CTAs per SM beat longer splits, bench/NOTES-cuda-decode.md);
        // NSA_DECODE_CC_CAP overrides it (experiments)
        let cap_env = std::env::var("NSA_DECODE_CC_CAP")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(512);
        // (the kernels' static shared memory, <= STATIC_SMEM, counts against the same limit)
        let cc_cap = (((max_smem - base - STATIC_SMEM) / (g * 4) - LOGITS_PAD) / PAGE * PAGE)
            .clamp(PAGE, cap_env.max(PAGE));
        let attn_smem_max = base + g * ls_row(cc_cap);
        let sms = ctx
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err)? as usize;
        let zeros = |len: usize| s.alloc_zeros::<u16>(len.max(1)).map_err(driver_err);
        let work = Work {
            rows: 0,
            wdesc: s.alloc_zeros::<i32>(4).map_err(driver_err)?,
            adesc: s.alloc_zeros::<i32>(4).map_err(driver_err)?,
            q: zeros(1)?,
            k: [zeros(1)?, zeros(1)?, zeros(1)?],
            v: [zeros(1)?, zeros(1)?, zeros(1)?],
            gates: [
                s.alloc_zeros::<f32>(1).map_err(driver_err)?,
                s.alloc_zeros::<f32>(1).map_err(driver_err)?,
                s.alloc_zeros::<f32>(1).map_err(driver_err)?,
            ],
            part_o: s.alloc_zeros::<f32>(1).map_err(driver_err)?,
            part_ml: s.alloc_zeros::<f32>(1).map_err(driver_err)?,
            part_u: s.alloc_zeros::<f32>(1).map_err(driver_err)?,
            out: s.alloc_zeros::<f32>(1).map_err(driver_err)?,
            sel: s.alloc_zeros::<i32>(1).map_err(driver_err)?,
            done: s.alloc_zeros::<i32>(1).map_err(driver_err)?,
        };
        Ok(GpuDecodeCache {
            cfg: cfg.clone(),
            shape,
            dk,
            dv,
            batch,
            max_len,
            raw: PageTable::new(s, batch, raw_pages, maxp_raw)?,
            cmp: PageTable::new(s, batch, cmp_pages, maxp_cmp)?,
            k_slc: zeros(raw_pages * PAGE * hkv * dk)?,
            v_slc: zeros(raw_pages * PAGE * hkv * dv)?,
            k_win: zeros(raw_pages * PAGE * hkv * dk)?,
            v_win: zeros(raw_pages * PAGE * hkv * dv)?,
            k_cmp: zeros(cmp_pages * PAGE * hkv * dk)?,
            v_cmp: zeros(cmp_pages * PAGE * hkv * dv)?,
            ring_k: zeros(batch * l * hkv * dk)?,
            ring_v: zeros(batch * l * hkv * dv)?,
            lens: vec![0; batch],
            lens_dev: s.alloc_zeros::<i32>(batch).map_err(driver_err)?,
            work,
            phi: None,
            stage: PhiStage {
                cap: 0,
                raw_k: zeros(1)?,
                raw_v: zeros(1)?,
                out_k: zeros(1)?,
                out_v: zeros(1)?,
                items: s.alloc_zeros::<i32>(2).map_err(driver_err)?,
                pdst: s.alloc_zeros::<i32>(2).map_err(driver_err)?,
                slot: s.alloc_zeros::<i32>(1).map_err(driver_err)?,
                hbuf: s.alloc_zeros::<f32>(1).map_err(driver_err)?,
            },
            sms,
            cc_cap,
            attn_smem_max,
            poison: false,
            marks: None,
        })
    }

    /// Uploads the `phi` weights (needed when `cfg.phi` is linear or mlp; a no-op for mean), as
    /// [`super::DeviceInputs::set_phi`] does for the forward. Weights equal to the ones held are
    /// not uploaded again; new ones of the same shapes are copied into the same device buffers
    /// (so CUDA graphs captured from [`Self::step_launch`] see them).
    pub fn set_phi(&mut self, ctx: &CudaContext, phi: &PhiParams<f32>) -> Result<()> {
        phi.validate(&self.cfg, self.dk, self.dv)?;
        if self.cfg.phi == PhiKind::Mean {
            return Ok(());
        }
        if self.phi.as_ref().is_some_and(|p| p.host == *phi) {
            return Ok(());
        }
        let parts = |w: &PhiWeights<f32>| -> Vec<Vec<f32>> {
            match w {
                PhiWeights::Mean => vec![],
                PhiWeights::Linear { pe, w } => vec![pe.clone(), w.clone()],
                PhiWeights::Mlp { pe, w1, b1, w2, b2 } => {
                    vec![pe.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()]
                }
            }
        };
        let (pk, pv) = (parts(&phi.k), parts(&phi.v));
        let s = &ctx.stream;
        let same_shapes = |dev: &[CudaSlice<f32>], host: &[Vec<f32>]| {
            dev.len() == host.len() && dev.iter().zip(host).all(|(a, b)| a.len() == b.len())
        };
        match &mut self.phi {
            Some(p) if same_shapes(&p.k, &pk) && same_shapes(&p.v, &pv) => {
                for (dev, host) in p.k.iter_mut().zip(&pk).chain(p.v.iter_mut().zip(&pv)) {
                    s.memcpy_htod(host, dev).map_err(driver_err)?;
                }
                p.host = phi.clone();
            }
            _ => {
                let up = |host: &[Vec<f32>]| -> Result<Vec<CudaSlice<f32>>> {
                    host.iter()
                        .map(|h| s.clone_htod(h).map_err(driver_err))
                        .collect()
                };
                self.phi = Some(DecodePhi {
                    host: phi.clone(),
                    k: up(&pk)?,
                    v: up(&pv)?,
                });
            }
        }
        // the MLP's hidden buffer follows the hidden width
        let cap = self.stage.cap;
        self.ensure_stage(s, cap, 1)
    }

    /// Grows the staging of a learned `phi` to `cap` slots and `rows` written rows (no-op for
    /// mean).
    fn ensure_stage(&mut self, stream: &Arc<CudaStream>, cap: usize, rows: usize) -> Result<()> {
        if self.cfg.phi == PhiKind::Mean {
            return Ok(());
        }
        let (hkv, l, dk, dv) = (self.cfg.kv_heads, self.cfg.cmp_block, self.dk, self.dv);
        let hidden = self.phi.as_ref().map_or(0, |p| p.host.hidden);
        let st = &mut self.stage;
        let cap = cap.max(st.cap);
        grow(stream, &mut st.raw_k, cap * l * hkv * dk)?;
        grow(stream, &mut st.raw_v, cap * l * hkv * dv)?;
        grow(stream, &mut st.out_k, cap * hkv * dk)?;
        grow(stream, &mut st.out_v, cap * hkv * dv)?;
        grow(stream, &mut st.items, 2 * cap)?;
        grow(stream, &mut st.pdst, 2 * cap)?;
        grow(stream, &mut st.slot, rows)?;
        grow(stream, &mut st.hbuf, hkv * cap * hidden)?;
        st.cap = cap;
        Ok(())
    }

    /// Number of sequences `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens held by each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Longest sequence the cache takes.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Pages in use (raw, compressed).
    pub fn pages_in_use(&self) -> (usize, usize) {
        (
            self.raw.rows.iter().map(Vec::len).sum(),
            self.cmp.rows.iter().map(Vec::len).sum(),
        )
    }

    /// Makes room for sequence `b` to reach `len` tokens (pages are taken now, so that steps
    /// captured in a CUDA graph never need the host). `CacheFull` when it cannot.
    pub fn reserve(&mut self, b: usize, len: usize) -> Result<()> {
        self.check_seq(b)?;
        if len > self.max_len {
            return Err(NsaError::CacheFull {
                capacity: self.max_len,
                needed: len,
            });
        }
        self.raw.ensure(b, len)?;
        let (l, d) = (self.cfg.cmp_block, self.cfg.cmp_stride);
        self.cmp.ensure(b, blocks::cmp_blocks_in(len, l, d))
    }

    /// Empties sequence `b` and returns its pages to the pool.
    pub fn reset(&mut self, ctx: &CudaContext, b: usize) -> Result<()> {
        self.check_seq(b)?;
        self.raw.release(b);
        self.cmp.release(b);
        self.lens[b] = 0;
        self.upload_lens(ctx)
    }

    fn check_seq(&self, b: usize) -> Result<()> {
        if b >= self.batch {
            return Err(NsaError::Decode(format!(
                "sequence {b} out of range: the cache holds {}",
                self.batch
            )));
        }
        Ok(())
    }

    fn upload_lens(&mut self, ctx: &CudaContext) -> Result<()> {
        let l: Vec<i32> = self.lens.iter().map(|&v| v as i32).collect();
        ctx.stream
            .memcpy_htod(&l, &mut self.lens_dev)
            .map_err(driver_err)
    }

    fn sync_tables(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        self.raw.sync(stream)?;
        self.cmp.sync(stream)
    }

    /// The split plan for `rows` query rows whose longest context is `max_ctx` tokens.
    pub fn plan(&self, rows: usize, max_ctx: usize) -> Result<Splits> {
        let cfg = &self.cfg;
        let g = cfg.group_size();
        let groups = (rows * cfg.kv_heads).max(1);
        // about four CTAs per SM for each branch launch
        let per = (4 * self.sms / groups).max(1);
        let ncmp = blocks::cmp_blocks_in(max_ctx, cfg.cmp_block, cfg.cmp_stride).max(1);
        let mut cc = ncmp
            .div_ceil(per)
            .next_multiple_of(PAGE)
            .clamp(PAGE, self.cc_cap);
        // the top-n kernel keeps (m, l) and weights per (split, head) in shared memory
        let sc_max = (SMALL_SMEM / (16 * g)).max(1);
        if ncmp.div_ceil(cc) > sc_max {
            cc = ncmp.div_ceil(sc_max).next_multiple_of(PAGE);
            if cc > self.cc_cap {
                return Err(NsaError::Unsupported(format!(
                    "a context of {max_ctx} tokens needs more compressed splits than the decode kernels hold"
                )));
            }
        }
        let sc = ncmp.div_ceil(cc);
        let wlen = cfg.window.min(max_ctx).max(1);
        // window and selected splits: about one CTA per SM (their CTAs are short, so fewer and
        // longer ones win at large batches: 64k/B 32 226 -> 219 us, bench/NOTES-cuda-decode.md);
        // NSA_DECODE_RAW_CTAS overrides it (experiments)
        let raw_ctas = std::env::var("NSA_DECODE_RAW_CTAS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1);
        let per_raw = (raw_ctas * self.sms / groups).max(1);
        let cw = wlen.div_ceil(per_raw).next_multiple_of(PAGE).max(PAGE);
        let sw = wlen.div_ceil(cw);
        let n = cfg.sel_count;
        let spb = (n / per_raw).max(1);
        let ss = n.div_ceil(spb);
        let uj = (cc * cfg.cmp_stride + cfg.cmp_block) / cfg.sel_block + 2;
        // fused top-n when a group has few splits (large batches: the last split's CTA does a
        // small top-n while other groups still stream); with many splits (batch 1) the 8-warp
        // kernel of its own is faster. NSA_DECODE_FUSE_TOPN=0|1 forces it (experiments, tests)
        let fuse_topn = match std::env::var("NSA_DECODE_FUSE_TOPN").ok().as_deref() {
            Some("0") => false,
            Some("1") => true,
            _ => sc <= 16,
        };
        let sp = Splits {
            sc,
            cc,
            sw,
            cw,
            ss,
            spb,
            uj,
            fuse_topn,
        };
        if sp.topn_smem(g) > SMALL_SMEM || sp.ns() * 12 > SMALL_SMEM {
            return Err(NsaError::Unsupported(format!(
                "{} compressed splits of {g} heads exceed the top-n kernel's shared memory",
                sp.sc
            )));
        }
        Ok(sp)
    }

    /// Grows the work buffers for `rows` rows and the split plan `sp`.
    fn ensure_work(&mut self, stream: &Arc<CudaStream>, rows: usize, sp: &Splits) -> Result<()> {
        self.ensure_rows(stream, rows)?;
        let (hkv, dv, g) = (self.cfg.kv_heads, self.dv, self.cfg.group_size());
        let w = &mut self.work;
        let rg = rows * hkv;
        grow(stream, &mut w.part_o, rg * sp.ns() * g * dv)?;
        grow(stream, &mut w.part_ml, rg * sp.ns() * g * 2)?;
        grow(stream, &mut w.part_u, rg * sp.sc * g * sp.uj)?;
        Ok(())
    }

    /// Grows the per-row work buffers (tokens, descriptors, outputs) for `rows` rows.
    fn ensure_rows(&mut self, stream: &Arc<CudaStream>, rows: usize) -> Result<()> {
        let (hq, hkv, dk, dv) = (self.cfg.heads, self.cfg.kv_heads, self.dk, self.dv);
        let w = &mut self.work;
        if w.rows < rows {
            w.wdesc = stream.alloc_zeros::<i32>(rows * 4).map_err(driver_err)?;
            w.adesc = stream.alloc_zeros::<i32>(rows * 4).map_err(driver_err)?;
            w.q = stream
                .alloc_zeros::<u16>(rows * hq * dk)
                .map_err(driver_err)?;
            for br in 0..3 {
                w.k[br] = stream
                    .alloc_zeros::<u16>(rows * hkv * dk)
                    .map_err(driver_err)?;
                w.v[br] = stream
                    .alloc_zeros::<u16>(rows * hkv * dv)
                    .map_err(driver_err)?;
                w.gates[br] = stream.alloc_zeros::<f32>(rows * hq).map_err(driver_err)?;
            }
            w.out = stream
                .alloc_zeros::<f32>(rows * hq * dv)
                .map_err(driver_err)?;
            w.sel = stream
                .alloc_zeros::<i32>(rows * hkv * self.cfg.sel_count)
                .map_err(driver_err)?;
            w.done = stream.alloc_zeros::<i32>(rows * hkv).map_err(driver_err)?;
            w.rows = rows;
        }
        Ok(())
    }

    /// Uploads rows `rows` of `x` (16-bit K/V/q, f32 gates) into the work buffers, in that order.
    fn upload_tokens(
        &mut self,
        ctx: &CudaContext,
        x: &NsaInputs<f32>,
        rows: &[usize],
    ) -> Result<()> {
        let sub = x.gather(rows, vec![0, rows.len()]);
        let s = &ctx.stream;
        let w = &mut self.work;
        let elem = self.shape.elem;
        let bf = |v: &Vec<f32>, dst: &mut CudaSlice<u16>| {
            let bits = elem.bits_of(v);
            let mut view = dst.slice_mut(0..bits.len());
            s.memcpy_htod(&bits, &mut view).map_err(driver_err)
        };
        bf(&sub.q, &mut w.q)?;
        for (br, (k, v)) in [
            (&sub.k_cmp, &sub.v_cmp),
            (&sub.k_slc, &sub.v_slc),
            (&sub.k_win, &sub.v_win),
        ]
        .into_iter()
        .enumerate()
        {
            bf(k, &mut w.k[br])?;
            bf(v, &mut w.v[br])?;
        }
        for (br, gt) in [&sub.g_cmp, &sub.g_slc, &sub.g_win].into_iter().enumerate() {
            let mut view = w.gates[br].slice_mut(0..gt.len());
            s.memcpy_htod(gt, &mut view).map_err(driver_err)?;
        }
        Ok(())
    }

    fn f(
        &self,
        ctx: &CudaContext,
        name: &str,
        smem: usize,
    ) -> Result<cudarc::driver::CudaFunction> {
        ctx.named_function(Family::Decode, name, &self.shape, smem)
    }

    /// Launches `decode_write` over the first `rows` work rows (`step_mode`: one row per
    /// sequence, positions from the device), then (prefill) `decode_ring`.
    fn launch_write(
        &mut self,
        ctx: &CudaContext,
        stream: &Arc<CudaStream>,
        rows: usize,
        step_mode: bool,
    ) -> Result<()> {
        let f = self.f(ctx, "decode_write", 0)?;
        let f_ring = self.f(ctx, "decode_ring", 0)?;
        let (maxp_raw, maxp_cmp) = (self.raw.maxp as i32, self.cmp.maxp as i32);
        let mode = step_mode as i32;
        let phi_stage = (self.cfg.phi != PhiKind::Mean) as i32;
        let cfg1 = |rows: usize| LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let w = &mut self.work;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut w.wdesc)
            .arg(&mut w.adesc)
            .arg(&mut self.lens_dev)
            .arg(&mode)
            .arg(&self.raw.dev)
            .arg(&self.cmp.dev)
            .arg(&maxp_raw)
            .arg(&maxp_cmp)
            .arg(&w.k[0])
            .arg(&w.v[0])
            .arg(&w.k[1])
            .arg(&w.v[1])
            .arg(&w.k[2])
            .arg(&w.v[2])
            .arg(&mut self.k_slc)
            .arg(&mut self.v_slc)
            .arg(&mut self.k_win)
            .arg(&mut self.v_win)
            .arg(&mut self.k_cmp)
            .arg(&mut self.v_cmp)
            .arg(&mut self.ring_k)
            .arg(&mut self.ring_v)
            .arg(&phi_stage)
            .arg(&self.stage.slot)
            .arg(&mut self.stage.items)
            .arg(&mut self.stage.pdst)
            .arg(&mut self.stage.raw_k)
            .arg(&mut self.stage.raw_v);
        // SAFETY: matches `decode_write`; every row's pages were reserved (PageTable::ensure) and
        // the tables synced before this launch; rows < the work buffers' capacity; with a learned
        // phi the staging holds `rows` slots in step mode (ensure_stage) and the uploaded plan's
        // slots in prefill.
        unsafe { b.launch(cfg1(rows)) }.map_err(driver_err)?;
        if !step_mode {
            let mut b = stream.launch_builder(&f_ring);
            b.arg(&w.wdesc)
                .arg(&w.k[0])
                .arg(&w.v[0])
                .arg(&mut self.ring_k)
                .arg(&mut self.ring_v);
            // SAFETY: matches `decode_ring`.
            unsafe { b.launch(cfg1(rows)) }.map_err(driver_err)?;
        }
        Ok(())
    }

    /// Learned `phi`: the weights are set and the staging holds `m` slots.
    fn check_phi_ready(&self, m: usize) -> Result<()> {
        let ph = self.phi.as_ref().ok_or_else(|| {
            NsaError::MissingTensor("phi weights (GpuDecodeCache::set_phi)".into())
        })?;
        let st = &self.stage;
        if m > st.cap || st.hbuf.len() < self.cfg.kv_heads * m * ph.host.hidden {
            return Err(NsaError::Decode(format!(
                "the phi staging holds {} slots, {m} needed (prepare_steps)",
                st.cap
            )));
        }
        Ok(())
    }

    /// Learned `phi`: the GEMMs over the `m` staging slots of the last write launch (slots
    /// marked -1 are skipped) and `decode_phi_put` into the compressed pages.
    fn launch_phi(&mut self, ctx: &CudaContext, stream: &Arc<CudaStream>, m: usize) -> Result<()> {
        self.check_phi_ready(m)?;
        let ph = self.phi.as_ref().expect("checked");
        let hidden = ph.host.hidden;
        let (hkv, l) = (self.cfg.kv_heads, self.cfg.cmp_block);
        let st = &mut self.stage;
        let f = ctx.named_function(Family::Phi, "phi_gemm", &self.shape, 0)?;
        let f_put = ctx.named_function(Family::Decode, "decode_phi_put", &self.shape, 0)?;
        for (src, w, dst, d) in [
            (&st.raw_k, &ph.k, &mut st.out_k, self.dk),
            (&st.raw_v, &ph.v, &mut st.out_v, self.dv),
        ] {
            let gemm = PhiGemm {
                f: &f,
                hkv,
                l,
                m,
                d,
                hidden,
            };
            gemm.launch(stream, src, w, &mut st.hbuf, &st.items, dst)?;
        }
        let maxp_cmp = self.cmp.maxp as i32;
        let mut b = stream.launch_builder(&f_put);
        b.arg(&st.pdst)
            .arg(&st.out_k)
            .arg(&st.out_v)
            .arg(&self.cmp.dev)
            .arg(&maxp_cmp)
            .arg(&mut self.k_cmp)
            .arg(&mut self.v_cmp);
        // SAFETY: matches `decode_phi_put`; `m` <= the staging slots; every destination's
        // compressed page was reserved and the table synced.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (m as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver_err)?;
        Ok(())
    }

    /// Launches the attention kernels over the first `rows` attention rows (`adesc`), writing
    /// `out` `[rows, HQ, dv]` and `sel` `[rows, HKV, n]` of the work buffers.
    fn launch_attention(
        &mut self,
        ctx: &CudaContext,
        stream: &Arc<CudaStream>,
        rows: usize,
        sp: &Splits,
    ) -> Result<()> {
        if self.poison {
            self.poison_outputs(stream)?;
        }
        let g = self.cfg.group_size();
        let hkv = self.cfg.kv_heads;
        let f_cw = self.f(ctx, "decode_attn_cw", self.attn_smem_max.max(SMALL_SMEM))?;
        let f_topn = self.f(ctx, "decode_topn", 0)?;
        let f_sel = self.f(ctx, "decode_sel", self.attn_smem_max)?;
        let f_comb = self.f(ctx, "decode_combine", 0)?;
        let base = self.attn_smem_max - g * (self.cc_cap + LOGITS_PAD) * 4;
        let (maxp_raw, maxp_cmp) = (self.raw.maxp as i32, self.cmp.maxp as i32);
        let [sc, cc, sw, cw, ss, spb, uj, ns, fuse] = [
            sp.sc,
            sp.cc,
            sp.sw,
            sp.cw,
            sp.ss,
            sp.spb,
            sp.uj,
            sp.ns(),
            sp.fuse_topn as usize,
        ]
        .map(|v| v as i32);
        let rg = (rows * hkv) as u32;
        let marks = self.marks.as_ref();
        let mark = |i: usize| -> Result<()> {
            if let Some(m) = marks {
                m[i].record(stream).map_err(driver_err)?;
            }
            Ok(())
        };
        let ls_bytes = g * (sp.cc + LOGITS_PAD) * 4;
        let w = &mut self.work;
        {
            let mut b = stream.launch_builder(&f_cw);
            b.arg(&w.adesc)
                .arg(&self.cmp.dev)
                .arg(&maxp_cmp)
                .arg(&w.q)
                .arg(&self.k_cmp)
                .arg(&self.v_cmp)
                .arg(&sc)
                .arg(&cc)
                .arg(&ns)
                .arg(&uj)
                .arg(&mut w.part_o)
                .arg(&mut w.part_ml)
                .arg(&mut w.part_u)
                .arg(&mut w.sel)
                .arg(&mut w.done)
                .arg(&fuse);
            // the fused top-n reuses the dynamic shared memory (<= 48 KiB, plan)
            let smem = if sp.fuse_topn {
                (base + ls_bytes).max(sp.topn_smem(g))
            } else {
                base + ls_bytes
            };
            // SAFETY: matches `decode_attn_cw`; partial buffers sized by ensure_work for (rows, sp);
            // the logits need g * (cc + pad) * 4 bytes after the base layout; `done` has rows * HKV
            // zeroed counters (every launch leaves them zero).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (rg * sp.sc as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
            }
            .map_err(driver_err)?;
            mark(2)?;
        }
        if !sp.fuse_topn {
            let mut b = stream.launch_builder(&f_topn);
            b.arg(&w.adesc)
                .arg(&w.part_ml)
                .arg(&w.part_u)
                .arg(&sc)
                .arg(&cc)
                .arg(&ns)
                .arg(&uj)
                .arg(&mut w.sel);
            // SAFETY: matches `decode_topn`; its shared memory is <= 48 KiB (plan).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (rg, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: sp.topn_smem(g) as u32,
                })
            }
            .map_err(driver_err)?;
        }
        mark(3)?;
        {
            let mut b = stream.launch_builder(&f_sel);
            b.arg(&w.adesc)
                .arg(&self.raw.dev)
                .arg(&maxp_raw)
                .arg(&w.q)
                .arg(&self.k_slc)
                .arg(&self.v_slc)
                .arg(&self.k_win)
                .arg(&self.v_win)
                .arg(&w.sel)
                .arg(&sc)
                .arg(&sw)
                .arg(&cw)
                .arg(&spb)
                .arg(&ns)
                .arg(&mut w.part_o)
                .arg(&mut w.part_ml);
            // SAFETY: matches `decode_sel`.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (rg, (sp.sw + sp.ss) as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: base as u32,
                })
            }
            .map_err(driver_err)?;
            mark(4)?;
        }
        {
            let mut b = stream.launch_builder(&f_comb);
            b.arg(&w.adesc)
                .arg(&w.part_o)
                .arg(&w.part_ml)
                .arg(&w.gates[0])
                .arg(&w.gates[1])
                .arg(&w.gates[2])
                .arg(&sc)
                .arg(&sw)
                .arg(&ss)
                .arg(&mut w.out);
            // SAFETY: matches `decode_combine`; one CTA per (row, group, head).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (rg, g as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (sp.ns() * 12) as u32,
                })
            }
            .map_err(driver_err)?;
            mark(5)?;
        }
        Ok(())
    }

    fn check_inputs(
        &self,
        x: &NsaInputs<f32>,
        cfg: &NsaConfig,
        phi: Option<&PhiParams<f32>>,
    ) -> Result<()> {
        x.validate(cfg)?;
        if let Some(phi) = phi {
            phi.validate(cfg, x.dk, x.dv)?;
        }
        check_shapes(cfg, x.dk, x.dv)?;
        if x.dk != self.dk || x.dv != self.dv {
            return Err(NsaError::Decode(format!(
                "inputs have dk={}, dv={} but the cache was made for dk={}, dv={}",
                x.dk, x.dv, self.dk, self.dv
            )));
        }
        if *cfg != self.cfg {
            return Err(NsaError::Decode(
                "the configuration differs from the one the cache was made for".into(),
            ));
        }
        Ok(())
    }

    // ---- bench / graph API: everything on the device, nothing allocated ----

    /// Random cache content for benchmarks: sequence `b` holds `lens[b]` tokens of N(0, 1) bf16
    /// K/V (raw, compressed and ring), with pages reserved for `extra` more tokens; the work
    /// buffers get `rows = B` random step tokens. The compressed pools are random rather than
    /// means (timing only).
    pub fn fill_random(
        &mut self,
        ctx: &CudaContext,
        lens: &[usize],
        extra: usize,
        seed: u64,
    ) -> Result<()> {
        if lens.len() != self.batch {
            return Err(NsaError::Decode(format!(
                "{} lengths for a batch of {}",
                lens.len(),
                self.batch
            )));
        }
        for (b, &l) in lens.iter().enumerate() {
            self.reserve(b, l + extra)?;
        }
        let s = ctx.stream.clone();
        self.sync_tables(&s)?;
        let sp = self.plan(self.batch, lens.iter().max().unwrap() + extra)?;
        self.ensure_work(&s, self.batch, &sp)?;
        let fill = ctx.named_function(Family::Fill, "fill_normal_bf16", &self.shape, 0)?;
        let unif = ctx.named_function(Family::Fill, "fill_uniform_f32", &self.shape, 0)?;
        let lc = LaunchConfig {
            grid_dim: (4096, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut k = 0u64;
        let w = &mut self.work;
        let [k0, k1, k2] = &mut w.k;
        let [v0, v1, v2] = &mut w.v;
        for buf in [
            &mut self.k_slc,
            &mut self.v_slc,
            &mut self.k_win,
            &mut self.v_win,
            &mut self.k_cmp,
            &mut self.v_cmp,
            &mut self.ring_k,
            &mut self.ring_v,
            &mut w.q,
            k0,
            v0,
            k1,
            v1,
            k2,
            v2,
        ] {
            k += 1;
            let sd = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let len = buf.len() as i64;
            let mut b = s.launch_builder(&fill);
            b.arg(buf).arg(&len).arg(&sd);
            // SAFETY: matches `fill_normal_bf16` (grid-stride over `len` elements).
            unsafe { b.launch(lc) }.map_err(driver_err)?;
        }
        for buf in w.gates.iter_mut() {
            k += 1;
            let sd = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let len = buf.len() as i64;
            let mut b = s.launch_builder(&unif);
            b.arg(buf).arg(&len).arg(&sd);
            // SAFETY: matches `fill_uniform_f32`.
            unsafe { b.launch(lc) }.map_err(driver_err)?;
        }
        self.lens = lens.to_vec();
        self.upload_lens(ctx)?;
        let wd: Vec<i32> = (0..self.batch).flat_map(|b| [b as i32, 0, 0, 0]).collect();
        let mut view = self.work.wdesc.slice_mut(0..wd.len());
        s.memcpy_htod(&wd, &mut view).map_err(driver_err)?;
        s.synchronize().map_err(driver_err)
    }

    /// One decode step of every sequence on `stream`, from the tokens already in the work
    /// buffers (row b = sequence b): no allocation, no upload, no host synchronisation, so it can
    /// be captured in a CUDA graph. Pages must be reserved ([`Self::reserve`]), `sp` planned
    /// for the longest context the launches will see, and a learned `phi`'s weights set
    /// ([`Self::set_phi`]) before [`Self::prepare_steps`]. The host's copy of the lengths is not
    /// advanced (see [`Self::advance_host`]).
    pub fn step_launch(
        &mut self,
        ctx: &CudaContext,
        stream: &Arc<CudaStream>,
        sp: &Splits,
    ) -> Result<()> {
        if self.cfg.phi != PhiKind::Mean {
            // before the write kernel, which stages the blocks of all B rows
            self.check_phi_ready(self.batch)?;
        }
        self.mark(0, stream)?;
        self.launch_write(ctx, stream, self.batch, true)?;
        if self.cfg.phi != PhiKind::Mean {
            self.launch_phi(ctx, stream, self.batch)?;
        }
        self.mark(1, stream)?;
        self.launch_attention(ctx, stream, self.batch, sp)
    }

    /// With `on`, [`Self::step_launch`] records an event before and after each of its kernels
    /// (benchmarks; not while capturing a graph).
    pub fn set_kernel_timing(&mut self, ctx: &CudaContext, on: bool) -> Result<()> {
        self.marks = if on {
            let mk = || {
                ctx.ctx
                    .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(driver_err)
            };
            Some((0..6).map(|_| mk()).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        Ok(())
    }

    fn mark(&self, i: usize, stream: &Arc<CudaStream>) -> Result<()> {
        if let Some(m) = &self.marks {
            m[i].record(stream).map_err(driver_err)?;
        }
        Ok(())
    }

    /// Milliseconds of the last timed step's kernels: write, compressed, top-n,
    /// selected + window, combine (waits for the step).
    pub fn kernel_times(&self) -> Result<[f32; 5]> {
        let m = self
            .marks
            .as_ref()
            .ok_or_else(|| NsaError::Cuda("kernel timing is off".into()))?;
        m[5].synchronize().map_err(driver_err)?;
        let mut t = [0f32; 5];
        for (i, v) in t.iter_mut().enumerate() {
            *v = m[i].elapsed_ms(&m[i + 1]).map_err(driver_err)?;
        }
        Ok(t)
    }

    /// Advances the host's copy of every length by `steps` (after device-side steps).
    pub fn advance_host(&mut self, steps: usize) {
        for l in self.lens.iter_mut() {
            *l += steps;
        }
    }

    /// Prepares [`Self::step_launch`]: work buffers for `sp`, tables synced.
    pub fn prepare_steps(&mut self, ctx: &CudaContext, sp: &Splits) -> Result<()> {
        let s = ctx.stream.clone();
        self.sync_tables(&s)?;
        self.ensure_work(&s, self.batch, sp)?;
        self.ensure_stage(&s, self.batch, 1)?;
        s.synchronize().map_err(driver_err)
    }

    /// With `on`, every later call fills the output buffers with NaN and the selection with
    /// `i32::MIN` before its kernels run (tests: every element must be written).
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    fn poison_outputs(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        let nan = vec![f32::NAN; self.work.out.len()];
        stream
            .memcpy_htod(&nan, &mut self.work.out)
            .map_err(driver_err)?;
        let bad = vec![i32::MIN; self.work.sel.len()];
        stream
            .memcpy_htod(&bad, &mut self.work.sel)
            .map_err(driver_err)
    }

    /// The configuration the cache was made for.
    pub fn config(&self) -> &NsaConfig {
        &self.cfg
    }
}

/// Downloads the first `rows` rows of the work outputs.
fn download(
    ctx: &CudaContext,
    cache: &GpuDecodeCache,
    rows: usize,
) -> Result<(Vec<f32>, Vec<i32>)> {
    let (hq, hkv, dv, n) = (
        cache.cfg.heads,
        cache.cfg.kv_heads,
        cache.dv,
        cache.cfg.sel_count,
    );
    let s = &ctx.stream;
    let o = s
        .clone_dtoh(&cache.work.out.slice(0..rows * hq * dv))
        .map_err(driver_err)?;
    let sel = s
        .clone_dtoh(&cache.work.sel.slice(0..rows * hkv * n))
        .map_err(driver_err)?;
    s.synchronize().map_err(driver_err)?;
    Ok((o, sel))
}

/// Appends sequence `k` of `x` to cache sequence `seq_ids[k]`, for every `k` (different
/// sequences, any lengths, in one call), and returns the rows of `x`'s tokens (`o` `[N, HQ, dv]`,
/// `sel_idx` `[N, HKV, n]`), equal to the rows of a forward over each whole prefix.
/// Errors: `Decode` (bad or repeated sequence ids, dims or config not the cache's), `CacheFull`,
/// the usual input validation errors.
pub fn prefill(
    ctx: &CudaContext,
    cache: &mut GpuDecodeCache,
    seq_ids: &[usize],
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    let cfg = cache.cfg.clone();
    cache.check_inputs(x, &cfg, Some(phi))?;
    cache.set_phi(ctx, phi)?;
    if seq_ids.len() != x.num_seqs() {
        return Err(NsaError::Decode(format!(
            "{} sequence ids for {} sequences of inputs",
            seq_ids.len(),
            x.num_seqs()
        )));
    }
    for (k, &b) in seq_ids.iter().enumerate() {
        cache.check_seq(b)?;
        if seq_ids[..k].contains(&b) {
            return Err(NsaError::Decode(format!("sequence {b} appears twice")));
        }
    }
    for (k, &b) in seq_ids.iter().enumerate() {
        cache.reserve(b, cache.lens[b] + x.seq_range(k).len())?;
    }
    let s = ctx.stream.clone();
    cache.sync_tables(&s)?;
    let (hq, hkv, dv, n) = (cfg.heads, cfg.kv_heads, x.dv, cfg.sel_count);
    let ntok = x.num_tokens();
    let mut out = NsaOutput {
        o: vec![0.0; ntok * hq * dv],
        sel_idx: vec![-1; ntok * hkv * n],
    };
    // Rows of sequences that were empty: the blocked forward (before the cache changes).
    let fresh: Vec<usize> = (0..seq_ids.len())
        .filter(|&k| cache.lens[seq_ids[k]] == 0)
        .collect();
    if !fresh.is_empty() {
        let mut rows = Vec::new();
        let mut cu = vec![0];
        for &k in &fresh {
            rows.extend(x.seq_range(k));
            cu.push(rows.len());
        }
        let part = super::forward_as(ctx, &cfg, &x.gather(&rows, cu), phi, cache.shape.elem)?;
        for (i, &r) in rows.iter().enumerate() {
            out.o[r * hq * dv..(r + 1) * hq * dv]
                .copy_from_slice(&part.o[i * hq * dv..(i + 1) * hq * dv]);
            out.sel_idx[r * hkv * n..(r + 1) * hkv * n]
                .copy_from_slice(&part.sel_idx[i * hkv * n..(i + 1) * hkv * n]);
        }
    }
    // Write every token's K/V (and compressed tokens), WRITE_ROWS rows per launch. A sequence
    // cut by a launch boundary continues in the next launch: its part in each launch is a chunk
    // of its own (positions before the chunk come from the ring, refreshed after each launch).
    let mut wrows: Vec<(usize, usize, usize)> = Vec::with_capacity(ntok); // (token row, b, t)
    let mut arows: Vec<(usize, usize, usize)> = Vec::new();
    for (k, &b) in seq_ids.iter().enumerate() {
        let cs = cache.lens[b];
        for (i, row) in x.seq_range(k).enumerate() {
            wrows.push((row, b, cs + i));
            if cs > 0 {
                arows.push((row, b, cs + i));
            }
        }
    }
    // (a learned phi also bounds the compressed tokens of a launch: its staging slots)
    let (l, d) = (cfg.cmp_block, cfg.cmp_stride);
    let learned = cfg.phi != PhiKind::Mean;
    let positions: Vec<usize> = wrows.iter().map(|w| w.2).collect();
    for range in write_launches(&positions, learned.then_some((l, d))) {
        let chunk = &wrows[range];
        let rows: Vec<usize> = chunk.iter().map(|w| w.0).collect();
        cache.ensure_rows(&s, rows.len())?;
        cache.upload_tokens(ctx, x, &rows)?;
        let mut n_phi = 0;
        if learned {
            let bt: Vec<(usize, usize)> = chunk.iter().map(|w| (w.1, w.2)).collect();
            let (slots, items, pdst) = phi_stage_plan(&bt, l, d);
            n_phi = items.len() / 2;
            cache.ensure_stage(&s, n_phi, rows.len())?;
            let st = &mut cache.stage;
            s.memcpy_htod(&slots, &mut st.slot.slice_mut(0..slots.len()))
                .map_err(driver_err)?;
            if n_phi > 0 {
                s.memcpy_htod(&items, &mut st.items.slice_mut(0..items.len()))
                    .map_err(driver_err)?;
                s.memcpy_htod(&pdst, &mut st.pdst.slice_mut(0..pdst.len()))
                    .map_err(driver_err)?;
            }
        }
        // (b, t, first position of b in this launch, one past its last)
        let mut span = std::collections::HashMap::new();
        for &(_, b, t) in chunk {
            let e = span.entry(b).or_insert((t, t));
            e.0 = e.0.min(t);
            e.1 = e.1.max(t);
        }
        let mut wd = Vec::with_capacity(rows.len() * 4);
        for &(_, b, t) in chunk {
            let (first, last) = span[&b];
            wd.extend([b as i32, t as i32, first as i32, last as i32 + 1]);
        }
        let mut view = cache.work.wdesc.slice_mut(0..wd.len());
        s.memcpy_htod(&wd, &mut view).map_err(driver_err)?;
        cache.launch_write(ctx, &s, rows.len(), false)?;
        if n_phi > 0 {
            cache.launch_phi(ctx, &s, n_phi)?;
        }
    }
    for (k, &b) in seq_ids.iter().enumerate() {
        cache.lens[b] += x.seq_range(k).len();
    }
    cache.upload_lens(ctx)?;
    // Decode rows of non-empty sequences (token-causal: each row masks by its own position).
    for chunk in arows.chunks(MAX_ROWS) {
        let rows: Vec<usize> = chunk.iter().map(|a| a.0).collect();
        let max_ctx = chunk.iter().map(|a| a.2 + 1).max().unwrap_or(1);
        let sp = cache.plan(rows.len(), max_ctx)?;
        cache.ensure_work(&s, rows.len(), &sp)?;
        cache.upload_tokens(ctx, x, &rows)?;
        let ad: Vec<i32> = chunk
            .iter()
            .enumerate()
            .flat_map(|(i, a)| [a.1 as i32, a.2 as i32, i as i32, 0])
            .collect();
        let mut view = cache.work.adesc.slice_mut(0..ad.len());
        s.memcpy_htod(&ad, &mut view).map_err(driver_err)?;
        cache.launch_attention(ctx, &s, rows.len(), &sp)?;
        let (o, sel) = download(ctx, cache, rows.len())?;
        for (i, &r) in rows.iter().enumerate() {
            out.o[r * hq * dv..(r + 1) * hq * dv]
                .copy_from_slice(&o[i * hq * dv..(i + 1) * hq * dv]);
            out.sel_idx[r * hkv * n..(r + 1) * hkv * n]
                .copy_from_slice(&sel[i * hkv * n..(i + 1) * hkv * n]);
        }
    }
    Ok(out)
}

/// One decode step of every sequence: `x` holds one token per cached sequence (`cu_seqlens =
/// [0, 1, .., B]`); token `b` is appended to sequence `b` and the rows `o` `[B, HQ, dv]`,
/// `sel_idx` `[B, HKV, n]` are returned. Errors as [`prefill`]'s.
///
/// With `phi` linear or mlp this compares `phi` with the weights the cache holds (and uploads
/// them if they changed): O(l·D²) host work per call. A decode loop with fixed weights can skip
/// it with [`step_held_phi`].
pub fn step(
    ctx: &CudaContext,
    cache: &mut GpuDecodeCache,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    cache.set_phi(ctx, phi)?;
    step_held_phi(ctx, cache, x)
}

/// [`step`] with the `phi` weights the cache already holds (uploaded by [`prefill`], [`step`] or
/// [`GpuDecodeCache::set_phi`]), without looking at any host copy of them. Errors as
/// [`step`]'s, and `Decode` when `phi` is linear or mlp and no weights were uploaded yet.
pub fn step_held_phi(
    ctx: &CudaContext,
    cache: &mut GpuDecodeCache,
    x: &NsaInputs<f32>,
) -> Result<NsaOutput<f32>> {
    let cfg = cache.cfg.clone();
    cache.check_inputs(x, &cfg, None)?;
    if cfg.phi != PhiKind::Mean && cache.phi.is_none() {
        return Err(NsaError::Decode(
            "phi is learned but the cache holds no weights yet (call prefill or set_phi first)"
                .into(),
        ));
    }
    let batch = cache.batch;
    let one_each: Vec<usize> = (0..=batch).collect();
    if x.cu_seqlens != one_each {
        return Err(NsaError::Decode(format!(
            "a step takes one token for each of the {batch} cached sequences (cu_seqlens [0, 1, .., {batch}]), got cu_seqlens {:?}",
            x.cu_seqlens
        )));
    }
    for b in 0..batch {
        cache.reserve(b, cache.lens[b] + 1)?;
    }
    let s = ctx.stream.clone();
    cache.sync_tables(&s)?;
    let max_ctx = cache.lens.iter().max().unwrap() + 1;
    let sp = cache.plan(batch, max_ctx)?;
    cache.ensure_work(&s, batch, &sp)?;
    cache.ensure_stage(&s, batch, 1)?;
    let rows: Vec<usize> = (0..batch).collect();
    cache.upload_tokens(ctx, x, &rows)?;
    let wd: Vec<i32> = (0..batch).flat_map(|b| [b as i32, 0, 0, 0]).collect();
    let mut view = cache.work.wdesc.slice_mut(0..wd.len());
    s.memcpy_htod(&wd, &mut view).map_err(driver_err)?;
    cache.step_launch(ctx, &s, &sp)?;
    cache.advance_host(1);
    let (o, sel_idx) = download(ctx, cache, batch)?;
    Ok(NsaOutput { o, sel_idx })
}

/// Prefill `[0, min(prefill_len, len))` of every sequence of `x`, then decode the rest one token
/// per step through a [`GpuDecodeCache`], and reassemble the rows in the forward's layout
/// (the contract of [`crate::replay::replay`]): while every sequence still has tokens a step is
/// one batched [`step`]; once some have run out, the others advance through one-token
/// [`prefill`] calls (same rows).
pub fn replay<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    prefill_len: usize,
) -> Result<NsaOutput<f32>> {
    replay_with(ctx, cfg, x, phi, prefill_len, usize::MAX, false)
}

/// [`replay`] with the prompt prefilled in chunks of at most `chunk` tokens (every sequence's
/// chunk `i` in one call), and, with `poison`, the output buffers filled with NaN / `i32::MIN`
/// before every call (tests: every element must be written by the kernels).
/// The cache's element type follows `T` (f32: bf16; `half::f16`: f16, [`HostElem`]).
pub fn replay_with<T: HostElem>(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    phi: &PhiParams<f32>,
    prefill_len: usize,
    chunk: usize,
    poison: bool,
) -> Result<NsaOutput<f32>> {
    if chunk == 0 {
        return Err(NsaError::ZeroSize("prefill chunk"));
    }
    x.validate(cfg)?;
    phi.validate(cfg, x.dk, x.dv)?;
    check_shapes(cfg, x.dk, x.dv)?;
    let (hq, hkv, n, dv) = (cfg.heads, cfg.kv_heads, cfg.sel_count, x.dv);
    let batch = x.num_seqs();
    let longest = (0..batch).map(|b| x.seq_range(b).len()).max().unwrap_or(0);
    let pool: usize = (0..batch)
        .map(|b| x.seq_range(b).len().next_multiple_of(PAGE))
        .sum();
    let elem = T::NATIVE.unwrap_or_default();
    let mut cache = GpuDecodeCache::new_in(ctx, cfg, batch, x.dk, x.dv, longest, pool, elem)?;
    // 16-bit host values widen to f32 exactly and round back to the same bits on upload
    let x = &x.map(HostElem::to_f32);
    cache.poison = poison;
    let mut out = NsaOutput {
        o: vec![0.0; x.num_tokens() * hq * dv],
        sel_idx: vec![-1; x.num_tokens() * hkv * n],
    };
    let mut put = |rows: &[usize], part: &NsaOutput<f32>| {
        for (i, &r) in rows.iter().enumerate() {
            out.o[r * hq * dv..(r + 1) * hq * dv]
                .copy_from_slice(&part.o[i * hq * dv..(i + 1) * hq * dv]);
            out.sel_idx[r * hkv * n..(r + 1) * hkv * n]
                .copy_from_slice(&part.sel_idx[i * hkv * n..(i + 1) * hkv * n]);
        }
    };
    // Prompt: chunk i of every sequence in one call.
    let mut c0 = 0;
    while c0 < prefill_len.min(longest) {
        let c1 = c0.saturating_add(chunk).min(prefill_len);
        let mut rows = Vec::new();
        let mut cu = vec![0];
        let mut ids = Vec::new();
        for b in 0..batch {
            let r = x.seq_range(b);
            let (p0, p1) = (c0.min(r.len()), c1.min(r.len()));
            if p1 > p0 {
                rows.extend(r.start + p0..r.start + p1);
                cu.push(rows.len());
                ids.push(b);
            }
        }
        put(
            &rows,
            &prefill(ctx, &mut cache, &ids, &x.gather(&rows, cu), phi)?,
        );
        c0 = c1;
    }
    // Generation.
    for pos in prefill_len..longest {
        let active: Vec<usize> = (0..batch).filter(|&b| x.seq_range(b).len() > pos).collect();
        let rows: Vec<usize> = active.iter().map(|&b| x.seq_range(b).start + pos).collect();
        if active.len() == batch {
            let one_each = (0..=batch).collect();
            put(
                &rows,
                &step(ctx, &mut cache, &x.gather(&rows, one_each), phi)?,
            );
        } else {
            let cu = (0..=rows.len()).collect();
            put(
                &rows,
                &prefill(ctx, &mut cache, &active, &x.gather(&rows, cu), phi)?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Launch-sized pieces of random chunks of several sequences: the plan makes exactly the
    /// blocks that complete inside each piece (every one of them once, none of the older ones),
    /// in slot order, each gathered from its own `l` staged rows.
    #[test]
    fn phi_stage_plan_makes_each_new_block_once() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0007);
        for (l, d) in [(32, 16), (48, 16), (16, 16), (8, 2)] {
            // (sequence, tokens already cached, chunk length)
            let seqs: Vec<(usize, usize, usize)> = (0..4)
                .map(|b| (b, rng.gen_range(0..200), rng.gen_range(1..300)))
                .collect();
            let rows: Vec<(usize, usize)> = seqs
                .iter()
                .flat_map(|&(b, s, n)| (s..s + n).map(move |t| (b, t)))
                .collect();
            let mut made = Vec::new();
            let mut start = 0;
            while start < rows.len() {
                let end = (start + rng.gen_range(1..400)).min(rows.len());
                let (slots, items, pdst) = phi_stage_plan(&rows[start..end], l, d);
                assert_eq!(slots.len(), end - start);
                let m = items.len() / 2;
                assert_eq!(pdst.len(), 2 * m);
                for (i, &slot) in slots.iter().enumerate() {
                    let (b, t) = rows[start + i];
                    if slot < 0 {
                        assert!(!completes_block(t, l, d));
                        continue;
                    }
                    let k = slot as usize;
                    assert_eq!(items[2 * k..2 * k + 2], [(k * l) as i32, k as i32]);
                    let ci = pdst[2 * k + 1] as usize;
                    assert_eq!(pdst[2 * k], b as i32);
                    // block ci covers [ci*d, ci*d + l): t is its last token
                    assert_eq!(ci * d + l - 1, t);
                    assert_eq!(blocks::cmp_visible(t, l, d), ci + 1);
                    made.push((b, ci));
                }
                // slots are numbered in row order, 0 .. m
                let used: Vec<i32> = slots.iter().copied().filter(|&s| s >= 0).collect();
                assert_eq!(used, (0..m as i32).collect::<Vec<_>>());
                start = end;
            }
            let mut want = Vec::new();
            for &(b, s, n) in &seqs {
                let old = blocks::cmp_blocks_in(s, l, d);
                want.extend((old..blocks::cmp_blocks_in(s + n, l, d)).map(|ci| (b, ci)));
            }
            assert_eq!(made, want, "l {l} d {d}");
        }
    }

    /// Write launches cover the rows in order, without gaps, within both limits.
    #[test]
    fn write_launches_bound_rows_and_staged_blocks() {
        let (l, d) = (32, 16);
        // one long sequence from 100, then one from 0: 20 000 rows, ~1250 blocks
        let ts: Vec<usize> = (100..15_100).chain(0..5_000).collect();
        for learned in [None, Some((l, d)), Some((16, 1))] {
            let ls = write_launches(&ts, learned);
            assert_eq!(ls.first().unwrap().start, 0);
            assert_eq!(ls.last().unwrap().end, ts.len());
            for w in ls.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for r in &ls {
                assert!(!r.is_empty() && r.len() <= WRITE_ROWS);
                let made = ts[r.clone()]
                    .iter()
                    .filter(|&&t| learned.is_some_and(|(l, d)| completes_block(t, l, d)))
                    .count();
                assert!(made <= PHI_STAGE_ROWS);
            }
            match learned {
                None => assert_eq!(ls.len(), ts.len().div_ceil(WRITE_ROWS)),
                // d = 1: every row past l - 1 completes a block
                Some((_, 1)) => assert!(ls.len() >= (ts.len() - 30) / PHI_STAGE_ROWS),
                Some(_) => assert!(ls.len() >= 1250 / PHI_STAGE_ROWS),
            }
        }
        assert!(write_launches(&[], None).is_empty());
    }
}
