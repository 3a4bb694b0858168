//! NVRTC compilation of the kernel families, with the shape constants and the 16-bit element type
//! (bf16, or f16 through `-DELEM_F16`) baked in as `-D` defines,
//! straight to a CUBIN for the device's architecture (no PTX JIT, so the driver's PTX version
//! limit never matters), cached in memory per process and on disk (keyed by a hash of source,
//! options and architecture).

use crate::elem::Elem;
use crate::error::{NsaError, Result};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use std::collections::hash_map::DefaultHasher;
use std::ffi::{CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

/// The shared prelude (16-bit element helpers, bf16 or f16 by `-DELEM_F16`, mma.sync / ldmatrix /
/// cp.async wrappers, the flash tile).
const COMMON: &str = include_str!("kernels/common.cu");

/// One kernel family: its source file and the kernels it defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `phi = mean`: compressed K/V.
    Compress,
    /// Compressed attention (`cmp_attn`), then selection scores + top-n (`cmp_topn`).
    CmpAttn,
    /// Attention over the selected blocks.
    SelAttn,
    /// Sliding-window attention.
    WinAttn,
    /// Device-side random inputs (benchmarks), in the shape's element type.
    Fill,
    /// Decoding over the paged cache (cuda/decode.rs): write, attention splits, top-n, combine.
    Decode,
    /// phi = linear / mlp: small GEMMs into the compressed K/V.
    Phi,
    /// Block-outer selected attention for small groups (cuda/sel_block.rs): inverse index,
    /// per-block partials, merge.
    SelBlock,
}

impl Family {
    /// Every family, for compile-only checks.
    pub const ALL: [Family; 8] = [
        Family::Compress,
        Family::CmpAttn,
        Family::SelAttn,
        Family::WinAttn,
        Family::Fill,
        Family::Decode,
        Family::Phi,
        Family::SelBlock,
    ];

    /// The `.cu` source of the family (without the prelude).
    pub fn source(self) -> &'static str {
        match self {
            Family::Compress => include_str!("kernels/compress.cu"),
            // the wgmma helpers (sm_90a) first: cmp_attn.cu uses them (-DCMP_NO_WGMMA: mma.sync only)
            Family::CmpAttn => concat!(
                include_str!("kernels/wgmma.cu"),
                include_str!("kernels/cmp_attn.cu")
            ),
            Family::SelAttn => include_str!("kernels/sel_attn.cu"),
            // the same wgmma helpers: win_attn.cu runs on them where cmp_attn does
            Family::WinAttn => concat!(
                include_str!("kernels/wgmma.cu"),
                include_str!("kernels/win_attn.cu")
            ),
            Family::Fill => include_str!("kernels/fill.cu"),
            Family::Phi => include_str!("kernels/phi.cu"),
            Family::Decode => include_str!("kernels/decode_attn.cu"),
            Family::SelBlock => include_str!("kernels/sel_block.cu"),
        }
    }

    /// The name of the family's `extern "C"` kernel.
    pub fn kernel(self) -> &'static str {
        match self {
            Family::Compress => "compress_mean",
            Family::CmpAttn => "cmp_attn",
            Family::SelAttn => "sel_attn",
            Family::WinAttn => "win_attn",
            Family::Fill => "fill_normal_bf16",
            Family::Phi => "phi_gemm",
            Family::Decode => "decode_attn_cw",
            Family::SelBlock => "selb_attn",
        }
    }
}

/// Row tiles per warp for a value dim: 2 when the accumulators fit (dv <= 128), else 1;
/// `NSA_CUDA_MT=1|2` overrides (experiments).
pub fn default_mt(dv: usize) -> usize {
    match std::env::var("NSA_CUDA_MT").ok().as_deref() {
        Some("1") => 1,
        Some("2") if dv <= 128 => 2,
        _ => {
            if dv <= 128 {
                2
            } else {
                1
            }
        }
    }
}

/// Shape constants baked into every kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub dk: usize,
    pub dv: usize,
    pub hq: usize,
    pub hkv: usize,
    pub cmp_l: usize,
    pub cmp_d: usize,
    pub sel_l: usize,
    pub nsel: usize,
    pub ninit: usize,
    pub nlocal: usize,
    pub win: usize,
    /// softmax scale (natural units); the kernels get `scale * log2(e)`.
    pub scale: f64,
    /// m16 row tiles per warp in the compressed and window kernels (1 or 2).
    pub mt: usize,
    /// The 16-bit element type of Q/K/V (`-DELEM_F16` for f16; common.cu).
    pub elem: Elem,
}

impl Shape {
    /// The `-D` options of this shape (the element type's define last, bf16 adds none).
    pub fn defines(&self) -> Vec<String> {
        let scale_log2 = self.scale * std::f64::consts::LOG2_E;
        let mut d = vec![
            format!("-DDK={}", self.dk),
            format!("-DDV={}", self.dv),
            format!("-DHQ={}", self.hq),
            format!("-DHKV={}", self.hkv),
            format!("-DG={}", self.hq / self.hkv),
            format!("-DCMP_L={}", self.cmp_l),
            format!("-DCMP_D={}", self.cmp_d),
            format!("-DSEL_L={}", self.sel_l),
            format!("-DNSEL={}", self.nsel),
            format!("-DNINIT={}", self.ninit),
            format!("-DNLOCAL={}", self.nlocal),
            format!("-DWIN={}", self.win),
            format!("-DMT_WIDE={}", self.mt),
            // exact f32 value as a hex-float literal, no rounding through decimal
            format!(
                "-DSCALE_LOG2=__int_as_float({:#x})",
                (scale_log2 as f32).to_bits()
            ),
        ];
        if self.elem == Elem::F16 {
            d.push("-DELEM_F16".to_string());
        }
        d
    }

