//! Block-outer selected attention (kernels/sel_block.cu): the forward's selection branch for
//! small groups (G < 16 by default), where the position-major `sel_attn` would load every
//! selected K/V block for only G query rows.
//!
//! Per chunk of (token range x KV-head range): an inverse index (per KV head and selection block,
//! the entries `(t, rank)` that chose it), one CTA per segment of a list (the block's K/V loaded
//! once, the positions' rows gathered 64 at a time), partial outputs + lse per
//! `(t, h, rank)`, and a merge that combines them in rank order and adds `g_slc * o_slc` (and
//! saves o_slc / lse as `sel_attn` does). The chunk size bounds the partial buffer
//! ([`partial_budget`]); the buffers are allocated on the first forward and kept.
//!
//! Partial outputs: f16 with a per-row f32 scale by default, f32 or bf16 through
//! `-DSELB_PART=0|1` ([`part_mode`]); Q pipeline depth `-DSELB_QSTAGES=N` ([`q_stages`]).
//! `NSA_SEL_PATH=rows` forces `sel_attn`, `NSA_SEL_PATH=block` this path for every G (both for
//! experiments and tests); `NSA_SEL_PARTIAL_MB` overrides the partial budget (tests: many chunks).
//!
//! The backward's selection dQ for small G ([`SelBlockDq`], kernels/sel_block_bwd.cu) reuses the
//! chunk plan and the index kernels with partial dQ rows per `(t, h, rank)` (f16 scaled per slot
//! by default, f32 through `-DSELB_DQ_PART=0`); `NSA_SEL_DQ_PATH=rows|block` forces either path.

use super::{driver_err, CudaContext, DeviceInputs, Family, Shape, NULL_PTR};
use crate::error::Result;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Partial-buffer budget (bytes): 2 GiB unless `NSA_SEL_PARTIAL_MB` says otherwise.
pub(crate) fn partial_budget() -> usize {
    std::env::var("NSA_SEL_PARTIAL_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|mb| mb.max(1) << 20)
        .unwrap_or(2 << 30)
}

/// Partial-output format, `-DSELB_PART=N` in NSA_CUDA_DEFINES (sel_block.cu; the kernel's default
/// is the same): 0 = f32, 1 = bf16, 2 (the default) = f16 scaled by the row's max |o|.
fn part_mode() -> u32 {
    super::module::define_value("SELB_PART").unwrap_or(2) as u32
}

/// Bytes of one element of a partial output row.
fn part_elem_bytes() -> usize {
    if part_mode() == 0 {
        4
    } else {
        2
    }
}

/// Q stages of `selb_attn`, `-DSELB_QSTAGES=N` in NSA_CUDA_DEFINES (default 2, as in the kernel;
/// deeper pipelines are an experiment not yet run on the GPU).
fn q_stages() -> usize {
    super::module::define_value("SELB_QSTAGES").unwrap_or(2)
}

/// Positions per 64-row tile and per segment (SELB_PG, SELB_SEG in sel_block.cu).
fn seg_positions(g: usize) -> usize {
    16 * (64 / g)
}

/// Dynamic shared memory of `selb_attn`: the block's K and V, the 64-row Q stages, the entries.
fn attn_smem(shape: &Shape) -> usize {
    let g = shape.hq / shape.hkv;
    (shape.sel_l * (shape.dk + 8 + shape.dv + 8) + q_stages() * 64 * (shape.dk + 8)) * 2
        + seg_positions(g) * 4
}

/// Whether the forward takes this path for `shape` on a device with `max_smem` bytes per block.
pub(crate) fn enabled(shape: &Shape, max_smem: usize) -> bool {
    let fits = shape.sel_l.is_multiple_of(32) && attn_smem(shape) <= max_smem;
    match std::env::var("NSA_SEL_PATH").ok().as_deref() {
        Some("rows") => false,
        Some("block") => fits,
        _ => fits && shape.hq / shape.hkv < 16,
    }
}

/// One chunk: tokens `[ta, ta + ct)` of the packed batch, KV heads `[ga, ga + gcnt)`, and the
/// selection blocks (batch numbering) `[jg_lo, jg_lo + nbc)` its tokens can choose.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    ta: usize,
    ct: usize,
    ga: usize,
    gcnt: usize,
    jg_lo: usize,
    nbc: usize,
}

