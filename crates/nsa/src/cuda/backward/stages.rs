//! The backward's kernel launches, one function per stage, each on the stream it is given:
//! [`super::backward_device_with`] runs the compressed and window stages on the context's stream
//! and the selection stages on a second one ([`Overlap`], the default), or all in order on the
//! context's stream.

use super::sel_fused;
use super::{grid, sel_rows_args, DeviceBackward, SavedStats};
use crate::cuda::sel_block;
use crate::cuda::{driver_err, CudaContext, DeviceInputs};
use crate::error::{NsaError, Result};
use cudarc::driver::{CudaEvent, CudaStream, PushKernelArg};
use std::sync::Arc;

/// What every stage reads: the context, the forward's inputs and outputs, and the statistics it
/// saved (None: the recompute mode).
pub(super) struct Run<'a> {
    pub ctx: &'a CudaContext,
    pub x: &'a DeviceInputs,
    pub saved: Option<&'a SavedStats>,
}

impl Run<'_> {
    /// The row-major kernel's name in this mode (`_saved` with saved statistics).
    fn dq_name(&self, base: &str) -> String {
        if self.saved.is_some() {
            format!("{base}_saved")
        } else {
            base.to_string()
        }
    }
}

/// The overlapped backward's second stream and events (the default; `NSA_BWD_OVERLAP=0` or
/// [`DeviceBackward::set_overlap`] turn it off).
pub(super) struct Overlap {
    pub stream: Arc<CudaStream>,
    /// the gate dots are done (stream A)
    pub gates: CudaEvent,
    /// the compressed and window dQ are done (stream A): the selection may add into dq
    pub dq: CudaEvent,
    /// the selection stages are done (stream B)
    pub done: CudaEvent,
}

impl Overlap {
    pub fn new(ctx: &CudaContext) -> Result<Self> {
        let stream = ctx.high_priority_stream()?;
        let ev = || ctx.ctx.new_event(None).map_err(driver_err);
        Ok(Overlap {
            stream,
            gates: ev()?,
            dq: ev()?,
            done: ev()?,
        })
    }
}

/// dg_b = do . o_b for the three branches (saved-statistics mode; also Delta of the dQ / dK, dV
/// passes).
pub(super) fn gate_dots(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    if let Some(sv) = r.saved {
        let f = b.func("bwd_gate_dot")?;
        let rows = (b.n_tokens * b.hq) as i64;
        for br in 0..3 {
            let mut l = s.launch_builder(&f);
            l.arg(&b.d_o).arg(&sv.o[br]).arg(&rows).arg(&mut b.dg[br]);
            // SAFETY: matches `bwd_gate_dot`; one warp per row.
            unsafe { l.launch(grid((rows as usize).div_ceil(8), 1, 256, 0)) }
                .map_err(driver_err)?;
        }
    }
    Ok(())
}

/// The compressed branch's dQ (`=` into dq; with recomputed statistics also its lse and dg).
pub(super) fn cmp_dq(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    row_dq(r, b, s, 0)
}

/// The row-major dQ pass of the compressed (`branch` 0: `cmp_bwd_dq`, writes dq) or window
/// (2: `win_bwd_dq`, adds into dq) branch: its K / V and gate, the statistics the forward saved
/// for it (the compressed lse is the forward's own) or the ones it recomputes.
fn row_dq(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>, branch: usize) -> Result<()> {
    let (x, saved, sm, hkv) = (r.x, r.saved, b.smem, b.hkv);
    let (name, k, v) = if branch == 0 {
        ("cmp_bwd_dq", &x.kc, &x.vc)
    } else {
        ("win_bwd_dq", &x.k[2], &x.v[2])
    };
    let f = b.func(&r.dq_name(name))?;
    let mut l = s.launch_builder(&f);
    l.arg(&x.q)
        .arg(k)
        .arg(v)
        .arg(&b.d_o)
        .arg(&x.gates[branch])
        .arg(&b.rows64);
    match (saved, branch) {
        (Some(_), 0) => l.arg(&x.lse),
        (Some(sv), _) => l.arg(&sv.lse[1]),
        (None, _) => l.arg(&mut b.lse[branch]),
    };
    l.arg(&mut b.dg[branch]).arg(&mut b.dq);
    let bytes = if saved.is_some() {
        sm.rows64_saved
    } else {
        sm.rows64
    };
    // SAFETY: matches `cmp_bwd_dq` / `win_bwd_dq` (the same signature); one CTA per (row tile,
    // KV head).
    unsafe { l.launch(grid(b.n_rows64, hkv, 128, bytes)) }.map_err(driver_err)?;
    Ok(())
}