    /// This shape with element type `elem`.
    pub fn with_elem(mut self, elem: Elem) -> Self {
        self.elem = elem;
        self
    }
}

/// The full option list for one compilation.
pub fn options(shape: &Shape, arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
        "--use_fast_math".to_string(),
    ];
    o.extend(shape.defines());
    // experiments only (e.g. NSA_CUDA_DEFINES="-DEXP_NO_MERGE"): timing of partial kernels
    o.extend(extra_defines());
    o
}

/// The extra NVRTC options of `NSA_CUDA_DEFINES` (experiment switches), split on whitespace.
fn extra_defines() -> Vec<String> {
    std::env::var("NSA_CUDA_DEFINES")
        .map(|d| d.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether `NSA_CUDA_DEFINES` holds `define` (e.g. `-DTOPN_WARP_MERGE`).
pub(crate) fn define_set(define: &str) -> bool {
    extra_defines().iter().any(|x| x == define)
}

/// The value `N` of `-D<name>=N` in `NSA_CUDA_DEFINES`, if set: the host mirrors such kernel
/// switches in its shared-memory and buffer sizes.
pub(crate) fn define_value(name: &str) -> Option<usize> {
    let prefix = format!("-D{name}=");
    extra_defines()
        .iter()
        .find_map(|x| x.strip_prefix(&prefix)?.parse().ok())
}

/// Result of one NVRTC compilation.
pub struct Compiled {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings; resource usage when asked for).
    pub log: String,
}

fn disk_cache_path(key: u64) -> Option<PathBuf> {
    let base = std::env::var_os("NSA_KERNEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nsa-kernels"))
        })?;
    Some(base.join(format!("{key:016x}.cubin")))
}

/// The whole source NVRTC compiles for `family`: the shared prelude, then the family's file(s).
fn family_source(family: Family) -> String {
    format!(
        "{COMMON}\n// ---- family {:?} ----\n{}",
        family,
        family.source()
    )
}

/// Hash of everything that determines a CUBIN: the whole source and the options (the
/// architecture and the baked defines among them).
fn source_key(src: &str, opts: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    opts.hash(&mut h);
    h.finish()
}

/// The disk-cache key [`compile`] uses for `family` with `opts` (the host tests check what it
/// depends on).
#[cfg(test)]
pub fn cache_key(family: Family, opts: &[String]) -> u64 {
    source_key(&family_source(family), opts)
}

/// Compiles one family to a CUBIN for `arch` (e.g. `sm_90a`), through the disk cache.
/// Needs only the NVRTC library, no GPU.
pub fn compile(family: Family, shape: &Shape, arch: &str, extra: &[&str]) -> Result<Compiled> {
    let mut opts = options(shape, arch);
    opts.extend(extra.iter().map(|s| s.to_string()));
    let kernel = family.kernel();
    compile_source(
        kernel,
        &format!("{kernel}.cu"),
        &family_source(family),
        &opts,
        !extra.is_empty(),
    )
}

/// Compiles the whole CUDA source `src` with `opts` to a CUBIN through the disk cache (keyed by
/// [`source_key`]); `fresh` skips reading the cache (callers that pass extra options such as
/// `--ptxas-options=-v` want NVRTC's log). `program` names the source in NVRTC's messages,
/// `kernel` the failing kernel in a `KernelCompile` error. Shared by the forward families and
/// the backward's (`backward/kernels.rs`).
pub(crate) fn compile_source(
    kernel: &str,
    program: &str,
    src: &str,
    opts: &[String],
    fresh: bool,
) -> Result<Compiled> {
    let path = disk_cache_path(source_key(src, opts));
    if !fresh {
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            return Ok(Compiled {
                cubin: bytes,
                log: String::new(),
            });
        }
    }
    let compiled = compile_uncached(kernel, program, src, opts)?;
    if let Some(p) = path {
        // best effort: a read-only home only costs a recompilation next time
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &compiled.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(compiled)
}

fn nvrtc_err(kernel: &str, what: &str, e: impl std::fmt::Debug) -> NsaError {
    NsaError::KernelCompile {
        kernel: kernel.to_string(),
        log: format!("{what}: {e:?}"),
    }
}

fn compile_uncached(kernel: &str, program: &str, src: &str, opts: &[String]) -> Result<Compiled> {
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(NsaError::CudaUnavailable(
            "the NVRTC library (libnvrtc) was not found".into(),
        ));
    }
    let csrc = CString::new(src).map_err(|e| nvrtc_err(kernel, "source", e))?;
    let name = CString::new(program).map_err(|e| nvrtc_err(kernel, "program name", e))?;
    let prog = nvrtc_result::create_program(&csrc, Some(&name))
        .map_err(|e| nvrtc_err(kernel, "create", e))?;
    // SAFETY: `prog` comes from create_program and is destroyed exactly once below; the source
    // and name CStrings outlive it.
    let res = unsafe { nvrtc_result::compile_program(prog, opts) };
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
        Err(e) => Err(NsaError::KernelCompile {
            kernel: kernel.to_string(),
            log: format!("{e:?} with options {opts:?}\n{log}"),
        }),
        Ok(()) => {
            let mut size = 0usize;
            let mut cubin = Vec::new();
            // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reported.
            let r = unsafe {
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        cubin.resize(size, 0u8);
                        nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _).result()
                    })
            };
            r.map(|_| Compiled { cubin, log })
                .map_err(|e| nvrtc_err(kernel, "get cubin", e))
        }
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    out
}