impl Chunk {
    /// (KV head, selection block) pairs of the chunk's index.
    fn pairs(&self) -> usize {
        self.gcnt * self.nbc
    }

    /// (t, h) rows of the chunk (a merge warp each).
    fn rows(&self, g: usize) -> usize {
        self.ct * self.gcnt * g
    }

    /// CTAs of a per-segment kernel: at most entries / `seg` full segments plus one partial
    /// segment per pair (CTAs past the chunk's segment count return at once).
    fn segment_ctas(&self, nsel: usize, seg: usize) -> usize {
        (self.ct * self.gcnt * nsel).div_ceil(seg) + self.pairs()
    }

    /// `(ta, ct, ga, gcnt, jg_lo, nbc)` as the kernels take them.
    fn args(&self) -> [i32; 6] {
        [self.ta, self.ct, self.ga, self.gcnt, self.jg_lo, self.nbc].map(|v| v as i32)
    }
}

/// Host layout of the batch (from `cu_seqlens`) and, after the first forward, the device buffers.
pub(crate) struct SelBlock {
    cu: Vec<usize>,
    dev: Option<Buffers>,
}

/// The chunked inverse index shared by the forward and the backward's dQ: the batch's block
/// tables, the chunk plan and, per chunk, each (KV head, block) pair's list of the rows that
/// chose the block (`selb_count` / `selb_scan` / `selb_fill`).
struct InverseIndex {
    chunks: Vec<Chunk>,
    /// `[N]` batch number of the first selection block of the token's sequence
    jbase: CudaSlice<i32>,
    /// `[NB]` (first key token, keys) per selection block
    blk: CudaSlice<i32>,
    /// counters / cursors, list offsets, segment offsets: `[max pairs + 1]`
    cnt: CudaSlice<i32>,
    base: CudaSlice<i32>,
    seg_base: CudaSlice<i32>,
    /// `[max entries]` packed `t_local * 32 + rank`
    list: CudaSlice<i32>,
}

/// The index kernels of the family that holds them (the forward's or the backward's copy).
struct IndexKernels<'a> {
    count: &'a CudaFunction,
    scan: &'a CudaFunction,
    fill: &'a CudaFunction,
}

impl InverseIndex {
    fn new(ctx: &CudaContext, lay: Layout) -> Result<Self> {
        let up = |v: &[i32]| -> Result<CudaSlice<i32>> {
            let v = if v.is_empty() { vec![0; 2] } else { v.to_vec() };
            ctx.stream.clone_htod(&v).map_err(driver_err)
        };
        Ok(InverseIndex {
            jbase: up(&lay.jbase)?,
            blk: up(&lay.blk)?,
            cnt: alloc(ctx, lay.max_pairs + 1)?,
            base: alloc(ctx, lay.max_pairs + 1)?,
            seg_base: alloc(ctx, lay.max_pairs + 1)?,
            list: alloc(ctx, lay.max_entries)?,
            chunks: lay.chunks,
        })
    }

