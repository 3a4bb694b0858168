//! Native Sparse Attention (Yuan et al., DeepSeek, arXiv 2502.11089).
//!
//! Each query attends through three branches mixed by gates: compressed blocks of keys,
//! the top-n selection blocks ranked by the compressed attention, and a sliding window.
//! `SPEC.md` (in the repository's shared folder) fixes the exact semantics; the modules:
//!
//! - [`config`]: hyper-parameters and their rules; [`error`]: the typed errors;
//! - [`inputs`]: the tensors of a call (packed, `cu_seqlens`), `phi` parameters, outputs, grads;
//! - [`blocks`]: the block index arithmetic every backend shares;
//! - [`cache`]: decoding state (raw K/V, rolling compression buffer, compressed K/V);
//! - [`reference`](mod@reference): float64 forward, backward and decoding, plain loops: the oracle;
//! - [`cpu`]: the fast f32 path (blocked, multi-threaded); `cuda` (feature `cuda`): the GPU kernels;
//! - [`elem`]: the 16-bit element types of the GPU kernels (bf16, f16) and the rounding to them;
//! - [`replay`]: prefill-then-decode through a cache, reassembled like a forward;
//! - [`testing`]: comparison helpers.
//!
//! The entry points [`forward`], [`backward`] and [`decode_replay`] dispatch on a [`Device`].
//!
//! ```
//! use nsa::{Device, NsaConfig, NsaInputs, PhiParams};
//!
//! // 8 query heads over 2 KV heads, small blocks so that the example is quick.
//! let cfg = NsaConfig::builder()
//!     .heads(8)
//!     .kv_heads(2)
//!     .cmp_block(16)
//!     .cmp_stride(8)
//!     .sel_block(32)
//!     .sel_count(4)
//!     .window(64)
//!     .build()?;
//! // A packed batch of two sequences (300 and 77 tokens), dk = dv = 32.
//! let x = NsaInputs::random(&cfg, &[300, 77], 32, 32, false, 7);
//! let phi = PhiParams::mean();
//! let out = nsa::forward(&Device::Cpu, &cfg, &x, &phi)?;
//! assert_eq!(out.o.len(), x.num_tokens() * cfg.heads * 32);
//!
//! // The float64 reference computes the same function.
//! let oracle = nsa::reference_forward(&cfg, &x, &phi)?;
//! assert!(nsa::testing::rel_rms(&out.o, &oracle.o) < 1e-5);
//!
//! // Gradients of sum(o * d_o) for every input.
//! let d_o = vec![1.0f32; out.o.len()];
//! let grads = nsa::backward(&Device::Cpu, &cfg, &x, &phi, &d_o)?;
//! assert_eq!(grads.dq.len(), x.q.len());
//!
//! // Bad input is a typed error, not a panic.
//! assert!(NsaConfig::builder().heads(6).kv_heads(4).build().is_err());
//! # Ok::<(), nsa::NsaError>(())
//! ```

pub mod blocks;
pub mod cache;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod elem;
pub mod error;
pub mod inputs;
mod op;
pub mod reference;
pub mod replay;
pub mod testing;

pub use config::{NsaConfig, NsaConfigBuilder, PhiKind};
pub use elem::Elem;
pub use error::{NsaError, Result};
pub use inputs::{NsaGrads, NsaInputs, NsaOutput, PhiParams, PhiShapes, PhiWeights};
pub use op::{
    backward, backward_as, decode_replay, decode_replay_as, forward, forward_as,
    reference_backward, reference_decode_replay, reference_forward, Device,
};