/// The compressed branch's dK / dV of the compressed keys (and the reduction of chunked tiles).
pub(super) fn cmp_kv(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    let (x, saved, sm, hkv) = (r.x, r.saved, b.smem, b.hkv);
    if b.n_cmp_kv > 0 {
        let f = b.func("cmp_bwd_dkdv")?;
        let mut l = s.launch_builder(&f);
        l.arg(&x.q)
            .arg(&x.kc)
            .arg(&x.vc)
            .arg(&b.d_o)
            .arg(&x.gates[0])
            .arg(match saved {
                Some(_) => &x.lse,
                None => &b.lse[0],
            })
            .arg(&b.dg[0])
            .arg(&b.cmp_kv)
            .arg(&mut b.dkc)
            .arg(&mut b.dvc)
            .arg(&mut b.pkc)
            .arg(&mut b.pvc);
        // SAFETY: matches `cmp_bwd_dkdv`; one CTA per (key tile of compressed tokens, chunk, KV
        // head), 128 threads per key warpgroup.
        unsafe { l.launch(grid(b.n_cmp_kv, hkv, sm.km_threads(), sm.kv_km)) }
            .map_err(driver_err)?;
    }
    if b.n_cmp_reduce > 0 {
        let f = b.func("cmp_dkdv_reduce")?;
        let mut l = s.launch_builder(&f);
        l.arg(&b.cmp_reduce)
            .arg(&b.pkc)
            .arg(&b.pvc)
            .arg(&mut b.dkc)
            .arg(&mut b.dvc);
        // SAFETY: matches `cmp_dkdv_reduce`; one CTA per (chunked tile, KV head).
        unsafe { l.launch(grid(b.n_cmp_reduce, hkv, 256, 0)) }.map_err(driver_err)?;
    }
    Ok(())
}

/// phi's backward: from the compressed keys' dK / dV to the raw ones (mean, or linear / mlp
/// with the parameter gradients; on the context's stream).
pub(super) fn cmp_phi(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    let (ctx, x, hkv) = (r.ctx, r.x, b.hkv);
    let (n, nseq) = (b.n_tokens as i32, b.nseq as i32);
    if let Some(p) = &mut b.phi {
        p.run(
            ctx,
            &b.kernels,
            x,
            &b.dkc,
            &b.dvc,
            &b.seqs,
            b.nseq,
            &mut b.dk[0],
            &mut b.dv[0],
        )?;
    } else {
        let f = b.func("cmp_mean_bwd")?;
        let items = b.n_tokens * hkv * (b.dk_dim + b.dv_dim) / 4;
        let mut l = s.launch_builder(&f);
        l.arg(&b.dkc)
            .arg(&b.dvc)
            .arg(&b.seqs)
            .arg(&nseq)
            .arg(&n)
            .arg(&mut b.dk[0])
            .arg(&mut b.dv[0]);
        // SAFETY: matches `cmp_mean_bwd`; one thread per (token, head, 4 elements).
        unsafe { l.launch(grid(items.div_ceil(256), 1, 256, 0)) }.map_err(driver_err)?;
    }
    Ok(())
}

/// The window branch's dQ (`+=` into dq).
pub(super) fn win_dq(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    row_dq(r, b, s, 2)
}

/// The window branch's dK / dV.
pub(super) fn win_kv(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    let (x, saved, sm, hkv) = (r.x, r.saved, b.smem, b.hkv);
    let f = b.func("win_bwd_dkdv")?;
    let mut l = s.launch_builder(&f);
    l.arg(&x.q)
        .arg(&x.k[2])
        .arg(&x.v[2])
        .arg(&b.d_o)
        .arg(&x.gates[2])
        .arg(match saved {
            Some(sv) => &sv.lse[1],
            None => &b.lse[2],
        })
        .arg(&b.dg[2])
        .arg(&b.win_kv)
        .arg(&mut b.dk[2])
        .arg(&mut b.dv[2]);
    // SAFETY: matches `win_bwd_dkdv` (128 threads per key warpgroup).
    unsafe { l.launch(grid(b.n_win_kv, hkv, sm.km_threads(), sm.kv_km)) }.map_err(driver_err)?;
    Ok(())
}

/// What the inverse index of one run holds: segments, partial slots, and (fused path) the
/// segment offsets on the host.
pub(super) struct SelIndex {
    pub nsegs: usize,
    pub npslots: usize,
    pub seg_base_host: Vec<i32>,
}