    /// Builds chunk `ch`'s lists from the selection `sel_idx`: count per pair, scan (list and
    /// segment offsets), fill.
    fn build(
        &mut self,
        s: &Arc<CudaStream>,
        k: &IndexKernels<'_>,
        sel_idx: &CudaSlice<i32>,
        ch: &Chunk,
    ) -> Result<()> {
        let [ta, ct, ga, gcnt, jg_lo, nbc] = ch.args();
        let np = ch.pairs() as i32;
        let threads_tg = ch.ct * ch.gcnt;
        s.memset_zeros(&mut self.cnt).map_err(driver_err)?;
        {
            let mut l = s.launch_builder(k.count);
            l.arg(sel_idx)
                .arg(&self.jbase)
                .arg(&ta)
                .arg(&ct)
                .arg(&ga)
                .arg(&gcnt)
                .arg(&jg_lo)
                .arg(&nbc)
                .arg(&mut self.cnt);
            // SAFETY: matches `selb_count`; one thread per (t, g) of the chunk (the rest idle).
            unsafe { l.launch(launch(threads_tg.div_ceil(256), 256, 0)) }.map_err(driver_err)?;
        }
        {
            let mut l = s.launch_builder(k.scan);
            l.arg(&mut self.cnt)
                .arg(&np)
                .arg(&mut self.base)
                .arg(&mut self.seg_base);
            // SAFETY: matches `selb_scan`; one CTA of 1024 threads, npairs + 1 entries each.
            unsafe { l.launch(launch(1, 1024, 0)) }.map_err(driver_err)?;
        }
        let mut l = s.launch_builder(k.fill);
        l.arg(sel_idx)
            .arg(&self.jbase)
            .arg(&ta)
            .arg(&ct)
            .arg(&ga)
            .arg(&gcnt)
            .arg(&jg_lo)
            .arg(&nbc)
            .arg(&mut self.cnt)
            .arg(&mut self.list);
        // SAFETY: matches `selb_fill`; the list holds every entry of the chunk.
        unsafe { l.launch(launch(threads_tg.div_ceil(256), 256, 0)) }.map_err(driver_err)?;
        Ok(())
    }
}

struct Buffers {
    idx: InverseIndex,
    /// `[max slots, dv]` (f32, or 16-bit values in the first half, see [`part_mode`]), the lse
    /// and the scale (mode 2) `[max slots]`
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    part_scale: CudaSlice<f32>,
    /// bytes of the two partial buffers (reported by [`DeviceInputs::sel_partial_bytes`])
    part_bytes: usize,
}

impl SelBlock {
    pub(crate) fn new(cu_seqlens: &[usize]) -> Self {
        SelBlock {
            cu: cu_seqlens.to_vec(),
            dev: None,
        }
    }

    fn buffers(&mut self, ctx: &CudaContext, shape: &Shape) -> Result<&mut Buffers> {
        if self.dev.is_none() {
            self.dev = Some(Buffers::new(ctx, shape, &self.cu)?);
        }
        Ok(self.dev.as_mut().expect("just set"))
    }
}

fn alloc<T: cudarc::driver::DeviceRepr>(ctx: &CudaContext, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every buffer is written (upload, memset or a kernel) before it is read.
    unsafe { ctx.stream.alloc::<T>(len.max(1)) }.map_err(driver_err)
}

/// The batch's block tables and chunks for a partial budget of `budget` bytes.
struct Layout {
    /// `[N]` batch number of the first selection block of the token's sequence
    jbase: Vec<i32>,
    /// `[NB]` (first key token, keys) per selection block
    blk: Vec<i32>,
    chunks: Vec<Chunk>,
    max_pairs: usize,
    max_entries: usize,
    max_slots: usize,
}

fn layout(shape: &Shape, cu: &[usize], budget: usize, part_bytes: usize) -> Layout {
    layout_slots(shape, cu, budget, shape.dv * part_bytes + 8) // + lse and scale
}

