//! Fused selection backward ([`SelDqPath::Fused`](super::SelDqPath::Fused), the default where it
//! is built; measured in bench/NOTES-cuda-bwd.md v17: 64k, G = 16 backward 93.0 -> 89.4 ms).
//!
//! The default saved-statistics backward runs the selection branch twice over the same
//! (position, selected block) pairs: `sel_bwd_dq` (or the block-outer `selb_bwd_dq` below
//! G = 16) for dQ, then `sel_bwd_dkdv` for dK / dV, each recomputing S = Q K^T and dP = dO V^T.
//! `sel_bwd_dkdv_dq` (kernels/sel_bwd.cu) is `sel_bwd_dkdv` with one more product per row step,
//! dQ_r = dS K, written unscaled to a partial slot per (t, h, rank of the block in t's list) in
//! the block-outer dQ's format (`SELB_DQ_PART`); `selb_dq_merge` (the `SelBlock` family) then
//! adds the ranks' partials to dq in rank order. Deterministic as the kernels it replaces.
//!
//! The partial buffer holds whole KV heads: the heads are processed in ranges whose slots fit
//! the block-outer paths' budget (`NSA_SEL_PARTIAL_MB`, 2 GiB by default), but at least one head
//! per range (at 64k tokens, G = 16, n = 16, dk = 128: 16.8M slots of 260 bytes, 4.4 GB).

use super::{driver_err, grid, CudaContext};
use crate::cuda::sel_block;
use crate::error::{NsaError, Result};
use cudarc::driver::{CudaEvent, CudaFunction, CudaSlice, CudaStream, PushKernelArg};

/// Row stride (elements) of the kernel's dS tile (`SEL_FUSED_DS_STRIDE`).
const DS_STRIDE: usize = 64 + 8;

/// Whether `sel_bwd_dkdv_dq` is built for this configuration (mirrors `SEL_FUSED` in
/// kernels/sel_bwd.cu): the key-major kernels on wgmma (`wg_kv`) with 64-row steps (dk and dv in
/// {64, 128}, not `-DBW_WG_RT=32`), one key tile per selection block (l' <= 64), and at most 32
/// selected blocks (the merge keeps one lane per rank).
pub(super) fn available(wg_kv: bool, dk: usize, dv: usize, sel_l: usize, nsel: usize) -> bool {
    wg_kv
        && matches!(dk, 64 | 128)
        && matches!(dv, 64 | 128)
        && crate::cuda::module::define_value("BW_WG_RT").unwrap_or(64) == 64
        && sel_l <= 64
        && nsel <= 32
}

/// Dynamic shared memory of `sel_bwd_dkdv_dq` (`SEL_FUSED_SMEM`): the key-major wgmma layout at
/// 64-row steps (1 KB of alignment slack, the K / V tile, two buffers of q / do rows and their
/// lse, dg, gate, t), then the two buffers' partial slots, the dS tile and the two rings of a
/// step's list entries (token, rank; 64 each).
pub(super) fn smem(dk: usize, dv: usize) -> usize {
    1024 + 64 * (dk + dv) * 2
        + 2 * 64 * ((dk + dv) * 2 + 16)
        + 2 * 64 * 4
        + 64 * DS_STRIDE * 2
        + 4 * 64 * 4
}

/// KV-head ranges `(first head, heads)` whose partial slots (`n * heads * g * nsel`, of
/// `slot_bytes` each) fit `budget`, with at least one head per range; and the slots of the
/// largest range. `None` when one head's slot numbers would overflow the kernel's i32.
pub(super) fn head_chunks(
    n: usize,
    g: usize,
    nsel: usize,
    hkv: usize,
    slot_bytes: usize,
    budget: usize,
) -> Option<(Vec<(usize, usize)>, usize)> {
    let per_head = n * g * nsel;
    if per_head == 0 || per_head > i32::MAX as usize {
        return None;
    }
    let by_budget = (budget / (per_head * slot_bytes)).max(1);
    let by_index = (i32::MAX as usize / per_head).max(1);
    let heads = by_budget.min(by_index).min(hkv);
    let chunks = (0..hkv)
        .step_by(heads)
        .map(|ga| (ga, heads.min(hkv - ga)))
        .collect();
    Some((chunks, heads * per_head))
}

/// The kernels of the fused path: the fused key-major pass (`Sel` family) and the merge
/// (`SelBlock` family).
pub(super) struct FusedKernels<'a> {
    pub fused: &'a CudaFunction,
    pub merge: &'a CudaFunction,
}

