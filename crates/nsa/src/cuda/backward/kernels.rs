//! NVRTC compilation of the backward kernel families. Each family is compiled as
//! `common.cu` + `bwd_common.cu` + its own file, with the same `-D` shape options as the forward
//! (`module::options`), straight to a CUBIN through the forward's compiler and disk cache
//! (`module::compile_source`: `NSA_KERNEL_CACHE` or `~/.cache/nsa-kernels`).

use crate::cuda::module::{self, Shape};
use crate::cuda::{driver_err, raise_smem_limit, CudaContext};
use crate::error::{NsaError, Result};
use cudarc::driver::CudaFunction;
use std::collections::HashMap;

const COMMON: &str = include_str!("../kernels/common.cu");
const BWD_COMMON: &str = include_str!("../kernels/bwd_common.cu");

/// One backward kernel family (one `.cu` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BwdFamily {
    /// Compression branch: dQ/statistics, dKcmp/dVcmp, phi = mean backward.
    Cmp,
    /// Sliding-window branch.
    Win,
    /// Selection branch: dQ/statistics, inverse index, dK/dV (and the fused dK/dV + dQ
    /// partials, `sel_bwd_dkdv_dq`, the default where built), partial reduction.
    Sel,
    /// phi = linear / mlp backward: strided f32 GEMMs, column sums, the scatter to raw K/V.
    Phi,
    /// Selection dQ, block-outer, for small G (saved statistics): the forward's chunked inverse
    /// index (sel_block.cu) and `selb_bwd_dq` / `selb_dq_merge` (sel_block_bwd.cu).
    SelBlock,
}

impl BwdFamily {
    /// Every family, for compile-only checks.
    pub const ALL: [BwdFamily; 5] = [
        BwdFamily::Cmp,
        BwdFamily::Win,
        BwdFamily::Sel,
        BwdFamily::Phi,
        BwdFamily::SelBlock,
    ];

    /// The family's own source.
    pub fn source(self) -> &'static str {
        match self {
            // the wgmma helpers and the backward's wgmma key-major path (sm_90a) first
            BwdFamily::Cmp => concat!(
                include_str!("../kernels/wgmma.cu"),
                include_str!("../kernels/bwd_wgmma.cu"),
                include_str!("../kernels/cmp_bwd.cu")
            ),
            BwdFamily::Win => concat!(
                include_str!("../kernels/wgmma.cu"),
                include_str!("../kernels/bwd_wgmma.cu"),
                include_str!("../kernels/win_bwd.cu")
            ),
            BwdFamily::Sel => concat!(
                include_str!("../kernels/wgmma.cu"),
                include_str!("../kernels/bwd_wgmma.cu"),
                include_str!("../kernels/sel_bwd.cu")
            ),
            BwdFamily::Phi => include_str!("../kernels/phi_bwd.cu"),
            BwdFamily::SelBlock => concat!(
                include_str!("../kernels/sel_block.cu"),
                include_str!("../kernels/sel_block_bwd.cu")
            ),
        }
    }

    /// The `extern "C"` kernels the family defines.
    pub fn kernels(self) -> &'static [&'static str] {
        match self {
            BwdFamily::Cmp => &[
                "cmp_bwd_dq",
                "cmp_bwd_dq_saved",
                "cmp_bwd_dkdv",
                "cmp_dkdv_reduce",
                "cmp_mean_bwd",
                "bwd_gate_dot",
            ],
            BwdFamily::Win => &["win_bwd_dq", "win_bwd_dq_saved", "win_bwd_dkdv"],
            BwdFamily::Sel => &[
                "sel_bwd_dq",
                "sel_bwd_dq_saved",
                "sel_index_count",
                "sel_index_chunk_scan",
                "sel_index_scan",
                "sel_index_fill",
                "sel_bwd_dkdv",
                "sel_dkdv_reduce",
                "sel_bwd_dkdv_dq",
            ],
            BwdFamily::Phi => &["phi_bwd_gemm", "phi_bwd_colsum", "phi_bwd_scatter"],
            BwdFamily::SelBlock => &[
                "selb_count",
                "selb_scan",
                "selb_fill",
                "selb_bwd_dq",
                "selb_dq_merge",
            ],
        }
    }

    fn file(self) -> &'static str {
        match self {
            BwdFamily::Cmp => "cmp_bwd.cu",
            BwdFamily::Win => "win_bwd.cu",
            BwdFamily::Sel => "sel_bwd.cu",
            BwdFamily::Phi => "phi_bwd.cu",
            BwdFamily::SelBlock => "sel_block_bwd.cu",
        }
    }
}

/// Result of one compilation: the CUBIN and NVRTC's log.
pub type BwdCompiled = module::Compiled;

/// Compiles one backward family for `arch` (needs only NVRTC, no GPU). `extra` options (e.g.
/// `--ptxas-options=-v`) bypass the disk cache so the log is fresh.
pub fn compile_bwd(
    family: BwdFamily,
    shape: &Shape,
    arch: &str,
    extra: &[&str],
) -> Result<BwdCompiled> {
    let mut opts = module::options(shape, arch);
    opts.extend(extra.iter().map(|s| s.to_string()));
    let src = format!(
        "{COMMON}\n// ---- backward prelude ----\n{BWD_COMMON}\n// ---- family {} ----\n{}",
        family.file(),
        family.source()
    );
    module::compile_source(family.file(), family.file(), &src, &opts, !extra.is_empty())
}

/// The loaded backward kernels of one shape, by name.
pub struct BwdKernels {
    fns: HashMap<&'static str, CudaFunction>,
}

impl BwdKernels {
    /// Compiles (through the disk cache) and loads every family (`SelBlock` only with
    /// `with_selb`: the block-outer selection dQ is enabled for the shape); `smem` gives the
    /// dynamic shared memory limit to raise per kernel name.
    pub fn load(
        ctx: &CudaContext,
        shape: &Shape,
        smem: &[(&str, usize)],
        with_selb: bool,
    ) -> Result<Self> {
        let mut k = BwdKernels {
            fns: HashMap::new(),
        };
        for fam in BwdFamily::ALL {
            if fam != BwdFamily::SelBlock || with_selb {
                k.load_family(ctx, shape, fam, smem)?;
            }
        }
        Ok(k)
    }

    /// Compiles (through the disk cache) and loads `fam` unless it is loaded already.
    pub fn ensure(
        &mut self,
        ctx: &CudaContext,
        shape: &Shape,
        fam: BwdFamily,
        smem: &[(&str, usize)],
    ) -> Result<()> {
        if fam.kernels().iter().all(|n| self.fns.contains_key(n)) {
            return Ok(());
        }
        self.load_family(ctx, shape, fam, smem)
    }

    fn load_family(
        &mut self,
        ctx: &CudaContext,
        shape: &Shape,
        fam: BwdFamily,
        smem: &[(&str, usize)],
    ) -> Result<()> {
        let c = compile_bwd(fam, shape, &ctx.arch, &[])?;
        let m = ctx
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin))
            .map_err(driver_err)?;
        for &name in fam.kernels() {
            let f = m.load_function(name).map_err(driver_err)?;
            if let Some(&(_, bytes)) = smem.iter().find(|(n, _)| *n == name) {
                raise_smem_limit(&f, bytes)?;
            }
            self.fns.insert(name, f);
        }
        Ok(())
    }

    /// The kernel `name` (one of the families' `kernels()`).
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.fns
            .get(name)
            .ok_or_else(|| NsaError::Cuda(format!("backward kernel `{name}` not loaded")))
    }
}