/// [`layout`] for partial slots of `slot` bytes each (the forward's o + lse + scale, or the
/// backward's dQ rows, [`SelBlockDq`]).
fn layout_slots(shape: &Shape, cu: &[usize], budget: usize, slot: usize) -> Layout {
    let (hkv, lp, nsel) = (shape.hkv, shape.sel_l, shape.nsel);
    let g = shape.hq / hkv;
    let n = *cu.last().unwrap_or(&0);
    let mut jbase = vec![0i32; n.max(1)];
    let mut blk = Vec::new();
    let mut seq_blocks = Vec::new(); // (batch number of the first block, blocks) per sequence
    for w in cu.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        let jb = blk.len() / 2;
        let nb = len.div_ceil(lp);
        for j in 0..nb {
            blk.extend([(start + j * lp) as i32, lp.min(len - j * lp) as i32]);
        }
        jbase[start..start + len].fill(jb as i32);
        seq_blocks.push((jb, nb));
    }
    let seq_of = |t: usize| cu.partition_point(|&c| c <= t) - 1;
    // rows (t, h) per chunk within the budget; whole heads' sequences when they fit, else
    // token ranges of one KV head (t_local * 32 + rank must fit an i32: at most 2^26 tokens)
    let rows_cap = (budget / (nsel * slot)).max(g);
    let (ct, gcnt) = if n * g <= rows_cap && n <= 1 << 26 {
        let per = (rows_cap / (n * g).max(1)).clamp(1, hkv);
        (n.max(1), hkv.div_ceil(hkv.div_ceil(per)))
    } else {
        let most = (rows_cap / g).clamp(1, 1 << 26);
        (n.div_ceil(n.div_ceil(most)), 1)
    };
    let mut out = Layout {
        jbase,
        blk,
        chunks: Vec::new(),
        max_pairs: 0,
        max_entries: 0,
        max_slots: 0,
    };
    for ga in (0..hkv).step_by(gcnt) {
        let gc = gcnt.min(hkv - ga);
        for ta in (0..n).step_by(ct) {
            let c = ct.min(n - ta);
            let (sa, sb) = (seq_of(ta), seq_of(ta + c - 1));
            let jg_lo = seq_blocks[sa].0;
            let jg_hi = seq_blocks[sb].0 + seq_blocks[sb].1;
            let ch = Chunk {
                ta,
                ct: c,
                ga,
                gcnt: gc,
                jg_lo,
                nbc: jg_hi - jg_lo,
            };
            out.max_pairs = out.max_pairs.max(gc * ch.nbc);
            out.max_entries = out.max_entries.max(c * gc * nsel);
            out.max_slots = out.max_slots.max(c * gc * g * nsel);
            out.chunks.push(ch);
        }
    }
    out
}

impl Buffers {
    fn new(ctx: &CudaContext, shape: &Shape, cu: &[usize]) -> Result<Self> {
        let lay = layout(shape, cu, partial_budget(), part_elem_bytes());
        let part_words = (lay.max_slots * shape.dv * part_elem_bytes()).div_ceil(4);
        let slots = lay.max_slots;
        Ok(Buffers {
            idx: InverseIndex::new(ctx, lay)?,
            part_o: alloc(ctx, part_words)?,
            part_lse: alloc(ctx, slots)?,
            part_scale: alloc(ctx, slots)?,
            part_bytes: (part_words + 2 * slots) * 4,
        })
    }
}