/// The device tensors the fused pass reads and writes (saved-statistics mode).
pub(super) struct FusedArgs<'a> {
    /// q, the selected branch's K / V, do, gate, saved lse, dg, sel_idx and the dq it adds into
    /// (the block-outer dQ's arguments)
    pub rows: sel_block::DqArgs<'a>,
    /// the inverse index of `sel_index_*` (the default path's)
    pub blocks: &'a CudaSlice<i32>,
    pub total: &'a CudaSlice<i32>,
    pub base: &'a CudaSlice<i32>,
    pub seg_base: &'a CudaSlice<i32>,
    pub pslot_base: &'a CudaSlice<i32>,
    pub list: &'a CudaSlice<i32>,
    /// each list entry's rank in its token's selection (`sel_index_fill` with ranks)
    pub list_rank: &'a CudaSlice<i32>,
    /// `seg_base` on the host (`npairs + 1` entries)
    pub seg_base_host: &'a [i32],
    pub nb: usize,
    pub seg_len: usize,
    pub dk: &'a mut CudaSlice<f32>,
    pub dv: &'a mut CudaSlice<f32>,
    pub pk: &'a mut CudaSlice<f32>,
    pub pv: &'a mut CudaSlice<f32>,
}

/// The fused path's partial dQ buffers and head ranges (allocated on its first backward).
pub(super) struct SelFusedDq {
    chunks: Vec<(usize, usize)>,
    /// `[slots, dk]` (f32, or f16 in the first half), the scales `[slots]` (f16 format)
    part_dq: CudaSlice<f32>,
    part_scale: CudaSlice<f32>,
    n: usize,
    g: usize,
    smem: usize,
    /// bytes of the partial buffers
    pub part_bytes: usize,
}

impl SelFusedDq {
    pub(super) fn new(
        ctx: &CudaContext,
        n: usize,
        hq: usize,
        hkv: usize,
        dk: usize,
        dv: usize,
        nsel: usize,
    ) -> Result<Self> {
        let g = hq / hkv;
        let eb = sel_block::dq_elem_bytes();
        let scaled = sel_block::dq_part_mode() != 0;
        let slot_bytes = dk * eb + if scaled { 4 } else { 0 };
        let (chunks, slots) = head_chunks(n, g, nsel, hkv, slot_bytes, sel_block::partial_budget())
            .ok_or(NsaError::IndexOverflow {
                what: "fused selection dQ partial slots of one KV head",
                value: (n * g * nsel) as u128,
                limit: 31,
            })?;
        let part_words = (slots * dk * eb).div_ceil(4);
        let scale_words = if scaled { slots } else { 1 };
        // SAFETY: every slot the merge reads (a valid rank) is written by the fused kernel first.
        let part_dq = unsafe { ctx.stream.alloc::<f32>(part_words.max(1)) }.map_err(driver_err)?;
        let part_scale = unsafe { ctx.stream.alloc::<f32>(scale_words) }.map_err(driver_err)?;
        Ok(SelFusedDq {
            chunks,
            part_dq,
            part_scale,
            n,
            g,
            smem: smem(dk, dv),
            part_bytes: (part_words + scale_words) * 4,
        })
    }

