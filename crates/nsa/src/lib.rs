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
//! - [`reference`]: float64 forward, backward and decoding, plain loops: the oracle;
//! - [`testing`]: comparison helpers.

pub mod blocks;
pub mod cache;
pub mod config;
pub mod cpu;
pub mod error;
pub mod inputs;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod testing;

pub use config::{NsaConfig, NsaConfigBuilder, PhiKind};
pub use error::{NsaError, Result};
pub use inputs::{NsaGrads, NsaInputs, NsaOutput, PhiParams, PhiShapes, PhiWeights};