fn launch(grid: usize, threads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

impl DeviceInputs {
    /// Bytes of the block-outer path's partial buffers (0 before its first forward or when the
    /// forward uses `sel_attn`).
    pub fn sel_partial_bytes(&self) -> usize {
        self.selb.dev.as_ref().map_or(0, |d| d.part_bytes)
    }
}

/// Step 4 of the forward on this path: adds `g_slc * o_slc` to `x.out` (and saves o_slc / lse
/// when the inputs save statistics).
pub(crate) fn run(ctx: &CudaContext, x: &mut DeviceInputs) -> Result<()> {
    let shape = x.shape.clone();
    let g = shape.hq / shape.hkv;
    let smem = attn_smem(&shape);
    let f_count = ctx.named_function(Family::SelBlock, "selb_count", &shape, 0)?;
    let f_scan = ctx.named_function(Family::SelBlock, "selb_scan", &shape, 0)?;
    let f_fill = ctx.named_function(Family::SelBlock, "selb_fill", &shape, 0)?;
    let f_attn = ctx.named_function(Family::SelBlock, "selb_attn", &shape, smem)?;
    let f_merge = ctx.named_function(Family::SelBlock, "selb_merge", &shape, 0)?;
    let s = ctx.stream.clone();
    let seg = seg_positions(g);
    let DeviceInputs {
        selb,
        q,
        k,
        v,
        gates,
        sel_idx,
        out,
        saved,
        ..
    } = x;
    let b = selb.buffers(ctx, &shape)?;
    let kidx = IndexKernels {
        count: &f_count,
        scan: &f_scan,
        fill: &f_fill,
    };
    for ch in b.idx.chunks.clone() {
        b.idx.build(&s, &kidx, sel_idx, &ch)?;
        let [ta, ct, ga, _, jg_lo, nbc] = ch.args();
        let np = ch.pairs() as i32;
        {
            let grid = ch.segment_ctas(shape.nsel, seg);
            let mut l = s.launch_builder(&f_attn);
            l.arg(&*q)
                .arg(&k[1])
                .arg(&v[1])
                .arg(&b.idx.blk)
                .arg(&b.idx.base)
                .arg(&b.idx.seg_base)
                .arg(&b.idx.list)
                .arg(&np)
                .arg(&nbc)
                .arg(&jg_lo)
                .arg(&ga)
                .arg(&ta)
                .arg(&ct)
                .arg(&mut b.part_o)
                .arg(&mut b.part_lse)
                .arg(&mut b.part_scale);
            // SAFETY: matches `selb_attn`; CTAs past the chunk's segment count return at once.
            unsafe { l.launch(launch(grid, 128, smem)) }.map_err(driver_err)?;
        }
        {
            let rows = ch.rows(g);
            let nr = rows as i32;
            let mut l = s.launch_builder(&f_merge);
            l.arg(&*sel_idx)
                .arg(&gates[1])
                .arg(&b.part_o)
                .arg(&b.part_lse)
                .arg(&b.part_scale)
                .arg(&ta)
                .arg(&ct)
                .arg(&ga)
                .arg(&nr)
                .arg(&mut *out);
            match saved.as_mut() {
                Some(sv) => l.arg(&mut sv.lse[0]).arg(&mut sv.o[1]),
                None => l.arg(&NULL_PTR).arg(&NULL_PTR),
            };
            // SAFETY: matches `selb_merge`; one warp per (t, h) row of the chunk.
            unsafe { l.launch(launch(rows.div_ceil(8), 256, 0)) }.map_err(driver_err)?;
        }
    }
    Ok(())
}

// ---- backward: the selection branch's dQ, block-outer (kernels/sel_block_bwd.cu) ----

/// Partial dQ format, `-DSELB_DQ_PART=N` in NSA_CUDA_DEFINES (sel_block_bwd.cu; the same default):
/// 0 = f32 rows, 2 (the default) = f16 of dQ_r / max|dQ_r| with an f32 scale per slot.
pub(crate) fn dq_part_mode() -> u32 {
    super::module::define_value("SELB_DQ_PART").unwrap_or(2) as u32
}

/// Bytes of one element of a partial dQ row.
pub(crate) fn dq_elem_bytes() -> usize {
    if dq_part_mode() == 0 {
        4
    } else {
        2
    }
}

/// Dynamic shared memory of `selb_bwd_dq`: the block's K and V, two stages of 64 rows of Q and
/// dO with their lse / dg / gate, the segment's entries.
pub(crate) fn dq_smem(shape: &Shape) -> usize {
    let g = shape.hq / shape.hkv;
    let stage = 64 * (shape.dk + 8 + shape.dv + 8) * 2 + 64 * 12;
    shape.sel_l * (shape.dk + 8 + shape.dv + 8) * 2 + 2 * stage + seg_positions(g) * 4
}

/// Whether `selb_bwd_dq` is built for this shape (l' a multiple of 32, n <= 32) and its shared
/// memory fits the device.
pub(crate) fn dq_fits(shape: &Shape, max_smem: usize) -> bool {
    shape.sel_l.is_multiple_of(32) && shape.nsel <= 32 && dq_smem(shape) <= max_smem
}

/// Whether the saved-statistics backward computes the selection dQ on this path (else
/// `sel_bwd_dq_saved`): by default for G < 16; `NSA_SEL_DQ_PATH=rows|block` forces either
/// (experiments and tests). The recompute mode always uses `sel_bwd_dq` (it needs that kernel's
/// statistics pass).
pub(crate) fn dq_enabled(shape: &Shape, max_smem: usize) -> bool {
    let fits = dq_fits(shape, max_smem);
    match std::env::var("NSA_SEL_DQ_PATH").ok().as_deref() {
        Some("rows") => false,
        Some("block") => fits,
        _ => fits && shape.hq / shape.hkv < 16,
    }
}

/// The backward's kernels of this path (compiled in the backward's `SelBlock` family).
pub(crate) struct DqKernels<'a> {
    pub count: &'a CudaFunction,
    pub scan: &'a CudaFunction,
    pub fill: &'a CudaFunction,
    pub dq: &'a CudaFunction,
    pub merge: &'a CudaFunction,
}