    /// dK / dV of the selection branch (into `a.dk` / `a.dv`, or the partial sums of the lists
    /// with more than one segment, which `sel_dkdv_reduce` adds up after) and its dQ added to
    /// `a.rows.dq`, one KV-head range at a time, on stream `s`; the first merge into dq waits
    /// for `dq_ready` when given.
    pub(super) fn run(
        &mut self,
        s: &CudaStream,
        f: &FusedKernels,
        a: FusedArgs,
        dq_ready: Option<&CudaEvent>,
    ) -> Result<()> {
        let r = a.rows;
        let mut waited = dq_ready.is_none();
        let (nb, n) = (a.nb as i32, self.n as i32);
        let seg_len = a.seg_len as i32;
        for &(ga, gcnt) in &self.chunks {
            let s0 = a.seg_base_host[ga * a.nb];
            let s1 = a.seg_base_host[(ga + gcnt) * a.nb];
            if s1 > s0 {
                let (seg0, ga32) = (s0, ga as i32);
                let mut l = s.launch_builder(f.fused);
                l.arg(r.q)
                    .arg(r.k)
                    .arg(r.v)
                    .arg(r.d_o)
                    .arg(r.gate)
                    .arg(r.lse)
                    .arg(r.dg)
                    .arg(a.blocks)
                    .arg(&nb)
                    .arg(a.total)
                    .arg(a.base)
                    .arg(a.seg_base)
                    .arg(a.pslot_base)
                    .arg(a.list)
                    .arg(&seg_len)
                    .arg(a.list_rank)
                    .arg(&seg0)
                    .arg(&ga32)
                    .arg(&n)
                    .arg(&mut *a.dk)
                    .arg(&mut *a.dv)
                    .arg(&mut *a.pk)
                    .arg(&mut *a.pv)
                    .arg(&mut self.part_dq)
                    .arg(&mut self.part_scale);
                // SAFETY: matches `sel_bwd_dkdv_dq`; one CTA per segment of the heads' lists.
                unsafe { l.launch(grid((s1 - s0) as usize, 1, 128, self.smem)) }
                    .map_err(driver_err)?;
            }
            if !waited {
                // the merges add into dq after the compressed and window dQ (overlapped backward)
                s.wait(dq_ready.expect("checked")).map_err(driver_err)?;
                waited = true;
            }
            let rows = gcnt * self.n * self.g;
            let (ta, ga32, nr) = (0i32, ga as i32, rows as i32);
            let mut l = s.launch_builder(f.merge);
            l.arg(r.sel_idx)
                .arg(&self.part_dq)
                .arg(&self.part_scale)
                .arg(&ta)
                .arg(&n)
                .arg(&ga32)
                .arg(&nr)
                .arg(&mut *r.dq);
            // SAFETY: matches `selb_dq_merge`; one warp per (t, h) row of the head range.
            unsafe { l.launch(grid(rows.div_ceil(8), 1, 256, 0)) }.map_err(driver_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_chunks_cover_every_head_within_the_budget() {
        // 64k tokens, G = 16, n = 16, 260-byte slots: one head (4.4 GB) exceeds 2 GiB, so one
        // head per range
        let (c, slots) = head_chunks(65536, 16, 16, 4, 260, 2 << 30).unwrap();
        assert_eq!(c, vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(slots, 65536 * 16 * 16);
        // small inputs: every head in one range
        let (c, slots) = head_chunks(1000, 4, 16, 8, 260, 2 << 30).unwrap();
        assert_eq!(c, vec![(0, 8)]);
        assert_eq!(slots, 8 * 1000 * 4 * 16);
        // a budget of three heads over seven: ranges 3, 3, 1
        let per_head = 100 * 2 * 16 * 260;
        let (c, _) = head_chunks(100, 2, 16, 7, 260, 3 * per_head + 1).unwrap();
        assert_eq!(c, vec![(0, 3), (3, 3), (6, 1)]);
        assert_eq!(c.iter().map(|&(_, k)| k).sum::<usize>(), 7);
        // the i32 slot numbers bound a range even under a huge budget
        let (c, slots) = head_chunks(1 << 20, 16, 16, 16, 4, usize::MAX).unwrap();
        assert!(slots <= i32::MAX as usize);
        assert_eq!(c, vec![(0, 7), (7, 7), (14, 2)]);
        // one head past i32: not available
        assert!(head_chunks(1 << 24, 16, 16, 4, 260, 2 << 30).is_none());
    }

    #[test]
    fn fused_footprint_keeps_two_ctas_per_sm_on_hopper() {
        // 228 KB per SM, 1 KB reserved per CTA
        for (dk, dv) in [(64, 64), (128, 64), (64, 128), (128, 128)] {
            let b = smem(dk, dv);
            assert!(2 * (b + 1024) <= 233_472, "dk {dk} dv {dv}: {b} bytes");
        }
        // ..., the slots, the dS tile and the rings of list entries (token, rank)
        assert_eq!(
            smem(128, 128),
            1024 + 32768 + 2 * 64 * 528 + 512 + 9216 + 1024
        );
    }

    #[test]
    fn availability_follows_the_kernel_guard() {
        assert!(available(true, 128, 128, 64, 16));
        assert!(available(true, 64, 128, 32, 16));
        assert!(!available(false, 128, 128, 64, 16)); // no wgmma
        assert!(!available(true, 192, 128, 64, 16)); // 32-row steps at dk 192
        assert!(!available(true, 128, 128, 128, 16)); // two key tiles per block
        assert!(!available(true, 128, 128, 64, 33)); // the merge's lanes
    }
}
