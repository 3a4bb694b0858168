//! NVRTC compilation of the backward kernel families. Each family is compiled as
//! `common.cu` + `bwd_common.cu` + its own file, with the same `-D` shape options as the forward
//! (`module::options`), straight to a CUBIN, cached on disk by a hash of source and options (the
//! same cache folder as the forward: `NSA_KERNEL_CACHE` or `~/.cache/nsa-kernels`).

use crate::cuda::module::{self, Shape};
use crate::cuda::{driver_err, CudaContext};
use crate::error::{NsaError, Result};
use cudarc::driver::CudaFunction;
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

const COMMON: &str = include_str!("../kernels/common.cu");
const BWD_COMMON: &str = include_str!("../kernels/bwd_common.cu");

/// One backward kernel family (one `.cu` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BwdFamily {
    /// Compression branch: dQ/statistics, dKcmp/dVcmp, phi = mean backward.
    Cmp,
    /// Sliding-window branch.
    Win,
    /// Selection branch: dQ/statistics, inverse index, dK/dV, partial reduction.
    Sel,
    /// phi = linear / mlp backward: strided f32 GEMMs, column sums, the scatter to raw K/V.
    Phi,
}

impl BwdFamily {
    /// Every family, for compile-only checks.
    pub const ALL: [BwdFamily; 4] = [
        BwdFamily::Cmp,
        BwdFamily::Win,
        BwdFamily::Sel,
        BwdFamily::Phi,
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
            ],
            BwdFamily::Phi => &["phi_bwd_gemm", "phi_bwd_colsum", "phi_bwd_scatter"],
        }
    }

    fn file(self) -> &'static str {
        match self {
            BwdFamily::Cmp => "cmp_bwd.cu",
            BwdFamily::Win => "win_bwd.cu",
            BwdFamily::Sel => "sel_bwd.cu",
            BwdFamily::Phi => "phi_bwd.cu",
        }
    }
}

/// Result of one compilation: the CUBIN and NVRTC's log.
pub struct BwdCompiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn cache_path(key: u64) -> Option<PathBuf> {
    let base = std::env::var_os("NSA_KERNEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nsa-kernels"))
        })?;
    Some(base.join(format!("bwd-{key:016x}.cubin")))
}

fn err(family: BwdFamily, log: String) -> NsaError {
    NsaError::KernelCompile {
        kernel: family.file().to_string(),
        log,
    }
}

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
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    opts.hash(&mut h);
    let path = cache_path(h.finish());
    if extra.is_empty() {
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            return Ok(BwdCompiled {
                cubin: bytes,
                log: String::new(),
            });
        }
    }
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(NsaError::CudaUnavailable(
            "the NVRTC library (libnvrtc) was not found".into(),
        ));
    }
    let csrc = CString::new(src).map_err(|e| err(family, format!("source: {e}")))?;
    let name = CString::new(family.file()).expect("no NUL in names");
    let prog = nvrtc_result::create_program(&csrc, Some(&name))
        .map_err(|e| err(family, format!("create: {e:?}")))?;
    // SAFETY: `prog` comes from create_program and is destroyed once below; the CStrings outlive it.
    let res = unsafe { nvrtc_result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { nvrtc_result::get_program_log(prog) }
        .map(|v| {
            let bytes: Vec<u8> = v.iter().map(|&c| c as u8).collect();
            CStr::from_bytes_until_nul(&bytes)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let out = match res {
        Err(e) => Err(err(family, format!("{e:?} with options {opts:?}\n{log}"))),
        Ok(()) => {
            let mut size = 0usize;
            let mut cubin = Vec::new();
            // SAFETY: `prog` compiled; the buffer has the size NVRTC reported.
            let r = unsafe {
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        cubin.resize(size, 0u8);
                        nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _).result()
                    })
            };
            r.map(|_| BwdCompiled { cubin, log })
                .map_err(|e| err(family, format!("get cubin: {e:?}")))
        }
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    let out = out?;
    if let Some(p) = path {
        // best effort: a read-only home only costs a recompilation next time
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &out.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(out)
}

/// The loaded backward kernels of one shape, by name.
pub struct BwdKernels {
    fns: HashMap<&'static str, CudaFunction>,
}

impl BwdKernels {
    /// Compiles (through the disk cache) and loads every family; `smem` gives the dynamic shared
    /// memory limit to raise per kernel name.
    pub fn load(ctx: &CudaContext, shape: &Shape, smem: &[(&str, usize)]) -> Result<Self> {
        let mut fns = HashMap::new();
        for fam in BwdFamily::ALL {
            let c = compile_bwd(fam, shape, &ctx.arch, &[])?;
            let m = ctx
                .ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin))
                .map_err(driver_err)?;
            for &name in fam.kernels() {
                let f = m.load_function(name).map_err(driver_err)?;
                if let Some(&(_, bytes)) = smem.iter().find(|(n, _)| *n == name) {
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(driver_err)?;
                }
                fns.insert(name, f);
            }
        }
        Ok(BwdKernels { fns })
    }

    /// The kernel `name` (one of the families' `kernels()`).
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.fns
            .get(name)
            .ok_or_else(|| NsaError::Cuda(format!("backward kernel `{name}` not loaded")))
    }
}