/// The device tensors the dQ pass reads (saved-statistics mode) and the dq it adds into.
pub(crate) struct DqArgs<'a> {
    pub q: &'a CudaSlice<u16>,
    pub k: &'a CudaSlice<u16>,
    pub v: &'a CudaSlice<u16>,
    pub d_o: &'a CudaSlice<u16>,
    pub gate: &'a CudaSlice<f32>,
    /// the selected branch's lse saved by the forward (log2 units)
    pub lse: &'a CudaSlice<f32>,
    /// dg_slc = do . o_slc (bwd_gate_dot)
    pub dg: &'a CudaSlice<f32>,
    pub sel_idx: &'a CudaSlice<i32>,
    pub dq: &'a mut CudaSlice<f32>,
}

/// Buffers of the block-outer selection dQ: the forward's chunk plan and inverse index
/// ([`layout_slots`], `selb_count` / `selb_scan` / `selb_fill`) with partial slots of one dQ row
/// (`dk` f32, or f16 + an f32 scale), within the same budget ([`partial_budget`]).
pub(crate) struct SelBlockDq {
    idx: InverseIndex,
    /// `[max slots, dk]` (f32, or f16 in the first half), the scales `[max slots]` (mode 2)
    part_dq: CudaSlice<f32>,
    part_scale: CudaSlice<f32>,
    /// bytes of the partial buffers
    pub part_bytes: usize,
}

impl SelBlockDq {
    pub(crate) fn new(ctx: &CudaContext, shape: &Shape, cu: &[usize]) -> Result<Self> {
        let eb = dq_elem_bytes();
        let scale_bytes = if dq_part_mode() == 0 { 0 } else { 4 };
        let lay = layout_slots(shape, cu, partial_budget(), shape.dk * eb + scale_bytes);
        let part_words = (lay.max_slots * shape.dk * eb).div_ceil(4);
        let scale_words = if scale_bytes > 0 { lay.max_slots } else { 1 };
        Ok(SelBlockDq {
            idx: InverseIndex::new(ctx, lay)?,
            part_dq: alloc(ctx, part_words)?,
            part_scale: alloc(ctx, scale_words)?,
            part_bytes: (part_words + scale_words) * 4,
        })
    }