/// The selection branch's inverse index (count, scans, fill), read back on `s` (which this
/// waits for), and the partial-sum buffers grown on `s` when they are short.
pub(super) fn sel_index(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<SelIndex> {
    let (x, saved, hkv) = (r.x, r.saved, b.hkv);
    let (n, nseq, nb) = (b.n_tokens as i32, b.nseq as i32, b.nb as i32);
    let npairs = (hkv * b.nb) as i32;
    let (chunk_len, nchunks) = (b.chunk_len as i32, b.nchunks as i32);
    let seg_len = b.seg_len as i32;
    s.memset_zeros(&mut b.cnt).map_err(driver_err)?;
    {
        let f = b.func("sel_index_count")?;
        let items = b.n_tokens * hkv * b.nsel;
        let mut l = s.launch_builder(&f);
        l.arg(&x.sel_idx)
            .arg(&b.seqs)
            .arg(&nseq)
            .arg(&n)
            .arg(&chunk_len)
            .arg(&nb)
            .arg(&mut b.cnt);
        // SAFETY: matches `sel_index_count`; one thread per index entry.
        unsafe { l.launch(grid(items.div_ceil(256), 1, 256, 0)) }.map_err(driver_err)?;
    }
    {
        let f = b.func("sel_index_chunk_scan")?;
        let mut l = s.launch_builder(&f);
        l.arg(&mut b.cnt)
            .arg(&nchunks)
            .arg(&npairs)
            .arg(&mut b.total);
        // SAFETY: matches `sel_index_chunk_scan`; one thread per pair.
        unsafe { l.launch(grid((npairs as usize).div_ceil(128), 1, 128, 0)) }
            .map_err(driver_err)?;
    }
    {
        let f = b.func("sel_index_scan")?;
        let mut l = s.launch_builder(&f);
        l.arg(&b.total)
            .arg(&npairs)
            .arg(&seg_len)
            .arg(&mut b.base)
            .arg(&mut b.seg_base)
            .arg(&mut b.pslot_base)
            .arg(&mut b.summary);
        // SAFETY: matches `sel_index_scan`; exactly one CTA of 1024 threads.
        unsafe { l.launch(grid(1, 1, 1024, 0)) }.map_err(driver_err)?;
    }
    let fused = saved.is_some() && b.fused_on;
    {
        let with_rank = i32::from(fused);
        let f = b.func("sel_index_fill")?;
        let mut l = s.launch_builder(&f);
        l.arg(&x.sel_idx)
            .arg(&b.seqs)
            .arg(&nseq)
            .arg(&n)
            .arg(&chunk_len)
            .arg(&nb)
            .arg(&mut b.cnt)
            .arg(&b.base)
            .arg(&mut b.list)
            .arg(&with_rank)
            .arg(&mut b.list_rank);
        // SAFETY: matches `sel_index_fill`; one warp per (chunk, KV head); list_rank has an
        // entry per list entry when with_rank is set (the fused path).
        unsafe { l.launch(grid(b.nchunks, hkv, 32, 0)) }.map_err(driver_err)?;
    }
    let summary = s.clone_dtoh(&b.summary).map_err(driver_err)?;
    let seg_base_host = if fused {
        s.clone_dtoh(&b.seg_base).map_err(driver_err)?
    } else {
        Vec::new()
    };
    s.synchronize().map_err(driver_err)?;
    let (nsegs, npslots) = (summary[0].max(0) as usize, summary[1].max(0) as usize);
    b.last_segments = nsegs;
    b.last_partial_slots = npslots;
    if npslots > b.pslot_cap {
        let cap = npslots + npslots / 4;
        // SAFETY: written by sel_bwd_dkdv before sel_dkdv_reduce reads them (stream order).
        b.pk = unsafe { s.alloc::<f32>(cap * x.shape.sel_l * b.dk_dim) }.map_err(driver_err)?;
        // SAFETY: as above.
        b.pv = unsafe { s.alloc::<f32>(cap * x.shape.sel_l * b.dv_dim) }.map_err(driver_err)?;
        b.pslot_cap = cap;
    }
    Ok(SelIndex {
        nsegs,
        npslots,
        seg_base_host,
    })
}

/// The selection branch's dQ (`+=` into dq) on the rows or block-outer path (with recomputed
/// statistics also its lse and dg); the fused path writes it in [`sel_dkdv`].
pub(super) fn sel_dq(r: &Run, b: &mut DeviceBackward, s: &Arc<CudaStream>) -> Result<()> {
    let (x, saved, sm, hkv) = (r.x, r.saved, b.smem, b.hkv);
    if let (Some(sv), true) = (saved, b.selb_dq_on) {
        // block-outer for small G (kernels/sel_block_bwd.cu): adds into dq as sel_bwd_dq does
        let k = &b.kernels;
        let f = sel_block::DqKernels {
            count: k.get("selb_count")?,
            scan: k.get("selb_scan")?,
            fill: k.get("selb_fill")?,
            dq: k.get("selb_bwd_dq")?,
            merge: k.get("selb_dq_merge")?,
        };
        let args = sel_rows_args(x, sv, &b.d_o, &b.dg[1], &mut b.dq);
        b.selb_dq
            .as_mut()
            .ok_or_else(|| NsaError::Cuda("block-outer selection dQ buffers not allocated".into()))?
            .run(s, &x.shape, &f, args)?;
    } else {
        let f = b.func(&r.dq_name("sel_bwd_dq"))?;
        let mut l = s.launch_builder(&f);
        l.arg(&x.q)
            .arg(&x.k[1])
            .arg(&x.v[1])
            .arg(&b.d_o)
            .arg(&x.gates[1])
            .arg(&b.rows_sel)
            .arg(&x.sel_idx);
        match saved {
            Some(sv) => l.arg(&sv.lse[0]),
            None => l.arg(&mut b.lse[1]),
        };
        l.arg(&mut b.dg[1]).arg(&mut b.dq);
        // SAFETY: matches `sel_bwd_dq`.
        unsafe { l.launch(grid(b.n_rows_sel, hkv, sm.sel_threads, sm.rows_sel)) }
            .map_err(driver_err)?;
    }
    Ok(())
}

/// The selection branch's dK / dV through the inverse index (and the reduction of split lists);
/// on the fused path also its dQ, whose merges into dq first wait for `dq_ready` when given.
pub(super) fn sel_dkdv(
    r: &Run,
    b: &mut DeviceBackward,
    s: &Arc<CudaStream>,
    ix: &SelIndex,
    dq_ready: Option<&CudaEvent>,
) -> Result<()> {
    let (x, saved, sm, hkv) = (r.x, r.saved, b.smem, b.hkv);
    let (nsegs, npslots) = (ix.nsegs, ix.npslots);
    let nb = b.nb as i32;
    let npairs = (hkv * b.nb) as i32;
    let seg_len = b.seg_len as i32;
    let fused = saved.is_some() && b.fused_on;
    s.memset_zeros(&mut b.dk[1]).map_err(driver_err)?;
    s.memset_zeros(&mut b.dv[1]).map_err(driver_err)?;
    if let (Some(sv), true) = (saved, fused) {
        let k = &b.kernels;
        let f = sel_fused::FusedKernels {
            fused: k.get("sel_bwd_dkdv_dq")?,
            merge: k.get("selb_dq_merge")?,
        };
        let args = sel_fused::FusedArgs {
            rows: sel_rows_args(x, sv, &b.d_o, &b.dg[1], &mut b.dq),
            blocks: &b.blocks,
            total: &b.total,
            base: &b.base,
            seg_base: &b.seg_base,
            pslot_base: &b.pslot_base,
            list: &b.list,
            list_rank: &b.list_rank,
            seg_base_host: &ix.seg_base_host,
            nb: b.nb,
            seg_len: b.seg_len,
            dk: &mut b.dk[1],
            dv: &mut b.dv[1],
            pk: &mut b.pk,
            pv: &mut b.pv,
        };
        b.fused
            .as_mut()
            .ok_or_else(|| NsaError::Cuda("fused selection dQ buffers not allocated".into()))?
            .run(s, &f, args, dq_ready)?;
    } else if nsegs > 0 {
        let f = b.func("sel_bwd_dkdv")?;
        let mut l = s.launch_builder(&f);
        l.arg(&x.q)
            .arg(&x.k[1])
            .arg(&x.v[1])
            .arg(&b.d_o)
            .arg(&x.gates[1])
            .arg(match saved {
                Some(sv) => &sv.lse[0],
                None => &b.lse[1],
            })
            .arg(&b.dg[1])
            .arg(&b.blocks)
            .arg(&nb)
            .arg(&b.total)
            .arg(&b.base)
            .arg(&b.seg_base)
            .arg(&b.pslot_base)
            .arg(&b.list)
            .arg(&seg_len)
            .arg(&mut b.dk[1])
            .arg(&mut b.dv[1])
            .arg(&mut b.pk)
            .arg(&mut b.pv);
        // SAFETY: matches `sel_bwd_dkdv`; one CTA per segment (summary[0] of this run).
        unsafe { l.launch(grid(nsegs, 1, 128, sm.kv)) }.map_err(driver_err)?;
    }
    if npslots > 0 {
        let f = b.func("sel_dkdv_reduce")?;
        let mut l = s.launch_builder(&f);
        l.arg(&b.blocks)
            .arg(&nb)
            .arg(&b.seg_base)
            .arg(&b.pslot_base)
            .arg(&b.pk)
            .arg(&b.pv)
            .arg(&mut b.dk[1])
            .arg(&mut b.dv[1]);
        // SAFETY: matches `sel_dkdv_reduce`; one CTA per pair (most return at once).
        unsafe { l.launch(grid(npairs as usize, 1, 256, 0)) }.map_err(driver_err)?;
    }
    Ok(())
}
