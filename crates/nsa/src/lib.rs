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
//! - [`replay`]: prefill-then-decode through a cache, reassembled like a forward;
//! - [`testing`]: comparison helpers.
//!
//! The entry points [`forward`], [`backward`] and [`decode_replay`] dispatch on a [`Device`].

pub mod blocks;
pub mod cache;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod inputs;
mod op;
pub mod reference;
pub mod replay;
pub mod testing;

pub use config::{NsaConfig, NsaConfigBuilder, PhiKind};
pub use error::{NsaError, Result};
pub use inputs::{NsaGrads, NsaInputs, NsaOutput, PhiParams, PhiShapes, PhiWeights};
pub use op::{
    backward, decode_replay, forward, reference_backward, reference_decode_replay,
    reference_forward, Device,
};
