//! The one error type of the crate: every bad input is a typed value, never a panic.

use thiserror::Error;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, NsaError>;

/// Everything that can go wrong when configuring or running NSA.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum NsaError {
    /// A size in the configuration (or a head dimension) is zero.
    #[error("`{0}` must be greater than zero")]
    ZeroSize(&'static str),
    /// `heads % kv_heads != 0`.
    #[error("query heads ({heads}) must be a multiple of kv heads ({kv_heads})")]
    HeadsNotDivisible { heads: usize, kv_heads: usize },
    /// The compression stride `d` must divide a block length (`l` or `l'`).
    #[error("compression stride d={stride} must divide {what}={block}")]
    StrideNotDividing {
        what: &'static str,
        block: usize,
        stride: usize,
    },
    /// `l > l'`.
    #[error("compression block l={cmp_block} must not exceed selection block l'={sel_block}")]
    CmpBlockTooLarge { cmp_block: usize, sel_block: usize },
    /// `n < n_init + n_local`.
    #[error(
        "sel_count n={sel_count} is smaller than the forced blocks (init {init} + local {local})"
    )]
    TooFewSelected {
        sel_count: usize,
        init: usize,
        local: usize,
    },
    /// The softmax scale is not a positive finite number.
    #[error("scale must be positive and finite, got {0}")]
    BadScale(f64),
    /// A tensor has the wrong number of elements or the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor that the operation needs is not there.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// `cu_seqlens` is malformed (not starting at 0, decreasing, or not ending at the token count).
    #[error("bad cu_seqlens: {0}")]
    BadSeqLens(String),
    /// A sequence (or the whole batch) has no tokens.
    #[error("empty sequence: {0}")]
    EmptySequence(String),
    /// Some element offset would not fit the index type of a backend.
    #[error("{what} = {value} overflows {limit}-bit indexing")]
    IndexOverflow {
        what: &'static str,
        value: u128,
        limit: u32,
    },
    /// A tensor's element type is not one the operation accepts.
    #[error("tensor `{name}`: unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    /// The requested operation is not supported for this configuration or backend.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A decode cache ran out of room.
    #[error("decode cache full: capacity {capacity} tokens, needed {needed}")]
    CacheFull { capacity: usize, needed: usize },
    /// The decode inputs do not line up with the caches.
    #[error("decode: {0}")]
    Decode(String),
    /// A file could not be read or written.
    #[error("i/o: {0}")]
    Io(String),
    /// A file was read but its content is not in the expected format.
    #[error("format: {0}")]
    Format(String),
    /// No CUDA driver, no GPU, or the crate was built without the `cuda` feature.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// NVRTC rejected a kernel.
    #[error("kernel `{kernel}` failed to compile: {log}")]
    KernelCompile { kernel: String, log: String },
    /// The device ran out of memory.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// Any other CUDA driver error.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

impl From<std::io::Error> for NsaError {
    fn from(e: std::io::Error) -> Self {
        NsaError::Io(e.to_string())
    }
}

impl From<serde_json::Error> for NsaError {
    fn from(e: serde_json::Error) -> Self {
        NsaError::Format(e.to_string())
    }
}