    /// Adds the selection branch's dQ to `a.dq` on stream `s`, chunk by chunk: index (count,
    /// scan, fill), the per-segment partials (`selb_bwd_dq`), the merge in rank order
    /// (`selb_dq_merge`).
    pub(crate) fn run(
        &mut self,
        s: &Arc<CudaStream>,
        shape: &Shape,
        f: &DqKernels,
        a: DqArgs,
    ) -> Result<()> {
        let g = shape.hq / shape.hkv;
        let smem = dq_smem(shape);
        let seg = seg_positions(g);
        let kidx = IndexKernels {
            count: f.count,
            scan: f.scan,
            fill: f.fill,
        };
        for ch in self.idx.chunks.clone() {
            self.idx.build(s, &kidx, a.sel_idx, &ch)?;
            let [ta, ct, ga, _, jg_lo, nbc] = ch.args();
            let np = ch.pairs() as i32;
            {
                let grid = ch.segment_ctas(shape.nsel, seg);
                let mut l = s.launch_builder(f.dq);
                l.arg(a.q)
                    .arg(a.k)
                    .arg(a.v)
                    .arg(a.d_o)
                    .arg(a.gate)
                    .arg(a.lse)
                    .arg(a.dg)
                    .arg(&self.idx.blk)
                    .arg(&self.idx.base)
                    .arg(&self.idx.seg_base)
                    .arg(&self.idx.list)
                    .arg(&np)
                    .arg(&nbc)
                    .arg(&jg_lo)
                    .arg(&ga)
                    .arg(&ta)
                    .arg(&ct)
                    .arg(&mut self.part_dq)
                    .arg(&mut self.part_scale);
                // SAFETY: matches `selb_bwd_dq`; CTAs past the chunk's segment count return.
                unsafe { l.launch(launch(grid, 128, smem)) }.map_err(driver_err)?;
            }
            {
                let rows = ch.rows(g);
                let nr = rows as i32;
                let mut l = s.launch_builder(f.merge);
                l.arg(a.sel_idx)
                    .arg(&self.part_dq)
                    .arg(&self.part_scale)
                    .arg(&ta)
                    .arg(&ct)
                    .arg(&ga)
                    .arg(&nr)
                    .arg(&mut *a.dq);
                // SAFETY: matches `selb_dq_merge`; one warp per (t, h) row of the chunk.
                unsafe { l.launch(launch(rows.div_ceil(8), 256, 0)) }.map_err(driver_err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(hq: usize, hkv: usize, dv: usize) -> Shape {
        let cfg = crate::NsaConfig::builder()
            .heads(hq)
            .kv_heads(hkv)
            .build()
            .unwrap();
        super::super::shape_of(&cfg, 128, dv)
    }

    #[test]
    fn segments_and_smem_follow_the_kernel_layout() {
        assert_eq!(seg_positions(1), 1024);
        assert_eq!(seg_positions(8), 128);
        assert_eq!(seg_positions(3), 16 * 21);
        // K/V 64 x (136 + 136), the Q stages of 64 x 136, 1024 entries
        assert_eq!(
            attn_smem(&shape(64, 64, 128)),
            (64 * 272 + q_stages() * 64 * 136) * 2 + 4096
        );
    }

    #[test]
    fn dq_smem_follows_the_kernel_layout() {
        // K/V 64 x (136 + 136), two stages of 64 rows of Q and dO (136 each) and 64 x 12 B of
        // lse / dg / gate, 1024 entries at G = 1 (128 at G = 8)
        let stage = 64 * 272 * 2 + 768;
        assert_eq!(
            dq_smem(&shape(64, 64, 128)),
            64 * 272 * 2 + 2 * stage + 4096
        );
        assert_eq!(dq_smem(&shape(64, 8, 128)), 64 * 272 * 2 + 2 * stage + 512);
    }

    /// Every (token, KV head) lies in exactly one chunk, each chunk's rows fit the budget, and a
    /// chunk's block range holds every block its tokens can choose.
    #[test]
    fn chunks_cover_the_batch_within_the_budget() {
        let cu = [0usize, 700, 701, 701, 1990, 2100];
        for (hq, hkv) in [(8, 8), (8, 2), (64, 4), (16, 1)] {
            let sh = shape(hq, hkv, 128);
            let g = hq / hkv;
            for (budget, bytes) in [(1usize << 30, 4usize), (1 << 20, 4), (300_000, 2), (1, 4)] {
                let lay = layout(&sh, &cu, budget, bytes);
                let n = cu[5];
                let mut seen = vec![0u8; n * hkv];
                for ch in &lay.chunks {
                    let rows = ch.ct * ch.gcnt * g;
                    assert!(
                        rows * sh.nsel * (128 * bytes + 4)
                            <= budget.max(g * sh.nsel * (128 * bytes + 4))
                    );
                    for t in ch.ta..ch.ta + ch.ct {
                        let jb = lay.jbase[t] as usize;
                        let own = jb + (t - cu[cu.partition_point(|&c| c <= t) - 1]) / sh.sel_l;
                        assert!(ch.jg_lo <= jb && own < ch.jg_lo + ch.nbc);
                        for gg in ch.ga..ch.ga + ch.gcnt {
                            seen[t * hkv + gg] += 1;
                        }
                    }
                    assert!(ch.gcnt * ch.nbc <= lay.max_pairs);
                    assert!(rows * sh.nsel <= lay.max_slots);
                }
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "hq {hq} hkv {hkv} budget {budget}"
                );
            }
        }
        // blocks: (first key, keys), the last block of a sequence cut at its end
        let lay = layout(&shape(8, 2, 128), &cu, 1 << 30, 4);
        assert_eq!(&lay.blk[..4], &[0, 64, 64, 64]);
        assert_eq!(&lay.blk[2 * 10..2 * 12], &[640, 60, 700, 1]);
        assert_eq!(lay.jbase[700], 11);
        assert_eq!(lay.jbase[701], 12);
    }
}
